"""Stochastic depth on a residual branch, for dense and sparse maps alike."""
from __future__ import annotations

import torch
from torch import nn

from ..tensor import SparseTensor


class DropPath(nn.Module):
    """Zero a whole image's branch with probability ``p`` in training, scaling survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        batch = x.index.batch_size if isinstance(x, SparseTensor) else x.shape[0]
        device = x.device
        keep = torch.empty(batch, device=device).bernoulli_(1.0 - self.p) / (1.0 - self.p)
        if isinstance(x, SparseTensor):
            return x.backend.scale_samples(x, keep)
        return x * keep.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"
