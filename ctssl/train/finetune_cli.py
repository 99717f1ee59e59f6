"""``ctssl-finetune``: fine-tune or linear-probe an encoder (ResNet, ConvNeXt, 3-D ResNet) on a labeled set.

Examples::

    # the seed paper's protocol on COVID-CT, from a SparK checkpoint, on 10% of the labels
    ctssl-finetune --data covid.csv --init runs/spark/checkpoint_final.pt --out ft/spark_0.1 \\
        --fraction 0.1 --fractions-file covid_fractions.json
    # a quick CPU run from random weights
    ctssl-finetune --data organsmnist.npz --init random --preset toy --out ft/random
    # volumes (a MedMNIST 3-D .npz) with a 3-D ResNet
    ctssl-finetune --data organmnist3d.npz --init random --arch resnet18_3d --preset toy --image-size 32 --out ft/3d
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..atomic import describe_os_error
from .config import FINETUNE_PRESETS as PRESETS
from .config import ConfigError, FinetuneConfig, FinetuneError, finetune_config

PROG = "ctssl-finetune"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that pick the labeled set and its splits (shared with ctssl-sweep)."""
    g = parser.add_argument_group("labeled data")
    g.add_argument("--data", required=True, metavar="PATH",
                   help="labeled set: a CSV (path,label[,patient][,split]), a class-folder root, or a MedMNIST .npz")
    g.add_argument("--split-list", action="append", default=[], metavar="SPLIT=FILE",
                   help="for class folders: a file listing the images of SPLIT (train/val/test); repeatable "
                        "(the COVID-CT Data-split lists)")
    g.add_argument("--patient-regex", default=None, metavar="REGEX",
                   help="for class folders: regex whose first group in a file name is the patient ID")
    g.add_argument("--split-seed", type=int, default=None, help="seed of train/val/test splits made here (default 0)")
    g.add_argument("--positive-class", default=None, metavar="NAME",
                   help="binary tasks: the class whose precision/recall/F1/AUC are reported (default: class 1)")
    g.add_argument("--intensity", default=None,
                   help="intensity mode for HU images: raw (default), lung, window:L,W, ...")


def _arch_choices() -> list[str]:
    from ..models import encoder_names

    return encoder_names()


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the fine-tuning protocol (shared with ctssl-sweep); None = the preset's value."""
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="paper: the seed paper's protocol (default); toy: minutes on a CPU; test: seconds")
    g.add_argument("--arch", default=None, choices=_arch_choices(),
                   help="encoder: a ResNet, ConvNeXt or 3-D ResNet (for volumes); default: the checkpoint's "
                        "(random init: the preset's)")
    g.add_argument("--in-chans", type=int, default=None, choices=(1, 3),
                   help="backbone input channels; default: the checkpoint's (random init: the preset's)")
    g.add_argument("--norm", default=None, choices=("batch", "instance"),
                   help="a 3-D ResNet from a random init: BatchNorm (default) or InstanceNorm (nnU-Net's)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--freeze-epochs", type=int, default=None, help="epochs with the backbone frozen at the start")
    g.add_argument("--linear-probe", action="store_true", default=None,
                   help="train only the head: backbone frozen throughout, BatchNorm in eval mode")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--augment", default=None, choices=("none", "flip", "crop"),
                   help="training augmentation (default crop: RandomResizedCrop 0.8-1 + horizontal flip)")
    g.add_argument("--normalize", default=None, choices=("auto", "none", "imagenet"),
                   help="input normalisation; auto: the checkpoint's if it records one, else none")
    g.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="before each evaluation, recompute BatchNorm statistics on N training images "
                        "(0: keep the running averages, the paper's; toy preset: 32)")
    g.add_argument("--fraction-seed", type=int, default=None,
                   help="seed of the nested label fractions made when no --fractions-file is given (default 0)")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default 0)")
    g.add_argument("--amp", action="store_true", default=None, help="bf16 autocast on CUDA")
    g.add_argument("--preload", default=None, choices=("auto", "yes", "no"),
                   help="decode every image once into memory (auto: when it fits in 2 GiB)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op CPU threads (default: torch's; 1 is faster on a busy machine)")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise FinetuneError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def parse_split_lists(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        split, sep, path = item.partition("=")
        split = split.strip().lower()
        if not sep or split not in ("train", "val", "valid", "validation", "test") or not path:
            raise FinetuneError(f"--split-list {item!r}: expected SPLIT=FILE with SPLIT train, val or test")
        out.setdefault(split, []).append(path)
    return out


def config_from_args(args: argparse.Namespace, **fixed) -> FinetuneConfig:
    """A FinetuneConfig from the shared flags; ``fixed`` sets run-specific fields."""
    overrides = dict(
        data=args.data, split_lists=parse_split_lists(args.split_list), patient_regex=args.patient_regex,
        positive_class=args.positive_class,
        split_seed=args.split_seed, intensity=args.intensity, arch=args.arch, in_chans=args.in_chans, norm=args.norm,
        epochs=args.epochs, freeze_epochs=args.freeze_epochs, linear_probe=args.linear_probe,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, image_size=args.image_size,
        augment=args.augment, normalize=args.normalize, fraction_seed=args.fraction_seed, device=args.device,
        workers=args.workers, amp=args.amp, preload=args.preload, bn_recalibrate=args.bn_recalibrate,
    )
    overrides.update(fixed)
    return finetune_config(args.preset, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune an encoder (a ctssl checkpoint of any method, an exported, torchvision, timm or "
                    "SparK state_dict, or random weights) with a new linear head; select the epoch on validation "
                    "accuracy and write the test metrics to OUT/metrics.json.",
    )
    parser.add_argument("--init", default="random", metavar="random|PATH",
                        help="backbone weights: 'random', a ctssl checkpoint, or an exported, torchvision, timm or "
                             "SparK state_dict")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (metrics.json, best.pt)")
    parser.add_argument("--name", default=None, help="method label in metrics.json (default: the checkpoint's method)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (head init, shuffling, augmentation)")
    parser.add_argument("--fraction", type=float, default=None,
                        help="fine-tune on this fraction of the training split (e.g. 0.1)")
    parser.add_argument("--fractions-file", default=None, metavar="PATH",
                        help="nested fractions JSON (ctssl.data.splits) so every method uses the same images")
    parser.add_argument("--no-save-model", action="store_true", help="do not keep OUT/best.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in OUT")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-epoch lines")
    add_data_arguments(parser)
    add_training_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        apply_threads(args)
        config = config_from_args(args, init=args.init, name=args.name, seed=args.seed, fraction=args.fraction,
                                  fractions_file=args.fractions_file, keep_model=not args.no_save_model)
        from .finetune import run_finetune

        result = run_finetune(config, args.out, log=None if args.quiet else print, overwrite=args.overwrite)
    except ConfigError as exc:  # FinetuneError, a bad --device, a corrupt checkpoint
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a lost mount while writing: the files written before stay whole
        print(f"{PROG}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except FloatingPointError as exc:
        print(f"{PROG}: training stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    test = result["test"]
    print(f"{PROG}: {result['name']} fraction {result['fraction']:g} ({result['n_train']} images) seed "
          f"{result['seed']}: best epoch {result['best_epoch']}, test accuracy {test['accuracy']:.4f} "
          f"AUC {_fmt(test['auc'])} F1 {test['f1']:.4f} -> {args.out}/metrics.json")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
