"""One weight loader (ctssl.train.weights): every layout, the report of what loaded, and ctssl-train --init."""

import json
import re

import pytest
import torch

from ctssl.models import convnext_tiny, create_encoder, resnet18, resnet18_3d
from ctssl.train import weights as W
from ctssl.train.checkpoint import FORMAT, VERSION
from ctssl.train.pretrain_cli import main as train_main

from ..ssl.helpers import tiny_method

pytestmark = pytest.mark.usefixtures("single_thread")


def _spark_release(method) -> dict:
    """A file in the layout of SparK's released ``*_withdecoder_1kpretrained_spark_style.pth``, made from a
    ctssl SparK model: its names, mask tokens of shape (1, C, 1, 1), a 3-channel decoder output, the
    deprecated buffers, and the wrapper entries."""
    block = {"0": "up_sample", "1": "conv.0", "2": "conv.1", "4": "conv.3", "5": "conv.4"}
    sd = {}
    for key, value in method.state_dict().items():
        if key.startswith("backbone."):
            key = "sparse_encoder.sp_cnn." + key[len("backbone."):]
        elif key.startswith("decoder.blocks."):
            i, j, rest = key[len("decoder.blocks."):].split(".", 2)
            key = f"dense_decoder.dec.{i}.{block[j]}.{rest}"
        elif key.startswith("decoder.proj."):
            key = "dense_decoder.proj." + key[len("decoder.proj."):]
            if key.endswith("weight"):
                value = value.repeat(3, 1, 1, 1) if value.shape[0] == 1 else value
            else:
                value = value.repeat(3) if value.shape[0] == 1 else value
        elif re.fullmatch(r"mask_tokens\.\d+", key):
            value = value.reshape(1, -1, 1, 1)
        sd[key] = value.clone()
    sd.update(imn_m=torch.zeros(1, 3, 1, 1), imn_s=torch.ones(1, 3, 1, 1), norm_black=torch.zeros(1, 3, 8, 8))
    return {"args": "Namespace(...)", "input_size": 224, "arch": "resnet18", "epoch": 1599,
            "performance_desc": "[no performance_desc]", "module": sd, "optimizer": {}, "is_pretrain": True}


def test_torchvision_resnet_state_dict_loads_into_spark_encoder(tmp_path):
    torch.manual_seed(1)
    source = resnet18(in_chans=1)
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "tv.pt")  # a DDP prefix too
    method = tiny_method("spark", seed=2)
    lines = []
    report = W.init_method(method, tmp_path / "tv.pt", arch="resnet18", log=lines.append)
    assert set(report.loaded) == {"backbone." + k for k in source.state_dict()}
    assert not report.mismatched and not report.not_in_model
    assert torch.equal(method.backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    # the method's own tensors keep their initialisation, and the summary says so
    assert any(k.startswith("decoder.") for k in report.not_in_file)
    assert lines[0].startswith(f"init: loaded {len(source.state_dict())} tensors from {tmp_path / 'tv.pt'}")
    assert "keep their initialisation (densify_norms" in lines[-1] and "decoder: " in lines[-1]


def test_spark_release_layout_loads_encoder_densify_and_decoder(tmp_path):
    pretrained = tiny_method("spark", seed=3)
    torch.save(_spark_release(pretrained), tmp_path / "res18_withdecoder_1kpretrained_spark_style.pth")
    fresh = tiny_method("spark", seed=4)
    lines = []
    report = W.init_method(fresh, tmp_path / "res18_withdecoder_1kpretrained_spark_style.pth", log=lines.append)
    # the decoder's output layer: SparK reconstructs 3 channels, this model 1 -- skipped with both shapes
    assert [m[0] for m in report.mismatched] == ["decoder.proj.weight", "decoder.proj.bias"]
    assert report.mismatched[0][1:] == ((3, 2, 1, 1), (1, 2, 1, 1))
    assert sorted(report.not_in_model) == ["imn_m", "imn_s", "norm_black"]
    theirs, ours = pretrained.state_dict(), fresh.state_dict()
    for key in report.loaded:
        assert torch.equal(ours[key], theirs[key]), key
    assert any(k.startswith("decoder.blocks.4.5.") for k in report.loaded)
    assert {"mask_tokens.0", "densify_norms.0.running_var", "densify_projs.1.weight"} <= set(report.loaded)
    assert set(report.not_in_file) == {"decoder.proj.weight", "decoder.proj.bias"}
    text = "\n".join(lines)
    assert "skipped decoder.proj.weight: shape [3, 2, 1, 1] in the file, [1, 2, 1, 1] in the model" in text
    assert "skipped imn_m: not in the model" in text
    # fine-tuning reads the same file: the encoder, its arch and channels, without SparK's classifier
    from ctssl.train import finetune as ft

    backbone, meta = ft.read_backbone(str(tmp_path / "res18_withdecoder_1kpretrained_spark_style.pth"))
    assert (meta["arch"], meta["in_chans"], meta["method"]) == ("resnet18", 1, "spark")
    assert set(backbone) == {k for k in pretrained.backbone.state_dict() if not k.startswith("fc.")}


def test_ctssl_checkpoint_into_another_method_loads_the_encoder(tmp_path):
    spark = tiny_method("spark", seed=5)
    ckpt = {"format": FORMAT, "version": VERSION, "method": "spark", "arch": "resnet18", "in_chans": 1,
            "config": {}, "step": 3, "epoch": 0, "model": spark.state_dict(),
            "backbone": spark.backbone.state_dict()}
    torch.save(ckpt, tmp_path / "c.pt")
    same = tiny_method("spark", seed=6)
    report = W.init_method(same, tmp_path / "c.pt", log=None)
    assert not report.not_in_file and not report.mismatched and not report.not_in_model
    byol = tiny_method("byol", seed=6)
    report = W.init_method(byol, tmp_path / "c.pt", log=None)
    assert torch.equal(byol.backbone.conv1.weight, spark.backbone.conv1.weight)
    assert any(k.startswith("decoder.") for k in report.not_in_model)  # SparK's decoder has no place in BYOL


def test_shape_mismatch_is_reported_and_the_rest_loads(tmp_path):
    torch.save(resnet18(in_chans=3).state_dict(), tmp_path / "rgb.pt")
    method = tiny_method("spark", seed=0, in_chans=1)
    report = W.init_method(method, tmp_path / "rgb.pt", log=None)
    assert report.mismatched == [("backbone.conv1.weight", (64, 3, 7, 7), (64, 1, 7, 7))]
    assert "backbone.layer1.0.conv1.weight" in report.loaded


@pytest.mark.parametrize("what", ["convnext", "junk"])
def test_a_file_that_matches_nothing_is_an_error_naming_it(tmp_path, what):
    sd = convnext_tiny(in_chans=1).state_dict() if what == "convnext" else {"foo.weight": torch.zeros(3)}
    torch.save(sd, tmp_path / f"{what}.pt")
    with pytest.raises(W.WeightsError, match=rf"{what}\.pt.*none of its tensors fit the spark model .*"
                                             rf"looked for backbone\.conv1\.weight"):
        W.init_method(tiny_method("spark"), tmp_path / f"{what}.pt", log=None)


def test_timm_convnext_tiny_state_dict_loads_and_is_recognised(tmp_path):
    timm = pytest.importorskip("timm", reason="timm (test extra) is not installed")
    torch.manual_seed(0)
    ref = timm.create_model("convnext_tiny", pretrained=False, num_classes=10)
    torch.save({"model": ref.state_dict()}, tmp_path / "timm.pth")  # timm's / the official release wrapper
    weights = W.read_weights(tmp_path / "timm.pth")
    assert W.infer_arch(weights.backbone) == "convnext_tiny"
    model = create_encoder("convnext_tiny", num_classes=10)
    report = W.load_matching(model, W.encoder_tensors(weights, model), source="timm.pth", target="convnext_tiny")
    assert not report.not_in_file and not report.mismatched and not report.not_in_model
    assert torch.equal(model.stages[2].blocks[4].mlp.fc1.weight, ref.stages[2].blocks[4].mlp.fc1.weight)


def test_infer_arch_covers_every_family_and_layout():
    with torch.device("meta"):  # shapes are all it reads
        r18, r50, r18_3d = resnet18(in_chans=1), create_encoder("resnet50"), resnet18_3d()
        r18_3d_in, cnx = resnet18_3d(norm="instance"), convnext_tiny(in_chans=1)
    assert W.infer_arch(r18.state_dict()) == "resnet18"
    old_torchvision = {k: v for k, v in r50.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert W.infer_arch(old_torchvision) == "resnet50"
    assert W.infer_arch(r18_3d.state_dict()) == "resnet18_3d"
    sd = r18_3d_in.state_dict()
    assert W.infer_arch(sd) == "resnet18_3d" and W.encoder_kwargs(sd) == {"in_chans": 1, "norm": "instance"}
    assert W.infer_arch(cnx.state_dict()) == "convnext_tiny"
    official = {re.sub(r"^stem\.", "downsample_layers.0.", k): v for k, v in cnx.state_dict().items()}
    official = {re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv.", k): v
                for k, v in official.items()}
    assert W.stem_weight(official).shape[1] == 1
    assert W.family_of_state_dict(official) == "convnext"
    assert W.infer_arch({"foo.weight": torch.zeros(1)}) is None
    assert W.infer_arch({"conv1.weight": torch.zeros(64, 1, 7, 7)}) is None  # a stem alone is no known encoder


def test_ctssl_train_init_starts_from_the_file(pretrain_store, tmp_path, capsys, monkeypatch):
    """--init: the weights are in the model when the first step runs; recorded in config.json; ignored on resume."""
    from ctssl.train import pretrain

    torch.manual_seed(7)
    source = resnet18(in_chans=3)
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    seen = {}
    original = pretrain._Run._train_step

    def spy(self, model, method, optimizer, scaler, batch, step):
        seen.setdefault("conv1", method.backbone.conv1.weight.detach().clone())
        return original(self, model, method, optimizer, scaler, batch, step)

    monkeypatch.setattr(pretrain._Run, "_train_step", spy)
    out = tmp_path / "run"
    argv = ["--method", "spark", "--preset", "toy", "--data", str(pretrain_store), "--out", str(out), "--steps", "1",
            "--set", "hparams.decoder_width=64", "--set", "vis_every=100", "--no-progress", "--init",
            str(tmp_path / "r18.pt")]
    assert train_main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"init: loaded {len(source.state_dict())} tensors from {tmp_path / 'r18.pt'}" in printed
    assert torch.equal(seen["conv1"], source.conv1.weight)
    assert json.loads((out / "config.json").read_text())["config"]["init"] == str(tmp_path / "r18.pt")
    # resuming: the checkpoint wins, with a note
    assert train_main(["--out", str(out), "--resume", "--no-progress"]) == 0
    assert "ignored: resuming, the checkpoint's weights win" in capsys.readouterr().out


def test_ctssl_train_init_that_matches_nothing_is_exit_2(pretrain_store, tmp_path, capsys):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "junk.pt")
    out = tmp_path / "run"
    rc = train_main(["--method", "spark", "--preset", "toy", "--data", str(pretrain_store), "--out", str(out),
                     "--steps", "1", "--no-progress", "--init", str(tmp_path / "junk.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "junk.pt" in err and "none of its tensors fit" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
