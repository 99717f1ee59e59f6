"""The run's closing summary (time, mean images/s without the warm-up step), Weights & Biases through a fake
``wandb`` module, and a NaN loss stopping the run with its step while the last good checkpoint stays whole."""
from __future__ import annotations

import hashlib
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from ctssl.train import pretrain
from ctssl.train.checkpoint import FINAL, LAST, load_checkpoint
from ctssl.train.config import ConfigError
from ctssl.train.logger import Throughput, format_duration, read_log
from ctssl.train.pretrain import run_pretraining
from ctssl.train.pretrain_cli import main

from .bars_data import write_npz

pytestmark = pytest.mark.usefixtures("single_thread")


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_leaves_out_the_first_step_and_evaluation_time():
    clock = _Clock()
    t = Throughput(images_per_step=8, clock=clock)
    assert t.mean_images_per_s() is None and t.eta_seconds(10) is None
    clock.now += 30.0  # a slow first step: allocator, kernels, workers
    t.step()
    assert t.mean_images_per_s() is None
    for _ in range(4):
        clock.now += 0.5
        t.step()
    with t.paused():  # an online evaluation
        clock.now += 7.0
    assert t.mean_images_per_s() == pytest.approx(8 * 4 / 2.0)  # 16 images/s, neither warm-up nor eval counted
    assert t.eta_seconds(9) == pytest.approx(9 * 9.0 / 4)  # wall pace since the first step, eval included
    line = t.summary(first_step=10)
    assert line == ("5 steps in 39.0 s (online evaluation 7.0 s); mean 16.0 images/s over steps 12-15 "
                    "(step 11 is warm-up and not counted; evaluation time excluded)")
    assert format_duration(3725.2) == "1:02:05"


def test_cli_prints_the_summary_line(pretrain_store, tmp_path, capsys):
    rc = main(["--method", "simclr", "--preset", "toy", "--data", str(pretrain_store), "--out", str(tmp_path / "r"),
               "--steps", "3", "--set", "hparams.proj_dim=16"])
    err = capsys.readouterr().err
    assert rc == 0, err
    done = re.search(r"ctssl-train: done: 3 steps in ([\d.]+) s; mean ([\d.]+) images/s over steps 2-3 "
                     r"\(step 1 is warm-up and not counted", err)
    assert done and float(done.group(1)) > 0 and float(done.group(2)) > 0, err
    bar = err.split("\r")[-1] if "\r" in err else err  # the progress bar's last state
    assert re.search(r"img_s=[\d.]+", err) and re.search(r"eta=[\d.]+ s", err), bar
    end = [r for r in read_log(tmp_path / "r" / "log.jsonl") if r.get("event") == "end"][0]
    assert end["images_per_s"] > 0 and 0 < end["seconds"] <= float(done.group(1)) + 0.1


class _FakeWandb(types.ModuleType):
    """Records what the trainer calls."""

    def __init__(self):
        super().__init__("wandb")
        self.calls: list[tuple] = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake = self

        class Run:
            def log(self, values, step=None):
                fake.calls.append(("log", dict(values), step))

            def finish(self):
                fake.calls.append(("finish",))

        return Run()


def test_wandb_gets_config_once_and_the_scalars_of_log_jsonl(pretrain_store, tiny_config, tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    bars = write_npz(tmp_path / "bars.npz", n=(12, 8, 4))
    cfg = tiny_config("simclr", pretrain_store, tmp_path / "run", max_steps=2, wandb=True, eval_data=bars,
                      eval_every=2, wandb_project="proj")
    run_pretraining(cfg)
    inits = [c for c in fake.calls if c[0] == "init"]
    assert len(inits) == 1
    kwargs = inits[0][1]
    assert (kwargs["project"], kwargs["mode"], kwargs["dir"]) == ("proj", "offline", str(tmp_path / "run"))
    assert kwargs["config"]["method"] == "simclr" and kwargs["config"]["eval_data"] == bars
    logs = [c for c in fake.calls if c[0] == "log"]
    records = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "step" in r and "event" not in r]
    assert len(logs) == len(records) == 3  # steps 1 and 2, and the evaluation at step 2
    train = [c for c in logs if "pretrain/loss" in c[1]]
    assert [c[2] for c in train] == [1, 2]
    assert train[0][1]["pretrain/loss"] == pytest.approx(records[0]["loss"])
    assert {"pretrain/lr", "pretrain/images_per_s"} <= set(train[0][1])
    evals = [c for c in logs if "eval/knn_acc" in c[1]]
    assert len(evals) == 1 and evals[0][2] == 2
    assert fake.calls[-1] == ("finish",)

    # a resumed run continues the same W&B run (its id is kept in OUT)
    first_id = kwargs["id"]
    run_pretraining(cfg, resume=True)
    assert [c for c in fake.calls if c[0] == "init"][-1][1]["id"] == first_id


def test_wandb_missing_is_one_line_at_start(pretrain_store, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    out = tmp_path / "run"
    rc = main(["--method", "byol", "--preset", "toy", "--data", str(pretrain_store), "--out", str(out),
               "--steps", "1", "--no-progress", "--wandb"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install 'ctssl[wandb]'" in err, err
    assert not out.exists()
    from ctssl.train.config import PretrainConfig

    with pytest.raises(ConfigError, match=r"pip install 'ctssl\[wandb\]'"):  # the same from the API
        run_pretraining(PretrainConfig(method="byol", data=str(pretrain_store), out=str(out), wandb=True,
                                       device="cpu"))
    assert not out.exists()


def test_run_logger_mirrors_steps_and_evaluations_to_tensorboard(tmp_path, monkeypatch):
    from ctssl.train.logger import RunLogger

    scalars = []

    class SummaryWriter:  # stands for torch.utils.tensorboard's (tensorboard is an optional extra)
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    logger = RunLogger(tmp_path, tensorboard=True)
    logger.log(3, {"loss": torch.tensor(0.5), "lr": 1e-3})
    logger.log_eval(3, {"knn_acc": 0.75, "eval_seconds": 1.5})
    logger.close()
    assert scalars == [("pretrain/loss", 0.5, 3), ("pretrain/lr", 1e-3, 3), ("eval/knn_acc", 0.75, 3),
                       ("eval/eval_seconds", 1.5, 3), "closed"]
    records = read_log(tmp_path / "log.jsonl")
    assert records[0]["loss"] == 0.5 and "kind" not in records[0]
    assert records[1]["kind"] == "eval" and records[1]["knn_acc"] == 0.75 and "loss" not in records[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_loss_stops_with_its_step_and_keeps_the_last_checkpoint(pretrain_store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--method", "spark", "--preset", "toy", "--data", str(pretrain_store), "--out", str(out), "--steps", "6",
            "--no-progress", "--set", "hparams.decoder_width=64", "--set", "log_every=4", "--set", "ckpt_every=2"]
    saved: dict[str, str] = {}
    save, train_step = pretrain._Run._save, pretrain._Run._train_step

    def save_and_hash(self, name, *args, **kwargs):
        path = save(self, name, *args, **kwargs)
        saved[name] = _sha(path)
        return path

    def poisoned_step(self, model, method, optimizer, scaler, batch, step):
        if step == 2:  # the third step (1-based 3): one weight becomes NaN, so is the loss
            with torch.no_grad():
                method.backbone.conv1.weight[0, 0, 0, 0] = float("nan")
        return train_step(self, model, method, optimizer, scaler, batch, step)

    monkeypatch.setattr(pretrain._Run, "_save", save_and_hash)
    monkeypatch.setattr(pretrain._Run, "_train_step", poisoned_step)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    # found at the step-4 log, named at the step it happened, with the outputs that were NaN
    assert "training stopped: the loss became NaN or infinite at step 3 (non-finite: " in err and "loss" in err
    assert f"last good checkpoint: {out / LAST} (step 2)" in err
    assert list(saved) == [LAST] and _sha(out / LAST) == saved[LAST]  # not rewritten
    assert load_checkpoint(out / LAST)["step"] == 2 and not (out / FINAL).exists()
    monkeypatch.undo()

    assert main(["--out", str(out), "--resume", "--no-progress"]) == 0
    final = load_checkpoint(out / FINAL)
    assert final["step"] == 6
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    assert [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r] == [4, 6]


def test_nan_found_at_a_checkpoint_names_its_step(pretrain_store, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("byol", pretrain_store, tmp_path / "run", max_steps=6, log_every=10, ckpt_every=2)
    train_step = pretrain._Run._train_step

    def poisoned_step(self, model, method, optimizer, scaler, batch, step):
        out = train_step(self, model, method, optimizer, scaler, batch, step)
        if step == 3:  # the loss of the fourth step only (the weights stay finite); found at its checkpoint
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(pretrain._Run, "_train_step", poisoned_step)
    found = r"at step 4 \(non-finite: loss; found before writing the checkpoint of step 4\)"
    with pytest.raises(pretrain.TrainingError, match=found):
        run_pretraining(cfg)
    assert load_checkpoint(tmp_path / "run" / LAST)["step"] == 2
