"""Normalisation statistics of packed rows: one type, and the one path every backend takes to them.

Kernels compute, the backend communicates. Each backend computes the moments (mean, biased
variance) of its own rows with its own kernel: torch ops, a Triton kernel, a compiled operator.
Everything after that is written here once:

- ``batch_norm_statistics``: torch's choice between batch and running statistics, and whether to
  synchronize (batch statistics of a process group with several ranks: SyncBatchNorm);
- ``sync_moments``: the forward's one all-reduce of ``(n * mean, n * (var + mean^2), n)``, in
  float64, the row count staying on the device (no host sync);
- ``update_running``: torch's running-statistics rule (momentum, unbiased variance, untouched
  below two rows);
- ``NormStats``: what an apply pass normalises with; its ``reduce_grad_sums`` is the backward's one
  all-reduce, which the kernels' backward passes call between their two passes.

Shapes: BatchNorm's statistics are per channel, ``(C,)``. ``NormStats`` and the moment/sum
conversions only broadcast: a per-sample InstanceNorm (statistics ``(B, C)`` over each sample's
visible rows, ``count`` per sample) or a per-row LayerNorm (``(M, 1)``) builds the same type from
the same pieces; only BatchNorm synchronizes across ranks or keeps running statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .precision import accumulation_dtype


def is_distributed(group) -> bool:
    """Synchronize only when a process group is given (SyncBatchNorm) and it has several ranks."""
    return (group is not None and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1)


@dataclass(eq=False)
class NormStats:
    """The statistics one normalisation applies, decided before its apply pass.

    ``mean`` and ``invstd`` are in the accumulation dtype. ``count`` is the number of rows they
    cover over every rank: an int, or a device tensor when synchronized (no host sync). ``batch``
    says they were computed from the rows being normalised (training): the input gradient then
    flows through them. ``group`` is the process group they were reduced over, or None.
    """

    mean: torch.Tensor
    invstd: torch.Tensor
    count: int | torch.Tensor
    batch: bool
    group: object = None

    @property
    def synchronized(self) -> bool:
        return self.batch and self.group is not None

    def reduce_grad_sums(self, sums):
        """The backward's sums over this rank's rows (``sum dz``, ``sum dz * xhat``, ...: a tensor
        stacked on dim 0, or a tuple of tensors) -> ``(sums, n)``, the same structure, with
        ``sums / n`` their means over every row the statistics cover.

        Synchronized: one all-reduce (by every rank, also one without rows: collectives must match),
        divided by the global count on the device, so ``n`` is 1.0. The given sums are left as they
        were (weight and bias gradients stay local; DDP averages them).
        """
        if not self.synchronized:
            return sums, float(self.count)
        split = isinstance(sums, (tuple, list))
        total = torch.stack(list(sums)) if split else sums.clone()
        dist.all_reduce(total, group=self.group)
        total = total / self.count.clamp_min(1).to(total.dtype)
        return (tuple(total.unbind(0)) if split else total), 1.0


def moments_to_sums(mean: torch.Tensor, var: torch.Tensor, count) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum x, sum x^2)`` of ``count`` rows with this mean and biased variance (any broadcastable shapes)."""
    return mean * count, (var + mean * mean) * count


def sums_to_moments(total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance from ``(sum x, sum x^2, count)``; zero where there are no rows."""
    safe = count.clamp_min(1)
    mean = total / safe
    return mean, (total_sq / safe - mean * mean).clamp_min(0)


def sync_moments(mean: torch.Tensor, var: torch.Tensor, count: int, group
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel moments over every rank's rows from each rank's own, in one all-reduce (float64);
    the global count comes back as a ``(1,)`` float64 device tensor."""
    C = mean.shape[-1]
    n = torch.full((1,), float(count), dtype=torch.float64, device=mean.device)
    packed = torch.cat([*moments_to_sums(mean.double(), var.double(), n), n])
    dist.all_reduce(packed, group=group)
    total = packed[-1:]
    g_mean, g_var = sums_to_moments(packed[:C], packed[C:2 * C], total)
    return g_mean.to(mean.dtype), g_var.to(mean.dtype), total


def update_running(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   count: int | torch.Tensor, momentum: float) -> None:
    """torch's rule: exponential average of the batch mean and the unbiased batch variance, only when
    the statistics cover more than one row. A device-tensor count is used without a host sync.

    (The Triton finalize kernel applies the same rule in its own launch on the single-process path;
    the tests hold every backend's running statistics to the dense reference's.)
    """
    with torch.no_grad():
        if isinstance(count, torch.Tensor):
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


def running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, count: int,
                  dtype: torch.dtype) -> NormStats:
    """Eval-mode statistics: the running ones, in the accumulation dtype of rows of ``dtype``."""
    acc = accumulation_dtype(dtype)
    mean = running_mean.detach().to(acc).contiguous()
    invstd = torch.rsqrt(running_var.detach().to(acc) + eps).contiguous()
    return NormStats(mean, invstd, count, False)


def batch_stats(mean: torch.Tensor, var: torch.Tensor, count: int, running_mean, running_var, momentum: float,
                eps: float, group=None) -> NormStats:
    """Final batch statistics from this rank's moments: synchronized over ``group`` (if any), the
    running statistics (if any) updated."""
    if group is not None:
        mean, var, count = sync_moments(mean, var, count, group)
    if running_mean is not None:
        update_running(running_mean, running_var, mean, var, count, momentum)
    return NormStats(mean, torch.rsqrt(var + eps), count, True, group)


Moments = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def batch_norm_statistics(rows: torch.Tensor, running_mean, running_var, training: bool, momentum: float,
                          eps: float, process_group, moments: Moments,
                          fused: Callable[[torch.Tensor], NormStats] | None = None) -> NormStats | None:
    """The statistics a BatchNorm over ``rows`` normalises with; None when there is nothing to
    normalise and no collective to join (no rows, not synchronized).

    Batch statistics when training or without running statistics, else the running ones;
    synchronized only for batch statistics of a process group with several ranks.
    ``moments(rows) -> (mean, biased var)`` in the accumulation dtype is the backend's kernel.
    ``fused(rows) -> NormStats``, where a backend has one, computes single-process batch statistics
    and updates the running ones in one launch, by ``update_running``'s rule.
    """
    use_batch = training or running_mean is None
    group = process_group if use_batch and is_distributed(process_group) else None
    M = rows.shape[0]
    if M == 0 and group is None:
        return None
    if not use_batch:
        return running_stats(running_mean, running_var, eps, M, rows.dtype)
    with torch.no_grad():
        rows = rows.detach()
        if group is None and fused is not None:
            return fused(rows)
        if M:
            mean, var = moments(rows)
        else:  # a rank without rows still joins the all-reduce
            mean = var = rows.new_zeros(rows.shape[1], dtype=accumulation_dtype(rows.dtype))
        return batch_stats(mean, var, M, running_mean, running_var, momentum, eps, group)


__all__ = ["NormStats", "batch_norm_statistics", "batch_stats", "is_distributed", "moments_to_sums",
           "running_stats", "sums_to_moments", "sync_moments", "update_running"]
