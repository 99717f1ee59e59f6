"""Tiny configurations of every method (ResNet-18, grey 64x64 images) for fast CPU tests."""
from __future__ import annotations

import torch

from ctssl.models import resnet18
from ctssl.ssl import create_method

SIZE = 64

TINY_HPARAMS = {
    "spark": {"decoder_width": 64},
    "simclr": {"proj_hidden_dim": 64, "proj_dim": 32},
    "mocov2": {"proj_hidden_dim": 64, "proj_dim": 32, "queue_size": 16, "key_momentum": 0.99},
    "byol": {"proj_hidden_dim": 64, "pred_hidden_dim": 64, "proj_dim": 32},
    "swav": {"proj_hidden_dim": 64, "proj_dim": 32, "num_prototypes": 16, "n_local_crops": 2,
             "local_size": 32, "queue_length": 0, "freeze_prototypes_steps": 0},
}


def tiny_method(name: str, seed: int = 0, in_chans: int = 1, backend: str = "torch", **overrides):
    torch.manual_seed(seed)
    return create_method(name, resnet18(in_chans=in_chans), backend=backend, **{**TINY_HPARAMS[name], **overrides})


def images(batch: int = 4, channels: int = 1, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (a blurred noise field, so patches have structure)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def make_batch(method, x: torch.Tensor, seed: int = 0):
    """What the DataLoader's default collate makes of ``method.train_transform`` applied per image."""
    transform = method.train_transform(x.shape[-1])
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.default_collate([transform(xi, generator=g) for xi in x])
