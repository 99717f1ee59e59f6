"""A run that crashes after a checkpoint and is resumed ends bit for bit where an uninterrupted run ends."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ctssl.train.checkpoint import LAST, load_checkpoint
from ctssl.train.logger import read_log
from ctssl.train.pretrain import run_pretraining

from .crash import run_until_first_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def _assert_same_tree(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_crash_and_resume_matches_a_straight_run(pretrain_store, tiny_config, tmp_path):
    # SparK's own recipe (LAMB, warm-up, cosine lr and wd, clipping) plus drop-path, so the resumed
    # run must also restore the RNG; 16 images / batch 4: the crash is mid-epoch, the end in epoch 2
    cfg = tiny_config("spark", pretrain_store, tmp_path / "straight", max_steps=5, optimizer="lamb", lr=5e-3,
                      betas=(0.9, 0.95), weight_decay=0.04, weight_decay_end=0.2, warmup_steps=2, grad_clip=5.0,
                      drop_path_rate=0.1)
    straight = load_checkpoint(run_pretraining(cfg))

    # the same run, with a DataLoader worker, dies right after its step-3 checkpoint
    interrupted = dataclasses.replace(cfg, out=str(tmp_path / "resumed"), ckpt_every=3, workers=1)
    run_until_first_checkpoint(interrupted)
    saved = load_checkpoint(tmp_path / "resumed" / LAST)
    assert (saved["step"], saved["epoch"], saved["sampler"]["batch"]) == (3, 0, 3)

    resumed = load_checkpoint(run_pretraining(dataclasses.replace(interrupted, workers=0), resume=True))
    assert resumed["step"] == straight["step"] == 5 and resumed["epoch"] == straight["epoch"] == 1
    for key in ("model", "backbone", "optimizer", "sampler"):
        _assert_same_tree(straight[key], resumed[key], key)
    _assert_same_tree(straight["rng"][0]["torch"], resumed["rng"][0]["torch"], "rng")

    losses = [[(r["step"], r["loss"]) for r in read_log(tmp_path / run / "log.jsonl") if "loss" in r]
              for run in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 5


def test_resume_refuses_another_method(pretrain_store, tiny_config, tmp_path):
    cfg = tiny_config("spark", pretrain_store, tmp_path / "run", max_steps=1)
    run_pretraining(cfg)
    other = dataclasses.replace(cfg, method="simclr", hparams={})
    with pytest.raises(ValueError, match="method='spark'"):
        run_pretraining(other, resume=True)
