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
import torch.distributed as dist

from ... import _ext
from ..index import PatchIndex
from ..pending import PendingBatchNorm, fuse_activation, fuse_add
from ..tensor import PackedTensor, SparseTensor
from .base import Backend, check_aligned, pair
from .torch_packed import TorchBackend

ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "relu6": 2}


def _ops():
    return torch.ops.ctssl


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- per-batch tables ------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchTables:
    """The index in the operators' formats: slot (B,h,w) int32, patch_ids (N,) int64, neighbours (N,3,3) int32."""

    slot: torch.Tensor
    patch_ids: torch.Tensor
    neighbours: torch.Tensor


def patch_tables(index: PatchIndex) -> PatchTables:
    """Build the tables with ``ctssl.patch_tables`` once per batch (cached on the index)."""
    cache = getattr(index, "_cuda_cache", None)
    if cache is None:
        cache = {}
        index._cuda_cache = cache
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
            grad_token = grad.masked_fill(mask, 0).sum(dim=(0, 2, 3), dtype=_acc_dtype(grad.dtype)).to(grad.dtype)
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

def _update_running(running_mean, running_var, mean, var, count, momentum) -> None:
    """torch's rule: exponential average of the batch mean and the unbiased batch variance (count > 1)."""
    with torch.no_grad():
        if isinstance(count, torch.Tensor):  # synchronized: the count lives on the device, no host sync
            n = count.to(mean.dtype)
            unbiased = var * n / (n - 1).clamp_min(1)
            keep = n > 1
            new_mean = running_mean * (1 - momentum) + mean.to(running_mean.dtype) * momentum
            new_var = running_var * (1 - momentum) + unbiased.to(running_var.dtype) * momentum
            running_mean.copy_(torch.where(keep, new_mean, running_mean))
            running_var.copy_(torch.where(keep, new_var, running_var))
        elif count > 1:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (count / (count - 1))).to(running_var.dtype), alpha=momentum)


def _sync_stats(mean, var, count: int, group):
    """Global (mean, biased var, count) from every rank's local ones: one all-reduce of [sum, sumsq, count]."""
    n = mean.new_full((1,), float(count), dtype=torch.float64)
    m, v = mean.double(), var.double()
    packed = torch.cat([m * n, (v + m * m) * n, n])
    dist.all_reduce(packed, group=group)
    C = mean.shape[0]
    total = packed[-1:]
    safe = total.clamp_min(1)
    g_mean = packed[:C] / safe
    g_var = (packed[C:2 * C] / safe - g_mean * g_mean).clamp_min(0)
    return g_mean.to(mean.dtype), g_var.to(mean.dtype), total


@dataclass
class RowStats:
    """What the apply pass needs: mean and 1/std in the accumulation dtype, and the row count
    (a device tensor when synchronized, so no host sync; an int otherwise)."""

    mean: torch.Tensor
    invstd: torch.Tensor
    count: "int | torch.Tensor"
    batch: bool  # batch statistics (their gradient flows into the rows) or running ones
    group: object = None


def row_stats(rows, running_mean, running_var, use_batch_stats, momentum, eps, group=None) -> RowStats:
    """Welford statistics of the rows (all-reduced over ``group``), updating the running ones at once."""
    with torch.no_grad():
        if not use_batch_stats:
            acc = _acc_dtype(rows.dtype)
            return RowStats(running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps), rows.shape[0], False)
        mean, var = _ops().bn_stats(rows.detach())
        count = rows.shape[0]
        if group is not None:
            mean, var, count = _sync_stats(mean, var, count, group)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, count, momentum)
        return RowStats(mean, torch.rsqrt(var + eps), count, True, group)


class RowBatchNormApply(torch.autograd.Function):
    """``act(bn(rows) + residual)`` with given statistics, in one pass; the backward treats batch
    statistics as functions of the rows (and all-reduces its two sums when synchronized)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, residual, mean, invstd, count, batch_stats, activation, group):
        """``count``: an int, or a device tensor when synchronized (no host sync)."""
        y = _ops().bn_apply(rows, mean, invstd, weight, bias, residual, activation)
        count_t = count if isinstance(count, torch.Tensor) else None
        ctx.save_for_backward(rows, y if activation else None, mean, invstd, weight, count_t)
        ctx.count = None if count_t is not None else count
        ctx.use_batch_stats, ctx.activation, ctx.group = batch_stats, activation, group
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        ops = _ops()
        rows, y, mean, invstd, weight, count_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        act = ctx.activation
        need_sums = ctx.use_batch_stats or need[1] or need[2]
        if need_sums:
            sum_dz, sum_dz_xhat = ops.bn_backward_reduce(grad_y, y, rows, mean, invstd, act)
        else:
            sum_dz = sum_dz_xhat = torch.zeros_like(mean)
        grad_weight = sum_dz_xhat.to(ctx.dtypes[0]) if need[1] and ctx.dtypes[0] is not None else None
        grad_bias = sum_dz.to(ctx.dtypes[1]) if need[2] and ctx.dtypes[1] is not None else None
        g_dz, g_dz_xhat, count = sum_dz, sum_dz_xhat, ctx.count
        if ctx.use_batch_stats and ctx.group is not None:
            sums = torch.cat([sum_dz, sum_dz_xhat])
            dist.all_reduce(sums, group=ctx.group)
            n = count_t.to(sums.dtype).clamp_min(1)
            C = sum_dz.shape[0]
            g_dz, g_dz_xhat, count = sums[:C] / n, sums[C:] / n, 1.0  # means already: divide by 1
        grad_rows = grad_res = None
        if need[0] or need[3]:
            want_z = bool(need[3]) and act != 0
            grad_rows, grad_z = ops.bn_backward_apply(grad_y, y, rows, mean, invstd, weight, g_dz, g_dz_xhat,
                                                      float(max(count, 1)), ctx.use_batch_stats, act, want_z)
            if need[3]:
                grad_res = grad_z if act != 0 else grad_y
            if not need[0]:
                grad_rows = None
        return grad_rows, grad_weight, grad_bias, grad_res, None, None, None, None, None, None


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


def apply_row_batch_norm(rows, weight, bias, stats: RowStats, activation=None, residual=None) -> torch.Tensor:
    """The apply pass alone, for statistics computed by ``row_stats``."""
    act = _check_activation(activation)
    residual = _residual_rows(residual, rows)
    if rows.shape[0] == 0 and stats.group is None:  # nothing to normalise, no collective to join
        return rows if residual is None else rows + residual
    return RowBatchNormApply.apply(rows.contiguous(), weight, bias, residual, stats.mean, stats.invstd, stats.count,
                                   stats.batch, act, stats.group)


def batch_norm_stats(rows, running_mean, running_var, training, momentum, eps, process_group=None
                     ) -> RowStats | None:
    """``row_stats`` with torch's choice of batch or running statistics and synchronization; None
    when there is nothing to normalise and no collective to join (no rows, not synchronized)."""
    use_batch_stats = training or running_mean is None
    group = process_group if use_batch_stats and _distributed(process_group) else None
    if rows.shape[0] == 0 and group is None:
        return None
    return row_stats(rows.contiguous(), running_mean, running_var, use_batch_stats, momentum, eps, group)


def row_batch_norm(rows, weight, bias, running_mean, running_var, training, momentum, eps, process_group=None,
                   activation=None, residual=None) -> torch.Tensor:
    """``batch_norm_rows`` on the compiled operators, with fused ``activation`` and ``residual``."""
    _check_activation(activation)
    stats = batch_norm_stats(rows, running_mean, running_var, training, momentum, eps, process_group)
    if stats is None:
        residual = _residual_rows(residual, rows)
        return rows if residual is None else rows + residual
    return apply_row_batch_norm(rows, weight, bias, stats, activation, residual)


class _PendingRowBN:
    """``bn(x1) [+ res]`` whose statistics are final; the cuda backend's fused kernel applies it."""

    __slots__ = ("x1", "weight", "bias", "stats", "res")

    def __init__(self, x1, weight, bias, stats: RowStats, res=None):
        self.x1, self.weight, self.bias, self.stats, self.res = x1, weight, bias, stats, res

    def plus(self, other: SparseTensor) -> "_PendingRowBN | None":
        """This BN with ``other`` as its residual (read, so a pending ``other`` is applied alone)."""
        if self.res is not None:
            return None
        r = other.values
        if r.dtype != self.x1.dtype or r.shape != self.x1.shape:
            return None
        return _PendingRowBN(self.x1, self.weight, self.bias, self.stats, r)


def _distributed(process_group) -> bool:
    return (process_group is not None and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(process_group) > 1)


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

def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device`` when autocast is on there (convs run in it), else None."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = device.type == "cuda" and torch.is_autocast_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device.type)
    except AttributeError:
        return torch.get_autocast_gpu_dtype()


class CudaBackend(TorchBackend):
    """Packed layout on ctssl's CUDA kernels; needs the compiled extension and a GPU."""

    name = "cuda"
    needs = ("a CUDA GPU and ctssl's CUDA extension, built by `pip install --no-build-isolation .` "
             "with nvcc and a CUDA build of torch")
    supported_ops = Backend.supported_ops
    unsupported_ops_reason = "the cuda backend's ConvNeXt ops (depthwise conv, LayerNorm) are not implemented yet"

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
        dtype = _autocast_dtype(x.values.device) or x.values.dtype
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
        return PendingBatchNorm(_PendingRowBN(rows, weight, bias, stats), x.index, x.stride, self)

    def _apply(self, p: _PendingRowBN, activation: str | None) -> torch.Tensor:
        return apply_row_batch_norm(p.x1, p.weight, p.bias, p.stats, activation, p.res)

    def relu(self, x: SparseTensor, inplace: bool = False) -> SparseTensor:
        return fuse_activation(x, "relu", self) or super().relu(x, inplace)

    def relu6(self, x: SparseTensor, inplace: bool = False) -> SparseTensor:
        return fuse_activation(x, "relu6", self) or super().relu6(x, inplace)

    def add(self, a: SparseTensor, b: SparseTensor) -> SparseTensor:
        """``bn(x) + r`` stays pending with ``r`` as the fused residual (either operand order)."""
        if isinstance(b, SparseTensor) and a.index is b.index and a.stride == b.stride and a.backend is b.backend:
            fused = fuse_add(a, b, self)
            if fused is not None:
                return fused
        return super().add(a, b)

    def max_pool2d(self, x, kernel_size, stride, padding):
        out_stride = check_aligned("max_pool2d", x, kernel_size, stride, padding)
        (k, kw), (s, _), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
        if k != kw or ph != pw:
            return super().max_pool2d(x, kernel_size, stride, padding)
        t = self._tables(x)
        y = MaskedMaxPool2d.apply(x.values.contiguous(), t.neighbours, x.patch_side, k, s, ph)
        return PackedTensor(y, x.index, out_stride, self)


__all__ = ["CudaBackend", "PatchTables", "patch_tables", "RowStats", "row_stats", "batch_norm_stats",
           "apply_row_batch_norm", "row_batch_norm", "PackPatches", "Densify", "MaskedConv2d", "RowBatchNormApply",
           "MaskedMaxPool2d", "ACTIVATIONS"]
