"""Checkpoints: atomic writes survive a crash mid-save; exports read back through the one weights reader."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision

from ctssl.train import checkpoint as ckpt_io
from ctssl.train import pretrain
from ctssl.train.checkpoint import (
    FINAL,
    LAST,
    CheckpointError,
    export_backbone,
    load_checkpoint,
    save_atomic,
)
from ctssl.train.pretrain import TrainingError, run_pretraining
from ctssl.train.weights import WeightsError, encoder_kwargs, read_weights

pytestmark = pytest.mark.usefixtures("single_thread")


def _crashing_save(obj, f, *args, **kwargs):
    with open(f, "wb") as file:  # some bytes reach the disk, then the write fails
        file.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("No space left on device")


def test_crash_during_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"step": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _crashing_save)
    with pytest.raises(OSError, match="No space"):
        save_atomic({"step": 2, "w": torch.zeros(4)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_trainer_crash_while_checkpointing_keeps_the_last_good_one(pretrain_store, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("spark", pretrain_store, tmp_path / "run", max_steps=2, ckpt_every=1)
    calls = []
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        calls.append(obj.get("step"))
        if len(calls) == 2:  # the final checkpoint of step 2
            return _crashing_save(obj, f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_io.torch, "save", save_then_die)
    with pytest.raises(OSError):
        run_pretraining(cfg)
    monkeypatch.undo()
    assert calls == [1, 2]
    out = tmp_path / "run"
    assert not (out / FINAL).exists()
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert load_checkpoint(out / LAST)["step"] == 1

    final = load_checkpoint(run_pretraining(cfg, resume=True))  # and the run can go on from it
    assert final["step"] == 2


def test_backbone_state_dict_from_a_checkpoint_and_from_plain_files(pretrain_store, tiny_config, tmp_path):
    cfg = tiny_config("spark", pretrain_store, tmp_path / "run", in_chans=3, max_steps=1)
    final = run_pretraining(cfg)
    weights = read_weights(final)
    state, meta = weights.backbone, weights.meta
    assert (meta["format"], meta["method"], meta["arch"], meta["in_chans"], meta["step"]) == \
        ("ctssl-checkpoint", "spark", "resnet18", 3, 1)
    assert meta["config"]["image_size"] == 64

    exported = export_backbone(final, tmp_path / "resnet18.pt")
    plain_file = read_weights(exported)
    plain = plain_file.backbone
    assert plain_file.meta == {"format": "state_dict"} and encoder_kwargs(plain) == {"in_chans": 3}
    assert set(plain) == set(state) and all(torch.equal(plain[k], state[k]) for k in state)
    model = torchvision.models.resnet18()
    model.load_state_dict(plain, strict=True)
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"], rtol=0, atol=0)

    torchvision_file = tmp_path / "torchvision.pt"
    torch.save(torchvision.models.resnet18().state_dict(), torchvision_file)
    assert encoder_kwargs(read_weights(torchvision_file).backbone) == {"in_chans": 3}


def test_unreadable_or_foreign_files_give_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match=r"garbage\.pt is corrupt"):
        read_weights(garbage)
    with pytest.raises(WeightsError, match="no such file"):
        read_weights(tmp_path / "missing.pt")

    foreign = tmp_path / "foreign.pt"
    torch.save({"epoch": 3, "notes": "not weights"}, foreign)
    with pytest.raises(WeightsError, match="neither a ctssl checkpoint nor a state_dict"):
        read_weights(foreign)
    with pytest.raises(CheckpointError, match="not a ctssl checkpoint"):
        load_checkpoint(foreign)

    truncated = tmp_path / "truncated.pt"
    save_atomic({"format": "ctssl-checkpoint", "version": 1, "w": torch.randn(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(truncated)

    newer = tmp_path / "newer.pt"
    torch.save({"format": "ctssl-checkpoint", "version": 99}, newer)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(newer)


def test_checkpoint_holds_what_resuming_and_fine_tuning_need(pretrain_store, tiny_config, tmp_path):
    cfg = tiny_config("byol", pretrain_store, tmp_path / "run", max_steps=1)
    saved = load_checkpoint(run_pretraining(cfg))
    for key in ("format", "version", "method", "arch", "in_chans", "config", "step", "epoch", "model", "backbone",
                "optimizer", "schedules", "scaler", "sampler", "rng", "world_size"):
        assert key in saved, key
    assert saved["config"] == dataclasses.asdict(cfg)
    assert set(saved["backbone"]) == {k[len("backbone."):] for k in saved["model"] if k.startswith("backbone.")}
    assert saved["sampler"]["batch"] == 1 and saved["sampler"]["epoch"] == 0
    assert set(saved["rng"][0]) == {"python", "numpy", "torch", "cuda"}


def _poison_weights_after_step(monkeypatch, bad_step: int) -> None:
    """From optimizer step ``bad_step`` on, the weights hold NaN (as after a diverging update)."""
    real_step = pretrain._Run._train_step

    def step_then_poison(self, model, method, optimizer, scaler, batch, step):
        out = real_step(self, model, method, optimizer, scaler, batch, step)
        if step + 1 == bad_step:
            with torch.no_grad():
                method.backbone.conv1.weight.fill_(float("nan"))
        return out

    monkeypatch.setattr(pretrain._Run, "_train_step", step_then_poison)


def _finite(state) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("bad_step, last_good", [(2, None), (4, 3)])
def test_non_finite_state_is_never_checkpointed(bad_step, last_good, pretrain_store, tiny_config, tmp_path,
                                                monkeypatch):
    """The loss is checked every log_every=7 steps, checkpoints come every 3: a checkpoint must not save NaN, and
    the error names the last good checkpoint only when one exists."""
    out = tmp_path / "run"
    cfg = tiny_config("spark", pretrain_store, out, max_steps=12, log_every=7, ckpt_every=3)
    _poison_weights_after_step(monkeypatch, bad_step)
    with pytest.raises(TrainingError) as info:
        run_pretraining(cfg)
    message = str(info.value)
    assert "NaN or infinite" in message and f"step {((bad_step - 1) // 3 + 1) * 3}" in message
    if last_good is None:
        assert not (out / LAST).exists() and "no checkpoint was written" in message and str(out / LAST) not in message
    else:
        saved = load_checkpoint(out / LAST)
        assert saved["step"] == last_good and _finite(saved["model"])
        assert f"last good checkpoint: {out / LAST} (step {last_good})" in message
    assert not (out / FINAL).exists()


def test_temp_file_of_a_killed_checkpoint_write_is_removed_by_the_next_run(pretrain_store, tiny_config, tmp_path):
    import subprocess
    import sys

    cfg = tiny_config("spark", pretrain_store, tmp_path / "run", max_steps=1)
    run_pretraining(cfg)
    writer = subprocess.Popen([sys.executable, "-c", "pass"])  # a process that wrote and was killed
    writer.wait()
    leftover = tmp_path / "run" / f".{LAST}.tmp-{writer.pid}"
    leftover.write_bytes(b"PK half a checkpoint")
    run_pretraining(dataclasses.replace(cfg, max_steps=2), resume=True)
    assert not leftover.exists()


def test_unreadable_files_do_not_pass_on_torchs_advice_to_load_unsafely(tmp_path):
    import numpy as np

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    pickled = tmp_path / "pickled.pt"
    torch.save({"weights": np.zeros(3)}, pickled)  # a numpy array: only an unsafe load would read it
    truncated = tmp_path / "truncated.pt"
    save_atomic({"w": torch.randn(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    for path, expected in ((garbage, "is corrupt or not a torch file"), (truncated, "is corrupt"),
                           (pickled, "holds Python objects other than tensors")):
        with pytest.raises(WeightsError) as info:
            read_weights(path)
        message = str(info.value)
        assert str(path) in message and expected in message and "\n" not in message
        assert "weights_only" not in message and "arbitrary code" not in message
