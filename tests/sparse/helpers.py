"""Shared tools for comparing a backend with the dense reference."""
from __future__ import annotations

import copy

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm()
    if denom == 0:
        return float((a - b).norm())
    return float((a - b).norm() / denom)


def edge_masks(batch: int, h: int, w: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random masks plus SparK's edge cases: an image with none, one with all, uneven counts."""
    random = torch.rand(batch, h, w, generator=gen) < 0.5
    edge = random.clone()
    edge[0] = False
    if batch > 1:
        edge[1] = True
    single = torch.zeros(batch, h, w, dtype=torch.bool)
    single[-1, h - 1, 0] = True
    return [random, edge, single]


def run_model(model, images, active, backend, loss_weights=None):
    """Forward + backward of ``forward_masked``; returns maps, image grad, param grads, buffers."""
    m = copy.deepcopy(model)
    x = images.detach().clone().requires_grad_(True)
    maps = m.forward_masked(x, active, backend)
    if loss_weights is None:
        loss_weights = [torch.randn_like(mp, generator=None) for mp in maps]
    loss = sum((mp * w).sum() for mp, w in zip(maps, loss_weights))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    return [mp.detach() for mp in maps], x.grad.clone(), grads, buffers, loss_weights


def random_batchnorm(channels: int, **kwargs):
    """A sparse BatchNorm2d with non-trivial affine parameters and running statistics."""
    from ctssl.sparse.modules import BatchNorm2d

    bn = BatchNorm2d(channels, **kwargs)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return bn
