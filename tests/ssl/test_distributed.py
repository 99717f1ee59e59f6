"""Cross-rank behaviour of the contrastive losses with two CPU (gloo) processes.

Splitting a batch over two ranks must give what one process computes on the whole batch:
SimCLR's NT-Xent (negatives gathered), Sinkhorn (sums all-reduced), MoCo's queue (keys of
both ranks enqueued on both).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ctssl.ssl import distributed as ssl_dist
from ctssl.ssl.mocov2 import KeyQueue
from ctssl.ssl.simclr import nt_xent
from ctssl.ssl.swav import sinkhorn

WORLD = 2
N = 3  # samples per rank


def _data():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(WORLD * N, 8, generator=g), torch.randn(WORLD * N, 8, generator=g)
    scores = F.normalize(torch.randn(WORLD * N, 8, generator=g), dim=1) @ F.normalize(
        torch.randn(5, 8, generator=g), dim=1).t()
    keys = F.normalize(torch.randn(WORLD * N, 4, generator=g), dim=1)
    return z1, z2, scores, keys


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        z1, z2, scores, keys = _data()
        part = slice(rank * N, (rank + 1) * N)
        a, b = z1[part].clone().requires_grad_(True), z2[part].clone().requires_grad_(True)
        loss = nt_xent(a, b, 0.1)
        loss.backward()
        q = sinkhorn(scores[part], 0.05, 3)
        queue = KeyQueue(10, 4)
        queue.enqueue(ssl_dist.all_gather(keys[part]))
        torch.save({"loss": loss.detach(), "grad": a.grad, "q": q, "queue": queue.keys[:WORLD * N].clone(),
                    "world": ssl_dist.world_size(), "rank": ssl_dist.rank()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == WORLD for r in results)
    z1, z2, scores, keys = _data()
    # NT-Xent: the mean of the rank losses is the full-batch loss
    full = nt_xent(z1, z2, 0.1)
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, full)
    # each rank's local embeddings receive the gradients of every rank's loss (they are negatives
    # there too): the sum of the rank losses is WORLD x the full-batch loss, so with DDP averaging
    # the parameter gradients this is exactly the one-process gradient
    a1 = z1.clone().requires_grad_(True)
    nt_xent(a1, z2, 0.1).backward()
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["grad"], WORLD * a1.grad[rank * N:(rank + 1) * N], rtol=1e-4, atol=1e-6)
    # Sinkhorn: the ranks' assignments stacked are the full-batch assignments
    torch.testing.assert_close(torch.cat([r["q"] for r in results]), sinkhorn(scores, 0.05, 3), rtol=1e-5, atol=1e-6)
    # MoCo: both ranks enqueue the keys of both, in rank order
    for r in results:
        torch.testing.assert_close(r["queue"], keys)


def test_single_process_collectives_are_identities():
    x = torch.randn(3, 2, requires_grad=True)
    assert ssl_dist.world_size() == 1 and ssl_dist.rank() == 0
    assert ssl_dist.all_gather_local_grad(x) is x
    assert torch.equal(ssl_dist.all_gather(x), x.detach())
