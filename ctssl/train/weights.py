"""Starting weights from a file: one loader for ``ctssl-train --init`` and for fine-tuning.

It reads every layout ctssl meets:

- torchvision / timm ResNet state_dicts and timm ConvNeXt state_dicts (``ctssl-train --export`` writes
  these too), with wrapper entries (``model``, ``state_dict``, ``module``) and ``module.`` / ``backbone.`` /
  ``encoder.`` prefixes removed;
- the official ConvNeXt layout (``downsample_layers``, ``stages.i.j.dwconv``...), renamed to timm's;
- ctssl checkpoints (``backbone`` and the method's other tensors, from ``model``);
- SparK's released pre-training files (``{"module": ..., "arch": ..., "is_pretrain": True}``): encoder
  tensors under ``sparse_encoder.sp_cnn.``, the decoder under ``dense_decoder.dec.i.{up_sample, conv.k}``
  and ``dense_decoder.proj``, ``densify_norms.i``, ``densify_projs.i`` and ``mask_tokens.i`` of shape
  ``(1, C, 1, 1)``. They are renamed to ctssl's SparK names, so encoder, densify and decoder all load.

Each encoder family has a converter hook (``FAMILY_CONVERTERS``) that puts a file's encoder tensors in
the family's ctssl names. Loading copies every tensor whose name and shape match and reports the rest
(``LoadReport``); a file of which no encoder tensor fits is an error naming the file and what was looked
for, never a silent random start.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from ..models.state_dicts import is_tensor_dict, rename_key, unwrap_state_dict
from .checkpoint import FORMAT, VERSION, CheckpointError, is_ctssl_checkpoint, read_file
from .config import ConfigError


class WeightsError(ConfigError):
    """A weights file that cannot be read or does not fit the model: the CLIs print it and exit 2."""


# ---------------------------------------------------------------- encoder families

def _resnet_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's, timm's and SparK's ResNets (and MedicalNet's 3-D ones) share ctssl's names."""
    return dict(state_dict)


def _convnext_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from ..models.convnext import timm_layout

    return timm_layout(dict(state_dict))


FAMILY_CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "resnet": _resnet_layout,
    "convnext": _convnext_layout,
}
"""Encoder family -> the hook that renames a file's encoder tensors to the family's ctssl names."""

STEM_KEYS = {"resnet": "conv1.weight", "convnext": "stem.0.weight"}
"""The first conv of each family (in ctssl names): its weight gives the input channels and spatial dims."""


def family_of_encoder(encoder: nn.Module) -> str:
    from ..models.convnext import ConvNeXt
    from ..models.resnet import ResNet

    if isinstance(encoder, ConvNeXt):
        return "convnext"
    if isinstance(encoder, ResNet):
        return "resnet"
    raise WeightsError(f"no weight converter for encoder {type(encoder).__name__}; known families: "
                       f"{', '.join(FAMILY_CONVERTERS)}")


def family_of_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The family whose stem a state_dict holds (official ConvNeXt keys count as ConvNeXt), or None."""
    if "stem.0.weight" in state_dict or "downsample_layers.0.0.weight" in state_dict:
        return "convnext"
    if "conv1.weight" in state_dict:
        return "resnet"
    return None


def stem_weight(state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The first conv's weight of a ResNet or ConvNeXt state_dict (any layout), or None."""
    for key in ("conv1.weight", "stem.0.weight", "downsample_layers.0.0.weight"):
        if key in state_dict:
            return state_dict[key]
    return None


def head_prefixes(encoder: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the encoder's head (pooled features -> logits): ``fc.`` (ResNet), ``head.`` (ConvNeXt).

    The classifier module and, when it sits inside a head module (ConvNeXt's norm + fc), that module.
    """
    classifier = encoder.get_classifier()
    name = next((n for n, m in encoder.named_modules() if m is classifier), None)
    if not name:
        return ()
    return (name.split(".", 1)[0] + ".",)


def classifier_prefix(encoder: nn.Module) -> str:
    """Key prefix of the classification layer alone (``fc.``, ``head.fc.``)."""
    classifier = encoder.get_classifier()
    return next(n for n, m in encoder.named_modules() if m is classifier) + "."


# ---------------------------------------------------------------- reading files

@dataclass
class WeightsFile:
    """What a weights file holds, in ctssl names."""

    path: str
    layout: str
    """``ctssl-checkpoint``, ``spark`` (SparK's pre-training file) or ``state_dict`` (torchvision, timm, export)."""
    backbone: dict[str, torch.Tensor]
    """Encoder tensors, named as in the file's family (convert with ``FAMILY_CONVERTERS``)."""
    method: dict[str, torch.Tensor] = field(default_factory=dict)
    """Pre-training method tensors besides the encoder (SparK: ``densify_*``, ``mask_tokens.*``, ``decoder.*``)."""
    meta: dict = field(default_factory=dict)


_PREFIXES = ("module.", "backbone.", "encoder.")
SPARK_ENCODER = "sparse_encoder.sp_cnn."
_SPARK_DECODER = [  # SparK's UNet block: up_sample, then conv = (conv, BN, ReLU6, conv, BN); ctssl: one Sequential
    (r"^dense_decoder\.dec\.(\d+)\.up_sample\.", r"decoder.blocks.\1.0."),
    (r"^dense_decoder\.dec\.(\d+)\.conv\.0\.", r"decoder.blocks.\1.1."),
    (r"^dense_decoder\.dec\.(\d+)\.conv\.1\.", r"decoder.blocks.\1.2."),
    (r"^dense_decoder\.dec\.(\d+)\.conv\.3\.", r"decoder.blocks.\1.4."),
    (r"^dense_decoder\.dec\.(\d+)\.conv\.4\.", r"decoder.blocks.\1.5."),
    (r"^dense_decoder\.proj\.", "decoder.proj."),
]


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP/wrapper prefixes (``module.``, ``backbone.``, ``encoder.``) shared by every key."""
    sd = dict(state_dict)
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def is_spark_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(SPARK_ENCODER) for k in state_dict)


def spark_to_ctssl(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(encoder tensors, SparK-method tensors in ctssl's names) of a SparK pre-training state_dict."""
    backbone, method = {}, {}
    for key, value in state_dict.items():
        if key.startswith(SPARK_ENCODER):
            backbone[key[len(SPARK_ENCODER):]] = value
            continue
        key = rename_key(key, _SPARK_DECODER)
        if re.fullmatch(r"mask_tokens\.\d+", key) and value.dim() == 4:
            value = value.reshape(-1)  # SparK: (1, C, 1, 1); ctssl: (C,)
        method[key] = value
    return backbone, method


def read_weights(path: str | os.PathLike, flag: str = "--init") -> WeightsFile:
    """The tensors of a weights file in ctssl's names, or WeightsError naming the file (after ``flag``) and
    the problem."""
    path = os.fspath(path)
    where = f"{flag} {path}" if flag else path
    if os.path.isdir(path):
        inside = [os.path.join(path, n) for n in ("checkpoint_final.pt", "checkpoint_last.pt")
                  if os.path.isfile(os.path.join(path, n))]
        hint = f"did you mean {flag + ' ' if flag else ''}{inside[0]}?" if inside else "give a checkpoint file"
        raise WeightsError(f"{where} is a directory; {hint}")
    if not os.path.isfile(path):
        raise WeightsError(f"{where}: no such file (give a ctssl checkpoint, an exported, torchvision, timm or "
                           f"SparK state_dict)")
    try:
        obj = read_file(path)
    except CheckpointError as exc:
        raise WeightsError(f"{flag + ': ' if flag else ''}{exc}") from None
    if is_ctssl_checkpoint(obj):
        if obj.get("version") != VERSION:
            raise WeightsError(f"{where}: ctssl checkpoint version {obj.get('version')} is not supported "
                               f"(this ctssl reads version {VERSION})")
        if not is_tensor_dict(obj.get("backbone")):
            raise WeightsError(f"{where}: ctssl checkpoint has no usable 'backbone' state_dict")
        model = obj.get("model") if is_tensor_dict(obj.get("model")) else {}
        method = {k: v for k, v in model.items() if not k.startswith("backbone.")}
        meta = {k: obj.get(k) for k in ("method", "arch", "in_chans", "step", "epoch", "config")}
        meta["format"] = FORMAT
        return WeightsFile(path, "ctssl-checkpoint", dict(obj["backbone"]), method, meta)
    sd = unwrap_state_dict(obj)
    if sd is None:
        what = (f"top-level keys: {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, Mapping)
                else type(obj).__name__)
        raise WeightsError(f"{where} is neither a ctssl checkpoint nor a state_dict ({what})")
    if is_spark_layout(sd):
        backbone, method = spark_to_ctssl(sd)
        meta = {"format": "spark", "method": "spark"}
        if isinstance(obj, Mapping) and isinstance(obj.get("arch"), str):
            meta["spark_arch"] = obj["arch"]
        return WeightsFile(path, "spark", backbone, method, meta)
    sd = strip_prefixes(sd)
    return WeightsFile(path, "state_dict", sd, {}, {"format": "state_dict"})


# ---------------------------------------------------------------- architecture from tensors

def encoder_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Constructor arguments a state_dict shows (ctssl names): ``in_chans``, and ``norm`` for 3-D ResNets."""
    stem = stem_weight(state_dict)
    if stem is None:
        return {}
    kwargs = {"in_chans": int(stem.shape[1])}
    if stem.dim() == 5 and "bn1.running_mean" not in state_dict and "bn1.weight" in state_dict:
        kwargs["norm"] = "instance"  # affine InstanceNorm: no running statistics
    return kwargs


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered encoder whose tensors (names and shapes, head aside) ``state_dict`` holds, or None.

    Candidates of the file's dimensionality are built on the meta device (no memory), once per process.
    """
    from ..models import encoder_names

    family = family_of_state_dict(state_dict)
    if family is None:
        return None
    sd = FAMILY_CONVERTERS[family](state_dict)
    kwargs = encoder_kwargs(sd)
    for name in encoder_names(spatial_dims=stem_weight(sd).dim() - 2):
        signature = _signature(name, tuple(sorted(kwargs.items())))
        if signature is None or signature[0] != family:
            continue
        heads, shapes = signature[1], signature[2]
        if shapes == _shapes(sd, heads):
            return name
    return None


@functools.lru_cache(maxsize=None)
def _signature(name: str, kwargs: tuple) -> tuple[str, tuple, dict] | None:
    """(family, head prefixes, {tensor name: shape} without the head) of encoder ``name``; None if it does not
    take ``kwargs``. Built once, on the meta device."""
    from ..models import create_encoder

    try:
        with torch.device("meta"):
            model = create_encoder(name, **dict(kwargs))
    except (TypeError, ValueError):
        return None
    heads = head_prefixes(model)
    return family_of_encoder(model), heads, _shapes(model.state_dict(), heads)


def _shapes(state_dict: Mapping[str, torch.Tensor], heads: tuple[str, ...]) -> dict[str, tuple]:
    """{name: shape} without the head and BatchNorm's batch counters (files from before torch 0.4.1 lack them)."""
    return {k: tuple(v.shape) for k, v in state_dict.items()
            if not k.startswith(heads) and not k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------- loading

@dataclass
class LoadReport:
    """What loading a file into a model did: every file tensor is loaded, ignored or skipped with a reason."""

    source: str
    target: str
    loaded: list[str] = field(default_factory=list)
    not_in_model: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    """(name, shape in the file, shape in the model)."""
    not_in_file: list[str] = field(default_factory=list)
    """Model tensors the file lacks: they keep their initialisation."""
    ignored: list[str] = field(default_factory=list)
    """File tensors left out on purpose (the classifier when fine-tuning: it gets a new head)."""

    def lines(self) -> list[str]:
        skipped = len(self.not_in_model) + len(self.mismatched)
        out = [f"init: loaded {len(self.loaded)} tensors from {self.source} into the {self.target}"
               + (f"; skipped {skipped}" if skipped else "")
               + (f"; left out {len(self.ignored)} ({_group(self.ignored)})" if self.ignored else "")]
        out += [f"init:   skipped {k}: shape {list(a)} in the file, {list(b)} in the model"
                for k, a, b in self.mismatched]
        out += [f"init:   skipped {k}: not in the model" for k in self.not_in_model]
        if self.not_in_file:
            out.append(f"init:   {len(self.not_in_file)} model tensors are not in the file and keep their "
                       f"initialisation ({_group(self.not_in_file)})")
        return out


def _group(keys: list[str]) -> str:
    """``decoder: 36, densify_projs: 3`` -- counts by top-level module."""
    counts: dict[str, int] = {}
    for k in keys:
        top = k.split(".", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{t}: {n}" for t, n in counts.items())


def load_matching(model: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str, target: str,
                  ignore: tuple[str, ...] = (), required: tuple[str, ...] = ("",)) -> LoadReport:
    """Copy every tensor of ``tensors`` whose name and shape match into ``model``; report the rest.

    ``ignore``: name prefixes not to load. WeightsError when no tensor under any ``required`` prefix
    loads (the file matches nothing that matters), naming the file and what was looked for.
    """
    report = LoadReport(source, target)
    state = model.state_dict()
    picked = {}
    for key, value in tensors.items():
        if _under(key, ignore):
            report.ignored.append(key)
        elif key not in state:
            report.not_in_model.append(key)
        elif tuple(value.shape) != tuple(state[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(state[key].shape)))
        else:
            picked[key] = value
    if not any(k.startswith(required) for k in picked):
        wanted = [k for k in state if k.startswith(required)][:3]
        found = [k for k in tensors if not _under(k, ignore)][:3]
        shape = ""
        if report.mismatched:
            k, a, b = report.mismatched[0]
            shape = f"; e.g. {k} has shape {list(a)} in the file, {list(b)} in the model"
        raise WeightsError(f"{source}: none of its tensors fit the {target} (looked for {', '.join(wanted)}, ...; "
                           f"the file holds {', '.join(found) or 'nothing usable'}{', ...' if len(tensors) > 3 else ''}"
                           f"{shape})")
    with torch.no_grad():
        for key, value in picked.items():
            state[key].copy_(value)
    report.loaded = list(picked)
    report.not_in_file = [k for k in state if k not in picked and not _under(k, ignore)
                          and not k.endswith("num_batches_tracked")]
    return report


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return bool(prefixes) and key.startswith(prefixes)


def encoder_tensors(weights: WeightsFile, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The file's encoder tensors in the names of ``encoder``'s family."""
    return FAMILY_CONVERTERS[family_of_encoder(encoder)](weights.backbone)


def init_method(method: nn.Module, path: str | os.PathLike, arch: str | None = None,
                log: Callable[[str], None] | None = print) -> LoadReport:
    """``ctssl-train --init PATH``: load the file into a freshly built pre-training method.

    Encoder tensors go to ``method.backbone``; a SparK file's or ctssl checkpoint's densify, mask-token and
    decoder tensors go where names and shapes match. WeightsError when no encoder tensor fits.
    """
    weights = read_weights(path)
    encoder = method.backbone
    tensors = {"backbone." + k: v for k, v in encoder_tensors(weights, encoder).items()}
    tensors.update(weights.method)
    arch = arch or type(encoder).__name__
    target = f"{getattr(method, 'name', type(method).__name__)} model ({arch} encoder, " \
             f"{getattr(encoder, 'in_chans', '?')} input channels)"
    report = load_matching(method, tensors, source=f"{weights.path} ({weights.layout})", target=target,
                           required=("backbone.",))
    if log is not None:
        for line in report.lines():
            log(line)
    return report


def apply_init(method: nn.Module, cfg, resuming: bool, log: Callable[[str], None] | None = print) -> list[str]:
    """``PretrainConfig.init`` applied to a freshly built method (before its optimizer exists); on resume a note
    that it is ignored (the checkpoint's weights win). Returns the lines it logged."""
    if not getattr(cfg, "init", None):
        return []
    if resuming:
        lines = [f"init: --init {cfg.init} ignored: resuming, the checkpoint's weights win"]
    else:
        lines = init_method(method, cfg.init, arch=cfg.arch, log=None).lines()
    for line in lines if log is not None else ():
        log(line)
    return lines


__all__ = ["apply_init", "WeightsError", "WeightsFile", "LoadReport", "FAMILY_CONVERTERS", "read_weights", "infer_arch",
           "encoder_kwargs", "load_matching", "init_method", "strip_prefixes", "spark_to_ctssl", "head_prefixes",
           "classifier_prefix", "family_of_encoder", "family_of_state_dict", "stem_weight", "encoder_tensors"]
