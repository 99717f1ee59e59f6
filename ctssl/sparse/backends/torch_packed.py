"""The ``torch`` backend: the packed layout with plain framework ops, for images and volumes.

A k x k (x k) conv gathers each visible patch with a halo of ``padding`` pixels from
its neighbours (as many patches away as the halo reaches) and runs the framework
conv with padding 0; where the output patches are tiny (side <= ``GEMM_MAX_SIDE``) the
taps of the halo-padded patches are unfolded into one matrix and the conv is a
single GEMM instead; 1x1 convs are matmuls on the rows; BatchNorm, LayerNorm and
Linear are the plain framework ops on the rows. Max pooling recomputes its halo in the backward instead of
keeping it. Correct on CPU and GPU, and the baseline the custom kernels must beat.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..batchnorm_rows import batch_norm_rows
from ..halo import HaloConv, halo_gather
from ..index import PatchIndex
from ..instance_norm_rows import instance_norm_rows
from ..tensor import PackedTensor, SparseTensor
from .base import ALL_OPS, Backend, check_aligned, ntuple

_CONV = {2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}

GEMM_MAX_SIDE = 2
"""Largest output patch side computed as one GEMM on unfolded taps. On 1- and 2-pixel patches the framework
conv runs once per tiny patch and (on the CPU, ResNet-18-3D at 96^3: benchmarks/results/2026-12-02-cpu-dev)
cost more than the emulation's dense conv of the whole map; the unfolded matrix is at most a few times the
halo-padded patches there (27/27 at side 1, 216/64 at side 2 for 3x3x3)."""


def _unfold_taps(halo: torch.Tensor, kernel, stride: int, dilation) -> torch.Tensor:
    """Halo-padded patches ``(N, P, ..., P, C)`` -> the conv's input matrix ``(N * q ** ndim, C * prod(kernel))``:
    rows in packed order, columns ordered like ``weight.reshape(C_out, -1)`` (channel, then taps)."""
    n = len(kernel)
    for axis, (k, d) in enumerate(zip(kernel, dilation)):
        halo = halo.unfold(1 + axis, d * (k - 1) + 1, stride)  # (N, q.., C, window..)
    if any(d != 1 for d in dilation):
        halo = halo[(Ellipsis, *(slice(None, None, d) for d in dilation))]
    return halo.reshape(-1, halo.shape[1 + n] * math.prod(kernel))


def _split_patches(ndim: int) -> tuple[int, ...]:
    """Permutation of ``(B, C, g1, p, g2, p[, g3, p])`` into ``(B, g1, g2[, g3], p, p[, p], C)``."""
    return (0, *range(2, 2 + 2 * ndim, 2), *range(3, 3 + 2 * ndim, 2), 1)


def _merge_patches(ndim: int) -> tuple[int, ...]:
    """Permutation of ``(B, g1, g2[, g3], p, p[, p], C)`` back into ``(B, C, g1, p, g2, p[, g3, p])``."""
    order = []
    for axis in range(ndim):
        order += [1 + axis, 1 + ndim + axis]
    return (0, 1 + 2 * ndim, *order)


class TorchBackend(Backend):
    name = "torch"
    needs = "nothing (always available)"
    spatial_dims = (2, 3)
    supported_ops = ALL_OPS

    # --- layout ------------------------------------------------------------
    def sparse_input(self, images: torch.Tensor, index: PatchIndex) -> SparseTensor:
        B, C = images.shape[:2]
        p, n = index.patch_size, index.ndim
        split = [B, C]
        for g in index.grid:
            split += [g, p]
        patches = images.reshape(split).permute(_split_patches(n)).reshape(-1, *([p] * n), C)
        rows = patches.index_select(0, index.patch_ids).reshape(-1, C)
        return PackedTensor(rows, index, 1, self)

    def _scatter(self, x: SparseTensor, fill: torch.Tensor) -> torch.Tensor:
        """Write the packed patches into ``fill`` ``(B * prod(grid), p, ..., p, C)``; return ``(B, C, *spatial)``."""
        idx = x.index
        out = fill.index_copy(0, idx.patch_ids, x.patches())
        out = out.view(idx.batch_size, *idx.grid, *([x.patch_side] * x.ndim), x.channels)
        out = out.permute(_merge_patches(x.ndim))
        return out.reshape(idx.batch_size, x.channels, *idx.dense_grid(x.stride))

    def _fill_shape(self, x: SparseTensor) -> tuple[int, ...]:
        idx = x.index
        return (idx.active.numel(), *([x.patch_side] * x.ndim), x.channels)

    def to_dense(self, x: SparseTensor) -> torch.Tensor:
        return self._scatter(x, x.values.new_zeros(self._fill_shape(x)))

    def densify(self, x: SparseTensor, token: torch.Tensor) -> torch.Tensor:
        fill = token.to(x.values.dtype).view(*([1] * (x.ndim + 1)), -1).expand(self._fill_shape(x))
        return self._scatter(x, fill)

    # --- ops ---------------------------------------------------------------
    def _halo(self, x: SparseTensor, padding, pad_value: float = 0.0) -> torch.Tensor:
        """Halo-padded patches ``(N, C, P, ..., P)``: a channels-first view of channels-last memory."""
        plan = x.index.halo_plan(x.patch_side, self._equal_padding(x, padding))
        return halo_gather(x.values, plan, x.index.num_patches, pad_value).movedim(-1, 1)

    def _equal_padding(self, x: SparseTensor, padding) -> int:
        pads = ntuple(padding, x.ndim)
        if len(set(pads)) != 1:
            raise ValueError(f"backend {self.name}: only equal padding on every axis is supported, got {pads}")
        return pads[0]

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, C, p, ..., p)`` op output back to rows ``(N * p ** ndim, C)``."""
        return y.movedim(1, -1).reshape(-1, y.shape[1])

    def _conv(self, x, weight, bias, stride, padding, dilation, groups):
        n = x.ndim
        out_stride = check_aligned(f"conv{n}d", x, weight.shape[2:], stride, padding, dilation)
        s = ntuple(stride, n)[0]
        if all(k == 1 for k in weight.shape[2:]) and set(ntuple(padding, n)) == {0} and groups == 1:
            rows = x.values
            if s > 1:
                rows = x.patches()[(slice(None),) + (slice(None, None, s),) * n].reshape(-1, x.channels)
            y = F.linear(rows, weight.flatten(1), bias)
            return PackedTensor(y, x.index, out_stride, self)
        if groups == 1 and x.patch_side // s <= GEMM_MAX_SIDE:
            cols = _unfold_taps(self._halo(x, padding).movedim(1, -1), weight.shape[2:], s, ntuple(dilation, n))
            y = F.linear(cols, weight.reshape(weight.shape[0], -1), bias)
            return PackedTensor(y, x.index, out_stride, self)
        plan = x.index.halo_plan(x.patch_side, self._equal_padding(x, padding))
        y = HaloConv.apply(x.values, weight, bias, plan, x.index.num_patches, _CONV[n], s, ntuple(dilation, n), groups)
        return PackedTensor(self._rows(y), x.index, out_stride, self)

    def _max_pool(self, x, kernel_size, stride, padding):
        out_stride = check_aligned(f"max_pool{x.ndim}d", x, kernel_size, stride, padding)

        def pool(values):
            halo = self._halo(x.with_values(values), padding, float("-inf"))
            return self._rows(_MAX_POOL[x.ndim](halo, kernel_size, stride, 0))

        # recomputed in the backward: keeping the halo-padded input and its indices cost more than the map itself
        y = checkpoint(pool, x.values, use_reentrant=False, preserve_rng_state=False)
        return PackedTensor(y, x.index, out_stride, self)

    def _avg_pool(self, x, kernel_size, stride, padding, count_include_pad=True):
        out_stride = check_aligned(f"avg_pool{x.ndim}d", x, kernel_size, stride, padding)
        pool = _AVG_POOL[x.ndim]
        y = pool(self._halo(x, padding), kernel_size, stride, 0)
        if not count_include_pad and set(ntuple(padding, x.ndim)) != {0}:
            # divide by the number of in-grid taps instead of k ** ndim
            ones = x.with_values(x.values.new_ones(x.values.shape[0], 1))
            y = y / pool(self._halo_outside_zero(ones, padding), kernel_size, stride, 0)
        return PackedTensor(self._rows(y), x.index, out_stride, self)

    conv2d = conv3d = _conv
    max_pool2d = max_pool3d = _max_pool
    avg_pool2d = avg_pool3d = _avg_pool

    def _halo_outside_zero(self, ones: SparseTensor, padding) -> torch.Tensor:
        """Halo of an all-ones map where masked neighbours read 1 and outside reads 0."""
        plan = ones.index.halo_plan(ones.patch_side, ntuple(padding, ones.ndim)[0])
        h = halo_gather(ones.values, plan, ones.index.num_patches, 0.0).clone()
        if plan.ring_zero.numel():
            h.view(-1, 1).index_fill_(0, plan.ring_zero, 1.0)
        return h.movedim(-1, 1)

    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps,
                   process_group=None):
        rows = batch_norm_rows(x.values, weight, bias, running_mean, running_var, training, momentum, eps,
                               process_group)
        return x.with_values(rows)

    def instance_norm(self, x, weight, bias, eps):
        rows = instance_norm_rows(x.values, weight, bias, x.index.row_samples(x.stride), x.index.batch_size, eps)
        return x.with_values(rows)
    def layer_norm(self, x, weight, bias, eps):
        return x.with_values(F.layer_norm(x.values, (x.channels,), weight, bias, eps))

    def linear(self, x, weight, bias):
        return x.with_values(F.linear(x.values, weight, bias))

    def scale_channels(self, x, scale):
        return x.with_values(x.values * scale.to(x.values.dtype))

    def scale_samples(self, x, scale):
        rows_scale = scale.to(x.values.dtype)[x.index.row_samples(x.stride)]
        return x.with_values(x.values * rows_scale.unsqueeze(1))
