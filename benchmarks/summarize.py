"""Turn saved benchmark results into a Markdown summary and PNG plots.

    python benchmarks/summarize.py RESULTS.json [MORE.json ...] --out DIR [--no-plots]

Reads pytest-benchmark JSON (``--benchmark-json`` / ``--benchmark-autosave``) and the
JSON of ``encoder_timing.py``. Writes ``DIR/summary.md`` (one table per family of
cases, speed-ups against SparK's dense emulation, and a "cost vs visible fraction"
table) and, unless ``--no-plots`` or matplotlib is missing, two kinds of plot per
family: time per backend, and time against mask ratio (a sparse backend's cost
should fall with the visible fraction; the emulation's should stay flat).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

NOMASK = "dense-nomask"
EMULATION = "dense"
ENCODER_TIMING_FORMAT = "ctssl-encoder-timing/1"
BACKEND_ORDER = (NOMASK, EMULATION, "torch", "triton", "cuda", "spconv", "minkowski")
FAMILY_ORDER = ("model", "conv fwd", "conv fwdbwd", "batchnorm fwdbwd", "maxpool fwd", "maxpool fwdbwd", "layout",
                "index")


class InputError(ValueError):
    """A results file that cannot be read or has an unknown layout."""


@dataclass
class Row:
    family: str
    case: str
    backend: str
    dtype: str
    batch: int | None
    mask_ratio: float | None
    visible_fraction: float | None
    median_ms: float
    iqr_ms: float | None
    rounds: int | None
    images_per_s: float | None
    peak_mem_bytes: int | None = None
    saved_activation_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    source: str
    meta: dict[str, Any]
    rows: list[Row]
    notes: list[str]


# --- reading -------------------------------------------------------------------

def _num(v):
    return None if v is None else float(v)


def _pytest_benchmark_rows(data: dict[str, Any]) -> list[Row]:
    rows = []
    for b in data["benchmarks"]:
        stats, info = b.get("stats") or {}, b.get("extra_info") or {}
        if "median" not in stats:
            continue
        median_ms = float(stats["median"]) * 1e3
        images = info.get("images") or info.get("batch")
        ips = info.get("images_per_s")
        if ips is None and images and median_ms > 0:
            ips = images / (median_ms / 1e3)
        params = b.get("params") or {}
        rows.append(Row(
            family=info.get("family") or b.get("group") or "other",
            case=info.get("case") or b.get("group") or b.get("name", "?"),
            backend=str(info.get("backend") or params.get("backend_name") or "?"),
            dtype=str(info.get("dtype") or params.get("dtype") or "?"),
            batch=info.get("batch"), mask_ratio=_num(info.get("mask_ratio")),
            visible_fraction=_num(info.get("visible_fraction")), median_ms=median_ms,
            iqr_ms=None if stats.get("iqr") is None else float(stats["iqr"]) * 1e3, rounds=stats.get("rounds"),
            images_per_s=ips, peak_mem_bytes=info.get("peak_mem_bytes"),
            saved_activation_bytes=info.get("saved_activation_bytes"), extra=info))
    return rows


def _encoder_timing_rows(data: dict[str, Any]) -> list[Row]:
    rows = []
    for r in data["results"]:
        if r.get("status") != "ok":
            continue
        rows.append(Row(
            family="model", case=r.get("case", "encoder"), backend=r["backend"], dtype=str(r.get("dtype", "?")),
            batch=r.get("batch"), mask_ratio=_num(r.get("mask_ratio")),
            visible_fraction=_num(r.get("visible_fraction")),
            median_ms=float(r["median_ms"]), iqr_ms=float(r["q3_ms"]) - float(r["q1_ms"]) if "q3_ms" in r else None,
            rounds=len(r.get("times_ms", [])) or None, images_per_s=r.get("images_per_s"),
            peak_mem_bytes=r.get("peak_mem_bytes"), saved_activation_bytes=r.get("saved_activation_bytes"), extra=r))
    return rows


def _not_timed_notes(results: list[dict[str, Any]]) -> list[str]:
    """One note per (backend, status, reason) that lists where it applied."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for r in results:
        if r.get("status") != "ok":
            groups[(r["backend"], r["status"], str(r.get("reason")))].append(
                f"{r.get('case')} mask {_fmt(_num(r.get('mask_ratio')), '.2f', '-')}")
    return [f"{b} not timed ({s}; {', '.join(where)}): {reason}" for (b, s, reason), where in groups.items()]


def load(path: str) -> Results:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        mi = data.get("machine_info") or {}
        ct = mi.get("ctssl") or {}
        meta = {"kind": "pytest-benchmark", "device_name": ct.get("device_name") or mi.get("cpu", {}).get("brand_raw"),
                "profile": ct.get("profile"), "date": data.get("datetime"), "command": ct.get("command"),
                "versions": ct.get("versions") or {"python": mi.get("python_version")},
                "git_commit": ct.get("git_commit") or (data.get("commit_info") or {}).get("id"),
                "backend_status": ct.get("backend_status") or {}}
        notes = list(ct.get("profile_notes") or [])
        if ct.get("load_average_1_5_15min"):
            load = ", ".join(f"{v:.1f}" for v in ct["load_average_1_5_15min"])
            cores = mi.get('cpu', {}).get('count', '?')
            notes.append(f"machine load average (1/5/15 min) when the run ended: {load} on {cores} cores")
        return Results(path, meta, _pytest_benchmark_rows(data), notes)
    if isinstance(data, dict) and data.get("format") == ENCODER_TIMING_FORMAT:
        m = data.get("machine") or {}
        meta = {"kind": "encoder-timing", "device_name": m.get("device_name"), "profile": None, "date": m.get("date"),
                "command": m.get("command"), "versions": m.get("versions") or {}, "git_commit": m.get("git_commit"),
                "backend_status": m.get("backend_status") or {}, "config": data.get("config")}
        return Results(path, meta, _encoder_timing_rows(data), _not_timed_notes(data.get("results", [])))
    raise InputError(f"{path}: neither pytest-benchmark JSON (a 'benchmarks' list) nor "
                     f"{ENCODER_TIMING_FORMAT} JSON (a 'format' field)")


# --- tables --------------------------------------------------------------------

def _order(values, preferred) -> list:
    pref = [v for v in preferred if v in values]
    return pref + sorted(v for v in values if v not in preferred)


def _ratio_key(r: float | None) -> float:
    return -1.0 if r is None else r


def _fmt(v, spec=".3g", empty=""):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return empty
    return format(v, spec)


def _mib(v):
    return _fmt(None if v is None else v / 2 ** 20, ".1f")


def emulation_speedups(rows: list[Row]) -> dict[int, float]:
    """id(row) -> emulation median / row median at the same case, dtype, batch and mask ratio."""
    emu = {(r.case, r.dtype, r.batch, r.mask_ratio): r.median_ms for r in rows if r.backend == EMULATION}
    out = {}
    for r in rows:
        ref = emu.get((r.case, r.dtype, r.batch, r.mask_ratio))
        if ref is not None and r.backend not in (EMULATION, NOMASK) and r.median_ms > 0:
            out[id(r)] = ref / r.median_ms
    return out


def nomask_speedups(rows: list[Row]) -> dict[int, float]:
    """id(row) -> no-mask median / row median at the same case, dtype and batch."""
    base = {(r.case, r.dtype, r.batch): r.median_ms for r in rows if r.backend == NOMASK}
    return {id(r): base[(r.case, r.dtype, r.batch)] / r.median_ms for r in rows
            if (r.case, r.dtype, r.batch) in base and r.backend != NOMASK and r.median_ms > 0}


def family_table(rows: list[Row]) -> list[str]:
    emu, nomask = emulation_speedups(rows), nomask_speedups(rows)
    lines = ["| case | dtype | batch | backend | mask ratio | visible | median ms | IQR ms | images/s "
             "| peak MiB | saved act. MiB | vs emulation | vs dense-nomask |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    backends = _order({r.backend for r in rows}, BACKEND_ORDER)
    rows = sorted(rows, key=lambda r: (r.case, r.dtype, r.batch or 0, _ratio_key(r.mask_ratio),
                                       backends.index(r.backend)))
    for r in rows:
        lines.append(
            f"| {r.case} | {r.dtype} | {_fmt(r.batch, 'd')} | {r.backend} | {_fmt(r.mask_ratio, '.2f', '-')} "
            f"| {_fmt(r.visible_fraction, '.2f')} | {r.median_ms:.4g} | {_fmt(r.iqr_ms, '.2g')} "
            f"| {_fmt(r.images_per_s, '.4g')} | {_mib(r.peak_mem_bytes)} | {_mib(r.saved_activation_bytes)} "
            f"| {_fmt(emu.get(id(r)), '.2f')}{'x' if id(r) in emu else ''} "
            f"| {_fmt(nomask.get(id(r)), '.2f')}{'x' if id(r) in nomask else ''} |")
    return lines


def ratio_sweeps(rows: list[Row]) -> dict[tuple[str, str, str], list[Row]]:
    """(case, dtype, backend) -> rows sorted by mask ratio, where at least two ratios were run."""
    groups: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for r in rows:
        if r.mask_ratio is not None:
            groups[(r.case, r.dtype, r.backend)].append(r)
    return {k: sorted(v, key=lambda r: r.mask_ratio) for k, v in groups.items()
            if len({r.mask_ratio for r in v}) >= 2}


def sweep_table(rows: list[Row]) -> list[str]:
    sweeps = ratio_sweeps(rows)
    if not sweeps:
        return []
    lines = ["| case | dtype | backend | median ms at each mask ratio | time ratio (last/first) "
             "| visible ratio (last/first) |", "|---|---|---|---|---|---|"]
    for (case, dtype, backend), rs in sorted(sweeps.items()):
        per = ", ".join(f"{r.mask_ratio:.2f}: {r.median_ms:.4g}" for r in rs)
        t_ratio = rs[-1].median_ms / rs[0].median_ms if rs[0].median_ms > 0 else None
        v0, v1 = rs[0].visible_fraction, rs[-1].visible_fraction
        v_ratio = v1 / v0 if v0 and v1 is not None else None
        lines.append(f"| {case} | {dtype} | {backend} | {per} | {_fmt(t_ratio, '.2f')} | {_fmt(v_ratio, '.2f')} |")
    return lines


# --- plots ---------------------------------------------------------------------

def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower() or "x"


def _reference_ratio(ratios: set) -> float | None:
    present = [r for r in ratios if r is not None]
    return min(present, key=lambda r: abs(r - 0.6)) if present else None


def plot_family(plt, rows: list[Row], family: str, dtype: str, out_dir: str, prefix: str) -> list[str]:
    """Time per backend (bars, at the mask ratio nearest 0.6) and time vs mask ratio (lines)."""
    written = []
    backends = _order({r.backend for r in rows}, BACKEND_ORDER)
    ref = _reference_ratio({r.mask_ratio for r in rows})
    cases = sorted({r.case for r in rows})
    colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}

    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.28 * len(cases) * max(1, len(backends)) ** 0.5 + 0.4 * len(cases)))
    height = 0.8 / max(1, len(backends))
    for j, b in enumerate(backends):
        ys, xs = [], []
        for i, c in enumerate(cases):
            match = [r for r in rows if r.case == c and r.backend == b and (r.mask_ratio in (ref, None))]
            if match:
                ys.append(i + j * height)
                xs.append(match[0].median_ms)
        if xs:
            ax.barh(ys, xs, height=height, color=colors[b], label=b)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    ax.set_yticklabels(cases, fontsize=7)
    ax.invert_yaxis()
    times = [r.median_ms for r in rows if r.median_ms > 0]
    log = bool(times) and max(times) / min(times) > 30
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("median time per step (ms" + (", log scale)" if log else ")"))
    ax.set_title(f"{family}, {dtype}: time per backend" + (f" (mask ratio {ref:.2f})" if ref is not None else ""))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}time_vs_backend_{_slug(family)}_{_slug(dtype)}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    sweeps = {k: v for k, v in ratio_sweeps(rows).items()}
    sweep_cases = sorted({k[0] for k in sweeps})
    if sweep_cases:
        cols = min(4, len(sweep_cases))
        nrows = math.ceil(len(sweep_cases) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(max(6.0, 3.6 * cols), 3.2 * nrows), squeeze=False)
        for ax, case in zip(axes.flat, sweep_cases):
            for (c, _, b), rs in sweeps.items():
                if c == case:
                    ax.plot([r.mask_ratio for r in rs], [r.median_ms for r in rs], "o-", color=colors[b], label=b)
            for r in rows:
                if r.case == case and r.backend == NOMASK:
                    ax.axhline(r.median_ms, color=colors[NOMASK], ls="--", label=NOMASK)
            ax.set_title(case, fontsize=7)
            ax.set_xlabel("mask ratio", fontsize=7)
            ax.set_ylabel("ms", fontsize=7)
            ax.set_ylim(bottom=0)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(sweep_cases):]:
            ax.axis("off")
        fig.suptitle(f"{family}, {dtype}: time vs mask ratio\n"
                     "(a sparse backend's time should fall with the visible fraction; the emulation's stays flat)",
                     fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}time_vs_mask_ratio_{_slug(family)}_{_slug(dtype)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --- report --------------------------------------------------------------------

def render(results: Results, plots: list[str], out_dir: str, plot_note: str | None) -> list[str]:
    m = results.meta
    lines = [f"## {os.path.basename(results.source)}", "",
             f"- device: {m.get('device_name') or 'unknown'}"
             + (f" (profile {m['profile']})" if m.get("profile") else ""),
             f"- date: {m.get('date') or 'unknown'}",
             f"- command: `{m.get('command') or 'unknown'}`",
             "- versions: " + (", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()) or "unknown"),
             f"- git commit: {m.get('git_commit') or 'unknown'}"]
    status = m.get("backend_status") or {}
    if status:
        lines.append("- backends: " + "; ".join(f"{k}: {v}" for k, v in status.items()))
    lines += [f"- note: {n}" for n in results.notes]
    if not results.rows:
        lines += ["", "No timed results in this file (run with `--benchmark-only`, not `--benchmark-disable`)."]
        return lines
    families = _order({r.family for r in results.rows}, FAMILY_ORDER)
    for fam in families:
        rows = [r for r in results.rows if r.family == fam]
        lines += ["", f"### {fam}", ""] + family_table(rows)
    sweep = sweep_table(results.rows)
    if sweep:
        lines += ["", "### Cost vs visible fraction", "",
                  "A backend that computes only visible patches should have a time ratio near the visible "
                  "ratio; SparK's emulation should stay near 1.", ""] + sweep
    if plots:
        lines += ["", "### Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in plots]
    elif plot_note:
        lines += ["", f"Plots: {plot_note}"]
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Summarize ctssl benchmark results as Markdown and PNG plots.")
    ap.add_argument("results", nargs="+", help="pytest-benchmark or encoder_timing JSON files")
    ap.add_argument("--out", required=True, help="output directory (summary.md and the PNGs)")
    ap.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    ap.add_argument("--title", default="ctssl benchmark summary")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loaded = [load(p) for p in args.results]
    except InputError as exc:
        print(f"summarize: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    plt, plot_note = None, None
    if args.no_plots:
        plot_note = "not drawn (--no-plots)"
    else:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            plot_note = f"not drawn: matplotlib is not importable ({exc})"
    lines = [f"# {args.title}", ""]
    for k, res in enumerate(loaded):
        prefix = f"{_slug(os.path.splitext(os.path.basename(res.source))[0])}_" if len(loaded) > 1 else ""
        plots: list[str] = []
        if plt is not None:
            for fam in _order({r.family for r in res.rows}, FAMILY_ORDER):
                for dtype in sorted({r.dtype for r in res.rows if r.family == fam}):
                    rows = [r for r in res.rows if r.family == fam and r.dtype == dtype]
                    plots += plot_family(plt, rows, fam, dtype, args.out, prefix)
        lines += render(res, plots, args.out, plot_note) + [""]
    path = os.path.join(args.out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    n = sum(len(r.rows) for r in loaded)
    print(f"summarize: {n} timed results from {len(loaded)} file(s) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
