"""Optimizers for pre-training: LAMB (SparK), LARS (SwAV, SimCLR), and torch's AdamW, Adam and SGD.

Parameter groups come from ``method.param_groups(weight_decay)``: groups with a positive weight
decay are the "decayed" ones. LAMB and LARS adapt the step per layer only in those groups (BN,
biases and tokens take plain steps), and the weight-decay schedule rescales only those groups.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer

from .config import ConfigError


class Lamb(Optimizer):
    """LAMB (You et al., 2019): Adam moments with a per-tensor trust ratio ||w|| / ||update||.

    ``update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` (decoupled decay inside the update);
    the trust ratio applies where ``weight_decay != 0`` or ``always_adapt``. SparK's betas are
    (0.9, 0.95). Moments are kept in fp32 whatever the parameter dtype.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-6,
                 weight_decay: float = 0.0, always_adapt: bool = False, max_trust: float | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"Lamb: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, always_adapt=always_adapt,
                        max_trust=max_trust)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(eps)
                update = (exp_avg / (1 - beta1 ** t)).div_(denom)
                weight = p.float()
                if wd != 0:
                    update.add_(weight, alpha=wd)
                if wd != 0 or group["always_adapt"]:
                    w_norm = weight.norm()
                    u_norm = update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    if group["max_trust"] is not None:
                        trust = trust.clamp(max=group["max_trust"])
                    update.mul_(trust)
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss


class Lars(Optimizer):
    """SGD with momentum and LARS layer-wise rates (SwAV's LARC without clipping).

    For adapted tensors (``weight_decay != 0``) the gradient plus decay is scaled by
    ``trust * ||w|| / (||g|| + weight_decay * ||w|| + eps)`` before the momentum update.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Lars: lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                weight = p.float()
                if wd != 0:
                    w_norm = weight.norm()
                    g_norm = grad.norm()
                    scale = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    scale = torch.where((w_norm > 0) & (g_norm > 0), scale, torch.ones_like(scale))
                    grad = grad.add(weight, alpha=wd).mul_(scale)
                state = self.state[p]
                if mom != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.clone()
                    else:
                        buf.mul_(mom).add_(grad)
                    grad = grad.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(grad.to(p.dtype), alpha=-lr)
        return loss


def mark_decay_groups(param_groups: Iterable[dict], weight_decay: float) -> list[dict]:
    """Copies of the groups with ``decayed`` set (the weight-decay schedule scales only those).

    A group without its own ``weight_decay`` gets ``weight_decay``; empty groups are dropped.
    """
    groups = []
    for group in param_groups:
        group = dict(group)
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        group["params"] = params
        group.setdefault("weight_decay", weight_decay)
        group["decayed"] = group["weight_decay"] > 0
        groups.append(group)
    if not groups:
        raise ConfigError("the method has no trainable parameters")
    return groups


def build_optimizer(name: str, param_groups: Iterable[dict], lr: float, weight_decay: float,
                    betas: tuple[float, float] | None = None, momentum: float | None = None,
                    eps: float | None = None, lars_trust: float = 0.001) -> Optimizer:
    """The optimizer called ``name`` over the method's parameter groups.

    ``betas`` None: (0.9, 0.95) for LAMB (SparK), (0.9, 0.999) for Adam(W); ``momentum`` None: 0.9.
    """
    groups = mark_decay_groups(param_groups, weight_decay)
    if betas is None:
        betas = (0.9, 0.95) if name == "lamb" else (0.9, 0.999)
    betas = tuple(betas)
    momentum = 0.9 if momentum is None else momentum
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=1e-6 if eps is None else eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return Lars(groups, lr=lr, momentum=momentum, trust_coefficient=lars_trust,
                    eps=1e-8 if eps is None else eps)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of lamb, adamw, adam, sgd, lars")


def clip_grad_norm(parameters, max_norm: float | None) -> torch.Tensor | None:
    """Clip the global gradient norm to ``max_norm`` (None: no clipping); returns the norm before."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm is None or not params:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


__all__ = ["Lamb", "Lars", "build_optimizer", "mark_decay_groups", "clip_grad_norm"]
