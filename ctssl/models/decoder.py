"""SparK's light UNet decoder: dense upsampling from the stride-32 map back to pixels.

Widths halve at every block: ``width, width/2, ..., width/32`` (768 -> 24 for the paper's
768). Densified encoder features (smallest first, widths ``width / 2**i``) are added
before the block at their scale; a final 1x1 conv maps to the image channels. The same
decoder decodes volumes with ``spatial_dims=3`` (3-D transposed convs, convs and BN).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

_LAYERS = {2: (nn.ConvTranspose2d, nn.Conv2d, nn.BatchNorm2d), 3: (nn.ConvTranspose3d, nn.Conv3d, nn.BatchNorm3d)}
"""(transposed conv, conv, batch norm) of images (2) and volumes (3)."""


def decoder_layers(spatial_dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """The dense layers of a decoder over ``spatial_dims`` (2: images, 3: volumes)."""
    if spatial_dims not in _LAYERS:
        raise ValueError(f"LightDecoder: spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims}")
    return _LAYERS[spatial_dims]


class UpBlock(nn.Sequential):
    """``ConvTranspose(k4, s2)`` (doubles the size), 3x3 conv + BN + ReLU6, 3x3 conv + BN (3x3x3 in 3-D)."""

    def __init__(self, cin: int, cout: int, spatial_dims: int = 2):
        up, conv, norm = decoder_layers(spatial_dims)
        super().__init__(
            up(cin, cin, kernel_size=4, stride=2, padding=1, bias=True),
            conv(cin, cin, 3, 1, 1, bias=False),
            norm(cin),
            nn.ReLU6(inplace=True),
            conv(cin, cout, 3, 1, 1, bias=False),
            norm(cout),
        )


class LightDecoder(nn.Module):
    """``num_blocks`` up-blocks from ``width`` channels at stride ``2**num_blocks`` to ``out_chans`` at stride 1,
    over images (``spatial_dims`` 2) or volumes (3)."""

    def __init__(self, width: int = 768, out_chans: int = 3, num_blocks: int = 5, spatial_dims: int = 2):
        super().__init__()
        if width % (2 ** num_blocks):
            raise ValueError(f"LightDecoder: width {width} must be divisible by 2**num_blocks = {2 ** num_blocks}")
        _, conv, _ = decoder_layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.widths = [width // 2 ** i for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(UpBlock(a, b, spatial_dims) for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.proj = conv(self.widths[-1], out_chans, kernel_size=1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SparK's initialisation: truncated normal (std 0.02) convs, zero biases, unit BN."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features[i]``: ``(B, width / 2**i, h * 2**i, w * 2**i)`` (a depth too in 3-D), smallest first; at most
        ``num_blocks``."""
        if not 1 <= len(features) <= len(self.blocks):
            raise ValueError(f"LightDecoder: expected 1..{len(self.blocks)} feature maps, got {len(features)}")
        x = None
        for i, block in enumerate(self.blocks):
            if i < len(features):
                f = features[i]
                if (f.dim() != self.spatial_dims + 2 or f.shape[1] != self.widths[i]
                        or (x is not None and f.shape[2:] != x.shape[2:])):
                    raise ValueError(
                        f"LightDecoder: feature {i} has shape {tuple(f.shape)}, expected {self.spatial_dims}-D maps "
                        f"of {self.widths[i]} channels" + ("" if x is None else f" at {tuple(x.shape[2:])}"))
                x = f if x is None else x + f
            x = block(x)
        return self.proj(x)
