"""Synchronized sparse BN: two gloo ranks equal one process on the combined batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.modules import BatchNorm2d, SyncBatchNorm, convert_sync_batchnorm

from .helpers import rel_err


def _data():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=gen, dtype=torch.float64)
    active = torch.rand(4, 2, 2, generator=gen) < 0.6
    active[0] = False  # a rank's image with nothing visible
    weights = torch.randn(4, 3, 64, 64, generator=gen, dtype=torch.float64)
    return images, active, weights


def _step(bn, images, active, weights, backend):
    x = images.clone().requires_grad_(True)
    y = bn(get_backend(backend).sparse_input(x, PatchIndex(active)))
    (y.to_dense() * weights).sum().backward()
    return y.to_dense().detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()


def _worker(rank, world, port, backend, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, active, weights = _data()
        part = slice(2 * rank, 2 * rank + 2)
        bn = convert_sync_batchnorm(BatchNorm2d(3, momentum=0.5)).double()
        assert isinstance(bn, SyncBatchNorm)
        y, gx, gw, gb = _step(bn, images[part], active[part], weights[part], backend)
        dist.all_reduce(gw)
        dist.all_reduce(gb)
        queue.put((rank, y, gx, gw, gb, bn.running_mean.clone(), bn.running_var.clone()))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_sync_bn_two_ranks_equal_one_process(backend):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, backend, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted([queue.get(timeout=120) for _ in procs], key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    images, active, weights = _data()
    bn = BatchNorm2d(3, momentum=0.5).double()
    y, gx, gw, gb = _step(bn, images, active, weights, backend)
    assert rel_err(torch.cat([r[1] for r in results]), y) < 1e-12
    assert rel_err(torch.cat([r[2] for r in results]), gx) < 1e-10
    for r in results:
        assert rel_err(r[3], gw) < 1e-10 and rel_err(r[4], gb) < 1e-10
        assert rel_err(r[5], bn.running_mean) < 1e-12 and rel_err(r[6], bn.running_var) < 1e-12


def test_sync_bn_without_process_group_is_plain_sparse_bn():
    images, active, weights = _data()
    a = _step(SyncBatchNorm(3).double(), images, active, weights, "torch")
    b = _step(BatchNorm2d(3).double(), images, active, weights, "torch")
    for u, v in zip(a, b):
        assert torch.equal(u, v)
