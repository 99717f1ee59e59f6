"""Layout helpers that let one model forward run on dense maps and on sparse maps.

A ConvNeXt block works channels-last between its depthwise conv and its residual add
(LayerNorm, Linear, GELU, layer scale on the last axis). On a dense map that is a permute;
a ``SparseTensor`` is left as it is (its ops know their channel axis), so the same forward
code serves both.
"""
from __future__ import annotations

import torch

from .tensor import SparseTensor


def to_channels_last(x):
    """``(B, C, *spatial)`` -> ``(B, *spatial, C)`` (a view); a sparse map unchanged."""
    return x if isinstance(x, SparseTensor) else x.movedim(1, -1)


def to_channels_first(x):
    """``(B, *spatial, C)`` -> ``(B, C, *spatial)`` (a view); a sparse map unchanged."""
    return x if isinstance(x, SparseTensor) else x.movedim(-1, 1)


def scale_channels(x, scale: torch.Tensor):
    """Channel c times ``scale[c]`` (layer scale): on a channels-last dense tensor or a sparse map."""
    if isinstance(x, SparseTensor):
        return x.backend.scale_channels(x, scale)
    return x * scale
