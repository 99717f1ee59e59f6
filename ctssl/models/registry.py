"""Encoders by name: every backbone family registers its constructors here.

An encoder is an ``nn.Module`` with the contract the SSL methods, fine-tuning and the
benchmarks rely on:

- ``forward(images)`` -> class logits; ``reset_classifier(num_classes)``;
- ``forward_features(images)`` -> the four stage maps, dense;
- ``forward_masked(images, active, backend, return_sparse=False)`` -> the same maps with
  SparK's masked semantics (``active``: the patch mask, ``(B, *grid)``);
- ``patch_size`` (its total downsampling, SparK's patch side), ``spatial_dims`` (2: images,
  3: volumes), ``in_chans``, ``feature_channels`` / ``feature_strides`` (one per stage),
  ``num_features`` (the pooled feature width);
- ``sparse_ops``: the engine ops its masked forward needs (names from
  ``ctssl.sparse.backends.base.OPS``), passed to ``sparse_input`` so that a backend without
  them is refused before anything runs; ``densify_norm`` ("batch_norm" or "layer_norm"):
  the sparse norm SparK applies to its features before densifying them;
- ``get_classifier()``: the classification layer (pre-training freezes it).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Make ``create_encoder(name, **kwargs)`` call ``factory(**kwargs)``."""
    if name in ENCODERS and ENCODERS[name] is not factory:
        raise ValueError(f"encoder {name!r} is already registered")
    ENCODERS[name] = factory
    return factory


def encoder_names() -> list[str]:
    return list(ENCODERS)


def create_encoder(name: str, **kwargs) -> nn.Module:
    """A fresh encoder of architecture ``name`` (``resnet50``, ...); kwargs go to its constructor."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name](**kwargs)
