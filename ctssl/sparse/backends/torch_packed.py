"""The ``torch`` backend: the packed layout with plain framework ops.

A k x k conv gathers each visible patch with a halo of ``padding`` pixels from its
neighbours and runs the framework conv with padding 0; 1x1 convs are matmuls on
the rows; BatchNorm is plain BatchNorm over the rows. Correct on CPU and GPU, and
the baseline the custom kernels must beat.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..batchnorm_rows import batch_norm_rows
from ..halo import halo_gather
from ..index import PatchIndex
from ..tensor import PackedTensor, SparseTensor
from .base import Backend, check_aligned, pair


class TorchBackend(Backend):
    name = "torch"
    needs = "nothing (always available)"

    # --- layout ------------------------------------------------------------
    def sparse_input(self, images: torch.Tensor, index: PatchIndex) -> SparseTensor:
        B, C, H, W = images.shape
        p = index.patch_size
        patches = images.reshape(B, C, index.h, p, index.w, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(B * index.h * index.w, p, p, C)
        rows = patches.index_select(0, index.patch_ids).reshape(-1, C)
        return PackedTensor(rows, index, 1, self)

    def _scatter(self, x: SparseTensor, fill: torch.Tensor) -> torch.Tensor:
        """Write the packed patches into ``fill`` ``(B*h*w, p, p, C)`` and return ``(B, C, H, W)``."""
        idx = x.index
        p, C = x.patch_side, x.channels
        out = fill.index_copy(0, idx.patch_ids, x.values.view(idx.num_patches, p, p, C))
        out = out.view(idx.batch_size, idx.h, idx.w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(idx.batch_size, C, idx.h * p, idx.w * p)

    def to_dense(self, x: SparseTensor) -> torch.Tensor:
        idx, p = x.index, x.patch_side
        zeros = x.values.new_zeros(idx.batch_size * idx.h * idx.w, p, p, x.channels)
        return self._scatter(x, zeros)

    def densify(self, x: SparseTensor, token: torch.Tensor) -> torch.Tensor:
        idx, p = x.index, x.patch_side
        fill = token.to(x.values.dtype).view(1, 1, 1, -1).expand(idx.batch_size * idx.h * idx.w, p, p, -1)
        return self._scatter(x, fill)

    # --- ops ---------------------------------------------------------------
    def _halo(self, x: SparseTensor, padding, pad_value: float = 0.0) -> torch.Tensor:
        """Halo-padded patches as an NCHW view of channels-last memory."""
        ph, pw = pair(padding)
        if ph != pw:
            raise ValueError(f"backend {self.name}: only square padding is supported, got {(ph, pw)}")
        plan = x.index.halo_plan(x.patch_side, ph)
        return halo_gather(x.values, plan, x.index.num_patches, pad_value).permute(0, 3, 1, 2)

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, C, p, p)`` conv output back to rows ``(N * p * p, C)``."""
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        out_stride = check_aligned("conv2d", x, weight.shape[-2:], stride, padding, dilation)
        s = pair(stride)[0]
        if weight.shape[-2:] == (1, 1) and pair(padding) == (0, 0) and groups == 1:
            rows = x.values
            if s > 1:
                p = x.patch_side
                rows = x.patches()[:, ::s, ::s].reshape(-1, x.channels)
            y = F.linear(rows, weight.flatten(1), bias)
            return PackedTensor(y, x.index, out_stride, self)
        if x.index.num_patches == 0:
            return PackedTensor(x.values.new_zeros(0, weight.shape[0]), x.index, out_stride, self)
        y = F.conv2d(self._halo(x, padding), weight, bias, stride, 0, dilation, groups)
        return PackedTensor(self._rows(y), x.index, out_stride, self)

    def max_pool2d(self, x, kernel_size, stride, padding):
        out_stride = check_aligned("max_pool2d", x, kernel_size, stride, padding)
        if x.index.num_patches == 0:
            return PackedTensor(x.values, x.index, out_stride, self)
        y = F.max_pool2d(self._halo(x, padding, float("-inf")), kernel_size, stride, 0)
        return PackedTensor(self._rows(y), x.index, out_stride, self)

    def avg_pool2d(self, x, kernel_size, stride, padding, count_include_pad=True):
        out_stride = check_aligned("avg_pool2d", x, kernel_size, stride, padding)
        if x.index.num_patches == 0:
            return PackedTensor(x.values, x.index, out_stride, self)
        y = F.avg_pool2d(self._halo(x, padding), kernel_size, stride, 0)
        if not count_include_pad and pair(padding) != (0, 0):
            # divide by the number of in-image taps instead of k*k
            inside = x.values.new_ones(x.values.shape[0], 1)
            ones = x.with_values(inside)
            frac = F.avg_pool2d(self._halo_outside_zero(ones, padding), kernel_size, stride, 0)
            y = y / frac
        return PackedTensor(self._rows(y), x.index, out_stride, self)

    def _halo_outside_zero(self, ones: SparseTensor, padding) -> torch.Tensor:
        """Halo of an all-ones map where masked neighbours read 1 and outside reads 0."""
        ph = pair(padding)[0]
        plan = ones.index.halo_plan(ones.patch_side, ph)
        h = halo_gather(ones.values, plan, ones.index.num_patches, 0.0).clone()
        flat = h.view(-1, 1)
        if plan.ring_zero.numel():
            flat.index_fill_(0, plan.ring_zero, 1.0)
        return h.permute(0, 3, 1, 2)

    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps,
                   process_group=None):
        rows = batch_norm_rows(x.values, weight, bias, running_mean, running_var, training, momentum, eps,
                               process_group)
        return x.with_values(rows)

    def scale_samples(self, x, scale):
        rows_scale = scale.to(x.values.dtype)[x.index.row_samples(x.stride)]
        return x.with_values(x.values * rows_scale.unsqueeze(1))
