"""SparK's light UNet decoder: dense upsampling from the stride-32 map back to pixels.

Widths halve at every block: ``width, width/2, ..., width/32`` (768 -> 24 for the paper's
768). Densified encoder features (smallest first, widths ``width / 2**i``) are added
before the block at their scale; a final 1x1 conv maps to the image channels. The same
decoder decodes volumes with ``spatial_dims=3`` (3-D transposed convs, convs and BN).

Once the encoder runs sparse, this dense decoder dominates a SparK step, so it comes in exact
alternatives (``impl``, ``DECODER_IMPLS``; joined with ``+``): ``channels-last`` (activations enter
channels-last in the autocast dtype), ``subpixel`` (each transposed conv as ``2**n`` small sub-pixel
convs) and ``compiled`` (``torch.compile``: BN + ReLU6 fused). All hold the same parameters under the
same names, so checkpoints move freely between them.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DECODER_IMPLS = ("eager", "channels-last", "subpixel", "compiled")
"""The decoder's implementations; ``eager`` is plain PyTorch, the others combine with ``+``."""


def parse_decoder_impl(spec: str) -> frozenset[str]:
    """``"compiled+subpixel"`` -> ``{"compiled", "subpixel"}``; ``eager`` alone is the empty set."""
    parts = [p.strip() for p in str(spec).split("+") if p.strip()]
    unknown = [p for p in parts if p not in DECODER_IMPLS]
    if not parts or unknown:
        raise ValueError(f"decoder_impl {spec!r}: expected one of {', '.join(DECODER_IMPLS)} or several joined "
                         f"with '+' (e.g. compiled+subpixel)")
    if "eager" in parts and len(parts) > 1:
        raise ValueError(f"decoder_impl {spec!r}: eager is plain PyTorch and combines with nothing")
    return frozenset(parts) - {"eager"}


class _SubPixelMixin:
    """``ConvTranspose(k=4, s=2, p=1)`` computed as ``2**n`` convolutions of kernel 2 on the input (one per output
    phase), interleaved. Along one dimension output ``2m`` reads inputs ``m-1, m`` through taps 3, 1 and output
    ``2m + 1`` reads ``m, m+1`` through taps 2, 0. The parameters are the transposed conv's own (same names)."""

    def _check_subpixel(self) -> None:
        n = len(self.kernel_size)
        if (self.kernel_size, self.stride, self.padding, self.output_padding, self.dilation) != (
                (4,) * n, (2,) * n, (1,) * n, (0,) * n, (1,) * n) or self.groups != 1:
            raise ValueError(f"{type(self).__name__}: sub-pixel form needs kernel 4, stride 2, padding 1, no output "
                             f"padding, dilation 1 and groups 1; got kernel {self.kernel_size}, stride {self.stride}, "
                             f"padding {self.padding}, groups {self.groups}")

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is not None:
            raise ValueError(f"{type(self).__name__}: output_size is not supported (the output is always 2x)")
        n = x.dim() - 2
        conv = (F.conv2d, F.conv3d)[n - 2]
        sizes = x.shape[2:]
        padded = F.pad(x, (1, 1) * n)
        # (C_out, C_in, 4, ...) in the conv's layout, taps reversed: phase a of a dimension takes taps a, a + 2 of it
        flipped = self.weight.transpose(0, 1).flip(list(range(2, 2 + n)))
        phases = []
        for phase in itertools.product((0, 1), repeat=n):
            w = flipped[(slice(None), slice(None), *(slice(a, None, 2) for a in phase))]
            window = padded[(slice(None), slice(None), *(slice(a, a + s + 1) for a, s in zip(phase, sizes)))]
            phases.append(conv(window, w, self.bias))
        # (B, C, 2, ..., 2, *sizes) -> (B, C, s0, 2, s1, 2, ...) -> (B, C, 2 * s0, 2 * s1, ...)
        out = torch.stack(phases, dim=2).unflatten(2, (2,) * n)
        order = [0, 1, *(v for d in range(n) for v in (2 + n + d, 2 + d))]
        return out.permute(order).reshape(x.shape[0], -1, *(2 * s for s in sizes))


class SubPixelConvTranspose2d(_SubPixelMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(k=4, s=2, p=1)`` as four 2x2 convolutions (no scattered writes, no zero taps)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_subpixel()


class SubPixelConvTranspose3d(_SubPixelMixin, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d(k=4, s=2, p=1)`` as eight 2x2x2 convolutions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_subpixel()


_LAYERS = {2: (nn.ConvTranspose2d, nn.Conv2d, nn.BatchNorm2d), 3: (nn.ConvTranspose3d, nn.Conv3d, nn.BatchNorm3d)}
"""(transposed conv, conv, batch norm) of images (2) and volumes (3)."""
_SUBPIXEL = {2: SubPixelConvTranspose2d, 3: SubPixelConvTranspose3d}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def decoder_layers(spatial_dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """The dense layers of a decoder over ``spatial_dims`` (2: images, 3: volumes)."""
    if spatial_dims not in _LAYERS:
        raise ValueError(f"LightDecoder: spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims}")
    return _LAYERS[spatial_dims]


class UpBlock(nn.Sequential):
    """``ConvTranspose(k4, s2)`` (doubles the size), 3x3 conv + BN + ReLU6, 3x3 conv + BN (3x3x3 in 3-D);
    ``subpixel`` computes the transposed conv as sub-pixel convs (same parameters)."""

    def __init__(self, cin: int, cout: int, spatial_dims: int = 2, subpixel: bool = False):
        up, conv, norm = decoder_layers(spatial_dims)
        if subpixel:
            up = _SUBPIXEL[spatial_dims]
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
    over images (``spatial_dims`` 2) or volumes (3), computed as ``impl`` says (``DECODER_IMPLS``)."""

    def __init__(self, width: int = 768, out_chans: int = 3, num_blocks: int = 5, spatial_dims: int = 2,
                 impl: str = "eager"):
        super().__init__()
        if width % (2 ** num_blocks):
            raise ValueError(f"LightDecoder: width {width} must be divisible by 2**num_blocks = {2 ** num_blocks}")
        _, conv, _ = decoder_layers(spatial_dims)
        self.impl = impl
        self.options = options = parse_decoder_impl(impl)
        self.spatial_dims = spatial_dims
        self.channels_last = "channels-last" in options
        self.widths = [width // 2 ** i for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(UpBlock(a, b, spatial_dims, subpixel="subpixel" in options)
                                    for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.proj = conv(self.widths[-1], out_chans, kernel_size=1, bias=True)
        self.reset_parameters()
        if self.channels_last:
            self.to(memory_format=_CHANNELS_LAST[spatial_dims])
        if "compiled" in options:
            self.compile()  # in place: the parameters keep their names (no ``_orig_mod.`` prefix)

    def __setstate__(self, state) -> None:
        """A copy (``copy.deepcopy``, pickle) of a compiled decoder is compiled too (torch drops the compiled call)."""
        super().__setstate__(state)
        if "compiled" in self.options and getattr(self, "_compiled_call_impl", None) is None:
            self.compile()

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

    def _entering(self, f: torch.Tensor) -> torch.Tensor:
        """A feature map as the decoder computes: unchanged for ``eager``; channels-last in the autocast dtype for
        ``channels-last``, so no layer converts it again."""
        if not self.channels_last:
            return f
        if torch.is_autocast_enabled(f.device.type) and f.is_floating_point():
            f = f.to(torch.get_autocast_dtype(f.device.type))
        return f.contiguous(memory_format=_CHANNELS_LAST[self.spatial_dims])

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
                f = self._entering(f)
                x = f if x is None else x + f
            x = block(x)
        return self.proj(x)
