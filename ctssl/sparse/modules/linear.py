"""Linear over channels that also takes sparse maps: same parameters and state_dict as ``nn.Linear``."""
from __future__ import annotations

from torch import nn

from ..tensor import SparseTensor


class Linear(nn.Linear):
    """``nn.Linear`` on the last axis of a dense tensor; on a ``SparseTensor``, the same map at every
    visible position (a 1x1 conv), masked positions staying 0 (the bias is not added there)."""

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        if x.channels != self.in_features:
            raise ValueError(f"Linear: expected {self.in_features} input channels, got {x.channels}")
        return x.backend.linear(x, self.weight, self.bias)
