"""Projection/prediction MLPs and SwAV's prototypes for the contrastive methods.

The heads sit on the pooled backbone features ``(B, num_features)``. Their BatchNorm1d
layers are converted to ``nn.SyncBatchNorm`` by ``SSLMethod.convert_sync_batchnorm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Sequential):
    """``Linear -> [BN] -> ReLU -> Linear`` (``num_layers`` linears, ReLU between them).

    MoCo v2: no BN; SimCLR, BYOL, SwAV: BN after every hidden linear. ``last_bn`` adds an
    affine-free BN on the output (off for all four methods' published settings).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True, last_bn: bool = False):
        if num_layers < 1:
            raise ValueError(f"MLPHead: num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


class Prototypes(nn.Module):
    """SwAV's prototype vectors: a bias-free linear layer whose rows are kept unit-norm.

    ``normalize_()`` projects the rows back onto the sphere (called once per step, before
    the forward pass), so the scores are cosine similarities of unit embeddings.
    """

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.normal_(self.weight)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))

    @property
    def num_prototypes(self) -> int:
        return self.weight.shape[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.t()
