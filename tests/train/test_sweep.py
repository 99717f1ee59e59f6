"""ctssl-sweep and the report: a tiny grid end to end, resumability, robustness verdicts, bad input."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from ctssl.models import resnet18
from ctssl.train import finetune as ft
from ctssl.train import report as R
from ctssl.train.sweep import main as sweep_main

from .bars_data import write_npz

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    export = root / "r18.pt"
    torch.save(resnet18(in_chans=1).state_dict(), export)
    return {"npz": write_npz(root / "bars.npz", n=(40, 12, 12)), "export": str(export), "root": root}


def _argv(setup, out, *extra):
    return ["--data", setup["npz"], "--out", str(out), "--preset", "test", "--device", "cpu",
            "--pretrained", f"tiny={setup['export']}", "--fractions", "0.25", "1.0", "--seeds", "0", "1",
            "--image-size", "32", *extra]


def test_sweep_writes_report_and_rerun_skips_every_cell(setup, monkeypatch, capsys):
    out = setup["root"] / "run"
    assert sweep_main(_argv(setup, out)) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("[")]
    assert len(lines) == 8 and all("test acc" in line for line in lines)  # one progress line per trained cell
    assert [line.split()[3] for line in lines] == ["0.25"] * 4 + ["1"] * 4  # smallest fraction first

    report = out / "report"
    for name in ("summary.csv", "summary.md", "results.csv", "relative_drop.csv", "accuracy.png", "auc.png",
                 "relative_drop_accuracy.png"):
        assert (report / name).is_file(), name
    assert (report / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(report / "summary.csv")))
    assert [(r["method"], float(r["fraction"]), r["n_seeds"]) for r in rows] == [
        ("tiny", 0.25, "2"), ("tiny", 1.0, "2"), ("random", 0.25, "2"), ("random", 1.0, "2")]
    # the table is the mean / sample std of the per-run metrics
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs" / "tiny" / "f0.25").glob("seed*/metrics.json"))]
    accs = [r["test"]["accuracy"] for r in runs]
    assert float(rows[0]["accuracy_mean"]) == pytest.approx(np.mean(accs))
    assert float(rows[0]["accuracy_std"]) == pytest.approx(np.std(accs, ddof=1))
    # every method saw exactly the same training images
    shas = {json.loads(p.read_text())["train_indices_sha"] for p in out.glob("runs/*/f0.25/seed*/metrics.json")}
    assert len(shas) == 1 and runs[0]["n_train"] == 10
    md = (report / "summary.md").read_text()
    assert "| tiny |" in md and "| random |" in md and "seed" in md
    assert "Most robust method" in md or "Not ranked: tiny" in md

    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(ft, "run_finetune", no_training)
    assert sweep_main(_argv(setup, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 8 and "8 skipped" in printed


def test_sweep_refuses_other_checkpoint_under_same_name(setup, tmp_path, capsys):
    out = tmp_path / "one"
    one_cell = ["--no-random", "--fractions", "1.0", "--seeds", "0"]
    assert sweep_main(_argv(setup, out) + one_cell) == 0
    other = tmp_path / "other.pt"
    torch.save(resnet18(in_chans=1).state_dict(), other)
    argv = _argv(setup, out) + one_cell
    argv[argv.index(f"tiny={setup['export']}")] = f"tiny={other}"
    capsys.readouterr()
    assert sweep_main(argv) == 2
    err = capsys.readouterr().err
    assert "'tiny'" in err and "other.pt" in err


@pytest.mark.parametrize("spec, needle", [
    ("noequals", "NAME=PATH"), ("random=x.pt", "random"), ("a=/does/not/exist.pt", "no such file"),
])
def test_bad_pretrained_spec(setup, tmp_path, capsys, spec, needle):
    argv = _argv(setup, tmp_path / "bad")
    argv[argv.index(f"tiny={setup['export']}")] = spec
    assert sweep_main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_fraction_missing_from_given_file(setup, tmp_path, capsys):
    from ctssl.data.splits import nested_fractions, write_fractions

    labels = np.arange(40) % 2
    write_fractions(tmp_path / "fr.json", nested_fractions(labels, [0.5], seed=0), labels=labels, seed=0)
    code = sweep_main(_argv(setup, tmp_path / "x", "--fractions-file", str(tmp_path / "fr.json")))
    assert code == 2 and "0.25" in capsys.readouterr().err


# ---------------------------------------------------------------- report logic on made-up results

def _records(table):
    """{method: {fraction: [acc per seed]}} to report records."""
    out = []
    for method, by_fraction in table.items():
        for fraction, accs in by_fraction.items():
            for seed, acc in enumerate(accs):
                out.append({"method": method, "fraction": fraction, "seed": seed, "n_train": 10,
                            **{m: acc for m in R.METRIC_NAMES}})
    return out


def test_relative_drop_and_clear_winner():
    recs = _records({
        "spark": {1.0: [0.90, 0.92, 0.91], 0.1: [0.85, 0.87, 0.86]},
        "mocov2": {1.0: [0.90, 0.92, 0.91], 0.1: [0.60, 0.62, 0.61]},
        "random": {1.0: [0.70, 0.71, 0.72], 0.1: [0.69, 0.70, 0.71]},
    })
    drops = {(r["method"], r["metric"]): r for r in R.relative_drop_rows(recs, ["accuracy"])}
    want = np.mean([(0.90 - 0.85) / 0.90, (0.92 - 0.87) / 0.92, (0.91 - 0.86) / 0.91])
    assert drops[("spark", "accuracy")]["drop_mean"] == pytest.approx(want)
    ranking = R.robustness(recs, "accuracy")
    assert ranking[0]["method"] == "random"  # smallest drop overall, but not ranked as a method
    text = R.robustness_statement(ranking, "accuracy", 1.0)
    assert "**spark**" in text and "larger than the seed spread" in text


def test_difference_within_seed_spread_is_said():
    recs = _records({
        "spark": {1.0: [0.90, 0.80, 0.85], 0.1: [0.80, 0.78, 0.70]},
        "byol": {1.0: [0.88, 0.82, 0.86], 0.1: [0.70, 0.80, 0.76]},
    })
    text = R.robustness_statement(R.robustness(recs, "accuracy"), "accuracy", 1.0)
    assert "within the seed spread" in text


def test_single_seed_is_not_evidence():
    recs = _records({"spark": {1.0: [0.9], 0.5: [0.8]}, "byol": {1.0: [0.9], 0.5: [0.7]}})
    text = R.robustness_statement(R.robustness(recs, "accuracy"), "accuracy", 1.0)
    assert "**spark**" in text and "single seed" in text


def test_summary_handles_missing_auc_and_no_reference():
    recs = _records({"spark": {0.5: [0.8, 0.9], 0.25: [0.7, 0.6]}})
    for r in recs:
        r["auc"] = math.nan
    rows = R.summarize(recs)
    assert math.isnan(rows[0]["auc_mean"]) and rows[0]["accuracy_mean"] == pytest.approx(0.65)
    assert R.reference_fraction(recs) == 0.5  # no 100% run: the largest fraction is the reference
    table = R.markdown_table(rows, "accuracy")
    assert "| spark | 0.650 +- 0.071 | 0.850 +- 0.071 |" in table


def test_chance_level_results_are_flagged():
    recs = _records({"spark": {1.0: [0.52, 0.48], 0.5: [0.50, 0.50]}, "byol": {1.0: [0.50, 0.51], 0.5: [0.5, 0.49]}})
    for r in recs:
        r["majority_share"] = 0.5
    rows = R.summarize(recs)
    assert "beats guessing" in R.chance_warning(rows, recs, "accuracy", 1.0)
    for r in recs:
        r["accuracy"] += 0.3 if r["fraction"] == 1.0 else 0.0
    assert R.chance_warning(R.summarize(recs), recs, "accuracy", 1.0) is None


def test_method_at_chance_at_full_labels_is_not_called_robust():
    """A method that never beats guessing has nothing to lose: it must not win the ranking."""
    recs = _records({
        "spark": {1.0: [0.90, 0.88], 0.1: [0.80, 0.76]},
        "byol": {1.0: [0.50, 0.50], 0.1: [0.55, 0.60]},  # chance on a balanced binary task
    })
    for r in recs:
        r["majority_share"] = 0.5
    rows = R.summarize(recs, ["accuracy"])
    excluded = R.at_chance_methods(rows, recs, "accuracy", 1.0)
    assert excluded == ["byol"]
    text = R.robustness_statement(R.robustness(recs, "accuracy"), "accuracy", 1.0, excluded)
    assert "**spark**" in text and "Not ranked: byol" in text
    alone = R.robustness_statement(R.robustness(recs, "accuracy"), "accuracy", 1.0, ["byol", "spark"])
    assert alone.startswith("No robustness ranking.")


def test_sweep_shows_each_cells_epochs(setup, tmp_path, capsys):
    argv = _argv(setup, tmp_path / "progress") + ["--no-random", "--fractions", "1.0", "--seeds", "0", "--epochs", "2"]
    assert sweep_main(argv) == 0
    epochs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    tiny fraction 1 seed 0:")]
    assert [line.split(": ", 1)[1].split()[:2] for line in epochs] == [["epoch", "1/2"], ["epoch", "2/2"]]
