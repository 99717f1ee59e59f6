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
            "--pretrained", f"tiny3d={setup['export']}", "--fractions", "0.5", "1.0", "--seeds", "0"]
    assert sweep_main(argv) == 0, capsys.readouterr().err
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and all("test acc" in line for line in lines)  # tiny3d and random x 2 fractions
    report = out / "report"
    for name in ("summary.csv", "summary.md", "results.csv", "relative_drop.csv", "accuracy.png"):
        assert (report / name).is_file(), name
    rows = list(csv.DictReader(open(report / "summary.csv")))
    assert sorted((r["method"], float(r["fraction"])) for r in rows) == [
        ("random", 0.5), ("random", 1.0), ("tiny3d", 0.5), ("tiny3d", 1.0)]


def test_sweep_of_volumes_with_a_2d_arch_is_one_error_before_training(setup, tmp_path, capsys):
    argv = ["--data", setup["npz"], "--out", str(tmp_path / "bad"), "--preset", "test", "--device", "cpu",
            "--image-size", "16", "--fractions", "1.0", "--seeds", "0"]  # random baseline: the preset's resnet18
    assert sweep_main(argv) == 2
    err = capsys.readouterr().err
    assert "--arch resnet18 is a 2-D encoder" in err and "(16, 16, 16)" in err
    assert not (tmp_path / "bad" / "runs").exists()
