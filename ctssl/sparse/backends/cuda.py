"""The ``cuda`` backend: the packed layout on ctssl's compiled operators (csrc/).

Each op is a ``torch.autograd.Function`` over ``torch.ops.ctssl.*`` (forward and backward
both compiled, no host syncs, so steps can be captured in CUDA graphs):
- tables: slot map and int32 neighbour table built once per batch, cached on the index;
- layout: ``pack_patches`` / ``densify`` (gather kernels, each other's adjoint);
- conv: halo gather kernel + cuDNN conv (k > 1), cuBLAS GEMM on the rows (1x1); the
  backward recomputes the halo and folds its gradient back with a deterministic gather;
- BatchNorm: Welford statistics, apply with fused ReLU/ReLU6 and residual, two-kernel
  backward; SyncBatchNorm all-reduces (sum, sum of squares, count) once forward and
  (sum dz, sum dz*xhat) once backward. ``batch_norm`` returns a pending tensor
  (ctssl.sparse.pending): statistics final, apply deferred, so ``relu(bn(x) + identity)``
  in a ResNet block runs as one apply kernel, forward and backward;
- max pool: masked taps read 0, taps beyond the image are skipped (-inf padding).
Average pooling and per-image scaling are inherited from the ``torch`` backend.

The Functions themselves are device-agnostic (the operators also have CPU loops, which
the CPU tests compare with the ``dense`` backend); the backend runs on CUDA tensors only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import _ext
from ..index import PatchIndex
from ..norm_stats import NormStats, batch_norm_statistics
from ..pending import PendingBN, PendingBatchNorm
from ..precision import accumulation_dtype, compute_dtype
from ..tensor import PackedTensor, SparseTensor
from .base import check_aligned, pair
from .torch_packed import TorchBackend

ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "relu6": 2}


def _ops():
    return torch.ops.ctssl


# --- per-batch tables ------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchTables:
    """The index in the operators' formats: slot (B,h,w) int32, patch_ids (N,) int64, neighbours (N,3,3) int32."""

    slot: torch.Tensor
    patch_ids: torch.Tensor
    neighbours: torch.Tensor


def patch_tables(index: PatchIndex) -> PatchTables:
    """Build the tables with ``ctssl.patch_tables`` once per batch (cached on the index)."""
    cache = index.backend_cache("cuda")
    if "tables" not in cache:
        slot, ids, nbr = _ops().patch_tables(index.active.contiguous(), index.num_patches)
        cache["tables"] = PatchTables(slot, ids, nbr)
    return cache["tables"]


# --- layout ------------------------------------------------------------------------------------

class PackPatches(torch.autograd.Function):
    """Images (B, C, H, W) -> visible rows (N * p * p, C); backward writes rows back densely."""

    @staticmethod
    def forward(ctx, images, patch_ids, slot, grid_h, grid_w):
        ctx.save_for_backward(slot)
        ctx.p = images.shape[-2] // grid_h
        return _ops().pack_patches(images, patch_ids, grid_h, grid_w)

    @staticmethod
    def backward(ctx, grad_rows):
        (slot,) = ctx.saved_tensors
        grad = _ops().densify(grad_rows.contiguous(), slot, ctx.p, None) if ctx.needs_input_grad[0] else None
        return grad, None, None, None, None


class Densify(torch.autograd.Function):
    """Rows -> dense (B, C, H, W) (channels-last memory), masked positions 0 or ``token``."""

    @staticmethod
    def forward(ctx, rows, token, slot, patch_ids, patch_side, mask):
        ctx.save_for_backward(patch_ids, mask)
        ctx.grid = (slot.shape[1], slot.shape[2])
        ctx.has_token = token is not None
        return _ops().densify(rows, slot, patch_side, token)

    @staticmethod
    def backward(ctx, grad):
        patch_ids, mask = ctx.saved_tensors
        grad_rows = grad_token = None
        if ctx.needs_input_grad[0]:
            grad_rows = _ops().pack_patches(grad, patch_ids, *ctx.grid)
        if ctx.has_token and ctx.needs_input_grad[1]:
            grad_token = grad.masked_fill(mask, 0).sum(dim=(0, 2, 3), dtype=accumulation_dtype(grad.dtype)).to(grad.dtype)
        return grad_rows, grad_token, None, None, None, None


# --- conv --------------------------------------------------------------------------------------

class MaskedConv2d(torch.autograd.Function):
    """Masked conv on rows: halo gather + framework conv, or a GEMM for 1x1."""

    @staticmethod
    def forward(ctx, rows, weight, bias, neighbours, patch_side, stride, padding, dilation, groups):
        ctx.save_for_backward(rows, weight, neighbours)
        ctx.geometry = (patch_side, stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return _ops().masked_conv2d(rows, neighbours, weight, bias, patch_side, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, neighbours = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
        if not any(mask):
            return (None,) * 9
        grad_rows, grad_weight, grad_bias = _ops().masked_conv2d_backward(
            grad.contiguous(), rows, neighbours, weight, *ctx.geometry, mask)
        return grad_rows, grad_weight, grad_bias, None, None, None, None, None, None


# --- batch norm --------------------------------------------------------------------------------

def _moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Welford mean and biased variance of the rows (``ctssl.bn_stats``), in the accumulation dtype."""
    return _ops().bn_stats(rows.contiguous())


class RowBatchNormApply(torch.autograd.Function):
    """``act(bn(rows) + residual)`` with given statistics, in one pass; the backward treats batch
    statistics as functions of the rows (its two sums go through ``stats.reduce_grad_sums``, the one
    all-reduce of a synchronized BatchNorm)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, residual, stats: NormStats, activation):
        y = _ops().bn_apply(rows, stats.mean, stats.invstd, weight, bias, residual, activation)
        ctx.save_for_backward(rows, y if activation else None, weight)
        ctx.stats, ctx.activation = stats, activation
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        ops = _ops()
        rows, y, weight = ctx.saved_tensors
        stats, act = ctx.stats, ctx.activation
        need = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        if stats.batch or need[1] or need[2]:
            sum_dz, sum_dz_xhat = ops.bn_backward_reduce(grad_y, y, rows, stats.mean, stats.invstd, act)
        else:
            sum_dz = sum_dz_xhat = torch.zeros_like(stats.mean)
        grad_weight = sum_dz_xhat.to(ctx.dtypes[0]) if need[1] and ctx.dtypes[0] is not None else None
        grad_bias = sum_dz.to(ctx.dtypes[1]) if need[2] and ctx.dtypes[1] is not None else None
        grad_rows = grad_res = None
        if need[0] or need[3]:
            (g_dz, g_dz_xhat), n = stats.reduce_grad_sums((sum_dz, sum_dz_xhat))
            want_z = bool(need[3]) and act != 0
            grad_rows, grad_z = ops.bn_backward_apply(grad_y, y, rows, stats.mean, stats.invstd, weight, g_dz,
                                                      g_dz_xhat, max(n, 1.0), stats.batch, act, want_z)
            if need[3]:
                grad_res = grad_z if act != 0 else grad_y
            if not need[0]:
                grad_rows = None
        return grad_rows, grad_weight, grad_bias, grad_res, None, None


def _check_activation(activation) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(k for k in ACTIVATIONS if k)} or None, got {activation!r}")
    return ACTIVATIONS[activation]


def _residual_rows(residual, rows):
    if residual is None:
        return None
    if residual.shape != rows.shape:
        raise ValueError(f"residual must have the shape of the rows {tuple(rows.shape)}, got {tuple(residual.shape)}")
    return residual.to(rows.dtype).contiguous()


def apply_row_batch_norm(rows, weight, bias, stats: NormStats, activation=None, residual=None) -> torch.Tensor:
    """The apply pass alone, for statistics from ``batch_norm_stats``."""
    act = _check_activation(activation)
    residual = _residual_rows(residual, rows)
    if rows.shape[0] == 0 and not stats.synchronized:  # nothing to normalise, no collective to join
        return rows if residual is None else rows + residual
    return RowBatchNormApply.apply(rows.contiguous(), weight, bias, residual, stats, act)


def batch_norm_stats(rows, running_mean, running_var, training, momentum, eps, process_group=None
                     ) -> NormStats | None:
    """The statistics of ``ctssl.sparse.norm_stats.batch_norm_statistics``, the moments from ``ctssl.bn_stats``."""
    return batch_norm_statistics(rows, running_mean, running_var, training, momentum, eps, process_group, _moments)


def row_batch_norm(rows, weight, bias, running_mean, running_var, training, momentum, eps, process_group=None,
                   activation=None, residual=None) -> torch.Tensor:
    """``batch_norm_rows`` on the compiled operators, with fused ``activation`` and ``residual``."""
    _check_activation(activation)
    stats = batch_norm_stats(rows, running_mean, running_var, training, momentum, eps, process_group)
    if stats is None:
        residual = _residual_rows(residual, rows)
        return rows if residual is None else rows + residual
    return apply_row_batch_norm(rows, weight, bias, stats, activation, residual)


# --- max pool ----------------------------------------------------------------------------------

class MaskedMaxPool2d(torch.autograd.Function):
    """Max pool on rows; the winning tap per element (int8) is kept for the backward."""

    @staticmethod
    def forward(ctx, rows, neighbours, patch_side, kernel_size, stride, padding):
        out, argmax = _ops().max_pool2d(rows, neighbours, patch_side, kernel_size, stride, padding)
        ctx.save_for_backward(argmax, neighbours)
        ctx.geometry = (patch_side, kernel_size, stride, padding)
        return out

    @staticmethod
    def backward(ctx, grad):
        argmax, neighbours = ctx.saved_tensors
        grad_rows = _ops().max_pool2d_backward(grad.contiguous(), argmax, neighbours, *ctx.geometry)
        return grad_rows, None, None, None, None, None


# --- the backend -------------------------------------------------------------------------------

class CudaBackend(TorchBackend):
    """Packed layout on ctssl's CUDA kernels; needs the compiled extension and a GPU."""

    name = "cuda"
    pending_activations = frozenset({"relu", "relu6"})
    needs = ("a CUDA GPU and ctssl's CUDA extension, built by `pip install --no-build-isolation .` "
             "with nvcc and a CUDA build of torch")

    def unavailable_reason(self) -> str | None:
        reason = _ext.missing_reason()
        if reason:
            return reason
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False); use backend 'torch' on the CPU"
        return None

    def check_device(self, device: torch.device) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors only, got a tensor on {device}; "
                             f"use backend='torch' for CPU tensors")

    def _tables(self, x_or_index) -> PatchTables:
        index = x_or_index.index if isinstance(x_or_index, SparseTensor) else x_or_index
        self.check_device(index.device)
        return patch_tables(index)

    # --- layout ------------------------------------------------------------------------------
    def sparse_input(self, images: torch.Tensor, index: PatchIndex) -> SparseTensor:
        self.check_device(images.device)
        t = self._tables(index)
        rows = PackPatches.apply(images, t.patch_ids, t.slot, index.h, index.w)
        return PackedTensor(rows, index, 1, self)

    def to_dense(self, x: SparseTensor) -> torch.Tensor:
        t = self._tables(x)
        return Densify.apply(x.values.contiguous(), None, t.slot, t.patch_ids, x.patch_side,
                             x.index.dense_mask(x.stride))

    def densify(self, x: SparseTensor, token: torch.Tensor) -> torch.Tensor:
        t = self._tables(x)
        token = token.reshape(-1).to(x.values.dtype).contiguous()
        if token.numel() != x.channels:
            raise ValueError(f"densify: token has {token.numel()} values for {x.channels} channels")
        return Densify.apply(x.values.contiguous(), token, t.slot, t.patch_ids, x.patch_side,
                             x.index.dense_mask(x.stride))

    # --- ops ---------------------------------------------------------------------------------
    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        out_stride = check_aligned("conv2d", x, weight.shape[-2:], stride, padding, dilation)
        (s, _), (ph, pw), (d, dw) = pair(stride), pair(padding), pair(dilation)
        if ph != pw or d != dw or weight.shape[-1] != weight.shape[-2]:
            return super().conv2d(x, weight, bias, stride, padding, dilation, groups)  # non-square: torch path
        t = self._tables(x)
        dtype = compute_dtype(x.values, weight, self.name)
        rows = x.values.to(dtype).contiguous()
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        y = MaskedConv2d.apply(rows, w, b, t.neighbours, x.patch_side, s, ph, d, groups)
        return PackedTensor(y, x.index, out_stride, self)

    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps, process_group=None):
        """Statistics now (running ones updated), the apply pass pending: ``relu``/``relu6``/``add``
        on the result fold into it, so a ResNet block's ``relu(bn(x) + identity)`` is one kernel."""
        self.check_device(x.values.device)
        rows = x.values.contiguous()
        stats = batch_norm_stats(rows, running_mean, running_var, training, momentum, eps, process_group)
        if stats is None:  # nothing visible: like batch_norm_rows, the input
            return x
        return PendingBatchNorm(PendingBN(rows, stats, weight, bias), x.index, x.stride, self)

    def apply_pending(self, p: PendingBN, activation: str | None) -> torch.Tensor:
        return apply_row_batch_norm(p.x1, p.weight1, p.bias1, p.stats1, activation, p.res)

    def max_pool2d(self, x, kernel_size, stride, padding):
        out_stride = check_aligned("max_pool2d", x, kernel_size, stride, padding)
        (k, kw), (s, _), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
        if k != kw or ph != pw:
            return super().max_pool2d(x, kernel_size, stride, padding)
        t = self._tables(x)
        y = MaskedMaxPool2d.apply(x.values.contiguous(), t.neighbours, x.patch_side, k, s, ph)
        return PackedTensor(y, x.index, out_stride, self)


__all__ = ["CudaBackend", "PatchTables", "patch_tables", "batch_norm_stats",
           "apply_row_batch_norm", "row_batch_norm", "PackPatches", "Densify", "MaskedConv2d", "RowBatchNormApply",
           "MaskedMaxPool2d", "ACTIVATIONS"]
