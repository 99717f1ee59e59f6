"""Two gloo processes on the CPU train exactly like one process on their combined batch.

The per-rank batches are contiguous slices of the global batch, gradients are averaged by DDP,
and every BatchNorm reduces its statistics across the ranks: for SparK the encoder's sparse BN
over visible positions and the decoder's dense BN, for BYOL the encoder's BN and the heads'
BatchNorm1d (BYOL also has frozen target networks updated after each step). SparK's masks are
drawn per rank from per-rank RNGs, so here each image's mask is made a function of its pixels,
identical in both setups.

Both setups run in float64: at this toy size the deepest BN layers normalise 8 rows, and float32
rounding alone (even reordering the batch in one process) moves some gradients by ~0.5%; in
float64 any real difference (a BN not synchronized, a wrong gradient average) stands out.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ctssl.train import pretrain
from ctssl.train.checkpoint import load_checkpoint
from ctssl.train.pretrain import run_pretraining

from .ranks import free_ports, start_ranks, wait_for_ranks

pytestmark = pytest.mark.usefixtures("single_thread")


def content_mask(self, images: torch.Tensor) -> torch.Tensor:
    """SparK's mask rule (round(L * 0.4) visible patches per image), seeded by each image's pixels."""
    from ctssl.sparse import random_patch_mask

    B, _, H, W = images.shape
    p = self.patch_size
    masks = []
    for image in images.detach().cpu().double():
        g = torch.Generator().manual_seed(int(image.sum().item() * 1e3) % (2 ** 31))
        masks.append(random_patch_mask(1, (H // p, W // p), self.hparams["mask_ratio"], generator=g))
    return torch.cat(masks).to(images.device)


def float64_batches(batch, device, channels_last=False):
    """The trainer's ``to_device``, casting the images to float64 (the model is float64 by default dtype)."""
    batch = _to_device(batch, device, channels_last)
    return batch.double() if isinstance(batch, torch.Tensor) else [b.double() for b in batch]


_to_device = pretrain.to_device

_WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
from ctssl.ssl.spark import SparK
from ctssl.train import pretrain
from tests.train.test_pretrain_ddp import content_mask, float64_batches
from ctssl.train.config import config_from_dict
SparK.random_mask = content_mask
pretrain.to_device = float64_batches
for cfg, port in json.loads(sys.argv[1]):
    os.environ["MASTER_PORT"] = str(port)
    pretrain.run_pretraining(config_from_dict(cfg))
"""

METHODS = ("spark", "byol")


@pytest.fixture(scope="module")
def ddp_runs(pretrain_store, tiny_config, tmp_path_factory):
    """Final checkpoints of each method: (one process with batch 4, two gloo ranks with batch 2 each)."""
    tmp = tmp_path_factory.mktemp("ddp")
    # SGD and no warm-up: the comparison is about gradients and BN statistics, not Adam's rounding
    single = {m: tiny_config(m, pretrain_store, tmp / m / "single", batch_size=4, max_steps=2, optimizer="sgd",
                             lr=0.05, grad_clip=None) for m in METHODS}
    ranks = [(dataclasses.asdict(dataclasses.replace(single[m], batch_size=2, out=str(tmp / m / "ddp"))), port)
             for m, port in zip(METHODS, free_ports(len(METHODS)))]
    procs = start_ranks(_WORKER, json.dumps(ranks))
    try:
        from ctssl.ssl.spark import SparK

        default_dtype = torch.get_default_dtype()
        with pytest.MonkeyPatch.context() as mp:  # the single-process runs, while the ranks train
            mp.setattr(SparK, "random_mask", content_mask)
            mp.setattr(pretrain, "to_device", float64_batches)
            torch.set_default_dtype(torch.float64)
            try:
                one = {m: load_checkpoint(run_pretraining(single[m])) for m in METHODS}
            finally:
                torch.set_default_dtype(default_dtype)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    wait_for_ranks(procs, timeout=600)
    return {m: (one[m], load_checkpoint(tmp / m / "ddp" / "checkpoint_final.pt")) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process_on_the_combined_batch(method, ddp_runs):
    one, two = ddp_runs[method]
    assert two["world_size"] == 2 and two["step"] == one["step"] == 2
    assert len(two["rng"]) == 2
    assert set(one["model"]) == set(two["model"])
    assert one["model"]["backbone.conv1.weight"].dtype == torch.float64
    for key, value in one["model"].items():  # weights, BN weights and running statistics, counters
        if value.is_floating_point():
            torch.testing.assert_close(two["model"][key], value, rtol=1e-7, atol=1e-9, msg=key)
        else:
            assert torch.equal(two["model"][key], value), key
