"""``ctssl-study``: the seed paper's few-label study end to end, on the built-in synthetic CT set.

    ctssl-study --out study            # toy scale on a CPU (the default --preset toy)
    ctssl-study --out study --preset gpu

Stages, each skipped on a rerun when its output exists (so an interrupted study resumes):
1. ``data``: synthetic chest CT phantoms (``ctssl.data.make_synthetic_ct``): a DICOM tree for
   pre-training and a labeled nodule / no-nodule set (PNG + labels.csv, other patients);
2. ``store``: ``prepare_store`` (what ``ctssl-prepare`` runs) of the DICOM tree into a slice store;
3. ``pretrain``: ``run_pretraining`` (``ctssl-train``) of SparK and contrastive methods on the store
   (``OUT/pretrain/<method>``; an interrupted run is resumed from its last checkpoint);
4. ``sweep``: ``run_sweep`` (``ctssl-sweep``): every backbone and a random-init baseline x label
   fractions x seeds, fine-tuned on the same nested label subsets; then the report in ``OUT/sweep/report``,
   with the k-NN accuracy that each pre-training run measured on the labeled set while it trained
   (``--eval-data``; curves in ``OUT/pretrain/eval_curves.png``).

At toy scale the pre-training is seconds long, so the numbers show that the pipeline works, not
the paper's finding. The paper's real setting, with the same tools::

    # 1. pre-training data: LIDC-IDRI (TCIA), 2-D axial slices; a series counts when it has > 10 files
    ctssl-prepare /data/LIDC-IDRI /data/lidc_store --min-files 11
    # 2. pre-train a ResNet-50 with each method at the paper's settings (--preset paper is the default)
    ctssl-train --method spark  --data /data/lidc_store --out runs/spark  --arch resnet50 --image-size 224
    ctssl-train --method swav   --data /data/lidc_store --out runs/swav   --arch resnet50 --image-size 224
    ctssl-train --method mocov2 --data /data/lidc_store --out runs/mocov2 --arch resnet50 --image-size 224
    ctssl-train --method byol   --data /data/lidc_store --out runs/byol   --arch resnet50 --image-size 224
    # 3a. COVID-CT (UCSD-AI4H): the unzipped class folders CT_COVID/ and CT_NonCOVID/ under Images/,
    #     the official Data-split lists, COVID as the positive class of precision/recall/F1/AUC
    ctssl-sweep --data /data/COVID-CT/Images --positive-class CT_COVID \\
        --split-list train=/data/COVID-CT/Data-split/COVID/trainCT_COVID.txt \\
        --split-list train=/data/COVID-CT/Data-split/NonCOVID/trainCT_NonCOVID.txt \\
        --split-list val=/data/COVID-CT/Data-split/COVID/valCT_COVID.txt \\
        --split-list val=/data/COVID-CT/Data-split/NonCOVID/valCT_NonCOVID.txt \\
        --split-list test=/data/COVID-CT/Data-split/COVID/testCT_COVID.txt \\
        --split-list test=/data/COVID-CT/Data-split/NonCOVID/testCT_NonCOVID.txt \\
        --pretrained spark=runs/spark/checkpoint_final.pt swav=runs/swav/checkpoint_final.pt \\
                     mocov2=runs/mocov2/checkpoint_final.pt byol=runs/byol/checkpoint_final.pt \\
        --fractions 0.05 0.1 0.25 0.5 1.0 --seeds 0 1 2 --out sweeps/covid-ct
    # 3b. OrganSMNIST (MedMNIST organsmnist.npz, 11 classes, its own train/val/test)
    ctssl-sweep --data /data/organsmnist.npz --pretrained spark=... swav=... mocov2=... byol=... \\
        --fractions 0.01 0.05 0.1 0.25 0.5 1.0 --seeds 0 1 2 --out sweeps/organsmnist

The sweep's fine-tuning default is the paper's protocol (``ctssl-finetune --preset paper``: Adam
lr 1e-4, weight decay 5e-4, batch 64, 70 epochs, backbone frozen for the first 10, 224 px, grey
copied to 3 channels, best validation accuracy tested). Each sweep writes ``OUT/report/summary.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

PROG = "ctssl-study"


@dataclass(frozen=True)
class StudyPreset:
    """Sizes of every stage of one study scale."""

    patients: int  # pre-training phantom patients (one series each)
    slices: int  # slices per pre-training series
    phantom_size: int  # phantom slice size in pixels
    labeled_patients: int
    labeled_slices: int  # labeled slices per labeled patient
    methods: tuple[str, ...]
    pretrain_preset: str  # ctssl-train --preset
    pretrain_steps: int
    pretrain_settings: dict  # PretrainConfig fields over the preset's
    finetune_preset: str  # ctssl-finetune / ctssl-sweep --preset
    finetune_settings: dict  # FinetuneConfig fields over the preset's
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads; None: torch's default


PRESETS: dict[str, StudyPreset] = {
    # seconds: for the test suite
    "test": StudyPreset(patients=2, slices=4, phantom_size=64, labeled_patients=6, labeled_slices=4,
                        methods=("spark", "byol"), pretrain_preset="toy", pretrain_steps=1,
                        pretrain_settings={"batch_size": 4, "eval_every": 1, "eval_images": 64},
                        finetune_preset="test", finetune_settings={"epochs": 1}, fractions=(0.5, 1.0), seeds=(0,),
                        threads=1),
    # about ten minutes on a 2-core CPU. One thread: batches this small gain little from a second
    # one, and lose several times over when the cores are shared with other work.
    "toy": StudyPreset(patients=8, slices=16, phantom_size=128, labeled_patients=24, labeled_slices=16,
                       methods=("spark", "mocov2", "byol"), pretrain_preset="toy", pretrain_steps=20,
                       pretrain_settings={"eval_every": 5, "eval_images": 256}, finetune_preset="toy",
                       finetune_settings={},
                       fractions=(0.1, 0.3, 1.0), seeds=(0, 1), threads=1),
    # one GPU: ResNet-50 at 224 px, the paper's four methods and fine-tuning protocol (shorter)
    "gpu": StudyPreset(patients=64, slices=64, phantom_size=256, labeled_patients=96, labeled_slices=24,
                       methods=("spark", "swav", "mocov2", "byol"), pretrain_preset="paper", pretrain_steps=2000,
                       pretrain_settings={"arch": "resnet50", "image_size": 224, "workers": 8, "eval_every": 250},
                       finetune_preset="paper", finetune_settings={"epochs": 30, "freeze_epochs": 5, "workers": 8,
                                                                   "amp": True},
                       fractions=(0.05, 0.1, 0.25, 0.5, 1.0), seeds=(0, 1, 2), device="cuda"),
}


class StudyError(Exception):
    """A stage failed or the input is wrong; carries the exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class StudyPaths:
    out: Path
    data: Path = field(init=False)
    store: Path = field(init=False)
    pretrain: Path = field(init=False)
    sweep: Path = field(init=False)

    def __post_init__(self):
        self.data = self.out / "data"
        self.store = self.out / "store"
        self.pretrain = self.out / "pretrain"
        self.sweep = self.out / "sweep"

    @property
    def labels_csv(self) -> Path:
        return self.data / "labeled" / "labels.csv"

    def checkpoint(self, method: str) -> Path:
        return self.pretrain / method / "checkpoint_final.pt"


def stage_data(paths: StudyPaths, preset: StudyPreset, seed: int, log: Callable[[str], None]) -> None:
    """Write the phantom set unless a finished one is there (phantom.json is written last)."""
    if (paths.data / "phantom.json").is_file() and paths.labels_csv.is_file():
        log(f"data: {paths.data} exists, skipped")
        return
    from ctssl.data import make_synthetic_ct

    t0 = time.perf_counter()
    result = make_synthetic_ct(paths.data, n_patients=preset.patients, slices_per_series=preset.slices,
                               size=preset.phantom_size, seed=seed, labeled=True,
                               labeled_patients=preset.labeled_patients,
                               labeled_slices_per_patient=preset.labeled_slices)
    log(f"data: {result.n_series} phantom series ({result.n_slices} slices), {result.n_labeled} labeled slices "
        f"({time.perf_counter() - t0:.1f} s)")


def stage_store(paths: StudyPaths, log: Callable[[str], None]) -> None:
    """``prepare_store`` (itself resumable: finished series are skipped); stops the study when a series failed."""
    from ..atomic import OutputError
    from ..data.prepare import UsageError, failure_message, prepare_store

    t0 = time.perf_counter()
    try:
        report = prepare_store(paths.data / "dicom", paths.store, workers=1, progress=False)
    except UsageError as exc:
        raise StudyError(f"preparing the store: {exc}", 2) from None
    except OutputError as exc:
        raise StudyError(f"preparing the store: {exc}", 1) from None
    if report.series_failed:
        raise StudyError(failure_message(report), 1)
    log(f"store: {paths.store} ({time.perf_counter() - t0:.1f} s)")


def pretrain_config(paths: StudyPaths, preset: StudyPreset, method: str, args):
    """The run of ``method``: the preset's settings, or an interrupted run's own (and its checkpoint)."""
    from .checkpoint import LAST
    from .config import apply_values, preset_values
    from .pretrain import PretrainConfig, load_run_config

    out = paths.pretrain / method
    if (out / LAST).is_file():  # an interrupted run: continue it
        return dataclasses.replace(load_run_config(out / LAST), progress=False), out / LAST
    values = {**preset_values(preset.pretrain_preset, method), "data": str(paths.store), "out": str(out),
              "max_steps": args.pretrain_steps or preset.pretrain_steps, "seed": args.seed,
              "device": args.device or preset.device, "progress": False, "eval_data": str(paths.labels_csv),
              **preset.pretrain_settings}
    if args.backend and method == "spark":
        values["backend"] = args.backend
    return apply_values(PretrainConfig(), values, f"study preset {args.preset}").validate(), None


def stage_pretrain(paths: StudyPaths, preset: StudyPreset, methods: Sequence[str], args,
                   log: Callable[[str], None]) -> dict[str, Path]:
    """``run_pretraining`` of every method whose final checkpoint is missing."""
    from ..atomic import OutputError
    from ..data.store import StoreError
    from ..sparse import BackendUnavailableError
    from . import pretrain
    from .checkpoint import CheckpointError
    from .config import ConfigError

    checkpoints = {}
    for method in methods:
        final = paths.checkpoint(method)
        if final.is_file():
            log(f"pretrain {method}: {final} exists, skipped")
        else:
            t0 = time.perf_counter()
            try:
                cfg, resume = pretrain_config(paths, preset, method, args)
                pretrain.run_pretraining(cfg, resume=resume)
            except (ConfigError, CheckpointError, BackendUnavailableError, StoreError) as exc:
                raise StudyError(f"pre-training {method}: {exc}", 2) from None
            except (pretrain.TrainingError, OutputError) as exc:
                raise StudyError(f"pre-training {method} stopped: {exc}", 1) from None
            log(f"pretrain {method}: {final} ({time.perf_counter() - t0:.1f} s)")
        checkpoints[method] = final
    return checkpoints


def stage_sweep(paths: StudyPaths, preset: StudyPreset, checkpoints: dict[str, Path], args,
                log: Callable[[str], None]) -> int:
    """``run_sweep`` of every backbone and the random baseline; 1 when a cell failed."""
    from ..atomic import OutputError
    from .config import ConfigError, finetune_config
    from .sweep import print_summary, run_sweep

    t0 = time.perf_counter()
    try:
        base = finetune_config(preset.finetune_preset, data=str(paths.labels_csv),
                               device=args.device or preset.device, keep_model=False, **preset.finetune_settings)
        result = run_sweep(base, paths.sweep, {m: str(p) for m, p in checkpoints.items()},
                           args.fractions or preset.fractions, args.seeds or preset.seeds)
    except ConfigError as exc:
        raise StudyError(f"sweep: {exc}", 2) from None
    except OutputError as exc:
        raise StudyError(f"sweep: {exc}", 1) from None
    print_summary(result)
    log(f"sweep: {paths.sweep} ({time.perf_counter() - t0:.1f} s)")
    return 1 if result["failed"] else 0


EVAL_SECTION = "## Pre-training: online k-NN accuracy"


def report_online_eval(paths: StudyPaths, methods: Sequence[str], log: Callable[[str], None]) -> Path | None:
    """Plot every method's k-NN accuracy during pre-training (``OUT/pretrain/eval_curves.png``) and add a
    section with the last values to the sweep's summary.md (once); None when no run evaluated."""
    from ..atomic import write_text
    from .logger import LOG_FILE
    from .viz import eval_records, plot_eval_curves

    curves = {m: eval_records(paths.pretrain / m / LOG_FILE) for m in methods}
    png = plot_eval_curves(curves, paths.pretrain / "eval_curves.png", title="online k-NN accuracy (val split)")
    if png is None:
        return None
    lines = [EVAL_SECTION, "",
             "k-NN accuracy (cosine similarity, k=20 or the train split's size when smaller, temperature-weighted "
             "votes) of each backbone's pooled features on the labeled set's val split, measured while "
             "pre-training (`pretrain/eval_curves.png`).", "",
             "| method | step | k-NN accuracy |", "|---|---|---|"]
    for method, records in curves.items():
        if records:
            lines.append(f"| {method} | {records[-1]['step']} | {records[-1]['knn_acc']:.3f} |")
            log(f"pretrain {method}: k-NN accuracy {records[-1]['knn_acc']:.3f} at step {records[-1]['step']}")
    summary = paths.sweep / "report" / "summary.md"
    if summary.is_file():
        text = summary.read_text(encoding="utf-8")
        if EVAL_SECTION not in text:
            write_text(summary, text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
    return png


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the few-label study end to end on synthetic CT: phantoms -> slice store -> pre-training "
                    "(SparK and contrastive methods) -> fine-tuning sweep over label fractions and seeds -> "
                    "report. Rerunning skips finished stages.",
        epilog="Presets: " + "; ".join(
            f"{name}: {p.patients} phantom patients, methods {'/'.join(p.methods)}, {p.pretrain_steps} pre-training "
            f"steps, fine-tuning preset {p.finetune_preset}, fractions {'/'.join(f'{f:g}' for f in p.fractions)}, "
            f"seeds {'/'.join(map(str, p.seeds))}" for name, p in PRESETS.items()),
    )
    parser.add_argument("--out", default="ctssl-study", metavar="DIR", help="study folder (default ./ctssl-study)")
    parser.add_argument("--preset", default="toy", choices=sorted(PRESETS),
                        help="toy (default): about 10 minutes on a CPU; gpu: larger, one GPU; test: seconds")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="pre-training methods (default: the preset's; spark, simclr, mocov2, byol, swav)")
    parser.add_argument("--fractions", nargs="+", type=float, default=None, help="label fractions (default: preset's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="fine-tuning seeds (default: preset's)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="optimizer steps per method (default: preset's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, auto (default: the preset's)")
    parser.add_argument("--backend", default=None, help="SparK's sparse backend (default: ctssl-train's auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms and the pre-training")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the toy and test presets, torch's default for gpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    methods = list(dict.fromkeys(args.methods or preset.methods))
    from .config import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"{PROG}: error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else preset.threads
    if threads is not None:
        if threads < 1:
            print(f"{PROG}: error: --threads must be at least 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
    paths = StudyPaths(Path(args.out))
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    try:
        paths.out.mkdir(parents=True, exist_ok=True)
        stage_data(paths, preset, args.seed, log)
        stage_store(paths, log)
        checkpoints = stage_pretrain(paths, preset, methods, args, log)
        code = stage_sweep(paths, preset, checkpoints, args, log)
        report_online_eval(paths, methods, log)
    except StudyError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    summary = paths.sweep / "report" / "summary.md"
    log(f"done in {time.perf_counter() - start:.1f} s; report: {summary}")
    return code


if __name__ == "__main__":
    sys.exit(main())
