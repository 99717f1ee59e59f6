"""The interface every self-supervised method offers the trainer.

A method owns its backbone (an encoder of ``ctssl.models``, ResNet or ConvNeXt, that is
exported and fine-tuned) plus whatever else it trains (decoder, heads, momentum copies,
queues). The trainer only calls the methods below, so SparK and the contrastive baselines
share one training loop.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

# hparams every method accepts (the trainer's knobs); the values are each method's own defaults
COMMON_HPARAMS = ("batch_size", "optimizer", "base_lr", "lr_batch_ref", "min_lr_ratio", "weight_decay",
                  "weight_decay_end", "warmup_epochs", "epochs", "momentum", "betas", "grad_clip",
                  "drop_path_rate", "steps_per_epoch", "input_size")


ENCODER_CONTRACT = ("forward_features", "forward_masked", "get_classifier", "num_features", "feature_channels",
                    "patch_size", "in_chans", "sparse_ops", "densify_norm")
"""What a method uses of its encoder (``ctssl.models.registry`` documents the contract)."""


def spatial_dims_of(encoder: nn.Module) -> int:
    """2 for an image encoder, 3 for a volume encoder (``ctssl.models`` encoders say so; others are 2-D)."""
    return int(getattr(encoder, "spatial_dims", 2))


def pooled_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled last-stage features ``(B, num_features)`` (the classifier's input), of images or
    volumes."""
    return backbone.forward_features(images)[-1].flatten(2).mean(dim=2)


def as_views(batch, method: str, min_views: int = 2, spatial_dims: int = 2) -> list[torch.Tensor]:
    """Check that a contrastive batch is a list of view tensors ``(B, C, H, W)`` (``(B, C, D, H, W)`` for
    ``spatial_dims`` 3)."""
    if isinstance(batch, torch.Tensor) or not isinstance(batch, (list, tuple)):
        raise TypeError(f"{method}: the batch must be a list of view tensors (use method.train_transform), "
                        f"got {type(batch).__name__}")
    if len(batch) < min_views:
        raise ValueError(f"{method}: needs at least {min_views} views per image, got {len(batch)}")
    want = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
    for i, v in enumerate(batch):
        if not isinstance(v, torch.Tensor) or v.dim() != spatial_dims + 2:
            raise ValueError(f"{method}: view {i} must be a {want} tensor, got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if v.shape[0] != batch[0].shape[0]:
            raise ValueError(f"{method}: views have different batch sizes {v.shape[0]} and {batch[0].shape[0]}")
    return list(batch)


class SSLMethod(nn.Module):
    """Base class: hparam handling, parameter groups, SyncBN conversion, no-op hooks.

    Subclasses set ``name`` and ``default_hparams`` and implement ``forward`` and
    ``train_transform``; ``spatial_dims`` lists the encoders they train (2: images, 3: volumes).
    ``default_hparams`` holds the paper's settings; the optimizer
    keys mean: ``lr = base_lr * batch_size / lr_batch_ref`` (no scaling when
    ``lr_batch_ref`` is None), cosine decay to ``min_lr_ratio * lr`` after
    ``warmup_epochs``; ``weight_decay_end`` (None: constant) is the end of a cosine
    weight-decay schedule as SparK uses.
    """

    name: str = "?"
    default_hparams: dict[str, Any] = {}
    spatial_dims: tuple[int, ...] = (2,)
    """Encoder dimensionalities the method trains: 2 (images), 3 (volumes)."""

    def __init__(self, encoder: nn.Module, backend: str = "auto", **hparams):
        super().__init__()
        missing = [a for a in ENCODER_CONTRACT if not hasattr(encoder, a)]
        if not isinstance(encoder, nn.Module) or missing:
            raise TypeError(f"{self.name}: encoder must be a ctssl.models encoder (ResNet, ConvNeXt), got "
                            f"{type(encoder).__name__}" + (f" without {', '.join(missing)}" if missing else ""))
        check_spatial_dims(type(self), spatial_dims_of(encoder), type(encoder).__name__)
        unknown = sorted(set(hparams) - set(self.default_hparams))
        if unknown:
            raise ValueError(f"{self.name}: unknown hparam(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(self.default_hparams))}")
        self.hparams = {**self.default_hparams, **hparams}
        self.backend = backend
        self.backbone = encoder
        # no method trains the classifier; frozen so DDP does not see unused parameters
        self.backbone.get_classifier().requires_grad_(False)

    # --- the trainer's interface ----------------------------------------------
    def forward(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_transform(self, size: int) -> Callable:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step (momentum updates and schedules)."""

    def on_after_backward(self, step: int) -> None:
        """Called between backward and the optimizer step (gradient surgery)."""

    def visualize(self, batch) -> torch.Tensor | None:
        return None

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters in two groups; BN, biases and tokens (<= 1-D) get no weight decay.

        Each group has a ``name`` ("decay" / "no_decay"); LARS implementations commonly
        also skip the trust ratio for the "no_decay" group.
        """
        decay, no_decay = [], []
        for _, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
                  {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def convert_sync_batchnorm(self, process_group=None) -> "SSLMethod":
        """Make every BN synchronise across ranks: ctssl's sparse-aware SyncBatchNorm for 2-D and 3-D BN
        (it still accepts sparse maps), torch's SyncBatchNorm for the heads' BatchNorm1d.

        Do not use ``nn.SyncBatchNorm.convert_sync_batchnorm`` on a method: it would replace the
        encoder's sparse BN by torch's, which cannot take masked (sparse) input.
        """
        from ..sparse.modules import convert_sync_batchnorm
        for name, child in list(self.named_children()):
            setattr(self, name, _convert_bn1d(convert_sync_batchnorm(child, process_group), process_group))
        return self


def check_spatial_dims(method: type[SSLMethod], dims: int, arch: str) -> None:
    """ValueError naming the method and the encoder when ``method`` does not train ``dims``-D encoders."""
    if dims not in method.spatial_dims:
        kinds = " and ".join({2: "2-D (images)", 3: "3-D (volumes)"}[d] for d in method.spatial_dims)
        raise ValueError(f"{method.name} does not support {dims}-D encoders ({arch}); it trains {kinds} encoders only")


def _convert_bn1d(module: nn.Module, process_group) -> nn.Module:
    if isinstance(module, nn.BatchNorm1d):
        out = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        setattr(module, name, _convert_bn1d(child, process_group))
    return module
