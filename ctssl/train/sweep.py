"""``ctssl-sweep``: pre-trained backbones x label fractions x seeds on one labeled set, then the report.

Every method is fine-tuned on exactly the same images: the nested, stratified fractions of the
training split are written once to a JSON file (``OUT/fractions.json`` unless
``--fractions-file`` names one) and reused by every cell and every rerun. Cells run cheapest
first (smallest fraction first); a cell whose ``metrics.json`` exists is never rerun, so an
interrupted sweep resumes where it stopped, and adding a method, fraction or seed runs only the
new cells. Example::

    ctssl-sweep --data covid.csv --out sweeps/covid \\
        --pretrained spark=runs/spark/checkpoint_final.pt mocov2=runs/mocov2/checkpoint_final.pt \\
        --fractions 0.05 0.1 0.25 0.5 1.0 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ..atomic import describe_os_error
from ..data.splits import nested_fractions, read_fractions, write_fractions
from . import finetune as ft
from .config import ConfigError
from .finetune_cli import add_data_arguments, add_training_arguments, apply_threads, config_from_args
from .metrics import METRIC_NAMES
from .report import RANDOM_NAME, REPORT_DIR, RUNS_DIR, write_report

PROG = "ctssl-sweep"
MANIFEST = "sweep.json"
DEFAULT_SWEEP_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


class SweepError(ft.FinetuneError):
    """A sweep-level user error: exit code 2."""


def parse_pretrained(items: Sequence[str]) -> dict[str, str]:
    """``name=PATH`` pairs to an ordered {name: path}; names are folder-safe and unique."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise SweepError(f"--pretrained {item!r}: expected NAME=PATH")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise SweepError(f"--pretrained {item!r}: the name may hold letters, digits and _ . + - only")
        if name == RANDOM_NAME:
            raise SweepError(f"--pretrained {item!r}: '{RANDOM_NAME}' is the random-init baseline's name")
        if name in out:
            raise SweepError(f"--pretrained: the name {name!r} is given twice")
        if not os.path.isfile(path):
            raise SweepError(f"--pretrained {name}={path}: no such file")
        out[name] = path
    return out


def cell_dir(out: Path, method: str, fraction: float, seed: int) -> Path:
    return out / RUNS_DIR / method / f"f{fraction:g}" / f"seed{seed}"


def ensure_fractions_file(path: Path, train_labels, fractions: Sequence[float], seed: int) -> None:
    """Write the nested fractions file if missing; check an existing one holds every fraction."""
    if path.is_file():
        try:
            subsets = read_fractions(path, labels=train_labels)
        except (OSError, ValueError, KeyError) as exc:
            raise SweepError(f"--fractions-file {path}: {exc}") from None
        missing = [f for f in fractions if not math.isclose(f, 1.0)
                   and not any(math.isclose(f, k, abs_tol=1e-9) for k in subsets)]
        if missing:
            raise SweepError(f"--fractions-file {path} has no subset for fraction(s) {missing}; it holds "
                             f"{sorted(subsets)} (use another file, or these fractions)")
        return
    from ..data.splits import DEFAULT_FRACTIONS

    wanted = sorted(set(DEFAULT_FRACTIONS) | {float(f) for f in fractions})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fractions(path, nested_fractions(train_labels, wanted, seed=seed), labels=train_labels, seed=seed)


def _check_manifest(out: Path, methods: dict, config: ft.FinetuneConfig) -> None:
    """Refuse to mix runs of other checkpoints or settings into an existing sweep folder."""
    import json

    settings = {k: v for k, v in ft._fingerprint(config).items()
                if k not in ("init", "seed", "fraction", "arch", "in_chans")}
    settings["data"] = os.path.abspath(config.data)
    doc = {"format": "ctssl-sweep", "settings": settings,
           "methods": {n: (os.path.abspath(p) if p != RANDOM_NAME else p) for n, p in methods.items()}}
    path = out / MANIFEST
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                         if json.dumps(settings.get(k)) != json.dumps(old.get("settings", {}).get(k)))
        if changed:
            raise SweepError(f"{out} holds a sweep with other settings ({', '.join(changed)}); "
                             f"use another --out or the same settings")
        for name, p in old.get("methods", {}).items():
            if name in doc["methods"] and doc["methods"][name] != p:
                raise SweepError(f"{out}: method {name!r} was run from {p}, now given {doc['methods'][name]}; "
                                 f"use another name or --out")
        doc["methods"] = {**old.get("methods", {}), **doc["methods"]}
    out.mkdir(parents=True, exist_ok=True)
    ft.write_json_atomic(path, doc)


def plan_cells(methods: Sequence[str], fractions: Sequence[float], seeds: Sequence[int]) -> list[tuple]:
    """(method, fraction, seed) cells, cheapest first: fraction ascending, then seed, then method."""
    return [(m, f, s) for f in sorted(set(fractions)) for s in seeds for m in methods]


def run_sweep(
    base: ft.FinetuneConfig,
    out: str | os.PathLike,
    pretrained: dict[str, str],
    fractions: Sequence[float],
    seeds: Sequence[int],
    include_random: bool = True,
    fractions_file: str | None = None,
    primary_metric: str = "accuracy",
    log: Callable[[str], None] = print,
) -> dict:
    """Run every unfinished cell and write the report; returns counts and the report's paths."""
    out = Path(out)
    if not pretrained and not include_random:
        raise SweepError("nothing to sweep: give --pretrained NAME=PATH and/or keep the random baseline")
    fractions = sorted({float(f) for f in fractions})
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise SweepError(f"--fractions must lie in (0, 1], got {fractions}")
    if not seeds:
        raise SweepError("--seeds: give at least one seed")
    # check every checkpoint before any training, and pick the random baseline's arch from them
    infos = {}
    for name, path in pretrained.items():
        _, meta = ft.read_backbone(path)
        if base.arch is not None and base.arch != meta["arch"]:
            raise SweepError(f"--arch {base.arch} does not match --pretrained {name}={path} ({meta['arch']})")
        if base.in_chans is not None and base.in_chans != meta["in_chans"]:
            raise SweepError(f"--in-chans {base.in_chans} does not match --pretrained {name}={path} "
                             f"({meta['in_chans']} channels)")
        infos[name] = (meta["arch"], meta["in_chans"], meta["encoder_kwargs"].get("norm"))
    random_config = base
    if include_random and infos and base.arch is None:
        shapes = set(infos.values())
        if len(shapes) > 1:
            raise SweepError(f"the checkpoints hold different backbones ({sorted(shapes)}); pass --arch and "
                             f"--in-chans for the random baseline or sweep them separately")
        arch, in_chans, norm = shapes.pop()
        random_config = ft.copy_config(base, arch=arch, in_chans=base.in_chans or in_chans, norm=base.norm or norm)
    methods = dict(pretrained)
    if include_random:
        methods[RANDOM_NAME] = RANDOM_NAME

    splits = ft.load_splits(base)
    archs = {arch for arch, _, _ in infos.values()}
    if include_random:
        archs.add(random_config.arch or random_config.random_arch)
    for arch in sorted(archs):  # a 2-D encoder on volumes (or the reverse): one error before any training
        if arch in ft.ENCODERS:
            ft.check_arch_dims(arch, splits, base.data)
    ff_path = Path(fractions_file) if fractions_file else out / "fractions.json"
    _check_manifest(out, methods, base)
    ensure_fractions_file(ff_path, splits.train_labels, fractions, base.fraction_seed)
    for f in fractions:  # unknown fraction or too few images: fail before any training
        _, idx = ft.select_fraction(ft.copy_config(base, fraction=f, fractions_file=str(ff_path)), splits.train_labels)
        if len(idx) < 2:
            raise SweepError(f"fraction {f:g} leaves {len(idx)} training image(s); at least 2 are needed")

    cells = plan_cells(list(methods), fractions, list(seeds))
    width = len(str(len(cells)))
    name_width = max(len(m) for m in methods)
    done = skipped = failed = 0
    t_start = time.perf_counter()
    for k, (method, fraction, seed) in enumerate(cells, 1):
        target = cell_dir(out, method, fraction, seed)
        head = f"[{k:{width}d}/{len(cells)}] {method:{name_width}s} fraction {fraction:<6g} seed {seed}"
        if (target / ft.METRICS_FILE).is_file():
            skipped += 1
            log(f"{head}: finished earlier, skipped")
            continue
        config = ft.copy_config(random_config if method == RANDOM_NAME else base,
                                init=methods[method], name=method, seed=seed, fraction=fraction,
                                fractions_file=str(ff_path))
        t0 = time.perf_counter()
        cell = f"{method} fraction {fraction:g} seed {seed}"
        try:  # epoch lines indented under the cell: a long cell shows its progress
            result = ft.run_finetune(config, target, splits=splits,
                                     log=lambda msg, cell=cell: log(f"    {cell}: {msg}"))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failed cell must not lose the others; it is reported and rerun next time
            failed += 1
            log(f"{head}: FAILED ({type(exc).__name__}: {exc})")
            continue
        done += 1
        test = result["test"]
        log(f"{head}: n={result['n_train']} best epoch {result['best_epoch']} test acc {test['accuracy']:.3f} "
            f"auc {_fmt(test['auc'])} f1 {test['f1']:.3f} ({time.perf_counter() - t0:.1f} s)")
    report = None
    try:
        report = write_report(out, out / REPORT_DIR, METRIC_NAMES, primary_metric)
    except ValueError as exc:
        log(f"no report: {exc}")
    return {"cells": len(cells), "trained": done, "skipped": skipped, "failed": failed,
            "seconds": time.perf_counter() - t_start, "report": report, "fractions_file": str(ff_path)}


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune every pre-trained backbone (and a random-init baseline) on every label fraction "
                    "with every seed, on the same images, resumably; then write the report (tables, plots, "
                    "robustness summary) to OUT/report.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="sweep folder (runs/, fractions.json, report/)")
    parser.add_argument("--pretrained", nargs="*", default=[], metavar="NAME=PATH",
                        help="pre-trained backbones: ctssl checkpoints or exported state_dicts")
    parser.add_argument("--no-random", action="store_true", help="leave out the random-init baseline")
    parser.add_argument("--fractions", nargs="+", type=float, default=list(DEFAULT_SWEEP_FRACTIONS),
                        help=f"label fractions (default {' '.join(map(str, DEFAULT_SWEEP_FRACTIONS))})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--fractions-file", default=None, metavar="PATH",
                        help="nested fractions JSON to reuse (written there if missing; default OUT/fractions.json)")
    parser.add_argument("--keep-models", action="store_true", help="keep each cell's best.pt (off: metrics only)")
    parser.add_argument("--metric", default="accuracy", choices=METRIC_NAMES,
                        help="metric the robustness summary ranks (default accuracy)")
    add_data_arguments(parser)
    add_training_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        apply_threads(args)
        pretrained = parse_pretrained(args.pretrained)
        base = config_from_args(args, keep_model=args.keep_models)
        result = run_sweep(base, args.out, pretrained, args.fractions, args.seeds, include_random=not args.no_random,
                           fractions_file=args.fractions_file, primary_metric=args.metric)
    except ConfigError as exc:  # FinetuneError / SweepError, a bad --device
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a lost mount while writing: the files written before stay whole
        print(f"{PROG}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to continue (finished cells are kept)", file=sys.stderr)
        return 130
    print_summary(result)
    return 1 if result["failed"] else 0


def print_summary(result: dict) -> None:
    """What ``run_sweep`` did, its verdict and where the report is (ctssl-sweep's and ctssl-study's last lines)."""
    print(f"{PROG}: {result['trained']} cells trained, {result['skipped']} skipped, {result['failed']} failed "
          f"in {result['seconds']:.1f} s")
    if result["report"]:
        print(result["report"]["verdict"])
        print(f"{PROG}: report in {result['report']['dir']} (summary.md)")


if __name__ == "__main__":
    sys.exit(main())
