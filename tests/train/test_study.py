"""ctssl-study end to end at the micro preset: phantoms -> store -> pre-training -> sweep -> report."""

import csv

import pytest
import torch

from ctssl.train import finetune as ft
from ctssl.train import study


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_study_end_to_end_then_resumes_without_work(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    assert study.main(["--preset", "test", "--out", str(out), "--threads", "1"]) == 0
    for method in study.PRESETS["test"].methods:
        assert (out / "pretrain" / method / "checkpoint_final.pt").is_file()
    report = out / "sweep" / "report"
    rows = list(csv.DictReader(open(report / "summary.csv")))
    methods = {r["method"] for r in rows}
    assert methods == {*study.PRESETS["test"].methods, "random"}
    assert {float(r["fraction"]) for r in rows} == set(study.PRESETS["test"].fractions)
    summary = (report / "summary.md").read_text()
    assert (report / "accuracy.png").is_file() and "## Robustness to fewer labels" in summary
    assert "Most robust method" in summary or "No robustness ranking" in summary
    capsys.readouterr()

    import ctssl.train.pretrain_cli as pretrain_cli
    from ctssl.train import pretrain

    def fail(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pretrain_cli, "main", fail)
    monkeypatch.setattr(pretrain, "run_pretraining", fail)
    monkeypatch.setattr(ft, "run_finetune", fail)
    assert study.main(["--preset", "test", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "data: " in printed and printed.count("exists, skipped") == 1 + len(study.PRESETS["test"].methods)
    assert "0 cells trained" in printed


def test_unknown_method_is_a_usage_error(tmp_path, capsys):
    assert study.main(["--preset", "test", "--out", str(tmp_path), "--methods", "spark", "dino"]) == 2
    assert "dino" in capsys.readouterr().err
