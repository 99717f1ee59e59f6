"""SparK's light UNet decoder: dense upsampling from the stride-32 map back to pixels.

Widths halve at every block: ``width, width/2, ..., width/32`` (768 -> 24 for the paper's
768). Densified encoder features (smallest first, widths ``width / 2**i``) are added
before the block at their scale; a final 1x1 conv maps to the image channels.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class UpBlock(nn.Sequential):
    """``ConvTranspose2d(k4, s2)`` (doubles the size), 3x3 conv + BN + ReLU6, 3x3 conv + BN."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True),
            nn.Conv2d(cin, cin, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )


class LightDecoder(nn.Module):
    """``num_blocks`` up-blocks from ``width`` channels at stride ``2**num_blocks`` to ``out_chans`` at stride 1."""

    def __init__(self, width: int = 768, out_chans: int = 3, num_blocks: int = 5):
        super().__init__()
        if width % (2 ** num_blocks):
            raise ValueError(f"LightDecoder: width {width} must be divisible by 2**num_blocks = {2 ** num_blocks}")
        self.widths = [width // 2 ** i for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(UpBlock(a, b) for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.proj = nn.Conv2d(self.widths[-1], out_chans, kernel_size=1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SparK's initialisation: truncated normal (std 0.02) convs, zero biases, unit BN."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features[i]``: ``(B, width / 2**i, h * 2**i, w * 2**i)``, smallest first; at most ``num_blocks``."""
        if not 1 <= len(features) <= len(self.blocks):
            raise ValueError(f"LightDecoder: expected 1..{len(self.blocks)} feature maps, got {len(features)}")
        x = None
        for i, block in enumerate(self.blocks):
            if i < len(features):
                f = features[i]
                if f.shape[1] != self.widths[i] or (x is not None and f.shape[-2:] != x.shape[-2:]):
                    raise ValueError(
                        f"LightDecoder: feature {i} has shape {tuple(f.shape)}, expected {self.widths[i]} channels"
                        + ("" if x is None else f" at {tuple(x.shape[-2:])}"))
                x = f if x is None else x + f
            x = block(x)
        return self.proj(x)
