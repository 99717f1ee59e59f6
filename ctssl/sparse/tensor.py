"""Sparse feature maps: the values of a masked batch plus the index that explains them.

Two layouts share one interface:
- ``PackedTensor``: visible pixels only, rows ``(N * p * p, C)`` channels last,
  rows of slot n first, row-major inside the patch (the fast backends' layout);
- ``MaskedDenseTensor``: a dense ``(B, C, H, W)`` map that is zero at masked
  positions (SparK's emulation, the reference layout).
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
    def channels(self) -> int:
        raise NotImplementedError

    @property
    def dense_shape(self) -> tuple[int, int, int, int]:
        p = self.patch_side
        return (self.index.batch_size, self.channels, self.index.h * p, self.index.w * p)

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
    """Visible pixels as rows ``(N * p * p, C)``, channels last."""

    __slots__ = ()

    @property
    def channels(self) -> int:
        return self.values.shape[1]

    def patches(self) -> torch.Tensor:
        """View as ``(N, p, p, C)``."""
        p = self.patch_side
        return self.values.view(self.index.num_patches, p, p, self.channels)


class MaskedDenseTensor(SparseTensor):
    """A dense ``(B, C, H, W)`` map, zero wherever the patch mask is False."""

    __slots__ = ()

    @property
    def channels(self) -> int:
        return self.values.shape[1]
