"""``ctssl-train`` with ConvNeXt encoders: registry names for --arch, a toy SparK run with timm-keyed export,
and a backend without ConvNeXt's ops refused before anything is written."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctssl.sparse.backends import Backend
from ctssl.sparse.backends.torch_packed import TorchBackend
from ctssl.train.checkpoint import FINAL, load_checkpoint
from ctssl.train.pretrain import build_method
from ctssl.train.pretrain_cli import build_config, build_parser, main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_arch_accepts_every_registered_encoder():
    from ctssl.models import encoder_names

    cfg, _ = build_config(build_parser().parse_args(
        ["--method", "spark", "--arch", "convnext_small", "--backend", "triton", "--data", "d"]))
    assert (cfg.arch, cfg.backend) == ("convnext_small", "triton")
    for name in encoder_names():  # 2-D encoders read slices, 3-D ones crops of the series (issue 17)
        assert build_parser().parse_args(["--arch", name]).arch == name
    assert "resnet18_3d" in encoder_names(spatial_dims=3)
    with pytest.raises(Exception, match="invalid choice: 'resnet18_4d'"):
        build_parser().parse_args(["--arch", "resnet18_4d"])
    pytest.importorskip("triton")
    method = build_method(cfg)  # the paper's SparK around ConvNeXt-S, on the triton backend
    assert type(method.backbone).__name__ == "ConvNeXt" and method.backbone.feature_channels[-1] == 768
    assert method.decoder.widths[0] == 768


def test_toy_spark_run_on_convnext_exports_timm_weights(pretrain_store, tmp_path, capsys):
    out, export = tmp_path / "run", tmp_path / "convnext_tiny.pt"
    rc = main(["--method", "spark", "--preset", "toy", "--arch", "convnext_tiny", "--backend", "torch",
               "--data", str(pretrain_store), "--out", str(out), "--steps", "1", "--batch-size", "2",
               "--set", "vis_every=1000", "--set", "hparams.decoder_width=64", "--no-progress",
               "--export", str(export)])
    assert rc == 0, capsys.readouterr().err
    saved = load_checkpoint(out / FINAL)
    assert (saved["step"], saved["arch"]) == (1, "convnext_tiny")
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_tiny", pretrained=False, in_chans=saved["in_chans"])
    model.load_state_dict(torch.load(export, weights_only=True), strict=True)
    torch.testing.assert_close(model.stages[2].blocks[4].mlp.fc1.weight,
                               saved["backbone"]["stages.2.blocks.4.mlp.fc1.weight"])


class ResNetOnlyBackend(TorchBackend):
    """The torch backend declaring only ResNet's ops (as spconv, minkowski and cuda do), for the refusal test."""

    name = "resnet-only"
    supported_ops = Backend.supported_ops
    unsupported_ops_reason = "it declares ResNet's ops only"


def test_backend_without_convnext_ops_is_refused_before_anything_is_written(pretrain_store, tmp_path, capsys,
                                                                            monkeypatch):
    from ctssl.sparse import backends

    monkeypatch.setitem(backends._REGISTRY, "resnet-only", (__name__, "ResNetOnlyBackend"))
    monkeypatch.delitem(backends._instances, "resnet-only", raising=False)
    out = tmp_path / "run"
    rc = main(["--method", "spark", "--preset", "toy", "--arch", "convnext_tiny", "--backend", "resnet-only",
               "--data", str(pretrain_store), "--out", str(out), "--no-progress"])
    assert rc == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "backend 'resnet-only' cannot run ConvNeXt: it has no depthwise_conv" in lines[0], lines
    assert not Path(out).exists()
