"""Elementwise activations that also take sparse maps (they map 0 to 0, so masks survive)."""
from __future__ import annotations

from torch import nn

from ..tensor import SparseTensor


class ReLU(nn.ReLU):
    def forward(self, x):
        if isinstance(x, SparseTensor):
            return x.backend.relu(x, self.inplace)
        return super().forward(x)


class ReLU6(nn.ReLU6):
    def forward(self, x):
        if isinstance(x, SparseTensor):
            return x.backend.relu6(x, self.inplace)
        return super().forward(x)


class LeakyReLU(nn.LeakyReLU):
    """The activation of nnU-Net-style encoders (negative slope 0.01 by default)."""

    def forward(self, x):
        if isinstance(x, SparseTensor):
            return x.backend.leaky_relu(x, self.negative_slope, self.inplace)
        return super().forward(x)


class GELU(nn.GELU):
    def forward(self, x):
        if isinstance(x, SparseTensor):
            return x.backend.gelu(x, self.approximate)
        return super().forward(x)
