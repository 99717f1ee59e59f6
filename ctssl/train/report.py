"""The few-label report: mean +- std over seeds per method and label fraction, plots, robustness.

Reads every ``metrics.json`` a sweep wrote (``SWEEP/runs/<method>/f<fraction>/seed<seed>/``) and
writes one folder:
- ``results.csv``: one row per finished run (method, fraction, seed, test metrics);
- ``summary.csv`` / ``summary.md``: mean and sample std over seeds per method and fraction;
- ``relative_drop.csv``: the relative drop of each metric from the reference fraction (100%);
- ``<metric>.png``: the metric against the fraction (log x), one line per method, +-1 std bands;
  ``relative_drop_<metric>.png`` for the primary metric;
- the summary names the most robust method and says whether that is within the seed spread.

Robustness is defined as follows. For a method, seed s and fraction f below the reference
fraction R (100% when the sweep has it, else its largest fraction), the relative drop is
``(M[R, s] - M[f, s]) / M[R, s]`` (M = test metric; runs paired by seed). A method's robustness
score is the mean of its drops over seeds and fractions; the most robust method has the smallest
score. Its seed spread is the std over seeds of each seed's mean drop; the lead over the
runner-up is "within the seed spread" when it is no larger than sqrt(std_1^2 + std_2^2).
Random initialisation is shown but not ranked when pre-trained methods are present.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..atomic import open_atomically, replace_atomically, write_text
from .metrics import METRIC_NAMES

RUNS_DIR = "runs"
REPORT_DIR = "report"
RANDOM_NAME = "random"


def _num(x) -> float:
    return math.nan if x is None else float(x)


def collect_results(sweep_dir: str | os.PathLike) -> list[dict]:
    """One record per finished run under ``sweep_dir``: method, fraction, seed, n_train, test metrics."""
    root = Path(sweep_dir)
    records = []
    for path in sorted(root.glob(f"{RUNS_DIR}/*/*/*/metrics.json")):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        test = doc.get("test", {})
        records.append({
            "method": doc["name"], "fraction": float(doc["fraction"]), "seed": int(doc["seed"]),
            "n_train": int(doc.get("n_train", 0)),
            **{m: _num(test.get(m)) for m in METRIC_NAMES},
            "majority_share": _majority_share(test.get("confusion_matrix")),
        })
    order = _manifest_order(root)
    records.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"], r["fraction"], r["seed"]))
    return records


def _majority_share(confusion) -> float:
    """Accuracy of always predicting the test set's most common class."""
    if not confusion:
        return math.nan
    counts = np.asarray(confusion, dtype=np.float64).sum(axis=1)
    return float(counts.max() / counts.sum()) if counts.sum() else math.nan


def chance_level(records: Sequence[dict], metric: str) -> float | None:
    """What guessing scores on ``metric``: the majority share (accuracy), 1/K (balanced accuracy), 0.5 (AUC)."""
    if metric == "accuracy":
        shares = [r.get("majority_share", math.nan) for r in records]
        shares = [v for v in shares if not math.isnan(v)]
        return max(shares) if shares else None
    if metric == "balanced_accuracy":
        return None  # needs the class count; reported through accuracy and AUC instead
    if metric == "auc":
        return 0.5
    return None


def chance_warning(rows: Sequence[dict], records: Sequence[dict], metric: str, reference: float) -> str | None:
    """A caution when no method beats guessing at the reference fraction by more than its seed spread."""
    chance = chance_level(records, metric)
    if chance is None:
        return None
    at_ref = [r for r in rows if math.isclose(r["fraction"], reference)]
    above = [r for r in at_ref if r[f"{metric}_mean"] - chance > (0.0 if math.isnan(r[f"{metric}_std"])
                                                                   else r[f"{metric}_std"])]
    if above:
        return None
    return (f"Caution: at {_frac_label(reference)} of the labels no method's test {metric} beats guessing "
            f"({chance:.3f}) by more than its seed spread, so these relative drops measure noise, not "
            f"robustness.")


def _manifest_order(root: Path) -> dict[str, int]:
    """Method order of the sweep's command line (from sweep.json), so tables follow it."""
    try:
        with open(root / "sweep.json", encoding="utf-8") as f:
            return {name: i for i, name in enumerate(json.load(f).get("methods", {}))}
    except (OSError, ValueError, AttributeError):
        return {}


def method_order(records: Sequence[dict]) -> list[str]:
    """Methods in first-seen order with random init last."""
    names = list(dict.fromkeys(r["method"] for r in records))
    return [n for n in names if n != RANDOM_NAME] + [n for n in names if n == RANDOM_NAME]


def _mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    vals = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(vals) == 0:
        return math.nan, math.nan, 0
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def summarize(records: Sequence[dict], metrics: Sequence[str] = METRIC_NAMES) -> list[dict]:
    """Rows (method, fraction, n_seeds, <metric>_mean, <metric>_std) sorted by method, fraction."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["method"], r["fraction"])].append(r)
    rows = []
    for method in method_order(records):
        for fraction in sorted({f for m, f in groups if m == method}):
            runs = groups[(method, fraction)]
            row = {"method": method, "fraction": fraction, "n_seeds": len(runs),
                   "n_train": int(np.median([r["n_train"] for r in runs]))}
            for m in metrics:
                row[f"{m}_mean"], row[f"{m}_std"], _ = _mean_std(r[m] for r in runs)
            rows.append(row)
    return rows


def reference_fraction(records: Sequence[dict]) -> float:
    fractions = {r["fraction"] for r in records}
    return 1.0 if any(math.isclose(f, 1.0) for f in fractions) else max(fractions)


def per_seed_drops(records: Sequence[dict], metric: str, reference: float) -> dict:
    """{method: {fraction: {seed: relative drop}}} for fractions below ``reference``."""
    value = {(r["method"], r["fraction"], r["seed"]): r[metric] for r in records}
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (method, fraction, seed), v in value.items():
        if fraction >= reference or math.isclose(fraction, reference):
            continue
        ref = value.get((method, reference, seed))
        if ref is None or math.isnan(ref) or math.isnan(v) or ref == 0:
            continue
        out[method][fraction][seed] = (ref - v) / ref
    return out


def relative_drop_rows(records: Sequence[dict], metrics: Sequence[str] = METRIC_NAMES) -> list[dict]:
    """Rows (method, fraction, metric, drop_mean, drop_std, n_seeds): the drop from the reference."""
    reference = reference_fraction(records)
    rows = []
    for metric in metrics:
        drops = per_seed_drops(records, metric, reference)
        for method in method_order(records):
            for fraction in sorted(drops.get(method, {})):
                mean, std, n = _mean_std(drops[method][fraction].values())
                rows.append({"method": method, "fraction": fraction, "reference": reference, "metric": metric,
                             "drop_mean": mean, "drop_std": std, "n_seeds": n})
    return rows


def robustness(records: Sequence[dict], metric: str) -> list[dict]:
    """Methods ranked by mean relative drop (smallest first), with the std over seeds."""
    reference = reference_fraction(records)
    drops = per_seed_drops(records, metric, reference)
    ranked = []
    for method in method_order(records):
        by_seed = defaultdict(list)
        for fraction, seeds in drops.get(method, {}).items():
            for seed, d in seeds.items():
                by_seed[seed].append(d)
        seed_scores = [float(np.mean(v)) for v in by_seed.values()]
        if not seed_scores:
            continue
        mean, std, n = _mean_std(seed_scores)
        ranked.append({"method": method, "score": mean, "std": std, "n_seeds": n})
    ranked.sort(key=lambda r: r["score"])
    return ranked


def at_chance_methods(rows: Sequence[dict], records: Sequence[dict], metric: str, reference: float) -> list[str]:
    """Methods whose test metric at the reference fraction does not beat guessing by more than its seed spread.

    Such a method cannot drop much because it has nothing to lose: ranking it as robust would
    reward failure, so the verdict leaves it out and says so.
    """
    chance = chance_level(records, metric)
    if chance is None:
        return []
    out = []
    for r in rows:
        if math.isclose(r["fraction"], reference):
            std = 0.0 if math.isnan(r[f"{metric}_std"]) else r[f"{metric}_std"]
            if r[f"{metric}_mean"] - chance <= std:
                out.append(r["method"])
    return out


def robustness_statement(ranking: Sequence[dict], metric: str, reference: float,
                         exclude: Sequence[str] = ()) -> str:
    """The summary's verdict: the most robust method and whether the seed spread separates it."""
    ref = f"{reference:.0%}" if reference >= 0.01 else f"{reference:g}"
    pre_trained = [r for r in ranking if r["method"] != RANDOM_NAME] or list(ranking)
    pool = [r for r in pre_trained if r["method"] not in exclude]
    note = ""
    left_out = [r["method"] for r in pre_trained if r["method"] in exclude]
    if left_out:
        note = (f" Not ranked: {', '.join(left_out)} (test {metric} at {ref} does not beat guessing by more "
                f"than the seed spread, so a small drop there means nothing).")
    if not pool and left_out:
        return "No robustness ranking." + note
    return _verdict(pool, metric, ref) + note


def _verdict(pool: Sequence[dict], metric: str, ref: str) -> str:
    if not pool:
        return (f"No robustness ranking: it needs runs at the reference fraction {ref} and at smaller "
                f"fractions with the same seeds.")
    best = pool[0]
    text = (f"Most robust method (smallest mean relative drop of test {metric} from {ref}): **{best['method']}**, "
            f"mean drop {best['score']:.1%}")
    if len(pool) == 1:
        return text + " (the only pre-trained method with a ranking)."
    second = pool[1]
    gap = second["score"] - best["score"]
    if math.isclose(gap, 0.0, abs_tol=1e-12):
        return text + f"; {second['method']} ties with it: neither is more robust in these runs."
    if min(best["n_seeds"], second["n_seeds"]) < 2 or math.isnan(best["std"]) or math.isnan(second["std"]):
        return (text + f"; runner-up {second['method']} ({second['score']:.1%}). With a single seed the seed "
                f"spread is unknown, so this ranking is not evidence of a difference.")
    spread = math.sqrt(best["std"] ** 2 + second["std"] ** 2)
    text += (f" +- {best['std']:.1%} over {best['n_seeds']} seeds; runner-up {second['method']} "
             f"{second['score']:.1%} +- {second['std']:.1%}.")
    if gap <= spread:
        return text + (f" The lead ({gap:.1%}) is within the seed spread ({spread:.1%}): these runs do not "
                       f"separate the two methods.")
    return text + f" The lead ({gap:.1%}) is larger than the seed spread ({spread:.1%})."


# ---------------------------------------------------------------- writing

def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _pm(mean: float, std: float, pct: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    if pct:
        return f"{mean:.1%}" + ("" if math.isnan(std) else f" +- {std:.1%}")
    return f"{mean:.3f}" + ("" if math.isnan(std) else f" +- {std:.3f}")


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    with open_atomically(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def _frac_label(f: float) -> str:
    return f"{f:.0%}" if f * 100 == round(f * 100) else f"{f:.1%}"


def markdown_table(rows: Sequence[dict], metric: str) -> str:
    """Methods as rows, fractions as columns, cells mean +- std of ``metric``."""
    fractions = sorted({r["fraction"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["fraction"]): _pm(r[f"{metric}_mean"], r[f"{metric}_std"]) for r in rows}
    lines = ["| method | " + " | ".join(_frac_label(f) for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell.get((m, f), "") for f in fractions) + " |")
    return "\n".join(lines)


def _drop_table(drop_rows: Sequence[dict], metric: str) -> str:
    rows = [r for r in drop_rows if r["metric"] == metric]
    if not rows:
        return "(no fraction below the reference)"
    fractions = sorted({r["fraction"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["fraction"]): _pm(r["drop_mean"], r["drop_std"], pct=True) for r in rows}
    lines = ["| method | " + " | ".join(_frac_label(f) for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell.get((m, f), "") for f in fractions) + " |")
    return "\n".join(lines)


def plot_metric(rows: Sequence[dict], metric: str, path: Path, ylabel: str | None = None,
                mean_key: str | None = None, std_key: str | None = None) -> None:
    """One line per method against the label fraction (log x), with +-1 std bands."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    mean_key = mean_key or f"{metric}_mean"
    std_key = std_key or f"{metric}_std"
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows})
    for method in methods:
        pts = sorted((r["fraction"], r[mean_key], r[std_key]) for r in rows if r["method"] == method)
        x = np.array([p[0] for p in pts])
        y = np.array([p[1] for p in pts], dtype=np.float64)
        s = np.nan_to_num(np.array([p[2] for p in pts], dtype=np.float64), nan=0.0)
        style = dict(linestyle="--", color="grey") if method == RANDOM_NAME else {}
        line, = ax.plot(x, y, marker="o", label=method, **style)
        ax.fill_between(x, y - s, y + s, alpha=0.2, color=line.get_color(), linewidth=0)
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([_frac_label(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the training labels")
    ax.set_ylabel(ylabel or f"test {metric}")
    n_seeds = max((r.get("n_seeds", 0) for r in rows), default=0)
    ax.set_title(f"mean \u00b1 std over {n_seeds} seed{'s' if n_seeds != 1 else ''}", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        with replace_atomically(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def write_report(
    sweep_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] = METRIC_NAMES,
    primary: str = "accuracy",
    title: str | None = None,
) -> dict:
    """Write the report folder from a sweep's runs; returns {"dir", "summary_md", "most_robust", ...}."""
    if primary not in metrics:
        raise ValueError(f"primary metric {primary!r} is not one of {list(metrics)}")
    records = collect_results(sweep_dir)
    if not records:
        raise ValueError(f"no finished runs (metrics.json) under {Path(sweep_dir) / RUNS_DIR}")
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records, metrics)
    drops = relative_drop_rows(records, metrics)
    reference = reference_fraction(records)
    ranking = robustness(records, primary)
    excluded = at_chance_methods(rows, records, primary, reference)
    verdict = robustness_statement(ranking, primary, reference, excluded)
    caution = chance_warning(rows, records, primary, reference)
    if caution:
        verdict += " " + caution

    order = {m: i for i, m in enumerate(method_order(records))}
    _write_csv(out / "results.csv", sorted(records, key=lambda r: (order[r["method"]], r["fraction"], r["seed"])))
    _write_csv(out / "summary.csv", rows)
    _write_csv(out / "relative_drop.csv", drops)
    plots = []
    for m in metrics:
        if any(not math.isnan(r[f"{m}_mean"]) for r in rows):
            plot_metric(rows, m, out / f"{m}.png")
            plots.append(f"{m}.png")
    primary_drops = [r for r in drops if r["metric"] == primary]
    if primary_drops:
        plot_metric(primary_drops, primary, out / f"relative_drop_{primary}.png",
                    ylabel=f"relative drop of test {primary} from {_frac_label(reference)}",
                    mean_key="drop_mean", std_key="drop_std")
        plots.append(f"relative_drop_{primary}.png")

    seeds = sorted({r["seed"] for r in records})
    ref_label = _frac_label(reference)
    lines = [f"# {title or 'Few-label study'}", "",
             f"{len(records)} fine-tuning runs: {len(order)} initialisations x "
             f"{len({r['fraction'] for r in records})} label fractions x seeds {seeds}. "
             f"Test metrics, mean +- sample std over seeds.", "",
             "## Robustness to fewer labels", "", verdict, "",
             f"Relative drop of test {primary} from {ref_label} "
             f"(per seed (M[{ref_label}] - M[f]) / M[{ref_label}], mean +- std over seeds):", "",
             _drop_table(drops, primary), "",
             "Ranking (mean relative drop over fractions and seeds, smallest first): "
             + ", ".join(f"{r['method']} {_pm(r['score'], r['std'], pct=True)}" for r in ranking) + ".", "",
             "Definitions: a method's robustness score is its mean relative drop over the smaller fractions and "
             "the seeds (runs paired by seed); its seed spread is the std over seeds of each seed's mean drop; "
             "the leader's margin over the runner-up is within the seed spread when it is at most "
             "sqrt(std_1^2 + std_2^2). Random initialisation is listed but not ranked. A small drop can also "
             "mean weak results at 100%: read it with the absolute numbers below.", ""]
    for m in metrics:
        lines += [f"## Test {m}", "", markdown_table(rows, m), ""]
        if f"{m}.png" in plots:
            lines += [f"![{m}]({m}.png)", ""]
    if primary_drops:
        lines += [f"![relative drop](relative_drop_{primary}.png)", ""]
    lines += ["Files: results.csv (every run), summary.csv (this table), relative_drop.csv (every metric).", ""]
    summary = out / "summary.md"
    write_text(summary, "\n".join(lines))
    pool = [r for r in ranking if r["method"] != RANDOM_NAME and r["method"] not in excluded]
    return {"dir": str(out), "summary_md": str(summary), "plots": plots, "verdict": verdict,
            "most_robust": pool[0]["method"] if pool else None, "ranking": ranking, "n_runs": len(records)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctssl.train.report SWEEP_DIR``: rebuild the report of a sweep."""
    parser = argparse.ArgumentParser(prog="python -m ctssl.train.report", description=main.__doc__)
    parser.add_argument("sweep_dir")
    parser.add_argument("--out", default=None, help="report folder (default SWEEP_DIR/report)")
    parser.add_argument("--metric", default="accuracy", choices=METRIC_NAMES, help="metric ranked for robustness")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.sweep_dir, args.out, primary=args.metric)
    except ValueError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(result["verdict"])
    print(f"report: {result['summary_md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
