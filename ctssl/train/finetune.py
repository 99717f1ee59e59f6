"""Fine-tuning a (pre-trained) encoder with a new linear head: the seed paper's protocol.

Any encoder of the registry fine-tunes (ResNets, ConvNeXts, 3-D ResNets on volumes); its own head
classifies the globally pooled last stage map, with a new classification layer.

One run = one backbone initialisation x one labeled dataset x one label fraction x one seed.
The paper's protocol is the default (``config.FINETUNE_PRESETS["paper"]``): ResNet-50, grey
images copied to 3 channels at 224 px, Adam (lr 1e-4, weight decay 5e-4), batch 64, 70 epochs,
backbone frozen for the first 10; the weights with the best validation accuracy are tested.
The data side (splits, label checks, fractions, transforms) is ``finetune_data``.

Choices the paper does not state, made here and recorded in every ``metrics.json``:
- while the backbone is frozen its parameters get no gradient but its BatchNorm layers stay in
  training mode (statistics adapt to the new images); ``linear_probe`` freezes the backbone for
  the whole run with BatchNorm in eval mode;
- training augmentation ``crop``: RandomResizedCrop(scale 0.8..1) + horizontal flip;
- model selection ties (equal validation accuracy) go to the lower validation loss;
- a last training batch of a single image is dropped (BatchNorm cannot train on it);
- ``bn_recalibrate`` (off in ``paper``, on in ``toy``): before each evaluation the BatchNorm
  statistics are recomputed from a fixed subset of the training images (no augmentation) under the
  current weights ("precise BN", Wu & Johnson 2021), instead of the running averages.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..atomic import OutputError, check_output_dir, remove_stale_temps, write_json
from ..models import ENCODERS, create_encoder, encoder_names
from ..models.registry import SPATIAL_DIMS
from .checkpoint import CheckpointError, read_file, save_atomic
from .config import FINETUNE_PRESETS as PRESETS
from .config import FinetuneConfig, FinetuneError, finetune_config
from .distributed import resolve_device, seed_everything
from .finetune_data import (
    LabeledSplits,
    PreloadedImages,
    indices_hash,
    load_splits,
    positive_index,
    recalibration_view,
    select_fraction,
    train_view,
    training_augmentation,
)
from .metrics import classification_metrics
from .weights import (
    FAMILY_CONVERTERS,
    STEM_KEYS,
    WeightsError,
    classifier_prefix,
    encoder_kwargs,
    family_of_state_dict,
    head_prefixes,
    load_matching,
    read_weights,
    stem_weight,
)
from .weights import infer_arch as weights_infer_arch

METRICS_FILE = "metrics.json"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
METRICS_FORMAT = "ctssl-finetune-metrics"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_config(preset: str = "paper", **overrides) -> FinetuneConfig:
    """``config.finetune_config``: preset ``preset`` with ``overrides`` (None leaves the preset's value)."""
    return finetune_config(preset, **overrides)


# ---------------------------------------------------------------- backbone

def read_backbone(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(encoder state_dict in ctssl names without the classifier, meta with arch / in_chans / encoder_kwargs /
    method) of a file.

    Any layout ``weights.read_weights`` reads (ctssl checkpoint or export, torchvision, timm, SparK); the
    architecture comes from the checkpoint or, for a plain state_dict, from its tensors (``infer_arch``).
    """
    try:
        weights = read_weights(path)
    except WeightsError as exc:
        raise FinetuneError(str(exc)) from None
    family = family_of_state_dict(weights.backbone)
    if family is None:
        raise FinetuneError(f"--init {path}: no encoder in it (none of {', '.join(STEM_KEYS.values())}, "
                            f"downsample_layers.0.0.weight; it holds {', '.join(list(weights.backbone)[:3])}, ...)")
    sd = FAMILY_CONVERTERS[family](weights.backbone)
    meta = dict(weights.meta)
    inferred = infer_arch(sd)
    meta["arch"] = meta.get("arch") or inferred
    if meta["arch"] is None:
        dims = stem_weight(sd).dim() - 2
        raise FinetuneError(f"--init {path}: cannot tell which encoder this is; its tensors match none of "
                            f"{', '.join(encoder_names(dims))}")
    kwargs = encoder_kwargs(sd)
    meta["in_chans"] = int(meta.get("in_chans") or kwargs["in_chans"])
    meta["encoder_kwargs"] = {k: v for k, v in kwargs.items() if k != "in_chans"}
    if meta["arch"] in ENCODERS:  # the classifier is the file's task, not ours: left out
        with torch.device("meta"):
            classifier = classifier_prefix(create_encoder(meta["arch"], **kwargs))
        sd = {k: v for k, v in sd.items() if not k.startswith(classifier)}
    return sd, meta


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered encoder (ResNet, 3-D ResNet, ConvNeXt) whose tensors ``state_dict`` holds, or None."""
    return weights_infer_arch(state_dict)


def check_arch_dims(arch: str, splits: LabeledSplits, data: str) -> None:
    """FinetuneError when the encoder's spatial dims (2: images, 3: volumes) differ from the labeled set's."""
    dims = SPATIAL_DIMS[arch]
    if dims != splits.spatial_dims:
        kind = {2: "images (C, H, W)", 3: "volumes (C, D, H, W)"}
        raise FinetuneError(f"--arch {arch} is a {dims}-D encoder for {kind[dims]}, but --data {data} holds "
                            f"{splits.spatial_dims}-D samples of shape {tuple(splits.sample_shape)}; choose a "
                            f"{splits.spatial_dims}-D arch ({', '.join(encoder_names(splits.spatial_dims))})")


def _random_in_chans(config: FinetuneConfig, arch: str) -> int:
    """--in-chans, else the preset's for images and 1 for volumes (grey CT, as the 3-D encoders default)."""
    if config.in_chans is not None:
        return config.in_chans
    return config.random_in_chans if SPATIAL_DIMS[arch] == 2 else 1


def build_model(config: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict]:
    """Any registered encoder with a new classification layer, loaded from ``config.init``; (model, init info)."""
    if config.init == "random":
        arch = config.arch or config.random_arch
        if arch not in ENCODERS:
            raise FinetuneError(f"--arch {arch}: unknown; choose one of {', '.join(encoder_names())}")
        in_chans = _random_in_chans(config, arch)
        kwargs = {}
        if config.norm is not None:
            if SPATIAL_DIMS[arch] != 3 or not arch.startswith("resnet"):
                raise FinetuneError(f"--norm {config.norm}: only the 3-D ResNets take a norm choice, not {arch}")
            kwargs["norm"] = config.norm
        model = create_encoder(arch, num_classes=num_classes, in_chans=in_chans, **kwargs)
        info = {"arch": arch, "in_chans": in_chans, "method": "random", "source": "random"}
        if kwargs:
            info["encoder_kwargs"] = kwargs
        return model, info
    sd, meta = read_backbone(config.init)
    if config.arch is not None and config.arch != meta["arch"]:
        raise FinetuneError(f"--arch {config.arch} does not match the checkpoint {config.init}, "
                            f"which holds a {meta['arch']} backbone")
    if config.in_chans is not None and config.in_chans != meta["in_chans"]:
        raise FinetuneError(f"--in-chans {config.in_chans} does not match the checkpoint {config.init}, "
                            f"whose backbone takes {meta['in_chans']} input channels")
    if meta["arch"] not in ENCODERS:
        raise FinetuneError(f"--init {config.init}: its arch {meta['arch']!r} is not a registered encoder "
                            f"({', '.join(encoder_names())})")
    model = create_encoder(meta["arch"], num_classes=num_classes, in_chans=meta["in_chans"], **meta["encoder_kwargs"])
    target = f"{meta['arch']} with {meta['in_chans']} input channels"
    try:
        report = load_matching(model, sd, source=f"--init {config.init}", target=target,
                               ignore=(classifier_prefix(model),))
    except WeightsError as exc:
        raise FinetuneError(str(exc)) from None
    heads = head_prefixes(model)
    missing = [k for k in report.not_in_file if not k.startswith(heads)]
    if missing or report.mismatched or report.not_in_model:
        details = [f"missing {missing[:3]}"] if missing else []
        details += [f"{k}: {list(a)} in the file, {list(b)} in the model" for k, a, b in report.mismatched[:3]]
        details += [f"unexpected {report.not_in_model[:3]}"] if report.not_in_model else []
        raise FinetuneError(f"--init {config.init}: not a complete {target} backbone ({'; '.join(details)})")
    info = {k: meta.get(k) for k in ("arch", "in_chans", "method")}
    info["source"] = os.path.abspath(config.init)
    if meta["encoder_kwargs"]:
        info["encoder_kwargs"] = meta["encoder_kwargs"]
    for key in ("mean", "std"):
        if meta.get(key) is not None:
            info[key] = list(meta[key])
    return model, info


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the classification layer (``fc``, ConvNeXt's ``head.fc``): the new head."""
    prefix = classifier_prefix(model)
    return {name for name, _ in model.named_parameters() if name.startswith(prefix)}


def backbone_parameters(model: nn.Module):
    head = head_parameter_names(model)
    return [p for name, p in model.named_parameters() if name not in head]


def set_backbone_trainable(model: nn.Module, trainable: bool, bn_train: bool) -> None:
    """Freeze or unfreeze every parameter but the classification layer's; ``bn_train`` chooses BatchNorm's mode."""
    for p in backbone_parameters(model):
        p.requires_grad_(trainable)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(bn_train and model.training)


# ---------------------------------------------------------------- training

class _InputAdapter(nn.Module):
    """Grey (B, 1, H, W) or (B, 1, D, H, W) in [0, 1] to what the backbone expects: channels copied, normalised."""

    def __init__(self, in_chans: int, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        self.in_chans = in_chans
        if mean is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        else:
            self.mean = self.std = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, *x.shape[2:])
        if self.mean is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - self.mean.view(shape)) / self.std.view(shape)
        return x


def _normalization(config: FinetuneConfig, info: dict, in_chans: int):
    if config.normalize == "none":
        return None, None
    if config.normalize == "imagenet":
        if in_chans == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),)
    if config.normalize == "auto":
        if info.get("mean") is not None and info.get("std") is not None:
            return tuple(info["mean"]), tuple(info["std"])
        return None, None
    raise FinetuneError(f"--normalize {config.normalize}: choose auto, none or imagenet")


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def train_one_epoch(model, adapter, loader, optimizer, device, amp=False) -> float:
    """One pass over ``loader``; returns the mean training loss."""
    total, count = 0.0, 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device, non_blocking=True)
        with _autocast(device, amp):
            loss = F.cross_entropy(model(adapter(images)).float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(labels)
        count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def predict(model, adapter, loader, device, amp=False) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, class probabilities (N, K), mean cross-entropy) with the model in eval mode."""
    was_training = model.training
    model.eval()
    labels_all, probs_all, loss_sum = [], [], 0.0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device)
        with _autocast(device, amp):
            logits = model(adapter(images)).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        labels_all.append(labels.cpu().numpy())
        probs_all.append(torch.softmax(logits, 1).cpu().numpy())
    model.train(was_training)
    n = sum(len(a) for a in labels_all)
    return np.concatenate(labels_all), np.concatenate(probs_all), loss_sum / max(n, 1)


@torch.no_grad()
def recalibrate_bn(model, adapter, loader, device, amp=False) -> None:
    """Replace every BatchNorm's running statistics by their average over ``loader`` under the current weights.

    Running averages mix statistics of older weights; evaluating with them is what makes a short,
    fast fine-tuning swing between epochs. Other layers stay in eval mode; modes and momenta are restored.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    for images, _ in loader:
        with _autocast(device, amp):
            model(adapter(images.to(device, non_blocking=True)))
    model.train(was_training)
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)


def make_adam(model: nn.Module, config: FinetuneConfig, device: torch.device) -> torch.optim.Adam:
    """Adam with L2 weight decay (the paper's); the fused kernel where this torch has it (same math, faster)."""
    params = list(model.parameters())
    try:
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def write_json_atomic(path: str | os.PathLike, doc) -> None:
    write_json(path, _json_safe(doc), indent=1, allow_nan=False)


def _json_safe(obj):
    """NaN/inf to None (strict JSON), numpy scalars to Python."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fingerprint(config: FinetuneConfig) -> dict:
    """Settings a resumed run (or a sweep's further cells) must share with the interrupted one.

    ``bn_recalibrate`` is left out when off, so runs and sweeps begun before the option existed still resume.
    """
    skip = {"device", "workers", "preload", "checkpoint_every", "keep_model", "name"}
    if not config.bn_recalibrate:
        skip.add("bn_recalibrate")
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def _loader(ds, batch_size, shuffle, workers, device, generator=None, drop_last=False):
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
                      drop_last=drop_last, pin_memory=device.type == "cuda")


def _check_out(out: Path, config: FinetuneConfig, overwrite: bool) -> None:
    """Refuse an OUT that cannot be written, or that holds a finished run, unless ``overwrite``."""
    try:
        check_output_dir(out, "--out")
    except OutputError as exc:
        raise FinetuneError(str(exc)) from None
    finished = out / METRICS_FILE
    if overwrite or not finished.is_file():
        return
    try:
        saved = json.loads(finished.read_text(encoding="utf-8"))["config"]
        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        ours = _fingerprint(config)
        other = _fingerprint(dataclasses.replace(FinetuneConfig(), **{k: v for k, v in saved.items() if k in names}))
        changed = sorted(k for k in set(ours) | set(other) if json.dumps(ours.get(k)) != json.dumps(other.get(k)))
    except (OSError, ValueError, KeyError, TypeError):
        changed = None
    what = ("this run" if changed == [] else f"a run with other settings ({', '.join(changed)})" if changed
            else "a finished run")
    raise FinetuneError(f"{out} already holds {what} ({METRICS_FILE}); choose another --out, or pass --overwrite "
                        f"to replace it")


def _read_resume_state(path: Path, fingerprint: dict) -> dict:
    try:
        state = read_file(path)
    except CheckpointError as exc:
        raise FinetuneError(f"{exc}; delete it to start the run afresh") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise FinetuneError(f"{path.parent} holds an interrupted run with other settings; "
                            f"use another --out or delete {path}")
    return state


def run_finetune(
    config: FinetuneConfig,
    out_dir: str | os.PathLike,
    splits: LabeledSplits | None = None,
    log: Callable[[str], None] | None = print,
    overwrite: bool = False,
) -> dict:
    """Fine-tune, select on validation accuracy, test; write and return ``OUT/metrics.json``.

    Resumes from ``OUT/last.pt`` when an interrupted run with the same settings left one. An OUT
    that holds a finished run is refused unless ``overwrite``. ``splits`` lets a sweep decode the
    labeled set once for many runs; its notes (classes with few images) are then the sweep's to show.
    """
    log = log or (lambda msg: None)
    start = time.perf_counter()
    out = Path(out_dir)
    config.validate()
    device = resolve_device(config.device)
    _check_out(out, config, overwrite)
    if splits is None:
        splits = load_splits(config)
        for note in splits.notes:
            log(f"warning: {note}")
    fraction, indices = select_fraction(config, splits.train_labels)
    if len(indices) < 2:
        raise FinetuneError(f"fraction {fraction:g} leaves {len(indices)} training image(s); at least 2 are needed")
    num_classes = len(splits.classes)
    positive = positive_index(config, splits.classes)
    seed_everything(config.seed)
    model, info = build_model(config, num_classes)
    check_arch_dims(info["arch"], splits, config.data)
    if getattr(model, "norm", None) == "instance" and config.image_size < 2 * model.patch_size:
        raise FinetuneError(f"--image-size {config.image_size}: a {info['arch']} with InstanceNorm needs at least "
                            f"{2 * model.patch_size} (its last stage map must hold more than one voxel)")
    mean, std = _normalization(config, info, info["in_chans"])
    adapter = _InputAdapter(info["in_chans"], mean, std).to(device)
    model.to(device)
    if device.type == "cuda" and splits.spatial_dims == 2:
        model.to(memory_format=torch.channels_last)
    name = config.name or (info.get("method") or "pretrained")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # of a checkpoint write that was killed

    train_ds = train_view(splits.train, indices, training_augmentation(config.augment, config.image_size,
                                                                    splits.spatial_dims))
    generator = torch.Generator().manual_seed(config.seed)
    drop_last = len(train_ds) > config.batch_size and len(train_ds) % config.batch_size == 1
    train_loader = _loader(train_ds, config.batch_size, True, config.workers, device, generator, drop_last)
    val_loader = _loader(splits.val, config.batch_size * 2, False, config.workers, device)
    test_loader = _loader(splits.test, config.batch_size * 2, False, config.workers, device)
    optimizer = make_adam(model, config, device)
    recal_loader = None
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # ConvNeXt: none
    if config.bn_recalibrate > 0 and not config.linear_probe and has_bn:  # a linear probe keeps the statistics
        recal_ds = recalibration_view(splits.train, indices, config.bn_recalibrate, config.seed)
        recal_loader = _loader(recal_ds, config.batch_size * 2, False, config.workers, device)

    history: list[dict] = []
    best = {"epoch": -1, "accuracy": -1.0, "loss": math.inf}
    best_state = None
    first_epoch = 0
    fingerprint = _fingerprint(config)
    last_path = out / LAST_FILE
    if last_path.is_file():
        state = _read_resume_state(last_path, fingerprint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, first_epoch = state["history"], state["best"], state["epoch"] + 1
        best_state = state["best_state"]
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["loader_rng"])
        log(f"resuming {out} after epoch {first_epoch}")

    for epoch in range(first_epoch, config.epochs):
        t0 = time.perf_counter()
        frozen = config.linear_probe or epoch < config.freeze_epochs
        model.train()
        set_backbone_trainable(model, trainable=not frozen, bn_train=not config.linear_probe)
        train_loss = train_one_epoch(model, adapter, train_loader, optimizer, device, config.amp)
        if recal_loader is not None:
            recalibrate_bn(model, adapter, recal_loader, device, config.amp)
        y_val, p_val, val_loss = predict(model, adapter, val_loader, device, config.amp)
        val_acc = float(np.mean(p_val.argmax(1) == y_val))
        improved = val_acc > best["accuracy"] or (val_acc == best["accuracy"] and val_loss < best["loss"])
        if improved:
            best = {"epoch": epoch, "accuracy": val_acc, "loss": val_loss}
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "frozen": frozen, "train_loss": train_loss, "val_loss": val_loss,
                        "val_accuracy": val_acc, "seconds": seconds})
        log(f"epoch {epoch + 1}/{config.epochs} train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
            f"val_acc {val_acc:.4f}{' [frozen]' if frozen else ''}{' *' if improved else ''} ({seconds:.1f} s)")
        if config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0 and epoch + 1 < config.epochs:
            if improved:
                save_atomic({"model": best_state, "info": info, "classes": splits.classes}, out / BEST_FILE)
            save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "history": history, "best": best, "best_state": best_state, "fingerprint": fingerprint,
                "torch_rng": torch.get_rng_state(), "loader_rng": generator.get_state(),
            }, last_path)

    model.load_state_dict(best_state)
    y_val, p_val, _ = predict(model, adapter, val_loader, device, config.amp)
    y_test, p_test, test_loss = predict(model, adapter, test_loader, device, config.amp)
    test = classification_metrics(y_test, p_test, num_classes, positive)
    test["loss"] = test_loss
    result = {
        "format": METRICS_FORMAT,
        "name": name,
        "init": info,
        "data": splits.source,
        "classes": splits.classes,
        "positive_class": splits.classes[positive] if num_classes == 2 else None,
        "fraction": fraction,
        "n_train": int(len(indices)),
        "n_train_full": int(len(splits.train_labels)),
        "n_val": int(len(y_val)),
        "n_test": int(len(y_test)),
        "train_indices_sha": indices_hash(indices),
        "seed": config.seed,
        "best_epoch": best["epoch"] + 1,
        "val": classification_metrics(y_val, p_val, num_classes, positive),
        "test": test,
        "history": history,
        "config": dataclasses.asdict(config),
        "device": str(device),
        "seconds": time.perf_counter() - start,
    }
    if config.keep_model:
        save_atomic({"model": best_state, "info": info, "classes": splits.classes}, out / BEST_FILE)
    else:
        (out / BEST_FILE).unlink(missing_ok=True)
    write_json_atomic(out / METRICS_FILE, result)
    last_path.unlink(missing_ok=True)
    return result


def copy_config(config: FinetuneConfig, **changes) -> FinetuneConfig:
    return dataclasses.replace(copy.deepcopy(config), **changes)


__all__ = ["FinetuneConfig", "FinetuneError", "PRESETS", "make_config", "copy_config", "run_finetune", "read_backbone",
           "build_model", "infer_arch", "check_arch_dims", "train_one_epoch", "predict", "recalibrate_bn",
           "load_splits", "select_fraction", "positive_index", "recalibration_view", "LabeledSplits", "PreloadedImages",
           "METRICS_FILE", "BEST_FILE", "LAST_FILE", "write_json_atomic"]
