"""Synchronized BatchNorm on the operators: two gloo ranks on the CPU equal one process on all rows."""
import os

import pytest
import torch
import torch.distributed as dist

from ctssl.cuda_ops.batchnorm import row_batch_norm

from ..sparse.helpers import run_ranks
from .helpers import needs_ext

pytestmark = [needs_ext, pytest.mark.slow]
M, C = (37, 23), 5  # uneven rows per rank, one rank's share tiny


def _data():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(sum(M), C, generator=gen, dtype=torch.float64) * 2 + 1
    gy = torch.randn(sum(M), C, generator=gen, dtype=torch.float64)
    res = torch.randn(sum(M), C, generator=gen, dtype=torch.float64)
    return rows, gy, res


def _step(rows, gy, res, group):
    x, r = rows.clone().requires_grad_(True), res.clone().requires_grad_(True)
    w = torch.linspace(0.5, 1.5, C, dtype=torch.float64, requires_grad=True)
    b = torch.linspace(-1, 1, C, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y = row_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, group, activation="relu", residual=r)
    (y * gy).sum().backward()
    return y.detach(), x.grad, r.grad, w.grad, b.grad, rm, rv


def _worker(rank, world, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        import ctssl._C  # noqa: F401  (registers torch.ops.ctssl in the child)
        rows, gy, res = _data()
        part = slice(0, M[0]) if rank == 0 else slice(M[0], sum(M))
        out = _step(rows[part], gy[part], res[part], dist.group.WORLD)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    if not dist.is_available():
        pytest.skip("needs torch.distributed (gloo)")
    ranks = run_ranks(_worker, (), tmp_path)
    rows, gy, res = _data()
    ref = _step(rows, gy, res, None)
    y = torch.cat([ranks[0][0], ranks[1][0]])
    gx = torch.cat([ranks[0][1], ranks[1][1]])
    gr = torch.cat([ranks[0][2], ranks[1][2]])
    assert torch.allclose(y, ref[0], atol=1e-10)
    assert torch.allclose(gx, ref[1], atol=1e-10)
    assert torch.allclose(gr, ref[2], atol=1e-10)
    # weight/bias grads stay local (DDP averages them): their sum over ranks is the full-batch grad
    assert torch.allclose(ranks[0][3] + ranks[1][3], ref[3], atol=1e-10)
    assert torch.allclose(ranks[0][4] + ranks[1][4], ref[4], atol=1e-10)
    for r in ranks:  # every rank holds the global running statistics
        assert torch.allclose(r[5], ref[5], atol=1e-12) and torch.allclose(r[6], ref[6], atol=1e-12)
