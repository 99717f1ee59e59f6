"""BYOL (Grill et al., 2020): an online network predicts a slowly moving target network."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import TwoViewTransform, TwoViewTransform3d
from ..models.heads import MLPHead
from .base import SSLMethod, as_views, pooled_features, spatial_dims_of
from .momentum import cosine_momentum, ema_update, momentum_copy


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, z)`` averaged over the batch (the target ``z`` gets no gradient)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


class BYOL(SSLMethod):
    name = "byol"
    spatial_dims = (2, 3)
    default_hparams = {
        # seed paper: batch 64, Adam lr 1e-3 (not scaled); BYOL: tau 0.996 -> 1 (cosine), 4096/256 MLPs
        "batch_size": 64, "optimizer": "adam", "base_lr": 1e-3, "lr_batch_ref": None, "min_lr_ratio": 0.0,
        "weight_decay": 1.5e-6, "weight_decay_end": None, "warmup_epochs": 10, "epochs": 300,
        "momentum": None, "betas": (0.9, 0.999), "grad_clip": None, "drop_path_rate": 0.0,
        "steps_per_epoch": None, "input_size": 224,
        "base_momentum": 0.996, "final_momentum": 1.0, "proj_hidden_dim": 4096, "proj_dim": 256,
        "pred_hidden_dim": 4096, "crop_scale": (0.08, 1.0), "blur_p": (1.0, 0.1),
    }

    def __init__(self, encoder: nn.Module, backend: str = "auto", **hparams):
        super().__init__(encoder, backend, **hparams)
        hp = self.hparams
        self.projector = MLPHead(encoder.num_features, hp["proj_hidden_dim"], hp["proj_dim"], batch_norm=True)
        self.predictor = MLPHead(hp["proj_dim"], hp["pred_hidden_dim"], hp["proj_dim"], batch_norm=True)
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)
        self.momentum = hp["base_momentum"]  # the value used by the last update (for logs)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        v1, v2 = as_views(batch, self.name, spatial_dims=spatial_dims_of(self.backbone))[:2]
        # each view is its own forward pass, so BN statistics are per view as in BYOL
        p1, p2 = (self.predictor(self.projector(pooled_features(self.backbone, v))) for v in (v1, v2))
        with torch.no_grad():
            z1, z2 = (self.target_projector(pooled_features(self.target_backbone, v)) for v in (v1, v2))
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)
        return {"loss": loss, "target_momentum": torch.tensor(self.momentum, device=loss.device)}

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA with ``tau = 1 - (1 - base) * (cos(pi * k / K) + 1) / 2``, k = the step just taken."""
        hp = self.hparams
        self.momentum = cosine_momentum(step, total_steps, hp["base_momentum"], hp["final_momentum"])
        ema_update(self.target_backbone, self.backbone, self.momentum)
        ema_update(self.target_projector, self.projector, self.momentum)

    def train_transform(self, size: int):
        """Two views; volumes get the 3-D views (crop, flips, jitter, noise: no blur, so ``blur_p`` is unused)."""
        if spatial_dims_of(self.backbone) == 3:
            return TwoViewTransform3d(size, scale=tuple(self.hparams["crop_scale"]))
        return TwoViewTransform(size, scale=tuple(self.hparams["crop_scale"]), blur_p=tuple(self.hparams["blur_p"]))
