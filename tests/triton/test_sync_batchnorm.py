"""SyncBatchNorm on the triton backend: two gloo ranks equal one process holding the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ctssl.sparse.modules import BatchNorm2d, Conv2d, ReLU, convert_sync_batchnorm

from ..sparse.helpers import run_ranks
from .util import F64, needs_triton, rel_err, sparse_at

pytestmark = needs_triton


def _model():
    torch.manual_seed(3)
    m = nn.Sequential(Conv2d(3, 6, 3, 1, 1, bias=False), BatchNorm2d(6), ReLU())
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    return m


MASKS = {
    "uneven": [[[True, False], [True, True]], [[False, True], [False, False]]],
    "rank 1 without rows": [[[True, False], [True, True]], [[False, False], [False, False]]],
}


def _data(mask="uneven"):
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    active = torch.tensor(MASKS[mask])
    weight = torch.randn(2, 6, 32, 32, generator=gen)  # loss weights at stride 2
    return images, active, weight


def _step(model, images, active, weight, backend):
    x = images.clone().requires_grad_(True)
    y = model(sparse_at(x, active, backend, stride=2)).to_dense()
    (y * weight).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


def _rank(rank, world, store_path, out_dir, mask):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        images, active, weight = _data(mask)
        model = convert_sync_batchnorm(_model())
        sl = slice(rank, rank + 1)
        out = _step(model, images[sl], active[sl], weight[sl], "triton")
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mask", list(MASKS))
def test_sync_batchnorm_over_two_ranks_equals_one_big_batch(tmp_path, mask):
    """A rank without visible rows still joins every all-reduce (else the other rank would hang)."""
    ranks = run_ranks(_rank, (mask,), tmp_path)
    images, active, weight = _data(mask)
    ref = _step(_model().to(F64), images.to(F64), active, weight.to(F64), "dense")
    y = torch.cat([r[0] for r in ranks])
    x_grad = torch.cat([r[1] for r in ranks])
    assert rel_err(y, ref[0]) < 1e-5
    assert rel_err(x_grad, ref[1]) < 1e-5
    for name, g in ref[2].items():  # local weight gradients add up to the big batch's (DDP averages them)
        assert rel_err(ranks[0][2][name] + ranks[1][2][name], g) < 1e-5, name
    for name, b in ref[3].items():  # every rank holds the global running statistics
        for r in ranks:
            assert rel_err(r[3][name].double(), b.double()) < 1e-5, name
