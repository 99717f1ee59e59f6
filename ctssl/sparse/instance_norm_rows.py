"""InstanceNorm over visible positions, on rows ``(M, C)``: statistics per (sample, channel) over that
sample's visible rows, the norm of nnU-Net-style encoders.

The statistics take the BatchNorm core's path (``ctssl.sparse.norm_stats``): moments from sums
(``sums_to_moments``, here corrected two-pass: the centred sums of a first mean) into one
``NormStats`` whose mean and invstd are ``(B, C)`` and whose count is the rows of each sample,
``(B, 1)``. Nothing synchronizes across ranks (each sample's statistics are its own) and no
running statistics are kept. A sample with no visible row has no statistics to use and no row
to normalise.
"""
from __future__ import annotations

import torch

from .norm_stats import NormStats, sums_to_moments
from .precision import accumulation_dtype


def _per_sample_sums(x: torch.Tensor, samples: torch.Tensor, batch: int) -> torch.Tensor:
    return x.new_zeros(batch, x.shape[1]).index_add_(0, samples, x)


def instance_statistics(rows: torch.Tensor, samples: torch.Tensor, batch: int, eps: float) -> NormStats:
    """Per-sample statistics of ``rows`` (``samples[m]``: the sample of row m), in the accumulation dtype."""
    with torch.no_grad():
        x = rows.detach().to(accumulation_dtype(rows.dtype))
        count = torch.bincount(samples, minlength=batch).to(x.dtype).unsqueeze(1)
        first = _per_sample_sums(x, samples, batch) / count.clamp_min(1)
        d = x - first[samples]
        shift, var = sums_to_moments(_per_sample_sums(d, samples, batch), _per_sample_sums(d * d, samples, batch),
                                     count)
        return NormStats(first + shift, torch.rsqrt(var + eps), count, True)


class RowInstanceNorm(torch.autograd.Function):
    """``(x - mean_b) * invstd_b * weight + bias`` on rows; the backward flows through the statistics
    (per sample: ``dx = (g - mean_b(g) - xhat * mean_b(g * xhat)) * invstd_b``, ``g = dy * weight``)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, samples, batch, eps):
        stats = instance_statistics(rows, samples, batch, eps)
        x = rows.to(stats.mean.dtype)
        xhat = (x - stats.mean[samples]) * stats.invstd[samples]
        y = xhat
        if weight is not None:
            y = y * weight.to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        ctx.save_for_backward(xhat, weight, samples)
        ctx.stats, ctx.batch = stats, batch
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(rows.dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, samples = ctx.saved_tensors
        stats, batch = ctx.stats, ctx.batch
        dyf = dy.to(xhat.dtype)
        g = dyf if weight is None else dyf * weight.to(xhat.dtype)
        count = stats.count.clamp_min(1)
        mean_g = _per_sample_sums(g, samples, batch) / count
        mean_gx = _per_sample_sums(g * xhat, samples, batch) / count
        dx = (g - mean_g[samples] - xhat * mean_gx[samples]) * stats.invstd[samples]
        dweight = (dyf * xhat).sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dyf.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx.to(dy.dtype), dweight, dbias, None, None, None


def instance_norm_rows(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       samples: torch.Tensor, batch: int, eps: float) -> torch.Tensor:
    """Normalise each sample's rows by that sample's statistics (``samples``: the sample of every row)."""
    if rows.shape[0] == 0:
        return rows
    return RowInstanceNorm.apply(rows, weight, bias, samples, batch, eps)


__all__ = ["RowInstanceNorm", "instance_norm_rows", "instance_statistics"]
