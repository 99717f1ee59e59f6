"""ctssl's sparse engine: SparK masks, the packed patch layout, backends and modules.

Typical use::

    active = random_patch_mask(B, (H // 32, W // 32), 0.6, device=images.device)
    x = sparse_input(images, active, backend="torch")   # a SparseTensor
    y = module(x)                                         # ctssl.sparse.modules accept it
    dense = y.to_dense()
"""
from __future__ import annotations

import torch

from .backends import (
    Backend,
    BackendUnavailableError,
    available_backends,
    backend_status,
    get_backend,
    register_backend,
)
from .index import PatchIndex
from .mask import PATCH_SIZE, check_images, check_mask, num_visible, patch_grid, random_patch_mask
from .tensor import MaskedDenseTensor, PackedTensor, SparseTensor


def sparse_input(images: torch.Tensor, active: torch.Tensor, backend: str | Backend = "dense",
                 *, patch_size: int = PATCH_SIZE, check_finite: bool = True,
                 index: PatchIndex | None = None, ops=None, model: str = "this model") -> SparseTensor:
    """Mask an image (or volume) batch and put it in ``backend``'s layout (the index is built here, once).

    ``ops``: the sparse ops ``model`` will run (an encoder's ``sparse_ops``); a backend that
    lacks one is refused here, before anything runs.
    """
    check_images(images, patch_size, check_finite)
    check_mask(active, images, patch_size)
    be = get_backend(backend, images.device, ops=ops, model=model)
    be.check_spatial_dims(images.dim() - 2)
    if index is None:
        index = PatchIndex(active, patch_size)
    return be.sparse_input(images, index)


__all__ = [
    "Backend", "BackendUnavailableError", "available_backends", "backend_status", "get_backend",
    "register_backend", "PatchIndex", "PATCH_SIZE", "check_images", "check_mask", "num_visible",
    "patch_grid", "random_patch_mask", "MaskedDenseTensor", "PackedTensor", "SparseTensor", "sparse_input",
]
