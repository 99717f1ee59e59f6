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

import torch
from torch import nn

from ..sparse import sparse_input

ENCODERS: dict[str, Callable[..., nn.Module]] = {}
SPATIAL_DIMS: dict[str, int] = {}
"""Each registered encoder's ``spatial_dims`` (2: images, 3: volumes), known without building it."""


def register_encoder(name: str, factory: Callable[..., nn.Module], spatial_dims: int = 2) -> Callable[..., nn.Module]:
    """Make ``create_encoder(name, **kwargs)`` call ``factory(**kwargs)``; ``spatial_dims``: what it takes."""
    if name in ENCODERS and ENCODERS[name] is not factory:
        raise ValueError(f"encoder {name!r} is already registered")
    ENCODERS[name] = factory
    SPATIAL_DIMS[name] = spatial_dims
    return factory


def encoder_names(spatial_dims: int | None = None) -> list[str]:
    """Registered encoders, all or those of ``spatial_dims`` (2: images, 3: volumes)."""
    return [n for n in ENCODERS if spatial_dims is None or SPATIAL_DIMS[n] == spatial_dims]


def create_encoder(name: str, **kwargs) -> nn.Module:
    """A fresh encoder of architecture ``name`` (``resnet50``, ...); kwargs go to its constructor."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name](**kwargs)


def masked_forward(encoder: nn.Module, images: torch.Tensor, active: torch.Tensor, backend, *,
                   return_sparse: bool = False, check_finite: bool = True) -> list:
    """What every encoder's ``forward_masked`` does: check the images, build the sparse input (a backend
    without the encoder's ``sparse_ops`` is refused there, before anything runs), run ``encoder._stages``
    and return the stage maps, dense (zeros where masked) or as ``SparseTensor``s."""
    if isinstance(images, torch.Tensor) and images.dim() in (4, 5):
        if images.dim() != encoder.spatial_dims + 2:
            want = "images (B, C, H, W)" if encoder.spatial_dims == 2 else "volumes (B, C, D, H, W)"
            raise ValueError(f"this {encoder.spatial_dims}-D encoder takes {want}, got shape {tuple(images.shape)}")
        if images.shape[1] != encoder.in_chans:
            raise ValueError(f"images have {images.shape[1]} channels, the encoder expects {encoder.in_chans}")
    x = sparse_input(images, active, backend, patch_size=encoder.patch_size, check_finite=check_finite,
                     ops=encoder.sparse_ops, model=type(encoder).__name__)
    maps = encoder._stages(x)
    return maps if return_sparse else [m.to_dense() for m in maps]
