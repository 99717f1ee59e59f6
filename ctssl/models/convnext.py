"""ConvNeXt-T/S/B/L (V1) encoders that run densely or on SparK's masked input.

Module names and parameter shapes are timm's (``stem``, ``stages.i.downsample``,
``stages.i.blocks.j.{gamma, conv_dw, norm, mlp.fc1, mlp.fc2}``, ``head.{norm, fc}``),
so timm's ConvNeXt checkpoints load with ``strict=True``; ``load_state_dict`` also
takes the official ConvNeXt layout that SparK's released weights use
(``downsample_layers``, ``stages.i.j.{dwconv, pwconv1, pwconv2, gamma}``, ``norm``,
``head``). Every layer is a ``ctssl.sparse.modules`` module, so one forward runs on a
dense image batch or on a ``SparseTensor`` of any backend that has ConvNeXt's ops.

Masked semantics (SparK's sparse ConvNeXt): the stem (4x4/4) and downsampling (2x2/2)
convs and the depthwise 7x7 conv are masked convs; LayerNorm normalises each visible
position over its channels; Linear, GELU and layer scale act per position; masked
positions stay 0 throughout.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..sparse.backends import Backend
from ..sparse.backends.base import CONVNEXT_OPS
from ..sparse.functional import scale_channels, to_channels_first, to_channels_last
from ..sparse.modules import GELU, Conv2d, DropPath, LayerNorm, LayerNorm2d, Linear
from .registry import masked_forward, register_encoder
from .state_dicts import rename_key, unwrap_state_dict


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` over the channels of each position (timm's ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = GELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, then channels-last LayerNorm, MLP (4x) and layer scale; a residual add."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: float = 1e-6, kernel_size: int = 7):
        super().__init__()
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value > 0 else None
        self.conv_dw = Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = to_channels_last(x)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = scale_channels(x, self.gamma)
        x = to_channels_first(x)
        return self.drop_path(x) + shortcut


class ConvNeXtStage(nn.Module):
    """An optional downsampling (LayerNorm + 2x2/2 conv), then ``depth`` blocks."""

    def __init__(self, cin: int, cout: int, depth: int, downsample: bool, drop_path_rates: Sequence[float],
                 ls_init_value: float):
        super().__init__()
        self.downsample = (nn.Sequential(LayerNorm2d(cin, eps=1e-6), Conv2d(cin, cout, 2, 2)) if downsample
                           else nn.Identity())
        self.blocks = nn.Sequential(*[ConvNeXtBlock(cout, r, ls_init_value) for r in drop_path_rates])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """Global average pool, LayerNorm, Linear (timm's ``head.norm``, ``head.fc``)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean(dim=(-2, -1))))


class ConvNeXt(nn.Module):
    """A timm-compatible ConvNeXt whose stages can run on visible patches only.

    ``forward(images)`` is the ordinary dense classifier; ``forward_features(images)`` returns
    the four stage maps (strides 4, 8, 16, 32); ``forward_masked(images, active, backend)``
    returns the same maps computed with SparK's masked semantics.
    """

    patch_size = 32  # total downsampling: SparK's patch size for this encoder
    spatial_dims = 2
    sparse_ops = CONVNEXT_OPS
    densify_norm = "layer_norm"  # SparK densifies ConvNeXt features with a sparse LayerNorm

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
                 ls_init_value: float = 1e-6, head_init_scale: float = 1.0):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt: needs 4 stage depths and 4 widths, got {tuple(depths)} and {tuple(dims)}")
        self.in_chans = in_chans
        self.stem = nn.Sequential(Conv2d(in_chans, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.stages = nn.Sequential(*[
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], i > 0, r.tolist(), ls_init_value)
            for i, r in enumerate(rates)])
        self.head = ClassifierHead(dims[-1], num_classes)
        self.feature_channels = tuple(dims)
        self.feature_strides = (4, 8, 16, 32)
        self.num_features = dims[-1]
        self._init_weights(head_init_scale)

    def _init_weights(self, head_init_scale: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.fc.weight.mul_(head_init_scale)
            self.head.fc.bias.mul_(head_init_scale)

    def _stages(self, x):
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Dense stage maps at strides 4, 8, 16, 32."""
        return self._stages(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._stages(images)[-1])

    def forward_masked(self, images: torch.Tensor, active: torch.Tensor, backend: str | Backend = "dense",
                       *, return_sparse: bool = False, check_finite: bool = True):
        """SparK's sparse forward: the four stage maps computed from visible patches only.

        ``active`` is a boolean ``(B, H/32, W/32)`` patch mask. Returns dense maps with zeros
        at masked positions, or the ``SparseTensor`` maps with ``return_sparse``. A backend
        without ConvNeXt's ops (depthwise conv, LayerNorm, ...) is refused before anything runs.
        """
        return masked_forward(self, images, active, backend, return_sparse=return_sparse, check_finite=check_finite)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.head.fc = nn.Linear(self.num_features, num_classes)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also takes the official ConvNeXt / SparK key layout."""
        return super().load_state_dict(timm_layout(state_dict), strict=strict, assign=assign)


# --- the official ConvNeXt / SparK key layout ----------------------------------------------------

_OFFICIAL_TO_TIMM = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.(gamma|norm\.)", r"stages.\1.blocks.\2.\3"),
    (r"^norm\.", "head.norm."),
    (r"^(head|fc)\.(weight|bias)$", r"head.fc.\2"),  # official: head; SparK's pre-training model: fc
]


def is_official_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("downsample_layers.") for k in state_dict)


def timm_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ConvNeXt state_dict in timm's key layout: official / SparK keys renamed, timm keys kept.

    Accepts the wrappers released checkpoints come in (``{"model": ...}``, ``{"module": ...}``,
    ``{"state_dict": ...}``) and a ``module.`` prefix (DDP).
    """
    state_dict = unwrap_state_dict(state_dict) or state_dict
    out = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if not is_official_layout(out):
        return out
    return {rename_key(key, _OFFICIAL_TO_TIMM): value for key, value in out.items()}


# --- constructors --------------------------------------------------------------------------------

def convnext_tiny(**kwargs) -> ConvNeXt:
    return ConvNeXt((3, 3, 9, 3), (96, 192, 384, 768), **kwargs)


def convnext_small(**kwargs) -> ConvNeXt:
    return ConvNeXt((3, 3, 27, 3), (96, 192, 384, 768), **kwargs)


def convnext_base(**kwargs) -> ConvNeXt:
    return ConvNeXt((3, 3, 27, 3), (128, 256, 512, 1024), **kwargs)


def convnext_large(**kwargs) -> ConvNeXt:
    return ConvNeXt((3, 3, 27, 3), (192, 384, 768, 1536), **kwargs)


CONVNEXTS = {"convnext_tiny": convnext_tiny, "convnext_small": convnext_small, "convnext_base": convnext_base,
             "convnext_large": convnext_large}
for _name, _factory in CONVNEXTS.items():
    register_encoder(_name, _factory)
