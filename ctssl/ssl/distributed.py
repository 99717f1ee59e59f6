"""The few collectives the contrastive losses need; plain identities in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), without gradient."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def all_gather_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Like ``all_gather``, but the local rank's slice is ``x`` itself, so gradient flows into it.

    The other ranks' slices are constants here; their own ranks back-propagate through them.
    """
    if not is_distributed():
        return x
    n, r = x.shape[0], dist.get_rank()
    gathered = all_gather(x)
    return torch.cat([gathered[: r * n], x, gathered[(r + 1) * n:]])


@torch.no_grad()
def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x
