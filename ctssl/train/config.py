"""Run configuration: the pre-training and fine-tuning dataclasses, their presets, config files and overrides.

Pre-training precedence (lowest first): dataclass defaults < preset < config file (TOML, or YAML
when PyYAML is installed) < ``--set key=value`` < explicit command-line flags. Fine-tuning: preset <
flags. Every value is checked against the field's type, so a typo fails with the field's name
instead of deep inside the run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

METHODS = ("spark", "simclr", "mocov2", "byol", "swav")


def _registered_encoders() -> tuple[str, ...]:
    from ctssl.models import encoder_names

    return tuple(encoder_names())


ARCHS = _registered_encoders()
"""Every encoder of ``ctssl.models``' registry: 2-D ones (ResNets, ConvNeXts) pre-train on CT slices, 3-D ones
(``resnet18_3d``...) on crops of CT volumes."""


def arch_spatial_dims(arch: str) -> int:
    """2 for an image encoder, 3 for a volume encoder (from the registry, without building it)."""
    from ctssl.models.registry import SPATIAL_DIMS

    return SPATIAL_DIMS.get(arch, 2)
OPTIMIZERS = ("lamb", "adamw", "adam", "sgd", "lars")
AMP_MODES = ("auto", "bf16", "fp16", "none")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("offline", "online")


_UnionType = getattr(types, "UnionType", None)


class ConfigError(ValueError):
    """A user-facing configuration or input problem (the CLI prints it and exits with code 2)."""


class FinetuneError(ConfigError):
    """A fine-tuning input problem the user can fix (missing file, wrong arch, unknown fraction): exit code 2."""


SPARK_FIELDS = ("mask_ratio", "decoder_impl")
"""Config fields that set a SparK hparam of the same name (None: the method's default); other methods refuse them."""


@dataclass
class PretrainConfig:
    """Every setting of a pre-training run. Defaults are SparK's paper settings for ResNet-50.

    The optimisation fields carry the names of ``ctssl.ssl``'s common hparams (batch_size,
    base_lr, lr_batch_ref, min_lr_ratio, weight_decay[_end], warmup_epochs, epochs, momentum,
    betas, grad_clip, drop_path_rate), so a method's ``default_hparams`` map onto them directly.
    """

    # what to train
    method: str = "spark"
    arch: str = "resnet50"
    in_chans: int = 3
    """Input channels of the encoder (3: grey CT copied to RGB, so the backbone fine-tunes as in the paper)."""
    backend: str = "auto"
    """Sparse engine backend for SparK (dense, torch, triton, cuda, spconv, minkowski, auto)."""
    drop_path_rate: float = 0.05
    mask_ratio: float | None = None
    """SparK only: fraction of 32x32 patches hidden from the encoder (None: the method's 0.6)."""
    decoder_impl: str | None = None
    """SparK only: how the light decoder computes (eager, channels-last, subpixel, compiled, or several joined with
    ``+``; None: the method's default). Exact alternatives with the same weights: checkpoints move between them."""
    hparams: dict = field(default_factory=dict)
    """Extra method-specific keyword arguments for ``ctssl.ssl.create_method`` (temperature, queue_size...)."""
    init: str | None = None
    """Starting weights (``--init``): a ctssl checkpoint or export, a torchvision / timm / SparK file; tensors load
    where names and shapes match (``ctssl.train.weights``). Ignored on resume: the checkpoint wins."""

    # data
    data: str = ""
    """A prepared slice store (``ctssl-prepare`` output)."""
    intensity: str = "raw"
    image_size: int = 224
    crop_size: int = 64
    """3-D encoders: edge of the cubic volume crops in voxels (a multiple of 32); image_size is for 2-D."""
    volume_spacing: float = 1.5
    """3-D encoders: isotropic voxel spacing (mm) every series is resampled to before cropping."""
    crops_per_volume: int = 16
    """3-D encoders: random crops per series and epoch (the data set length is series x this)."""
    workers: int = 4

    # where
    out: str = "runs/pretrain"
    device: str = "auto"

    # how long
    batch_size: int = 32
    """Images per process (the global batch is batch_size x world size)."""
    epochs: int = 1600
    max_steps: int | None = None
    """When set, the run stops after this many optimizer steps (and the schedules span them)."""

    # optimisation
    optimizer: str = "lamb"
    lr: float | None = None
    """Peak learning rate; None means base_lr x global batch / lr_batch_ref (SparK's scaling rule)."""
    base_lr: float = 2e-4
    lr_batch_ref: int | None = 256
    """Reference batch of the linear scaling rule; None: base_lr is used unscaled."""
    min_lr_ratio: float = 0.0
    """The cosine schedule ends at min_lr_ratio x peak lr."""
    betas: tuple[float, float] | None = (0.9, 0.95)
    momentum: float | None = None
    eps: float | None = None
    """Optimizer epsilon; None keeps the optimizer's own default."""
    weight_decay: float = 0.04
    weight_decay_end: float | None = 0.2
    """Cosine weight-decay schedule end value (SparK: 0.04 -> 0.2); None keeps it constant."""
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None
    """Overrides warmup_epochs when set."""
    grad_clip: float | None = 5.0
    lars_trust: float = 0.001

    # numerics
    amp: str = "auto"
    """auto: bf16 autocast on GPU, off on CPU."""
    channels_last: bool = True
    """Channels-last model and inputs (GPU only; ignored on the CPU)."""
    seed: int = 0

    # bookkeeping
    log_every: int = 20
    ckpt_every: int = 1000
    vis_every: int = 500
    vis_images: int = 4
    progress: bool = True
    tensorboard: bool = True
    find_unused_parameters: bool = False

    # online evaluation and run tracking (ctssl.train.online_eval, logger)
    eval_data: str = ""
    """A labeled set (anything ``ctssl-finetune --data`` reads) for k-NN accuracy while pre-training; "" = off."""
    eval_every: int = 1000
    """Steps between online evaluations (and one at the end of the run)."""
    eval_images: int = 1000
    """At most this many images of the labeled set's train split, and as many of its val split, are used."""
    eval_k: int = 20
    eval_probe: bool = False
    """Also a quick linear probe (logistic regression on the cached features) at each evaluation."""
    wandb: bool = False
    """Mirror log.jsonl's scalars to Weights & Biases (pip install 'ctssl[wandb]')."""
    wandb_project: str = "ctssl"
    wandb_mode: str = "offline"
    """offline (default: no network, ``wandb sync`` later) or online."""

    def global_batch(self, world_size: int = 1) -> int:
        return self.batch_size * world_size

    def peak_lr(self, world_size: int = 1) -> float:
        """Explicit ``lr``, else ``base_lr`` x global batch / ``lr_batch_ref`` (unscaled when that is None)."""
        if self.lr is not None:
            return float(self.lr)
        if self.lr_batch_ref is None:
            return float(self.base_lr)
        return self.base_lr * self.global_batch(world_size) / self.lr_batch_ref

    @property
    def spatial_dims(self) -> int:
        """2: the encoder takes slices; 3: volume crops."""
        return arch_spatial_dims(self.arch)

    @property
    def input_size(self) -> int:
        """The side of the network's input: ``image_size`` for 2-D encoders, ``crop_size`` for 3-D ones."""
        return self.crop_size if self.spatial_dims == 3 else self.image_size

    def validate(self) -> "PretrainConfig":
        """Check every value that does not need the data or the device; raises ConfigError."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"unknown amp mode {self.amp!r}; choose one of {', '.join(AMP_MODES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if self.image_size <= 0 or self.image_size % 32:
            raise ConfigError(f"image_size must be a positive multiple of 32 (the patch size), got {self.image_size}")
        if self.spatial_dims == 3:
            self._validate_volumes()
        for name in SPARK_FIELDS:
            if getattr(self, name) is not None and self.method != "spark":
                raise ConfigError(f"{name} applies to spark only, not to {self.method}")
        if self.mask_ratio is not None and not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_impl is not None:
            from ctssl.models.decoder import parse_decoder_impl
            try:
                parse_decoder_impl(self.decoder_impl)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        positive = {"batch_size": self.batch_size, "log_every": self.log_every, "ckpt_every": self.ckpt_every,
                    "vis_every": self.vis_every}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.max_steps is None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1 (or set max_steps), got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if (self.lr is not None and self.lr <= 0) or self.base_lr <= 0:
            raise ConfigError("lr and base_lr must be positive")
        if self.lr_batch_ref is not None and self.lr_batch_ref < 1:
            raise ConfigError(f"lr_batch_ref must be >= 1 or none, got {self.lr_batch_ref}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be positive or none, got {self.grad_clip}")
        if self.betas is not None and (len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or (self.weight_decay_end is not None and self.weight_decay_end < 0):
            raise ConfigError("weight_decay and weight_decay_end must be >= 0")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.vis_images < 1:
            raise ConfigError(f"vis_images must be >= 1, got {self.vis_images}")
        check_hparams(self.method, self.hparams)
        self._validate_tracking()
        return self

    def _validate_tracking(self) -> None:
        for name in ("eval_every", "eval_images", "eval_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"unknown wandb_mode {self.wandb_mode!r}; choose one of {', '.join(WANDB_MODES)}")

    def _validate_volumes(self) -> None:
        from ctssl.ssl import method_class
        from ctssl.ssl.base import check_spatial_dims

        if self.crop_size <= 0 or self.crop_size % 32:
            raise ConfigError(f"crop_size must be a positive multiple of 32 (the patch size), got {self.crop_size}")
        if self.volume_spacing <= 0:
            raise ConfigError(f"volume_spacing must be positive (mm), got {self.volume_spacing}")
        if self.crops_per_volume < 1:
            raise ConfigError(f"crops_per_volume must be >= 1, got {self.crops_per_volume}")
        try:
            check_spatial_dims(method_class(self.method), 3, self.arch)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def to_dict(self) -> dict:
        return asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(PretrainConfig))


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

# ctssl.ssl's common hparams that are trainer settings, and the config field each one sets
TRAINER_HPARAMS = {
    "batch_size": "batch_size", "optimizer": "optimizer", "base_lr": "base_lr", "lr_batch_ref": "lr_batch_ref",
    "min_lr_ratio": "min_lr_ratio", "weight_decay": "weight_decay", "weight_decay_end": "weight_decay_end",
    "warmup_epochs": "warmup_epochs", "epochs": "epochs", "momentum": "momentum", "betas": "betas",
    "grad_clip": "grad_clip", "drop_path_rate": "drop_path_rate", "input_size": "image_size",
}

# A CPU demo in seconds: ResNet-18 at 64x64, 20 steps, small heads, queues and decoder.
TOY_PRESET: dict[str, Any] = dict(
    arch="resnet18", image_size=64, batch_size=8, max_steps=20, epochs=1, warmup_steps=2, workers=0, log_every=1,
    ckpt_every=10, vis_every=10, drop_path_rate=0.0, amp="none", channels_last=False, tensorboard=False,
    device="cpu",
)
TOY_LR = {"spark": 1e-3, "swav": 0.05, "mocov2": 0.03, "byol": 1e-3, "simclr": 0.05}
TOY_HPARAMS: dict[str, dict[str, Any]] = {
    "spark": {"decoder_width": 128},
    "swav": {"num_prototypes": 32, "queue_length": 0, "n_local_crops": 2, "proj_dim": 32},
    "mocov2": {"queue_size": 64, "proj_dim": 32},
    "byol": {"proj_hidden_dim": 128, "pred_hidden_dim": 128, "proj_dim": 32},
    "simclr": {"proj_dim": 32},
}

PRESETS = ("paper", "toy")


def method_default_hparams(method: str) -> dict[str, Any]:
    """``default_hparams`` of the ``ctssl.ssl`` method class called ``method`` (the paper's settings)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    from ctssl.ssl import method_class

    return dict(method_class(method).default_hparams)


def check_hparams(method: str, hparams: dict[str, Any]) -> None:
    """ConfigError naming ``hparams.KEY`` when a value does not have the type of the method's default
    (unknown keys are the method's to refuse)."""
    defaults = method_default_hparams(method)
    for key, value in hparams.items():
        default = defaults.get(key)
        if default is None or value is None:
            continue
        hint = tuple[tuple(type(v) for v in default)] if isinstance(default, tuple) else type(default)
        _coerce(f"hparams.{key}", value, hint)


def preset_values(name: str, method: str) -> dict[str, Any]:
    """The field values of preset ``name`` for ``method``.

    ``paper``: the method's ``default_hparams`` (the seed paper's settings, else the method's
    published defaults) mapped onto config fields. ``toy``: ``paper`` shrunk to a CPU demo.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    defaults = method_default_hparams(method)
    values: dict[str, Any] = {"method": method, "lr": None}
    for key, field_name in TRAINER_HPARAMS.items():
        if key in defaults:
            values[field_name] = defaults[key]
    if name == "toy":
        values.update(TOY_PRESET)
        values["lr"] = TOY_LR[method]
        values["hparams"] = {k: v for k, v in TOY_HPARAMS[method].items() if k in defaults}
    return values


# ---------------------------------------------------------------------------------------------
# config files and overrides
# ---------------------------------------------------------------------------------------------

def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat table of config fields (``[hparams]`` may be a nested table) from TOML or YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"config file {path}: YAML needs PyYAML (pip install pyyaml); or use TOML") from None
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"config file {path}: unknown type {suffix!r} (use .toml, .yaml or .json)")
    except ConfigError:
        raise
    except Exception as exc:  # parse errors of any of the three formats
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings, got {type(data).__name__}")
    return data


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint``, or ConfigError naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (_UnionType is not None and origin is _UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",")
                     if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return dict(value)
    return value


def apply_values(cfg, values: dict[str, Any], source: str):
    """A copy of the config dataclass ``cfg`` with ``values`` set, each checked against its field's type
    (``hparams`` tables are merged, not replaced)."""
    hints = _type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in hints:
            known = ", ".join(f.name for f in fields(cfg))
            raise ConfigError(f"{source}: unknown setting {key!r}; known settings: {known}")
        coerced = _coerce(key, value, hints[key])
        if key == "hparams":
            merged = dict(changes.get("hparams", cfg.hparams))
            merged.update(coerced)
            coerced = merged
        changes[key] = coerced
    return dataclasses.replace(cfg, **changes)


def _literal(text: str) -> Any:
    """A ``--set`` value: TOML/JSON-like literals (numbers, booleans, lists, none), else the string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "hparams.temperature=0.2"]`` -> ``{"lr": 0.001, "hparams": {"temperature": 0.2}}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        value = _literal(text)
        if key.startswith("hparams."):
            out.setdefault("hparams", {})[key[len("hparams."):]] = value
        elif "." in key:
            raise ConfigError(f"--set {item!r}: only hparams.NAME may be dotted")
        else:
            out[key] = value
    return out


def config_from_dict(values: dict[str, Any], source: str = "config") -> PretrainConfig:
    """A config from a saved ``asdict`` (e.g. a checkpoint's ``config``), unknown keys rejected."""
    return apply_values(PretrainConfig(), values, source)



# ---------------------------------------------------------------------------------------------
# fine-tuning
# ---------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """Everything that defines one fine-tuning run (``ctssl.train.finetune``). ``None`` fields are resolved
    at run time."""

    data: str = ""
    init: str = "random"  # "random" or a checkpoint / exported state_dict path
    name: str | None = None  # method label for reports (default: the checkpoint's method or "random")
    positive_class: str | None = None  # binary tasks: class name or index counted positive (default index 1)
    arch: str | None = None  # None: the checkpoint's arch, or PRESET arch for random init
    in_chans: int | None = None  # None: the checkpoint's, or the preset's for random init
    random_arch: str = "resnet50"  # arch of a random init when --arch is not given
    random_in_chans: int = 3
    norm: str | None = None  # 3-D ResNets from a random init: "batch" or "instance" (None: batch)
    epochs: int = 70
    freeze_epochs: int = 10
    linear_probe: bool = False
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 5e-4
    image_size: int = 224
    augment: str = "crop"  # none | flip | crop
    intensity: str = "raw"
    normalize: str = "auto"  # auto (the checkpoint's, else none) | none | imagenet
    fraction: float | None = None
    fractions_file: str | None = None
    fraction_seed: int = 0
    split_seed: int = 0
    split_lists: dict = field(default_factory=dict)  # split name -> list of files (COVID-CT lists)
    patient_regex: str | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    amp: bool = False  # bf16 autocast on CUDA
    preload: str = "auto"  # auto | yes | no: keep decoded images in memory
    checkpoint_every: int = 1  # epochs between resumable checkpoints (0: none)
    keep_model: bool = True  # keep OUT/best.pt after the run
    # BatchNorm statistics for evaluation: from this many training images under the current weights,
    # recomputed before each evaluation; 0: the running averages (the paper's, torchvision's default)
    bn_recalibrate: int = 0

    def validate(self) -> "FinetuneConfig":
        """Check the values that need neither the data nor the device; raises FinetuneError."""
        if self.epochs < 1:
            raise FinetuneError(f"--epochs must be at least 1, got {self.epochs}")
        if self.freeze_epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.bn_recalibrate < 0:
            raise FinetuneError("--freeze-epochs must be >= 0, --batch-size >= 1, --lr > 0 and --bn-recalibrate >= 0")
        if self.norm not in (None, "batch", "instance"):
            raise FinetuneError(f"--norm must be 'batch' or 'instance', got {self.norm!r}")
        return self


FINETUNE_PRESETS: dict[str, dict] = {
    "paper": dict(random_arch="resnet50", random_in_chans=3, epochs=70, freeze_epochs=10, batch_size=64, lr=1e-4,
                  weight_decay=5e-4, image_size=224, checkpoint_every=1, workers=4),
    "toy": dict(random_arch="resnet18", random_in_chans=3, epochs=6, freeze_epochs=1, batch_size=16, lr=1e-3,
                weight_decay=5e-4, image_size=64, checkpoint_every=0, preload="yes", bn_recalibrate=32),
    "test": dict(random_arch="resnet18", random_in_chans=3, epochs=1, freeze_epochs=0, batch_size=8, lr=1e-3,
                 weight_decay=5e-4, image_size=32, checkpoint_every=0, preload="yes"),
}
"""``paper``: the seed paper's protocol (GPU). ``toy``: minutes on a CPU. ``test``: seconds, for tests.

``toy`` recalibrates BatchNorm before each evaluation: with lr 1e-3 from random weights and only
2-17 steps per epoch, the running averages (momentum 0.1) lag the weights or still hold their
initial values, and the evaluated model predicts one class (validation accuracy 0.5 in most epochs).
"""


def finetune_config(preset: str = "paper", **overrides) -> FinetuneConfig:
    """Preset ``preset`` with ``overrides`` (None values leave the preset's), type-checked."""
    if preset not in FINETUNE_PRESETS:
        raise FinetuneError(f"unknown preset {preset!r}; choose one of {', '.join(FINETUNE_PRESETS)}")
    values = {**FINETUNE_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return apply_values(FinetuneConfig(), values, f"fine-tuning ({preset} preset)")
    except ConfigError as exc:
        raise FinetuneError(str(exc)) from None


__all__ = [
    "PretrainConfig", "ConfigError", "METHODS", "ARCHS", "OPTIMIZERS", "AMP_MODES", "DEVICES", "PRESETS",
    "TRAINER_HPARAMS", "TOY_PRESET", "method_default_hparams", "preset_values", "read_config_file", "apply_values",
    "parse_overrides",
    "config_from_dict", "FIELD_NAMES", "FinetuneConfig", "FinetuneError", "FINETUNE_PRESETS", "finetune_config",
]
