"""SwAV (Caron et al., 2020): swapped prediction of Sinkhorn-Knopp prototype assignments, multi-crop."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import MultiCropTransform
from ..models.heads import MLPHead, Prototypes
from . import distributed as dist
from .base import SSLMethod, as_views, pooled_features


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Equipartitioned soft assignments ``(B, K)`` of ``B`` samples to ``K`` prototypes.

    Alternately normalises ``exp(scores / epsilon)`` so every prototype receives ``B/K`` of the
    mass and every sample a total of 1 (the sample normalisation comes last, so each row of
    the result sums to 1 exactly, the prototype totals approach ``B/K``). Under
    ``torch.distributed`` the sums run over the samples of all ranks.
    """
    scores = scores.float()
    top = scores.max().clone()
    dist.all_reduce(top, "max")  # one shift for all ranks keeps the result exact and exp finite
    q = torch.exp((scores - top) / epsilon).t()  # (K, B)
    k, b = q.shape[0], q.shape[1] * dist.world_size()
    q /= dist.all_reduce(q.sum())
    for _ in range(iterations):
        q /= dist.all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def swapped_prediction_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over assigned crops i and other crops v of ``-sum(q_i * log softmax(s_v / T))``.

    ``scores``: every crop's prototype scores ``(B, K)``; ``codes``: the assignments of the
    first ``len(codes)`` crops.
    """
    total = 0.0
    for i, q in enumerate(codes):
        others = [v for v in range(len(scores)) if v != i]
        sub = sum(-(q * F.log_softmax(scores[v].float() / temperature, dim=1)).sum(dim=1).mean() for v in others)
        total = total + sub / len(others)
    return total / len(codes)


class FeatureQueue(nn.Module):
    """Per assigned crop, the latest ``length`` embeddings (newest first) to enlarge Sinkhorn's batch.

    Each rank keeps its own queue, as SwAV does: wrap the method in DDP with
    ``broadcast_buffers=False`` so rank 0's queue is not copied onto the others.
    """

    def __init__(self, crops: int, length: int, dim: int):
        super().__init__()
        self.register_buffer("features", torch.zeros(crops, length, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def length(self) -> int:
        return self.features.shape[1]

    @property
    def full(self) -> bool:
        return self.length > 0 and int(self.filled) >= self.length

    @torch.no_grad()
    def push(self, z: list[torch.Tensor]) -> None:
        n = z[0].shape[0]
        for i, zi in enumerate(z):
            self.features[i] = torch.cat([zi.detach().to(self.features.dtype), self.features[i]])[: self.length]
        self.filled.copy_(torch.clamp(self.filled + n, max=self.length))


class SwAV(SSLMethod):
    name = "swav"
    default_hparams = {
        # seed paper: batch 128, LARS, 500 prototypes, prototypes frozen at first, 2x224 (0.9-1) + 6x96 (0.1-0.33);
        # SwAV small-batch setting: lr 0.6 x batch/256 to 1/1000 of it, wd 1e-6, queue 3840 from epoch 15
        "batch_size": 128, "optimizer": "lars", "base_lr": 0.6, "lr_batch_ref": 256, "min_lr_ratio": 1e-3,
        "weight_decay": 1e-6, "weight_decay_end": None, "warmup_epochs": 0, "epochs": 200,
        "momentum": 0.9, "betas": None, "grad_clip": None, "drop_path_rate": 0.0, "steps_per_epoch": None,
        "input_size": 224,
        "num_prototypes": 500, "temperature": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3,
        "proj_hidden_dim": None, "proj_dim": 128,
        "n_global_crops": 2, "n_local_crops": 6, "local_size": None,
        "global_scale": (0.9, 1.0), "local_scale": (0.1, 0.33),
        "queue_length": 3840, "queue_start_epochs": 15, "queue_start_steps": None,
        "freeze_prototypes_epochs": 1, "freeze_prototypes_steps": None,
    }

    def __init__(self, encoder: nn.Module, backend: str = "auto", **hparams):
        super().__init__(encoder, backend, **hparams)
        hp = self.hparams
        if hp["n_global_crops"] < 1 or hp["n_global_crops"] + hp["n_local_crops"] < 2:
            raise ValueError(f"swav: needs >= 1 global crop and >= 2 crops, got {hp['n_global_crops']} global "
                             f"and {hp['n_local_crops']} local")
        feat = encoder.num_features
        self.projector = MLPHead(feat, hp["proj_hidden_dim"] or feat, hp["proj_dim"], batch_norm=True)
        self.prototypes = Prototypes(hp["proj_dim"], hp["num_prototypes"])
        self.queue = FeatureQueue(hp["n_global_crops"], int(hp["queue_length"] or 0), hp["proj_dim"])
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        # total_steps / epochs as seen by after_step (0: not known yet); kept in checkpoints
        self.register_buffer("inferred_steps_per_epoch", torch.zeros((), dtype=torch.long))

    def _schedule_steps(self, key: str) -> int | None:
        """``<key>_steps`` if given, else ``<key>_epochs`` x steps per epoch (None while unknown)."""
        hp = self.hparams
        if hp[f"{key}_steps"] is not None:
            return int(hp[f"{key}_steps"])
        per_epoch = hp["steps_per_epoch"] or int(self.inferred_steps_per_epoch)
        return None if not per_epoch else int(round(hp[f"{key}_epochs"] * per_epoch))

    def prototypes_frozen(self, step: int) -> bool:
        steps = self._schedule_steps("freeze_prototypes")
        if steps is None:  # before the first after_step: frozen iff any freezing was asked for
            return self.hparams["freeze_prototypes_epochs"] > 0
        return step < steps

    def _queue_started(self) -> bool:
        start = self._schedule_steps("queue_start")
        return self.queue.length > 0 and start is not None and int(self.steps_done) >= start

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Unit embeddings of all crops ``(V * B, D)``; crops of one resolution share a forward pass."""
        feats, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(pooled_features(self.backbone, torch.cat(views[start:end])))
            start = end
        return F.normalize(self.projector(torch.cat(feats)).float(), dim=1)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        hp = self.hparams
        n_global = hp["n_global_crops"]
        views = as_views(batch, self.name, min_views=max(2, n_global))
        if self.training:
            self.prototypes.normalize_()
        b = views[0].shape[0]
        z = self.embed(views)
        scores = list(self.prototypes(z).split(b))
        use_queue = self._queue_started() and self.queue.full
        codes = []
        with torch.no_grad():
            for i in range(n_global):
                s = scores[i].detach()
                if use_queue:
                    s = torch.cat([self.prototypes(self.queue.features[i]), s])
                codes.append(sinkhorn(s, hp["epsilon"], hp["sinkhorn_iterations"])[-b:])
        loss = swapped_prediction_loss(scores, codes, hp["temperature"])
        if self.training and self._queue_started():
            self.queue.push([z[i * b:(i + 1) * b] for i in range(n_global)])
        return {"loss": loss, "queue_used": torch.tensor(float(use_queue), device=loss.device)}

    def on_after_backward(self, step: int) -> None:
        """While frozen, drop the prototypes' gradients so no optimizer (nor weight decay) moves them."""
        if self.prototypes_frozen(step):
            for p in self.prototypes.parameters():
                p.grad = None

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(step + 1)
        if self.hparams["steps_per_epoch"] is None and self.hparams["epochs"]:
            self.inferred_steps_per_epoch.fill_(max(1, -(-total_steps // int(self.hparams["epochs"]))))

    def train_transform(self, size: int):
        hp = self.hparams
        local = hp["local_size"] or max(1, round(size * 96 / 224))
        return MultiCropTransform(global_size=size, local_size=local, n_global=hp["n_global_crops"],
                                  n_local=hp["n_local_crops"], global_scale=tuple(hp["global_scale"]),
                                  local_scale=tuple(hp["local_scale"]))
