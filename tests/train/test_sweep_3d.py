"""ctssl-sweep and its report on a 3-D labeled set (phantom volumes) with a 3-D ResNet."""

import csv

import pytest
import torch

from ctssl.data.phantom import write_labeled_volumes
from ctssl.models import resnet18_3d
from ctssl.train.sweep import main as sweep_main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep3d")
    torch.manual_seed(0)
    torch.save(resnet18_3d().state_dict(), root / "r18_3d.pt")
    return {"npz": str(write_labeled_volumes(root / "volumes.npz", 16, size=16, seed=2)),
            "export": str(root / "r18_3d.pt"), "root": root}


def test_sweep_on_volumes_with_a_3d_resnet_writes_the_report(setup, capsys):
    out = setup["root"] / "run"
    argv = ["--data", setup["npz"], "--out", str(out), "--preset", "test", "--device", "cpu", "--image-size", "16",
            "--arch", "resnet18_3d", "--fractions", "0.5", "1.0", "--seeds", "0"]
    assert sweep_main(argv) == 0, capsys.readouterr().err
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and all("test acc" in line for line in lines)  # the random baseline x 2 fractions
    report = out / "report"
    for name in ("summary.csv", "summary.md", "results.csv", "relative_drop.csv", "accuracy.png"):
        assert (report / name).is_file(), name
    rows = list(csv.DictReader(open(report / "summary.csv")))
    assert sorted((r["method"], float(r["fraction"])) for r in rows) == [("random", 0.5), ("random", 1.0)]
    runs = list((out / "runs" / "random").glob("f*/seed0/metrics.json"))
    assert len(runs) == 2 and all('"arch": "resnet18_3d"' in p.read_text() for p in runs)


def test_sweep_reads_the_arch_of_a_3d_export_for_the_random_baseline(setup, tmp_path, monkeypatch):
    from ctssl.train import finetune as ft
    from ctssl.train import sweep

    seen = []
    monkeypatch.setattr(ft, "run_finetune", lambda config, *a, **k: seen.append(config) or (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(ft.make_config("test", data=setup["npz"], image_size=16, device="cpu"), tmp_path / "s",
                        {"tiny3d": setup["export"]}, [1.0], [0], log=lambda m: None)
    assert seen[0].init == setup["export"]


def test_sweep_of_volumes_with_a_2d_arch_is_one_error_before_training(setup, tmp_path, capsys):
    argv = ["--data", setup["npz"], "--out", str(tmp_path / "bad"), "--preset", "test", "--device", "cpu",
            "--image-size", "16", "--fractions", "1.0", "--seeds", "0"]  # random baseline: the preset's resnet18
    assert sweep_main(argv) == 2
    err = capsys.readouterr().err
    assert "--arch resnet18 is a 2-D encoder" in err and "(16, 16, 16)" in err
    assert not (tmp_path / "bad" / "runs").exists()


def test_random_baseline_takes_the_norm_of_an_instance_norm_3d_export(setup, tmp_path, monkeypatch):
    from ctssl.models import resnet18_3d
    from ctssl.train import finetune as ft
    from ctssl.train import sweep

    export = tmp_path / "r18_3d_instance.pt"
    torch.save(resnet18_3d(norm="instance").state_dict(), export)
    seen = []

    def record(config, *args, **kwargs):
        seen.append(config)
        if config.init == "random":
            raise KeyboardInterrupt  # the random baseline's config is all this test needs
        raise RuntimeError("not trained in this test")  # the sweep logs the cell as failed and goes on

    monkeypatch.setattr(ft, "run_finetune", record)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(ft.make_config("test", data=setup["npz"], image_size=16, device="cpu"), tmp_path / "s",
                        {"inst": str(export)}, [1.0], [0], log=lambda m: None)
    random_config = next(c for c in seen if c.init == "random")
    assert (random_config.arch, random_config.norm) == ("resnet18_3d", "instance")
    model, info = ft.build_model(random_config, num_classes=2)
    assert info["encoder_kwargs"] == {"norm": "instance"}
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())


def test_norm_choice_is_refused_for_a_2d_encoder():
    from ctssl.train import finetune as ft
    from ctssl.train.config import FinetuneError

    with pytest.raises(FinetuneError, match="--norm instance: only the 3-D ResNets take a norm choice, not resnet18"):
        ft.build_model(ft.make_config("test", arch="resnet18", norm="instance"), num_classes=2)
    with pytest.raises(FinetuneError, match="--norm must be 'batch' or 'instance'"):
        ft.make_config("test", norm="group").validate()
