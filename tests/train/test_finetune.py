"""ctssl-finetune: backbone loading, the protocol's freezing, model selection, resume, bad input."""

import json

import numpy as np
import pytest
import torch

from ctssl.models import create_resnet, resnet18
from ctssl.train import finetune as ft
from ctssl.train.finetune_cli import main as finetune_main

from .bars_data import write_csv, write_npz

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("ft") / "bars.npz")


@pytest.fixture(scope="module")
def r18_export(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "r18.pt"
    torch.save(resnet18(in_chans=3).state_dict(), path)
    return str(path)


def _config(npz, **kw):
    base = dict(data=npz, epochs=2, freeze_epochs=0, image_size=32, batch_size=16, device="cpu")
    base.update(kw)
    return ft.make_config("test", **base)


def test_export_loads_into_torchvision_resnet50_strict(tmp_path):
    tv = pytest.importorskip("torchvision", reason="torchvision (test dependency) is not installed")
    from ctssl.train.checkpoint import export_backbone

    torch.manual_seed(1)
    model = create_resnet("resnet50", in_chans=3)
    path = export_backbone(model, tmp_path / "r50.pt")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    ref = tv.models.resnet50()
    ref.load_state_dict(sd, strict=True)
    assert torch.equal(ref.layer3[2].conv2.weight, model.layer3[2].conv2.weight)
    # and fine-tuning reads it back: arch and channels inferred, every backbone tensor loaded, new head
    backbone, meta = ft.read_backbone(str(path))
    assert meta["arch"] == "resnet50" and meta["in_chans"] == 3
    assert not any(k.startswith("fc.") for k in backbone)
    tuned, info = ft.build_model(ft.make_config("paper", init=str(path)), num_classes=11)
    assert info["arch"] == "resnet50" and tuned.fc.out_features == 11
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(tuned.state_dict()[k], v), k


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_infer_arch(arch):
    assert ft.infer_arch(create_resnet(arch).state_dict()) == arch


def test_ctssl_checkpoint_meta_is_used(tmp_path):
    """A ctssl pre-training checkpoint: arch, channels and method come from its entries."""
    from ctssl.train.checkpoint import FORMAT, VERSION

    model = resnet18(in_chans=1)
    ckpt = {"format": FORMAT, "version": VERSION, "method": "spark", "arch": "resnet18", "in_chans": 1,
            "config": {}, "step": 3, "epoch": 0, "model": {}, "backbone": model.state_dict()}
    torch.save(ckpt, tmp_path / "c.pt")
    tuned, info = ft.build_model(ft.make_config("toy", init=str(tmp_path / "c.pt")), num_classes=2)
    assert info["method"] == "spark" and info["in_chans"] == 1
    assert torch.equal(tuned.conv1.weight, model.conv1.weight)


def test_finetune_selects_best_validation_epoch(npz, tmp_path, r18_export):
    result = ft.run_finetune(_config(npz, init=r18_export, epochs=3), tmp_path / "run", log=None)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["confusion_matrix"] == result["test"]["confusion_matrix"]
    hist = saved["history"]
    assert len(hist) == 3
    best = max(hist, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert saved["best_epoch"] == best["epoch"]
    # the tested weights are the selected epoch's: validation re-measured with them matches the history
    assert saved["val"]["accuracy"] == pytest.approx(best["val_accuracy"])
    assert saved["n_train"] == 48 and saved["n_test"] == 16 and saved["name"] == "pretrained"
    assert set(saved["test"]) >= {"accuracy", "balanced_accuracy", "auc", "f1", "precision", "recall"}
    assert (tmp_path / "run" / "best.pt").is_file() and not (tmp_path / "run" / "last.pt").exists()


def _backbone_tensors(model_state):
    return {k: v.clone() for k, v in model_state.items() if not k.startswith("fc.")}


@pytest.mark.parametrize("bn_recalibrate", [0, 16])
def test_linear_probe_keeps_backbone_and_bn_stats(npz, tmp_path, r18_export, bn_recalibrate):
    cfg = _config(npz, init=r18_export, linear_probe=True, epochs=1, bn_recalibrate=bn_recalibrate)
    ft.run_finetune(cfg, tmp_path / "lp", log=None)
    tuned = torch.load(tmp_path / "lp" / "best.pt", weights_only=False)["model"]
    init = torch.load(r18_export, weights_only=True)
    for k, v in _backbone_tensors(tuned).items():
        assert torch.equal(v, init[k]), f"linear probe changed {k}"
    assert not torch.equal(tuned["fc.weight"][:, :4], init["fc.weight"][:2, :4])


def test_frozen_epochs_train_only_the_head(npz, tmp_path, r18_export):
    """Backbone frozen (no gradient) but BatchNorm statistics adapt, as documented."""
    cfg = _config(npz, init=r18_export, epochs=1, freeze_epochs=1)
    ft.run_finetune(cfg, tmp_path / "fr", log=None)
    tuned = torch.load(tmp_path / "fr" / "best.pt", weights_only=False)["model"]
    init = torch.load(r18_export, weights_only=True)
    assert torch.equal(tuned["layer2.0.conv1.weight"], init["layer2.0.conv1.weight"])
    assert torch.equal(tuned["layer2.0.bn1.weight"], init["layer2.0.bn1.weight"])
    assert not torch.equal(tuned["layer2.0.bn1.running_mean"], init["layer2.0.bn1.running_mean"])
    # after unfreezing the backbone trains
    ft.run_finetune(_config(npz, init=r18_export, epochs=1), tmp_path / "unfrozen", log=None)
    tuned = torch.load(tmp_path / "unfrozen" / "best.pt", weights_only=False)["model"]
    assert not torch.equal(tuned["layer2.0.conv1.weight"], init["layer2.0.conv1.weight"])


def test_recalibrate_bn_sets_the_statistics_of_the_given_images():
    """Running statistics become those of the images under the current weights; modes and momenta survive."""
    torch.manual_seed(0)
    model = resnet18(in_chans=3).train()
    adapter = ft._InputAdapter(3, None, None)
    images = torch.rand(12, 1, 32, 32) * 0.5 + 0.3
    ft.recalibrate_bn(model, adapter, [(images, torch.zeros(12))], torch.device("cpu"))
    with torch.no_grad():
        first = model.conv1(adapter(images))
    assert torch.allclose(model.bn1.running_mean, first.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, first.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert model.training and model.bn1.training and model.bn1.momentum == 0.1
    assert int(model.bn1.num_batches_tracked) == 1


def test_toy_preset_recalibrates_bn_and_paper_does_not():
    """The paper's protocol evaluates with running averages; the toy preset's short runs need recalibration."""
    assert ft.make_config("toy").bn_recalibrate > 0
    assert ft.make_config("paper").bn_recalibrate == 0 and "bn_recalibrate" not in ft.PRESETS["paper"]
    # off, it is not part of the resume fingerprint: paper runs and sweeps begun before the option still resume
    assert "bn_recalibrate" not in ft._fingerprint(ft.make_config("paper"))
    assert ft._fingerprint(ft.make_config("toy"))["bn_recalibrate"] == ft.PRESETS["toy"]["bn_recalibrate"]


def test_tested_model_has_recalibrated_bn_stats(npz, tmp_path):
    """best.pt (the tested weights) holds the statistics of the recalibration images, not running averages."""
    cfg = _config(npz, epochs=2, bn_recalibrate=16, seed=1)
    ft.run_finetune(cfg, tmp_path / "rc", log=None)
    tuned = torch.load(tmp_path / "rc" / "best.pt", weights_only=False)["model"]
    model = resnet18(in_chans=3, num_classes=2)
    model.load_state_dict(tuned)
    splits = ft.load_splits(cfg)
    view = ft.recalibration_view(splits.train, np.arange(48), 16, seed=1)
    assert len(view) == 16
    loader = torch.utils.data.DataLoader(view, batch_size=32)
    ft.recalibrate_bn(model, ft._InputAdapter(3, None, None), loader, torch.device("cpu"))
    for name in ("bn1", "layer2.0.bn1", "layer4.1.bn2"):
        for stat in ("running_mean", "running_var"):
            key = f"{name}.{stat}"
            assert torch.allclose(model.state_dict()[key], tuned[key], rtol=1e-4, atol=1e-6), key


def test_resume_after_interruption_matches_uninterrupted(npz, tmp_path, monkeypatch):
    cfg = _config(npz, epochs=2, checkpoint_every=1, seed=3)
    full = ft.run_finetune(cfg, tmp_path / "full", log=None)

    calls = {"n": 0}
    real = ft.train_one_epoch

    def interrupt_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "train_one_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        ft.run_finetune(cfg, tmp_path / "cut", log=None)
    assert (tmp_path / "cut" / "last.pt").is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.setattr(ft, "train_one_epoch", real)
    resumed = ft.run_finetune(cfg, tmp_path / "cut", log=None)
    assert len(resumed["history"]) == 2
    for a, b in zip(full["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert not (tmp_path / "cut" / "last.pt").exists()


def test_fraction_file_selects_the_same_images(npz, tmp_path):
    from ctssl.data.splits import nested_fractions, write_fractions

    labels = np.arange(48) % 2
    subsets = nested_fractions(labels, [0.25, 0.5, 1.0], seed=7)
    write_fractions(tmp_path / "fr.json", subsets, labels=labels, seed=7)
    cfg = _config(npz, fraction=0.25, fractions_file=str(tmp_path / "fr.json"))
    f, idx = ft.select_fraction(cfg, labels)
    assert f == 0.25 and np.array_equal(idx, subsets[0.25])
    assert len(idx) == 12 and np.bincount(labels[idx]).tolist() == [6, 6]


# ---------------------------------------------------------------- bad input: exit code 2, one clear line

def _run_cli(capsys, argv):
    code = finetune_main(argv)
    err = capsys.readouterr().err
    return code, err


def _base_argv(npz, tmp_path):
    return ["--data", npz, "--out", str(tmp_path / "o"), "--preset", "test", "--device", "cpu"]


def test_missing_files(npz, tmp_path, capsys):
    code, err = _run_cli(capsys, _base_argv(str(tmp_path / "nope.npz"), tmp_path))
    assert code == 2 and "nope.npz" in err and "Traceback" not in err
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--init", str(tmp_path / "missing.pt")])
    assert code == 2 and "missing.pt" in err and "no such file" in err
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--fraction", "0.5", "--fractions-file",
                                                             str(tmp_path / "fr.json")])
    assert code == 2 and "fr.json" in err


def test_wrong_arch_or_channels_for_checkpoint(npz, tmp_path, capsys, r18_export):
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--init", r18_export, "--arch", "resnet50"])
    assert code == 2 and "resnet50" in err and "resnet18" in err
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--init", r18_export, "--in-chans", "1"])
    assert code == 2 and "input channels" in err


def test_corrupt_or_foreign_checkpoint(npz, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--init", str(tmp_path / "junk.pt")])
    assert code == 2 and "junk.pt" in err and "Traceback" not in err
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(1)},
               tmp_path / "partial.pt")
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--init", str(tmp_path / "partial.pt")])
    assert code == 2 and "partial.pt" in err


def test_unknown_fraction_and_foreign_fractions_file(npz, tmp_path, capsys):
    from ctssl.data.splits import nested_fractions, write_fractions

    labels = np.arange(48) % 2
    write_fractions(tmp_path / "fr.json", nested_fractions(labels, [0.25, 0.5], seed=0), labels=labels, seed=0)
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--fraction", "0.1", "--fractions-file",
                                                             str(tmp_path / "fr.json")])
    assert code == 2 and "0.1" in err and "0.25" in err
    other = np.arange(30) % 2
    write_fractions(tmp_path / "other.json", nested_fractions(other, [0.5], seed=0), labels=other, seed=0)
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--fraction", "0.5", "--fractions-file",
                                                             str(tmp_path / "other.json")])
    assert code == 2 and "another training set" in err
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--fraction", "1.5"])
    assert code == 2 and "(0, 1]" in err


def test_negative_bn_recalibrate(npz, tmp_path, capsys):
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--bn-recalibrate", "-1"])
    assert code == 2 and "--bn-recalibrate" in err


def test_positive_class(npz, tmp_path, capsys):
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--positive-class", "tumour"])
    assert code == 2 and "tumour" in err and "0, 1" in err
    cfg = _config(npz, positive_class="0")
    assert ft.positive_index(cfg, ["0", "1"]) == 0
    assert ft.positive_index(_config(npz, positive_class="CT_COVID"), ["CT_COVID", "CT_NonCOVID"]) == 0


# ---------------------------------------------------------------- labels that cannot train a classifier

def test_stray_labels_are_named_in_a_warning(tmp_path, caplog):
    labels = ["0", "1"] * 20 + ["maybe", "2"]  # a binary task with two stray labels
    data = write_csv(tmp_path / "set", labels)
    splits = ft.load_splits(_config(data))
    assert splits.classes == ["0", "1", "2", "maybe"]
    stray = [n for n in splits.notes if "'maybe'" in n or "'2'" in n]
    assert len(stray) == 2 and all("has only 1 image(s)" in n for n in stray)
    assert all(note in caplog.text for note in stray)


def test_empty_label_or_a_single_class_is_refused(tmp_path, capsys):
    for name, labels, message in (("empty", ["0", "1"] * 10 + [""], "row(s) have an empty label (first: line 22"),
                                  ("single", ["tumour"] * 20, "every image has the label 'tumour'")):
        data = write_csv(tmp_path / name, labels)
        code, err = _run_cli(capsys, _base_argv(data, tmp_path / name))
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / name / "o").exists()


def test_missing_image_in_the_csv_is_named(tmp_path, capsys):
    data = write_csv(tmp_path / "set", ["0", "1"] * 10)
    (tmp_path / "set" / "img007.png").unlink()
    code, err = _run_cli(capsys, _base_argv(data, tmp_path))
    assert code == 2 and "1 image(s) listed do not exist" in err and "img007.png" in err and "Traceback" not in err


def test_a_finished_run_is_not_overwritten_without_overwrite(npz, tmp_path, capsys):
    argv = _base_argv(npz, tmp_path) + ["--image-size", "16", "-q"]
    assert finetune_main(argv) == 0
    metrics = (tmp_path / "o" / "metrics.json").read_text()
    code, err = _run_cli(capsys, argv + ["--lr", "0.01"])
    assert code == 2 and "already holds a run with other settings (lr)" in err and "--overwrite" in err
    assert (tmp_path / "o" / "metrics.json").read_text() == metrics
    assert finetune_main(argv + ["--lr", "0.01", "--overwrite"]) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["config"]["lr"] == 0.01


def test_init_directory_points_at_its_checkpoint(npz, tmp_path, capsys, r18_export):
    run = tmp_path / "run"
    run.mkdir()
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--init", str(run)])
    assert code == 2 and f"--init {run} is a directory" in err and "no such file" not in err
    import shutil

    shutil.copy(r18_export, run / "checkpoint_final.pt")
    code, err = _run_cli(capsys, _base_argv(npz, tmp_path) + ["--init", str(run)])
    assert code == 2 and f"--init {run / 'checkpoint_final.pt'}" in err
