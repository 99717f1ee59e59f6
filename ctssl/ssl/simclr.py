"""SimCLR (Chen et al., 2020): two views, a projection MLP, and the NT-Xent loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import TwoViewTransform, TwoViewTransform3d
from ..models.heads import MLPHead
from . import distributed as dist
from .base import SSLMethod, as_views, pooled_features, spatial_dims_of


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Normalised-temperature cross entropy over both views of every image.

    Each of the ``2N`` local embeddings has its other view as positive and every other
    embedding of the (globally gathered) batch as negative. Under ``torch.distributed``
    the candidates are gathered from all ranks (gradient flows into the local slice).
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    n, r = z1.shape[0], dist.rank()
    all1, all2 = dist.all_gather_local_grad(z1), dist.all_gather_local_grad(z2)
    total = all1.shape[0]
    candidates = torch.cat([all1, all2])  # (2 * total, D)
    anchors = torch.cat([z1, z2])  # (2n, D)
    logits = anchors @ candidates.t() / temperature
    local = torch.arange(n, device=z1.device) + r * n
    own = torch.cat([local, local + total])
    positive = torch.cat([local + total, local])
    logits[torch.arange(2 * n, device=z1.device), own] = float("-inf")
    return F.cross_entropy(logits, positive)


class SimCLR(SSLMethod):
    name = "simclr"
    spatial_dims = (2, 3)
    default_hparams = {
        # SimCLR paper: LARS, lr 0.3 x batch/256, weight decay 1e-6, 10 warm-up epochs, temperature 0.1
        "batch_size": 256, "optimizer": "lars", "base_lr": 0.3, "lr_batch_ref": 256, "min_lr_ratio": 0.0,
        "weight_decay": 1e-6, "weight_decay_end": None, "warmup_epochs": 10, "epochs": 100,
        "momentum": 0.9, "betas": None, "grad_clip": None, "drop_path_rate": 0.0, "steps_per_epoch": None,
        "input_size": 224,
        "temperature": 0.1, "proj_hidden_dim": None, "proj_dim": 128, "crop_scale": (0.08, 1.0),
    }

    def __init__(self, encoder: nn.Module, backend: str = "auto", **hparams):
        super().__init__(encoder, backend, **hparams)
        hp = self.hparams
        feat = encoder.num_features
        self.projector = MLPHead(feat, hp["proj_hidden_dim"] or feat, hp["proj_dim"], batch_norm=True)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        v1, v2 = as_views(batch, self.name, spatial_dims=spatial_dims_of(self.backbone))[:2]
        if v1.shape != v2.shape:
            raise ValueError(f"simclr: the two views must have the same shape, got {tuple(v1.shape)} "
                             f"and {tuple(v2.shape)}")
        z = self.projector(pooled_features(self.backbone, torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent(z1, z2, self.hparams["temperature"])}

    def train_transform(self, size: int):
        if spatial_dims_of(self.backbone) == 3:
            return TwoViewTransform3d(size, scale=tuple(self.hparams["crop_scale"]))
        return TwoViewTransform(size, scale=tuple(self.hparams["crop_scale"]))
