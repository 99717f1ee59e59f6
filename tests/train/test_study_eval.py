"""The study's pre-training runs evaluate on its labeled set, and its report shows their k-NN accuracy."""
from __future__ import annotations

import argparse
import json

from ctssl.train import study


def test_pretraining_runs_evaluate_on_the_study_labeled_set(tmp_path):
    paths = study.StudyPaths(tmp_path)
    args = argparse.Namespace(pretrain_steps=None, seed=0, device=None, backend=None, preset="toy")
    cfg, resume = study.pretrain_config(paths, study.PRESETS["toy"], "byol", args)
    assert resume is None and cfg.eval_data == str(paths.labels_csv)
    assert cfg.eval_every < cfg.max_steps  # a curve, not one point, at toy scale


def test_report_plots_curves_and_adds_one_section(tmp_path):
    paths = study.StudyPaths(tmp_path)
    for method, accs in (("spark", [0.5, 0.625]), ("byol", [0.75])):
        (paths.pretrain / method).mkdir(parents=True)
        lines = [{"step": 1, "loss": 1.0}] + [{"step": 5 * (i + 1), "kind": "eval", "knn_acc": a}
                                               for i, a in enumerate(accs)]
        (paths.pretrain / method / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = paths.sweep / "report" / "summary.md"
    summary.parent.mkdir(parents=True)
    summary.write_text("# Summary\n")
    printed = []
    for _ in range(2):  # a rerun of the study does not add the section again
        png = study.report_online_eval(paths, ["spark", "byol", "mocov2"], printed.append)
    assert png == paths.pretrain / "eval_curves.png" and png.stat().st_size > 0
    text = summary.read_text()
    assert text.count(study.EVAL_SECTION) == 1
    assert "| spark | 10 | 0.625 |" in text and "| byol | 5 | 0.750 |" in text and "mocov2" not in text
    assert "pretrain spark: k-NN accuracy 0.625 at step 10" in printed


def test_report_without_evaluations_adds_nothing(tmp_path):
    paths = study.StudyPaths(tmp_path)
    assert study.report_online_eval(paths, ["spark"], print) is None
