"""LayerNorm over channels that also takes sparse maps: same parameters and state_dict as ``nn.LayerNorm``."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..tensor import SparseTensor


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis (channels-last dense input); on a ``SparseTensor``,
    SparK's sparse LayerNorm: each visible position normalised over its channels, masked ones 0."""

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        if self.normalized_shape != (x.channels,):
            raise ValueError(f"{type(self).__name__}: normalizes over {self.normalized_shape}, the map has "
                             f"{x.channels} channels")
        return x.backend.layer_norm(x, self.weight, self.bias, self.eps)


class LayerNorm2d(LayerNorm):
    """timm's ``LayerNorm2d``: LayerNorm over the channels of a channels-first ``(B, C, *spatial)`` map
    (any number of spatial axes); on a ``SparseTensor`` the same as ``LayerNorm``."""

    def forward(self, x):
        if isinstance(x, SparseTensor):
            return super().forward(x)
        return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)
