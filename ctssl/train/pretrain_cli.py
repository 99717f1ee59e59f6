"""``ctssl-train``: SparK or contrastive pre-training from the command line.

    ctssl-train --method spark --backend triton --data PREPARED_DIR --out runs/spark
    ctssl-train --method byol --preset toy --data PREPARED_DIR --out runs/toy --steps 50
    torchrun --no-python --nproc-per-node 4 ctssl-train --method spark --data ... --out ...
    ctssl-train --out runs/spark --resume                 # continue where it stopped
    ctssl-train --out runs/spark --resume --export r50.pt # write the backbone for fine-tuning
    ctssl-train --method spark --data STORE --out runs/spark --eval-data labels.csv --eval-every 500 --wandb
    ctssl-train --method spark --arch resnet18_3d --crop-size 64 --data PREPARED_DIR --out runs/spark3d

Settings: preset (``paper`` by default: the seed paper's settings of the method) < config file
(--config FILE.toml / .yaml / .json) < ``--set key=value`` < the flags below. With --resume the
checkpoint's own settings replace the preset. Bad input prints one line on stderr and exits 2
before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import LAST, CheckpointError
from .config import (
    ARCHS,
    DEVICES,
    METHODS,
    PRESETS,
    WANDB_MODES,
    ConfigError,
    PretrainConfig,
    apply_values,
    parse_overrides,
    preset_values,
    read_config_file,
)

PROG = "ctssl-train"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, raised so main() can return it
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Self-supervised pre-training (SparK, SimCLR, MoCo v2, BYOL, SwAV) of a "
                                       "ResNet or ConvNeXt on a prepared CT slice store.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--method", choices=METHODS, help="pre-training method (default: the checkpoint's with --resume)")
    p.add_argument("--backend", help="sparse engine backend for SparK: auto, dense, torch, triton, cuda, spconv, "
                                     "minkowski (default auto)")
    p.add_argument("--data", help="prepared slice store (ctssl-prepare output)")
    p.add_argument("--out", help="output directory (logs, checkpoints, pictures)")
    p.add_argument("--config", help="config file: .toml, .yaml (with PyYAML) or .json")
    p.add_argument("--preset", choices=PRESETS, help="paper (default): the paper's settings of the method; "
                                                     "toy: ResNet-18, 64 px, 20 steps on the CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config field (repeatable), e.g. --set warmup_epochs=10 --set hparams.temperature=0.2")
    p.add_argument("--arch", choices=ARCHS,
                   help="encoder: a ResNet or ConvNeXt (paper preset: resnet50; toy: resnet18); a 3-D one "
                        "(resnet18_3d...) trains on volume crops of the store's series")
    p.add_argument("--in-chans", type=int, choices=(1, 3),
                   help="encoder input channels: 3 (grey CT copied to RGB, as the paper fine-tunes) or 1")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the data (paper preset: the method's, e.g. 1600)")
    length.add_argument("--steps", type=int, help="stop after this many optimizer steps (schedules span them)")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--image-size", type=int, help="input size, a multiple of 32")
    p.add_argument("--crop-size", type=int, help="3-D encoders: volume crop edge in voxels, a multiple of 32 "
                                                 "(default 64)")
    p.add_argument("--volume-spacing", type=float, help="3-D encoders: isotropic voxel spacing in mm the series are "
                                                        "resampled to (default 1.5)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: base_lr x global batch / 256)")
    p.add_argument("--mask-ratio", type=float, help="SparK's mask ratio (default 0.6)")
    p.add_argument("--decoder-impl", metavar="IMPL",
                   help="how SparK's dense decoder computes: eager (default), channels-last, subpixel, compiled, or "
                        "several joined with '+' (e.g. compiled+subpixel); exact alternatives, same weights")
    p.add_argument("--seed", type=int, help="seed of the weights, the data order, augmentations and masks (default 0)")
    p.add_argument("--device", choices=DEVICES, help="auto (default): the GPU when there is one, else the CPU")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"),
                   help="mixed precision: auto (default) is bf16 autocast on a GPU and none on the CPU; fp16 "
                        "needs a GPU")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--init", metavar="PATH",
                   help="start from these weights (ctssl checkpoint or export, torchvision, timm, SparK release): "
                        "tensors load where names and shapes match, every other one is listed; ignored on --resume")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help=f"continue from PATH (default OUT/{LAST})")
    p.add_argument("--export", metavar="PATH", help="after training, write the backbone as a plain state_dict "
                                                    "(torchvision's keys for ResNets, timm's for ConvNeXts)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that already holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_tracking_flags(p)
    return p


def _add_tracking_flags(p: argparse.ArgumentParser) -> None:
    """Online evaluation and Weights & Biases (config fields eval_* and wandb*)."""
    g = p.add_argument_group("online evaluation and tracking")
    g.add_argument("--eval-data", metavar="LABELED",
                   help="labeled set (a CSV, class folders or a MedMNIST .npz, as ctssl-finetune --data) for k-NN "
                        "accuracy of the backbone's features while pre-training (val split; log.jsonl, eval_curve.png)")
    g.add_argument("--eval-every", type=int, metavar="N", help="steps between online evaluations (default 1000; "
                                                               "also at the end of the run)")
    g.add_argument("--eval-images", type=int, metavar="N",
                   help="use at most N images of the train split and N of the val split (default 1000)")
    g.add_argument("--eval-probe", action="store_true", default=None,
                   help="also a quick linear probe (300 full-batch steps of logistic regression on the features)")
    g.add_argument("--wandb", action="store_true", default=None,
                   help="also log to Weights & Biases (pip install 'ctssl[wandb]')")
    g.add_argument("--wandb-project", help="W&B project (default ctssl)")
    g.add_argument("--wandb-mode", choices=WANDB_MODES,
                   help="offline (default: no network; wandb sync OUT/wandb later) or online")


_TRACKING_FLAG_FIELDS = {
    "eval_data": "eval_data", "eval_every": "eval_every", "eval_images": "eval_images", "eval_probe": "eval_probe",
    "wandb": "wandb", "wandb_project": "wandb_project", "wandb_mode": "wandb_mode",
}


_FLAG_FIELDS = {
    "backend": "backend", "data": "data", "out": "out", "arch": "arch", "in_chans": "in_chans",
    "epochs": "epochs", "batch_size": "batch_size", "image_size": "image_size", "crop_size": "crop_size",
    "volume_spacing": "volume_spacing", "lr": "lr", "mask_ratio": "mask_ratio",
    "decoder_impl": "decoder_impl",
    "seed": "seed", "device": "device", "amp": "amp", "workers": "workers", "init": "init",
}


def build_config(args: argparse.Namespace) -> tuple[PretrainConfig, Path | None]:
    """The run's config from preset / checkpoint, config file, --set and flags; and the checkpoint to resume."""
    file_values = read_config_file(args.config) if args.config else {}
    overrides = parse_overrides(args.overrides)
    flags = {field: getattr(args, name) for name, field in _FLAG_FIELDS.items() if getattr(args, name) is not None}
    flags.update({field: getattr(args, name) for name, field in _TRACKING_FLAG_FIELDS.items()
                  if getattr(args, name, None) is not None})
    if args.steps is not None:
        flags["max_steps"] = args.steps
    elif args.epochs is not None:
        flags["max_steps"] = None
    if args.no_progress:
        flags["progress"] = False

    resume_path = None
    cfg = PretrainConfig()
    if args.resume is not None:
        from .pretrain import load_run_config

        out = flags.get("out") or overrides.get("out") or file_values.get("out")
        if args.resume:
            resume_path = Path(args.resume)
        elif out:
            resume_path = Path(out) / LAST
        else:
            raise ConfigError("--resume without PATH needs --out (it resumes OUT/checkpoint_last.pt)")
        if not resume_path.exists():
            raise CheckpointError(f"nothing to resume: {resume_path} does not exist")
        cfg = load_run_config(resume_path)
        if args.preset:
            cfg = apply_values(cfg, preset_values(args.preset, cfg.method), f"preset {args.preset}")
    else:
        method = args.method or overrides.get("method") or file_values.get("method")
        if method is None:
            raise ConfigError("--method is required (one of " + ", ".join(METHODS) + ")")
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        cfg = apply_values(cfg, preset_values(args.preset or "paper", method), f"preset {args.preset or 'paper'}")
    if args.method is not None and args.resume is not None and args.method != cfg.method:
        raise CheckpointError(f"cannot resume {resume_path}: it was trained with method={cfg.method!r}, "
                              f"not {args.method!r}")
    cfg = apply_values(cfg, file_values, f"config file {args.config}")
    cfg = apply_values(cfg, overrides, "--set")
    if args.method is not None:
        flags["method"] = args.method
    cfg = apply_values(cfg, flags, "command line")
    return cfg.validate(), resume_path


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc} (see {PROG} --help)", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    from ctssl.atomic import describe_os_error
    from ctssl.data.store import StoreError
    from ctssl.sparse import BackendUnavailableError

    from .pretrain import TrainingError, export_backbone, run_pretraining

    try:
        cfg, resume_path = build_config(args)
        final = run_pretraining(cfg, resume=resume_path, overwrite=args.overwrite)
        if args.export and _is_main_rank():
            export_backbone(final, args.export)
    except (ConfigError, CheckpointError, BackendUnavailableError, StoreError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"{PROG}: training stopped: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a lost mount while writing: the files written before stay whole
        print(f"{PROG}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; resume with --resume", file=sys.stderr)
        return 130
    if _is_main_rank():
        print(f"{PROG}: final checkpoint {final}" + (f"; backbone exported to {args.export}" if args.export else ""))
    return 0


def _is_main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":  # torchrun -m ctssl.train.pretrain_cli ...
    sys.exit(main())
