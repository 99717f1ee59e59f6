"""Momentum (EMA) target networks, shared by MoCo v2 and BYOL."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` to be updated only by ``ema_update``."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for every parameter.

    Buffers (BN running statistics) are left alone: the target runs its BN in training
    mode, so it normalises with batch statistics and keeps its own running averages.
    """
    t_params = [p for p in target.parameters()]
    o_params = [p for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("ema_update: target and online networks have different parameters")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in o_params], alpha=1.0 - momentum)


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: ``final - (final - base) * (cos(pi * step / total) + 1) / 2``.

    ``base`` at step 0, ``final`` at ``total_steps``.
    """
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
