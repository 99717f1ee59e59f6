"""``ctssl-train``: a toy run end to end, settings precedence, and bad input (one line, exit 2, nothing written)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torchvision

from ctssl.train.checkpoint import FINAL, LAST, load_checkpoint
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
                                      "--batch-size", "6", "--steps", "7"])
    cfg, resume = build_config(args)
    assert resume is None
    assert cfg.image_size == 64 and cfg.warmup_steps == 2  # preset
    assert cfg.arch == "resnet34" and cfg.lr == 0.5  # file over preset
    assert cfg.hparams == {"decoder_width": 96, "mask_ratio": 0.75}  # file and --set tables merged
    assert cfg.batch_size == 6 and cfg.max_steps == 7  # flags over --set over file

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
    }


@pytest.mark.parametrize("case", ["unknown method", "unknown backend", "missing data", "not a store", "empty store",
                                  "corrupt resume", "image size", "existing run", "nothing to resume", "bad --set"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, pretrain_store, tmp_path, capsys):
    argv, message, out = _bad_inputs(pretrain_store, tmp_path)[case]
    before = _snapshot(out)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ctssl-train: error:") and message in lines[0], err
    assert _snapshot(out) == before
