"""BatchNorm over visible positions, on rows ``(M, C)``: shared by every layout.

SparK normalises with statistics of the visible pixels only. Once the visible
pixels are rows, that is plain BatchNorm1d over the rows; this module adds the
cases plain BatchNorm refuses (fewer than two rows) and the synchronized variant,
whose statistics take ``ctssl.sparse.norm_stats``' one path (one all-reduce forward,
one backward), like every backend's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .norm_stats import batch_norm_statistics, is_distributed
from .precision import accumulation_dtype


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
    if use_batch_stats and is_distributed(process_group):
        return SyncRowBatchNorm.apply(rows, weight, bias, running_mean, running_var, momentum, eps,
                                      process_group)
    if rows.shape[0] == 0:
        return rows
    if use_batch_stats and rows.shape[0] < 2:
        return _batch_norm_few_rows(rows, weight, bias, eps)
    return F.batch_norm(rows, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)


def _batch_norm_few_rows(rows, weight, bias, eps):
    x = rows.to(accumulation_dtype(rows.dtype))
    mean = x.mean(0, keepdim=True)
    var = (x - mean).pow(2).mean(0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(rows.dtype)


def row_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each column, in the accumulation dtype (torch ops)."""
    var, mean = torch.var_mean(rows.to(accumulation_dtype(rows.dtype)), 0, correction=0)
    return mean, var


class SyncRowBatchNorm(torch.autograd.Function):
    """BatchNorm whose statistics and backward sums are reduced across ranks.

    Statistics come from ``batch_norm_statistics`` (one all-reduce of the moments, running
    statistics updated); the backward reduces ``[sum(dy), sum(dy * xhat)]`` with the statistics'
    ``reduce_grad_sums``. Weight and bias gradients stay local (DDP averages them like any
    parameter gradient).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, running_mean, running_var, momentum, eps, group):
        stats = batch_norm_statistics(rows, running_mean, running_var, True, momentum, eps, group, row_moments)
        x = rows.to(stats.mean.dtype)
        xhat = (x - stats.mean) * stats.invstd
        y = xhat
        if weight is not None:
            y = y * weight.to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        ctx.save_for_backward(xhat, weight)
        ctx.stats = stats
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(rows.dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, weight = ctx.saved_tensors
        stats = ctx.stats
        dyf = dy.to(xhat.dtype)
        local = torch.stack([dyf.sum(0), (dyf * xhat).sum(0)])
        sums, n = stats.reduce_grad_sums(local)
        scale = stats.invstd if weight is None else stats.invstd * weight.to(xhat.dtype)
        dx = (dyf - sums[0] / n - xhat * (sums[1] / n)) * scale
        dweight = local[1].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = local[0].to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx.to(dy.dtype), dweight, dbias, None, None, None, None, None
