"""The trainer's dense synchronized BN on the CPU takes volumes (B, C, D, H, W): two gloo ranks with half a batch
each normalise exactly like one process with the whole batch."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ctssl.train.distributed import convert_batchnorm

WORLD = 2


def _data() -> torch.Tensor:
    return torch.randn(2 * WORLD, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4)).double()


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = convert_batchnorm(_model(), torch.device("cpu")).train()
        x = _data()[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
        y = model(x)
        y.pow(2).mul(torch.arange(4, dtype=y.dtype).view(1, 4, 1, 1, 1)).sum().backward()
        torch.save({"y": y.detach(), "grad": x.grad, "mean": model[1].running_mean},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_two_ranks_normalise_volumes_like_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    model = _model().train()
    x = _data().requires_grad_(True)
    y = model(x)
    y.pow(2).mul(torch.arange(4, dtype=y.dtype).view(1, 4, 1, 1, 1)).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]), x.grad)
    for r in results:
        torch.testing.assert_close(r["mean"], model[1].running_mean)
