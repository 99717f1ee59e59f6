"""Shared tools for comparing a backend with the dense reference."""
from __future__ import annotations

import copy
import multiprocessing
import os

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
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


def sparse_at(images: torch.Tensor, active: torch.Tensor, backend, stride: int = 1, patch_size: int = 32):
    """A sparse map (images or volumes) at ``stride``, built at stride 1 and brought down by
    non-overlapping average pooling."""
    from ctssl.sparse import PatchIndex, get_backend

    be = get_backend(backend) if isinstance(backend, str) else backend
    x = be.sparse_input(images, PatchIndex(active, patch_size))
    if stride > 1:
        x = getattr(be, f"avg_pool{x.ndim}d")(x, stride, stride, 0)
    return x


def run_ranks(target, args, out_dir, world: int = 2, timeout: float = 120) -> list:
    """Run ``target(rank, world, store_path, out_dir, *args)`` in ``world`` spawned processes and
    return what each rank ``torch.save``d to ``out_dir/rank{r}.pt``.

    Results go through files: tensors sent over a multiprocessing queue are shared by file
    descriptor and vanish if the rank exits before the parent has read them. A rank still alive
    after ``timeout`` (a collective skipped on the other rank) is terminated and fails the test.
    """
    ctx = multiprocessing.get_context("spawn")
    store = os.path.join(str(out_dir), "store")
    procs = [ctx.Process(target=target, args=(r, world, store, str(out_dir), *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.terminate()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt")) for r in range(world)]


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


def assert_runs_match(ref, out, tol):
    """Two ``run_model`` results agree: every map, the image gradient, every parameter gradient, every buffer."""
    maps_d, xg_d, g_d, b_d, _ = ref
    maps_t, xg_t, g_t, b_t, _ = out
    for a, b in zip(maps_t, maps_d):
        assert rel_err(a, b) < tol
    assert rel_err(xg_t, xg_d) < tol
    assert g_d.keys() == g_t.keys() and len(g_d) > 0
    for name in g_d:
        assert rel_err(g_t[name], g_d[name]) < tol, name
    for name in b_d:  # BN running statistics after the step
        assert rel_err(b_t[name].double(), b_d[name].double()) < tol, name


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
