"""Self-supervised pre-training methods: SparK and the contrastive baselines of the seed paper.

Every method is an ``SSLMethod`` (``ctssl.ssl.base``) wrapping a ``ctssl.models`` encoder (ResNet, ConvNeXt)
backbone; ``create_method(name, encoder, backend, **hparams)`` builds one by name.

Library decision (issue 7): the losses and heads are written here, not taken from lightly.
``pip install --dry-run lightly`` (1.6.0) in the project venv keeps torch 2.14.1 and
torchvision, but pulls 15 further packages (pytorch-lightning, torchmetrics, hydra-core,
omegaconf, aiohttp and its dependencies) that ctssl does not otherwise need; the GPU machine
has no package index, so each would have to be carried as a wheel; and the losses we need
(NT-Xent, InfoNCE with a queue, BYOL's regression, SwAV's Sinkhorn + swapped prediction)
are a few lines each, here tested against direct formulas, with the cross-rank gathering
the brief asks for in one place (``ctssl.ssl.distributed``).
"""
from __future__ import annotations

import importlib

from .base import SSLMethod

_METHODS = {
    "spark": ("ctssl.ssl.spark", "SparK"),
    "simclr": ("ctssl.ssl.simclr", "SimCLR"),
    "mocov2": ("ctssl.ssl.mocov2", "MoCoV2"),
    "byol": ("ctssl.ssl.byol", "BYOL"),
    "swav": ("ctssl.ssl.swav", "SwAV"),
}
METHODS: tuple[str, ...] = tuple(_METHODS)


def method_class(name: str) -> type[SSLMethod]:
    """The ``SSLMethod`` subclass called ``name`` (for its ``default_hparams`` without building it)."""
    if name not in _METHODS:
        raise ValueError(f"unknown SSL method {name!r}; choose one of {', '.join(METHODS)}")
    module, cls = _METHODS[name]
    return getattr(importlib.import_module(module), cls)


def create_method(name: str, encoder, backend: str = "auto", **hparams) -> SSLMethod:
    """Build method ``name`` around ``encoder``; ``hparams`` override its ``default_hparams``.

    ``backend`` selects the sparse engine for SparK; the contrastive methods run the encoder
    densely and ignore it.
    """
    return method_class(name)(encoder, backend, **hparams)


__all__ = ["SSLMethod", "METHODS", "create_method", "method_class"]
