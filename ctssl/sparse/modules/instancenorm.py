"""InstanceNorm3d over each sample's visible voxels, with the same state_dict as ``nn.InstanceNorm3d``."""
from __future__ import annotations

from torch import nn

from ..tensor import SparseTensor
from .dims import check_map_dims


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` on dense volumes; on a sparse volume map, statistics per (sample, channel) over
    that sample's visible voxels, output 0 where masked (nnU-Net-style encoders' norm).

    Sparse maps take per-sample statistics only (``track_running_stats=False``, torch's default): running
    averages of instance statistics have no use in those encoders and are refused rather than half-kept.
    """

    sparse_ndim = 3

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        check_map_dims(self, x, self.sparse_ndim)
        if x.channels != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels, got {x.channels}")
        if self.track_running_stats:
            raise ValueError(f"{type(self).__name__}: track_running_stats=True is not supported on sparse maps "
                             "(statistics are each sample's own); use track_running_stats=False")
        return x.backend.instance_norm(x, self.weight, self.bias, self.eps)
