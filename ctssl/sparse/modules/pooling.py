"""Max and average pooling that also take sparse maps (masked pixels read 0, outside reads padding)."""
from __future__ import annotations

from torch import nn

from ..backends.base import ntuple
from ..tensor import SparseTensor
from .dims import check_map_dims


class _SparseMaxPool:
    """``pool(x) * active_at(y)`` with -inf padding on a sparse map; torch's ``MaxPoolNd`` on dense tensors."""

    sparse_ndim: int

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        check_map_dims(self, x, self.sparse_ndim)
        if self.ceil_mode or self.return_indices or set(ntuple(self.dilation, self.sparse_ndim)) != {1}:
            raise ValueError("sparse max pool supports ceil_mode=False, return_indices=False, dilation=1 only")
        op = getattr(x.backend, f"max_pool{self.sparse_ndim}d")
        return op(x, self.kernel_size, self.stride, self.padding)


class _SparseAvgPool:
    """``pool(x) * active_at(y)`` on a sparse map (masked pixels count as 0); torch's ``AvgPoolNd`` on dense."""

    sparse_ndim: int

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        check_map_dims(self, x, self.sparse_ndim)
        if self.ceil_mode or self.divisor_override is not None:
            raise ValueError("sparse avg pool supports ceil_mode=False and no divisor_override only")
        op = getattr(x.backend, f"avg_pool{self.sparse_ndim}d")
        return op(x, self.kernel_size, self.stride, self.padding, self.count_include_pad)


class MaxPool2d(_SparseMaxPool, nn.MaxPool2d):
    sparse_ndim = 2


class MaxPool3d(_SparseMaxPool, nn.MaxPool3d):
    sparse_ndim = 3


class AvgPool2d(_SparseAvgPool, nn.AvgPool2d):
    sparse_ndim = 2


class AvgPool3d(_SparseAvgPool, nn.AvgPool3d):
    sparse_ndim = 3
