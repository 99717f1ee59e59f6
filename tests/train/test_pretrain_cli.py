"""``ctssl-train``: a toy run end to end, settings precedence, and bad input (one line, exit 2, nothing written)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from ctssl.train import pretrain
from ctssl.train.checkpoint import FINAL, LAST, load_checkpoint, save_atomic
from ctssl.train.config import ConfigError
from ctssl.train.logger import read_log
from ctssl.train.pretrain_cli import build_config, build_parser, main

pytestmark = pytest.mark.usefixtures("single_thread")


def _snapshot(path: Path) -> dict[str, str] | None:
    """Every file under ``path`` with a hash of its bytes (None when ``path`` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_toy_run_writes_checkpoints_logs_pictures_and_exports(pretrain_store, tmp_path, capsys):
    out, export = tmp_path / "run", tmp_path / "resnet18.pt"
    rc = main(["--method", "spark", "--preset", "toy", "--data", str(pretrain_store), "--out", str(out),
               "--steps", "2", "--set", "vis_every=1", "--set", "vis_images=2", "--set", "hparams.decoder_width=64",
               "--no-progress", "--export", str(export)])
    assert rc == 0, capsys.readouterr().err
    assert f"final checkpoint {out / FINAL}" in capsys.readouterr().out

    saved = load_checkpoint(out / FINAL)
    assert (saved["step"], saved["arch"], saved["in_chans"]) == (2, "resnet18", 3)
    assert saved["config"]["image_size"] == 64 and saved["config"]["optimizer"] == "lamb"  # toy keeps SparK's LAMB
    assert saved["config"]["hparams"] == {"decoder_width": 64}
    assert load_checkpoint(out / LAST)["step"] == 2
    assert [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["step_000001.png", "step_000002.png"]
    assert (out / "loss_curve.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["plan"]["total_steps"] == 2

    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(export, weights_only=True), strict=True)
    torch.testing.assert_close(model.layer4[1].conv2.weight, saved["backbone"]["layer4.1.conv2.weight"])

    # resuming a finished run trains nothing more and can export again
    again = tmp_path / "again.pt"
    assert main(["--out", str(out), "--resume", "--export", str(again), "--no-progress"]) == 0
    assert load_checkpoint(out / FINAL)["step"] == 2 and again.exists()


def test_settings_precedence_preset_file_set_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('arch = "resnet34"\nbatch_size = 16\nlr = 0.5\n[hparams]\ndecoder_width = 96\n')
    args = build_parser().parse_args(["--method", "spark", "--preset", "toy", "--config", str(toml), "--data", "d",
                                      "--set", "batch_size=12", "--set", "hparams.mask_ratio=0.75",
                                      "--batch-size", "6", "--steps", "7", "--decoder-impl", "compiled+subpixel"])
    cfg, resume = build_config(args)
    assert resume is None
    assert cfg.image_size == 64 and cfg.warmup_steps == 2  # preset
    assert cfg.arch == "resnet34" and cfg.lr == 0.5  # file over preset
    assert cfg.hparams == {"decoder_width": 96, "mask_ratio": 0.75}  # file and --set tables merged
    assert cfg.batch_size == 6 and cfg.max_steps == 7  # flags over --set over file
    hparams = pretrain.method_hparams(cfg, {"mask_ratio": 0.6, "decoder_impl": "eager"})
    assert hparams["decoder_impl"] == "compiled+subpixel"  # the flag reaches the method

    paper, _ = build_config(build_parser().parse_args(["--method", "mocov2", "--data", "d"]))
    assert (paper.batch_size, paper.optimizer, paper.base_lr, paper.epochs, paper.arch) == \
        (128, "sgd", 0.03, 200, "resnet50")  # the seed paper's MoCo v2 settings
    import ctssl.ssl
    from ctssl.train import config

    assert config.METHODS == ctssl.ssl.METHODS
    with pytest.raises(ConfigError, match="unknown setting 'batchsize'"):
        build_config(build_parser().parse_args(["--method", "spark", "--set", "batchsize=3"]))


def _bad_inputs(store: Path, tmp: Path):
    empty = tmp / "empty"
    empty.mkdir()
    no_slices = tmp / "no_slices"
    no_slices.mkdir()
    (no_slices / "index.jsonl").write_text("")
    corrupt = tmp / "corrupt_run"
    corrupt.mkdir()
    (corrupt / LAST).write_bytes(b"not a checkpoint at all")
    toy = ["--preset", "toy", "--no-progress"]
    a_file = tmp / "a_file"
    a_file.write_text("not a directory")
    return {
        "unknown method": (["--method", "nope", "--data", str(store), "--out", str(tmp / "a")],
                           "invalid choice: 'nope'", tmp / "a"),
        "unknown backend": (["--method", "spark", *toy, "--backend", "nope", "--data", str(store), "--out",
                             str(tmp / "b")], "unknown backend 'nope'", tmp / "b"),
        "missing data": (["--method", "spark", *toy, "--data", str(tmp / "missing"), "--out", str(tmp / "c")],
                         "does not exist", tmp / "c"),
        "not a store": (["--method", "spark", *toy, "--data", str(empty), "--out", str(tmp / "d")],
                        "not a prepared slice store", tmp / "d"),
        "empty store": (["--method", "spark", *toy, "--data", str(no_slices), "--out", str(tmp / "e")],
                        "is empty", tmp / "e"),
        "corrupt resume": (["--out", str(corrupt), "--resume"], "corrupt", corrupt),
        "image size": (["--method", "spark", *toy, "--image-size", "80", "--data", str(store), "--out", str(tmp / "f")],
                       "multiple of 32", tmp / "f"),
        "existing run": (["--method", "spark", *toy, "--data", str(store), "--out", str(corrupt)],
                         "already holds a run", corrupt),
        "nothing to resume": (["--out", str(tmp / "g"), "--resume"], "nothing to resume", tmp / "g"),
        "bad --set": (["--method", "spark", "--set", "image_size=big", "--data", str(store), "--out", str(tmp / "h")],
                      "image_size must be an integer", tmp / "h"),
        "bad hparam": (["--method", "spark", *toy, "--set", "hparams.decoder_width=abc", "--data", str(store),
                        "--out", str(tmp / "i")], "hparams.decoder_width must be an integer, got 'abc'", tmp / "i"),
        "unknown decoder impl": (["--method", "spark", *toy, "--decoder-impl", "fast+subpixel", "--data", str(store),
                                  "--out", str(tmp / "j")], "decoder_impl 'fast+subpixel': expected one of eager, "
                                 "channels-last, subpixel, compiled", tmp / "j"),
        "decoder impl of byol": (["--method", "byol", *toy, "--decoder-impl", "subpixel", "--data", str(store),
                                  "--out", str(tmp / "k")], "decoder_impl applies to spark only, not to byol",
                                 tmp / "k"),
        "out is a file": (["--method", "spark", *toy, "--data", str(store), "--out", str(a_file)],
                          f"--out {a_file} is a file, not a directory", a_file),
        "out under a file": (["--method", "spark", *toy, "--data", str(store), "--out", str(a_file / "run")],
                             f"{a_file} is a file", a_file),
    }


@pytest.mark.parametrize("case", ["unknown method", "unknown backend", "missing data", "not a store", "empty store",
                                  "corrupt resume", "image size", "existing run", "nothing to resume", "bad --set",
                                  "bad hparam", "unknown decoder impl", "decoder impl of byol", "out is a file",
                                  "out under a file"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, pretrain_store, tmp_path, capsys):
    argv, message, out = _bad_inputs(pretrain_store, tmp_path)[case]
    before = _snapshot(out)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ctssl-train: error:") and message in lines[0], err
    assert _snapshot(out) == before


def _stop_at_the_first_step(self, *args, **kwargs):
    raise KeyboardInterrupt


def test_default_paper_preset_starts_without_tensorboard(batch32_store, tmp_path, capsys, monkeypatch):
    """The README's main command: the paper preset (ResNet-50, 224 px, TensorBoard on) gets through its start-up
    to the first training step when TensorBoard is not installed (as in the venv scripts/setup.sh builds),
    and says so in one line."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: not installed
    monkeypatch.setattr(pretrain._Run, "_train_step", _stop_at_the_first_step)
    out = tmp_path / "run"
    assert main(["--method", "spark", "--data", str(batch32_store), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; resume with --resume" in err
    tensorboard = [line for line in err.splitlines() if "TensorBoard" in line]
    assert len(tensorboard) == 1 and "pip install tensorboard" in tensorboard[0], err
    too_large = [line for line in err.splitlines() if "sized for a GPU" in line]
    assert len(too_large) == 1 and "resnet50, 224 px, 1600 steps" in too_large[0] and "--preset toy" in too_large[0]
    events = [r for r in read_log(out / "log.jsonl") if "event" in r]
    assert [e["event"] for e in events] == ["note", "start"]
    assert "TensorBoard" in events[0]["message"] and events[1]["total_steps"] == 1600
    assert json.loads((out / "config.json").read_text())["config"]["arch"] == "resnet50"


def test_resume_under_another_world_size_reseeds_and_notes_it(pretrain_store, tiny_config, tmp_path):
    """A checkpoint holds one RNG state per rank; resumed by another number of processes the run reseeds."""
    cfg = tiny_config("spark", pretrain_store, tmp_path / "run", max_steps=1)
    final = pretrain.run_pretraining(cfg)
    saved = load_checkpoint(final)
    saved["rng"] = saved["rng"] * 2  # as written by two ranks
    save_atomic(saved, tmp_path / "run" / LAST)
    pretrain.run_pretraining(dataclasses.replace(cfg, max_steps=2), resume=True)
    notes = [r["message"] for r in read_log(tmp_path / "run" / "log.jsonl") if r.get("event") == "note"]
    assert notes == ["the checkpoint's RNG states are for another world size: reseeded"]
    assert load_checkpoint(tmp_path / "run" / FINAL)["step"] == 2


def test_read_only_out_is_one_line(pretrain_store, tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as on a read-only mount (root ignores chmod)
    out = tmp_path / "run"
    assert main(["--method", "spark", "--preset", "toy", "--no-progress", "--data", str(pretrain_store),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctssl-train: error: --out") and "not writable" in err and "\n" not in err
    assert not out.exists()


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_one(pretrain_store, tmp_path, capsys,
                                                                              monkeypatch):
    import errno

    from ctssl.train import checkpoint as ckpt_io

    real_save = torch.save
    steps = []

    def disk_full_on_the_second(obj, f, *args, **kwargs):
        steps.append(obj["step"])
        if len(steps) == 2:
            with open(f, "wb") as file:
                file.write(b"PK half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_io.torch, "save", disk_full_on_the_second)
    out = tmp_path / "run"
    rc = main(["--method", "spark", "--preset", "toy", "--no-progress", "--data", str(pretrain_store), "--out",
               str(out), "--steps", "3", "--set", "ckpt_every=1", "--set", "hparams.decoder_width=64"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("ctssl-train: error: cannot write") and str(out / LAST) in err[0]
    assert "no space left on the device (the previous file is unchanged)" in err[0]
    monkeypatch.undo()
    assert load_checkpoint(out / LAST)["step"] == 1
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_store_shard_is_one_line_naming_it(workers, pretrain_store, tmp_path, capsys):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(pretrain_store, store)
    shard = sorted((store / "shards").rglob("*.npy"))[-1]
    shard.write_bytes(shard.read_bytes()[:200])  # cut short, as by a full disk or a bad copy
    rc = main(["--method", "spark", "--preset", "toy", "--no-progress", "--data", str(store), "--out",
               str(tmp_path / "run"), "--steps", "4", "--workers", str(workers), "--set", "hparams.decoder_width=64"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"ctssl-train: error: store shard {shard} is damaged") and "rerun ctssl-prepare" in err[0]


def test_every_option_has_help():
    """``ctssl-train --help`` explains each flag (--arch, --seed, --device and --amp had none)."""
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def test_a_toy_run_on_the_cpu_gets_no_size_warning(pretrain_store, tmp_path, capsys):
    assert main(["--method", "spark", "--preset", "toy", "--no-progress", "--data", str(pretrain_store), "--out",
                 str(tmp_path / "run"), "--steps", "1", "--set", "hparams.decoder_width=64"]) == 0
    assert "sized for a GPU" not in capsys.readouterr().err


def test_auto_backend_is_resolved_once_on_rank_0_and_shared(pretrain_store, tiny_config, tmp_path, monkeypatch):
    """SparK's ``auto`` becomes one named backend before training: rank 0 picks (self-check and timing run there)
    and every rank takes its pick, so ranks never run different backends; the run's config keeps ``auto``."""
    from ctssl.sparse import backends
    from ctssl.train.distributed import DistContext

    cfg = tiny_config("spark", pretrain_store, tmp_path / "main", backend="auto")
    run = pretrain._Run(cfg, DistContext(), None, False)
    assert run.method.backend == "torch" and cfg.backend == "auto"
    assert run.backend_pick == ("auto -> torch (nothing measured: torch is the only backend auto can use on "
                                "this device)")

    def not_on_rank_1(*args, **kwargs):
        raise AssertionError("only rank 0 resolves auto")

    shared = []
    monkeypatch.setattr(backends, "explain_auto", not_on_rank_1)
    monkeypatch.setattr(pretrain, "broadcast_object", lambda ctx, obj: shared.append(obj) or ("dense", "rank 0's"))
    other = pretrain._Run(tiny_config("spark", pretrain_store, tmp_path / "rank1", backend="auto"),
                          DistContext(rank=1, world_size=2), None, False)
    assert shared == [None] and other.method.backend == "dense" and other.backend_pick == "auto -> dense (rank 0's)"
    named = pretrain._Run(tiny_config("spark", pretrain_store, tmp_path / "named"), DistContext(), None, False)
    assert named.backend_pick is None and named.method.backend == "torch"  # a named backend is used as named
