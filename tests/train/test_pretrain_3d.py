"""ctssl-train with a 3-D encoder: SparK and a contrastive method on volume crops of a prepared DICOM store, resume
bit for bit, export, and clear refusals (a method without 3-D support, a bad crop size)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ctssl.train.checkpoint import load_checkpoint
from ctssl.train.config import ConfigError
from ctssl.train.pretrain import export_backbone, run_pretraining
from ctssl.train.pretrain_cli import main

from .crash import run_until_first_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

VOLUME_FIELDS = dict(arch="resnet18_3d", crop_size=32, volume_spacing=6.0, crops_per_volume=2, batch_size=2)
"""32^3 crops of phantom series resampled to 6 mm: about 40x40x20 voxels per series, steps well under a second."""


@pytest.fixture(scope="module")
def volume_store(tmp_path_factory):
    from ctssl.data import make_synthetic_ct, prepare_store

    root = tmp_path_factory.mktemp("volume_store")
    synthetic = make_synthetic_ct(root / "synthetic", n_patients=2, slices_per_series=8, size=64, seed=5,
                                  labeled=False)
    prepare_store(synthetic.dicom_dir, root / "store", progress=False)
    return root / "store"


def test_spark_3d_crash_and_resume_matches_a_straight_run(volume_store, tiny_config, tmp_path):
    cfg = tiny_config("spark", volume_store, tmp_path / "straight", max_steps=3, hparams={"decoder_width": 32},
                      **VOLUME_FIELDS)
    assert cfg.spatial_dims == 3 and cfg.input_size == 32
    straight = load_checkpoint(run_pretraining(cfg))
    assert straight["step"] == 3 and straight["arch"] == "resnet18_3d"

    interrupted = dataclasses.replace(cfg, out=str(tmp_path / "resumed"), ckpt_every=2)
    run_until_first_checkpoint(interrupted)
    resumed = load_checkpoint(run_pretraining(interrupted, resume=True))
    assert resumed["step"] == 3
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key

    exported = export_backbone(tmp_path / "resumed" / "checkpoint_final.pt", tmp_path / "r18_3d.pt")
    from ctssl.models import resnet18_3d

    encoder = resnet18_3d(in_chans=1)
    encoder.load_state_dict(torch.load(exported), strict=True)
    assert (tmp_path / "resumed" / "vis").is_dir()  # SparK's picture: the middle slice of each volume


def test_simclr_3d_from_the_command_line(volume_store, tmp_path, capsys):
    code = main(["--method", "simclr", "--preset", "toy", "--arch", "resnet18_3d", "--crop-size", "32",
                 "--volume-spacing", "6", "--set", "crops_per_volume=2", "--batch-size", "2", "--steps", "1",
                 "--in-chans", "1", "--data", str(volume_store), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    saved = load_checkpoint(tmp_path / "run" / "checkpoint_final.pt")
    assert saved["config"]["crop_size"] == 32 and saved["config"]["arch"] == "resnet18_3d"


def test_methods_without_3d_support_are_refused_naming_method_and_arch(volume_store, tmp_path, capsys):
    code = main(["--method", "swav", "--preset", "toy", "--arch", "resnet18_3d", "--data", str(volume_store),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "swav does not support 3-D encoders (resnet18_3d)" in err
    assert not (tmp_path / "run").exists()


def test_bad_crop_size_is_a_config_error(tiny_config, volume_store, tmp_path):
    with pytest.raises(ConfigError, match="crop_size must be a positive multiple of 32"):
        tiny_config("spark", volume_store, tmp_path, **{**VOLUME_FIELDS, "crop_size": 48})
