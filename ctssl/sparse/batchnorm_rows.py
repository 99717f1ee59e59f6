"""BatchNorm over visible positions, on rows ``(M, C)``: shared by every layout.

SparK normalises with statistics of the visible pixels only. Once the visible
pixels are rows, that is plain BatchNorm1d over the rows; this module adds the
cases plain BatchNorm refuses (fewer than two rows) and the synchronized variant,
which reduces (sum, sum of squares, count) across ranks in one all-reduce.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def running_momentum(bn: torch.nn.modules.batchnorm._BatchNorm) -> float:
    """torch's momentum rule for a BN module's running statistics (fixed, or the cumulative average
    when ``momentum`` is None), counting this batch in ``num_batches_tracked`` when training."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def batch_norm_rows(
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    process_group=None,
) -> torch.Tensor:
    """Normalise rows by their own statistics (training) or the running ones (eval).

    ``process_group`` not None (SyncBatchNorm) reduces the statistics across its ranks.

    With fewer than two rows in training the batch statistics are undefined for the
    unbiased running variance: the running statistics are left unchanged then, and
    an empty input returns itself.
    """
    use_batch_stats = training or running_mean is None
    if use_batch_stats and _distributed(process_group):
        return SyncRowBatchNorm.apply(rows, weight, bias, running_mean, running_var, momentum, eps,
                                      process_group)
    if rows.shape[0] == 0:
        return rows
    if use_batch_stats and rows.shape[0] < 2:
        return _batch_norm_few_rows(rows, weight, bias, eps)
    return F.batch_norm(rows, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)


def _batch_norm_few_rows(rows, weight, bias, eps):
    stat_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    x = rows.to(stat_dtype)
    mean = x.mean(0, keepdim=True)
    var = (x - mean).pow(2).mean(0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(rows.dtype)


def _distributed(process_group) -> bool:
    """Synchronize only when a process group is given (SyncBatchNorm) and it has several ranks."""
    return (process_group is not None and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(process_group) > 1)


class SyncRowBatchNorm(torch.autograd.Function):
    """BatchNorm whose statistics and backward sums are reduced across ranks.

    Forward all-reduces ``[sum, sum of squares, count]`` once; backward all-reduces
    ``[sum(dy), sum(dy * xhat)]`` once. Weight and bias gradients stay local (DDP
    averages them like any parameter gradient).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, running_mean, running_var, momentum, eps, group):
        stat_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        x = rows.to(stat_dtype)
        C = x.shape[1]
        local = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))])
        dist.all_reduce(local, group=group)
        count = local[-1]
        n = float(count.item())
        ctx.group, ctx.empty = group, n == 0
        if n == 0:
            return rows.clone()
        mean = local[:C] / count
        var = (local[C:2 * C] / count - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and n > 1:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * n / (n - 1)).to(running_var.dtype), alpha=momentum)
        xhat = (x - mean) * invstd
        y = xhat
        if weight is not None:
            y = y * weight.to(stat_dtype)
        if bias is not None:
            y = y + bias.to(stat_dtype)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.n = n
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(rows.dtype)

    @staticmethod
    def backward(ctx, dy):
        if ctx.empty:
            return dy, None, None, None, None, None, None, None
        x, mean, invstd, weight = ctx.saved_tensors
        dyf = dy.to(x.dtype)
        xhat = (x - mean) * invstd
        local_dy = dyf.sum(0)
        local_dy_xhat = (dyf * xhat).sum(0)
        sums = torch.cat([local_dy, local_dy_xhat])
        dist.all_reduce(sums, group=ctx.group)
        C = x.shape[1]
        g_dy, g_dy_xhat = sums[:C] / ctx.n, sums[C:] / ctx.n
        scale = invstd if weight is None else invstd * weight.to(x.dtype)
        dx = (dyf - g_dy - xhat * g_dy_xhat) * scale
        dweight = local_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = local_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx.to(dy.dtype), dweight, dbias, None, None, None, None, None
