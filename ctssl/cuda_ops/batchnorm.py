"""BatchNorm over rows: ``ctssl.bn_stats``, ``bn_apply``, ``bn_backward_reduce``, ``bn_backward_apply``
(csrc/batchnorm.cpp, batchnorm_cuda.cu).

Welford statistics; one apply pass with the residual add and ReLU/ReLU6 fused; a two-pass backward
(the sums of dz and dz * xhat, then dx and the residual's gradient). The statistics take
``ctssl.sparse.norm_stats``' one path: the moments come from ``ctssl.bn_stats``, synchronization
and the running-statistics update happen there, and the backward's sums cross ranks only through
``NormStats.reduce_grad_sums``.
"""
from __future__ import annotations

import torch

from ..sparse.norm_stats import NormStats, batch_norm_statistics
from ..sparse.precision import accumulation_dtype
from .runtime import fake, ops

ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "relu6": 2}
"""The fused activations and their codes in the operators."""


def _moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Welford mean and biased variance of the rows (``ctssl.bn_stats``), in the accumulation dtype."""
    return ops().bn_stats(rows.contiguous())


class RowBatchNormApply(torch.autograd.Function):
    """``act(bn(rows) + residual)`` with given statistics, in one pass; the backward treats batch
    statistics as functions of the rows (its two sums go through ``stats.reduce_grad_sums``, the one
    all-reduce of a synchronized BatchNorm)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, residual, stats: NormStats, activation):
        y = ops().bn_apply(rows, stats.mean, stats.invstd, weight, bias, residual, activation)
        ctx.save_for_backward(rows, y if activation else None, weight)
        ctx.stats, ctx.activation = stats, activation
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        op = ops()
        rows, y, weight = ctx.saved_tensors
        stats, act = ctx.stats, ctx.activation
        need = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        if stats.batch or need[1] or need[2]:
            sum_dz, sum_dz_xhat = op.bn_backward_reduce(grad_y, y, rows, stats.mean, stats.invstd, act)
        else:
            sum_dz = sum_dz_xhat = torch.zeros_like(stats.mean)
        grad_weight = sum_dz_xhat.to(ctx.dtypes[0]) if need[1] and ctx.dtypes[0] is not None else None
        grad_bias = sum_dz.to(ctx.dtypes[1]) if need[2] and ctx.dtypes[1] is not None else None
        grad_rows = grad_res = None
        if need[0] or need[3]:
            (g_dz, g_dz_xhat), n = stats.reduce_grad_sums((sum_dz, sum_dz_xhat))
            want_z = bool(need[3]) and act != 0
            grad_rows, grad_z = op.bn_backward_apply(grad_y, y, rows, stats.mean, stats.invstd, weight, g_dz,
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


@fake("bn_stats")
def _bn_stats_fake(rows):
    acc = accumulation_dtype(rows.dtype)
    return rows.new_empty((rows.shape[1],), dtype=acc), rows.new_empty((rows.shape[1],), dtype=acc)


@fake("bn_apply")
def _bn_apply_fake(rows, mean, invstd, weight, bias, residual, activation):
    return torch.empty_like(rows)


@fake("bn_backward_reduce")
def _bn_backward_reduce_fake(grad_y, y, rows, mean, invstd, activation):
    return _bn_stats_fake(rows)


@fake("bn_backward_apply")
def _bn_backward_apply_fake(grad_y, y, rows, mean, invstd, weight, sum_dz, sum_dz_xhat, count, batch_stats,
                            activation, need_grad_z):
    return torch.empty_like(rows), (torch.empty_like(rows) if need_grad_z else None)


__all__ = ["ACTIVATIONS", "RowBatchNormApply", "apply_row_batch_norm", "batch_norm_stats", "row_batch_norm"]
