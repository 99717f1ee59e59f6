"""BatchNorm over visible positions only, with the same state_dicts as ``nn.BatchNorm2d`` / ``nn.BatchNorm3d``."""
from __future__ import annotations

import torch
from torch import nn

from ..batchnorm_rows import running_momentum
from ..tensor import SparseTensor
from .dims import check_map_dims


class _SparseBatchNorm:
    """torch's ``BatchNormNd`` on dense tensors; SparK's sparse BN on a ``SparseTensor``.

    Batch and running statistics come from visible positions only; the output is 0
    at masked positions; eval mode normalises with the running statistics.
    ``sparse_ndim`` None takes sparse maps of any dimensionality (SyncBatchNorm, like torch's).
    """

    sparse_ndim: int | None
    process_group = None

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        if self.sparse_ndim is not None:
            check_map_dims(self, x, self.sparse_ndim)
        if x.channels != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels, got {x.channels}")
        momentum = running_momentum(self)
        use_batch_stats = self.training or not self.track_running_stats
        return x.backend.batch_norm(
            x, self.weight, self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            use_batch_stats, momentum, self.eps,
            process_group=self._group(),
        )

    def _group(self):
        return None


class BatchNorm2d(_SparseBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d``; on a sparse image map, statistics over its visible pixels."""

    sparse_ndim = 2


class BatchNorm3d(_SparseBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d``; on a sparse volume map, statistics over its visible voxels."""

    sparse_ndim = 3


class SyncBatchNorm(BatchNorm2d):
    """Sparse BN whose statistics are reduced across ``torch.distributed`` ranks, for images and volumes.

    Dense inputs use ``nn.SyncBatchNorm``'s function; sparse inputs reduce
    (sum, sum of squares, count) of the visible positions in one all-reduce.
    With no process group initialised it behaves like ``BatchNorm2d`` (``BatchNorm3d`` on volumes).
    """

    sparse_ndim = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _group(self):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        return self.process_group if self.process_group is not None else torch.distributed.group.WORLD

    def forward(self, x):
        if isinstance(x, SparseTensor):
            return super().forward(x)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.training:
            return nn.SyncBatchNorm.forward(self, x)
        return nn.BatchNorm2d.forward(self, x)

    def _check_input_dim(self, input):
        if input.dim() not in (4, 5):
            raise ValueError(f"expected 4D or 5D input (got {input.dim()}D input)")


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm2d / BatchNorm3d (ctssl's or torch's) by ctssl's SyncBatchNorm, keeping its state."""
    out = module
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
