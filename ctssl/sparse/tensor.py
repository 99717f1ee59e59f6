"""Sparse feature maps: the values of a masked batch plus the index that explains them.

Two layouts share one interface, for images (2 spatial axes) and volumes (3):
- ``PackedTensor``: visible pixels only, rows ``(N * p ** ndim, C)`` channels last,
  rows of slot n first, row-major inside the patch (the fast backends' layout);
- ``MaskedDenseTensor``: a dense ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) map that is
  zero at masked positions (SparK's emulation, the reference layout).
Modules never look inside: they call the tensor's backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .index import PatchIndex

if TYPE_CHECKING:
    from .backends.base import Backend


class SparseTensor:
    """A feature map at ``stride`` of a masked batch; ``values`` layout is the backend's."""

    __slots__ = ("values", "index", "stride", "backend")

    def __init__(self, values: torch.Tensor, index: PatchIndex, stride: int, backend: "Backend"):
        self.values = values
        self.index = index
        self.stride = stride
        self.backend = backend

    @property
    def patch_side(self) -> int:
        return self.index.patch_side(self.stride)

    @property
    def ndim(self) -> int:
        """Spatial axes: 2 for images, 3 for volumes."""
        return self.index.ndim

    @property
    def channels(self) -> int:
        raise NotImplementedError

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return (self.index.batch_size, self.channels, *self.index.dense_grid(self.stride))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def with_values(self, values: torch.Tensor, stride: int | None = None) -> "SparseTensor":
        """A tensor of the same layout and index holding other values."""
        return type(self)(values, self.index, self.stride if stride is None else stride, self.backend)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "SparseTensor":
        """Apply an elementwise function that maps 0 to 0 (so masked stays masked)."""
        return self.with_values(fn(self.values))

    def to_dense(self) -> torch.Tensor:
        return self.backend.to_dense(self)

    def __add__(self, other: "SparseTensor") -> "SparseTensor":
        return self.backend.add(self, other)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend.name}, stride={self.stride}, "
            f"dense_shape={self.dense_shape}, visible_patches={self.index.num_patches}, dtype={self.dtype})"
        )


class PackedTensor(SparseTensor):
    """Visible pixels (voxels) as rows ``(N * p ** ndim, C)``, channels last."""

    __slots__ = ()

    @property
    def channels(self) -> int:
        return self.values.shape[1]

    def patches(self) -> torch.Tensor:
        """View as ``(N, p, p, C)`` (or ``(N, p, p, p, C)``)."""
        return self.values.view(self.index.num_patches, *([self.patch_side] * self.ndim), self.channels)


class MaskedDenseTensor(SparseTensor):
    """A dense ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) map, zero wherever the patch mask is False."""

    __slots__ = ()

    @property
    def channels(self) -> int:
        return self.values.shape[1]
