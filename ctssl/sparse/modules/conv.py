"""Conv2d and Conv3d that also take sparse maps: same parameters and state_dicts as torch's."""
from __future__ import annotations

from torch import nn

from ..tensor import SparseTensor
from .dims import check_map_dims


class _SparseConv:
    """The sparse forward of ``ConvNd`` (torch's class, next in the MRO, supplies the dense one).

    On a sparse map the output is ``conv(x) * active_at(y)``, computed by the map's backend.
    """

    sparse_ndim: int

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        check_map_dims(self, x, self.sparse_ndim)
        if self.padding_mode != "zeros":
            raise ValueError(f"sparse conv supports padding_mode='zeros' only, got {self.padding_mode!r}")
        if isinstance(self.padding, str):
            raise ValueError(f"sparse conv needs numeric padding, got {self.padding!r}")
        op = getattr(x.backend, f"conv{self.sparse_ndim}d")
        return op(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2d(_SparseConv, nn.Conv2d):
    """``nn.Conv2d`` on dense tensors; SparK's masked conv on a sparse image map."""

    sparse_ndim = 2


class Conv3d(_SparseConv, nn.Conv3d):
    """``nn.Conv3d`` on dense tensors; SparK's masked conv on a sparse volume map."""

    sparse_ndim = 3
