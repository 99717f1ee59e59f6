"""Synchronized sparse BN: two gloo ranks equal one process on the combined batch."""
import os

import pytest
import torch
import torch.distributed as dist

from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.modules import BatchNorm2d, BatchNorm3d, SyncBatchNorm, convert_sync_batchnorm

from .helpers import rel_err, run_ranks

BATCHNORM = {2: BatchNorm2d, 3: BatchNorm3d}


def _data(dims=2):
    """Images (patch 32) or volumes (patch 8), with one sample that shows nothing."""
    gen = torch.Generator().manual_seed(0)
    size = 64 if dims == 2 else 16
    images = torch.randn(4, 3, *([size] * dims), generator=gen, dtype=torch.float64)
    active = torch.rand(4, *([2] * dims), generator=gen) < 0.6
    active[0] = False  # a rank's image with nothing visible
    weights = torch.randn(4, 3, *([size] * dims), generator=gen, dtype=torch.float64)
    return images, active, weights


def _step(bn, images, active, weights, backend):
    x = images.clone().requires_grad_(True)
    y = bn(get_backend(backend).sparse_input(x, PatchIndex(active, images.shape[-1] // 2)))
    (y.to_dense() * weights).sum().backward()
    return y.to_dense().detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()


def _worker(rank, world, store_path, out_dir, backend, dims):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        images, active, weights = _data(dims)
        part = slice(2 * rank, 2 * rank + 2)
        bn = convert_sync_batchnorm(BATCHNORM[dims](3, momentum=0.5)).double()
        assert isinstance(bn, SyncBatchNorm)
        y, gx, gw, gb = _step(bn, images[part], active[part], weights[part], backend)
        dist.all_reduce(gw)
        dist.all_reduce(gb)
        torch.save((y, gx, gw, gb, bn.running_mean, bn.running_var), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend,dims", [("dense", 2), ("torch", 2), ("torch", 3)])
def test_sync_bn_two_ranks_equal_one_process(tmp_path, backend, dims):
    results = run_ranks(_worker, (backend, dims), tmp_path)
    images, active, weights = _data(dims)
    bn = BATCHNORM[dims](3, momentum=0.5).double()
    y, gx, gw, gb = _step(bn, images, active, weights, backend)
    assert rel_err(torch.cat([r[0] for r in results]), y) < 1e-12
    assert rel_err(torch.cat([r[1] for r in results]), gx) < 1e-10
    for r in results:
        assert rel_err(r[2], gw) < 1e-10 and rel_err(r[3], gb) < 1e-10
        assert rel_err(r[4], bn.running_mean) < 1e-12 and rel_err(r[5], bn.running_var) < 1e-12


def test_sync_bn_without_process_group_is_plain_sparse_bn():
    images, active, weights = _data()
    a = _step(SyncBatchNorm(3).double(), images, active, weights, "torch")
    b = _step(BatchNorm2d(3).double(), images, active, weights, "torch")
    for u, v in zip(a, b):
        assert torch.equal(u, v)
