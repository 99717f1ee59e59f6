"""MoCo v2 (Chen et al., 2020): a momentum key encoder and a queue of negative keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import TwoViewTransform, TwoViewTransform3d
from ..models.heads import MLPHead
from . import distributed as dist
from .base import SSLMethod, as_views, pooled_features, spatial_dims_of
from .momentum import ema_update, momentum_copy


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross entropy of each query against its key (positive) and the queued keys (negatives).

    ``q`` and ``k`` are unit ``(N, D)``, ``queue`` unit ``(K, D)``, all treated as constants but ``q``.
    """
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.t()
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class KeyQueue(nn.Module):
    """A ring buffer of ``size`` unit keys, initialised with random unit vectors.

    Any size works, also one larger than the dataset (at toy scale the random initial keys
    stay in the queue as negatives until real keys overwrite them) or smaller than a batch
    (only the newest ``size`` keys are kept).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"KeyQueue: size must be >= 1, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest entries with ``keys`` (N, D), wrapping around."""
        size = self.keys.shape[0]
        keys = keys.detach().to(self.keys.dtype)[-size:]
        n = keys.shape[0]
        slots = (self.ptr + torch.arange(n, device=self.keys.device)) % size
        self.keys[slots] = keys
        self.ptr.copy_((self.ptr + n) % size)


class MoCoV2(SSLMethod):
    name = "mocov2"
    spatial_dims = (2, 3)
    default_hparams = {
        # seed paper: batch 128, SGD; MoCo v2: lr 0.03 x batch/256, momentum 0.9, wd 1e-4, cosine, 200 epochs
        "batch_size": 128, "optimizer": "sgd", "base_lr": 0.03, "lr_batch_ref": 256, "min_lr_ratio": 0.0,
        "weight_decay": 1e-4, "weight_decay_end": None, "warmup_epochs": 0, "epochs": 200,
        "momentum": 0.9, "betas": None, "grad_clip": None, "drop_path_rate": 0.0, "steps_per_epoch": None,
        "input_size": 224,
        "queue_size": 65536, "key_momentum": 0.999, "temperature": 0.07, "proj_hidden_dim": None,
        "proj_dim": 128, "symmetric": False, "crop_scale": (0.2, 1.0),
    }

    def __init__(self, encoder: nn.Module, backend: str = "auto", **hparams):
        super().__init__(encoder, backend, **hparams)
        hp = self.hparams
        feat = encoder.num_features
        self.projector = MLPHead(feat, hp["proj_hidden_dim"] or feat, hp["proj_dim"], batch_norm=False)
        self.momentum_backbone = momentum_copy(self.backbone)
        self.momentum_projector = momentum_copy(self.projector)
        self.queue = KeyQueue(int(hp["queue_size"]), hp["proj_dim"])

    def _query(self, x):
        return F.normalize(self.projector(pooled_features(self.backbone, x)).float(), dim=1)

    @torch.no_grad()
    def _key(self, x):
        return F.normalize(self.momentum_projector(pooled_features(self.momentum_backbone, x)).float(), dim=1)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        v1, v2 = as_views(batch, self.name, spatial_dims=spatial_dims_of(self.backbone))[:2]
        T = self.hparams["temperature"]
        negatives = self.queue.keys.clone()  # the queue is updated below, after the logits are built
        k2 = self._key(v2)
        loss = info_nce(self._query(v1), k2, negatives, T)
        keys = [k2]
        if self.hparams["symmetric"]:
            k1 = self._key(v1)
            loss = (loss + info_nce(self._query(v2), k1, negatives, T)) / 2
            keys.append(k1)
        if self.training:
            for k in keys:
                self.queue.enqueue(dist.all_gather(k))
        return {"loss": loss}

    def after_step(self, step: int, total_steps: int) -> None:
        m = self.hparams["key_momentum"]
        ema_update(self.momentum_backbone, self.backbone, m)
        ema_update(self.momentum_projector, self.projector, m)

    def train_transform(self, size: int):
        if spatial_dims_of(self.backbone) == 3:
            return TwoViewTransform3d(size, scale=tuple(self.hparams["crop_scale"]))
        return TwoViewTransform(size, scale=tuple(self.hparams["crop_scale"]))
