"""Online evaluation under DDP: rank 0 evaluates while rank 1 waits at the barrier; both finish, rank 0 logs."""
from __future__ import annotations

import dataclasses
import json

import pytest

from ctssl.train.logger import read_log

from .bars_data import write_npz
from .ranks import free_ports, start_ranks, wait_for_ranks

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]

_WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
from ctssl.train import pretrain
from ctssl.train.config import config_from_dict
pretrain.run_pretraining(config_from_dict(json.loads(sys.argv[1])))
"""


def test_two_ranks_evaluate_on_rank_0_only(pretrain_store, tiny_config, tmp_path):
    bars = write_npz(tmp_path / "bars.npz", n=(12, 8, 4))
    cfg = tiny_config("byol", pretrain_store, tmp_path / "ddp", batch_size=2, max_steps=3, eval_data=bars,
                      eval_every=2, ckpt_every=2)
    wait_for_ranks(start_ranks(_WORKER, json.dumps(dataclasses.asdict(cfg)), port=free_ports(1)[0]), timeout=300)
    records = read_log(tmp_path / "ddp" / "log.jsonl")
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 3] and all(0.0 <= r["knn_acc"] <= 1.0 for r in evals)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # one log, written by rank 0
    assert (tmp_path / "ddp" / "eval_curve.png").is_file()
