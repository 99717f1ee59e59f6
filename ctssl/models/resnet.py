"""ResNet encoders for images (ResNet-18/34/50/101/152) and volumes (ResNet-18/34/50-3D) that run
densely or on SparK's masked input.

Module names and parameter shapes are torchvision's (v1.5: stride on the 3x3 conv
of a bottleneck), so torchvision and timm checkpoints load with ``strict=True`` and
an exported backbone loads back into ``torchvision.models.resnet50``. The 3-D encoders
are the same network with 3-D layers (7x7x7 stem, 3x3x3 and 1x1x1 convs), under the same
key names (those of MedicalNet's 3-D ResNets). Every layer is a ``ctssl.sparse.modules``
module, so the same forward code runs on a dense batch or on a ``SparseTensor`` of any backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..sparse.backends import Backend
from ..sparse.backends.base import RESNET_OPS
from ..sparse.modules import (
    BatchNorm2d,
    BatchNorm3d,
    Conv2d,
    Conv3d,
    DropPath,
    InstanceNorm3d,
    MaxPool2d,
    MaxPool3d,
    ReLU,
)
from .registry import create_encoder, masked_forward, register_encoder


@dataclass(frozen=True)
class Parts:
    """The layers of one dimensionality and norm: the blocks and the ResNet are written once against them."""

    ndim: int
    conv: type[nn.Module]
    norm: Callable[[int], nn.Module]
    max_pool: type[nn.Module]
    global_pool: type[nn.Module]


NORMS = ("batch", "instance")


def parts(ndim: int = 2, norm: str = "batch") -> Parts:
    """The layers of a ResNet on images (``ndim`` 2) or volumes (3), normalised by ``norm``."""
    if ndim not in (2, 3):
        raise ValueError(f"ResNet: spatial_dims must be 2 (images) or 3 (volumes), got {ndim}")
    if norm not in NORMS:
        raise ValueError(f"ResNet: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if ndim == 2:
        if norm != "batch":
            raise ValueError(f"ResNet: norm={norm!r} is for the 3-D ResNets; 2-D ResNets use norm='batch'")
        return Parts(2, Conv2d, BatchNorm2d, MaxPool2d, nn.AdaptiveAvgPool2d)
    return Parts(3, Conv3d, BatchNorm3d if norm == "batch" else _affine_instance_norm, MaxPool3d,
                 nn.AdaptiveAvgPool3d)


def _affine_instance_norm(channels: int) -> nn.Module:
    """nnU-Net's InstanceNorm: a learned scale and shift per channel, no running statistics."""
    return InstanceNorm3d(channels, affine=True)


PARTS_2D = parts(2)


def conv3x3(cin: int, cout: int, stride: int = 1, parts: Parts = PARTS_2D) -> nn.Module:
    return parts.conv(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1, parts: Parts = PARTS_2D) -> nn.Module:
    return parts.conv(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path: float = 0.0, parts: Parts = PARTS_2D):
        super().__init__()
        self.conv1 = conv3x3(cin, width, stride, parts)
        self.bn1 = parts.norm(width)
        self.relu = ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, 1, parts)
        self.bn2 = parts.norm(width)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path: float = 0.0, parts: Parts = PARTS_2D):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv1x1(cin, width, 1, parts)
        self.bn1 = parts.norm(width)
        self.conv2 = conv3x3(width, width, stride, parts)
        self.bn2 = parts.norm(width)
        self.conv3 = conv1x1(width, cout, 1, parts)
        self.bn3 = parts.norm(cout)
        self.relu = ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A torchvision-compatible ResNet on images or volumes whose stages can run on visible patches only.

    ``forward(images)`` is the ordinary dense classifier; ``forward_features(images)``
    returns the four stage maps (strides 4, 8, 16, 32); ``forward_masked(images,
    active, backend)`` returns the same maps computed with SparK's masked semantics.
    ``spatial_dims`` 3 makes every layer 3-D (inputs ``(B, C, D, H, W)``).
    """

    patch_size = 32  # total downsampling: SparK's patch size for this encoder
    densify_norm = "batch_norm"  # SparK densifies ResNet features with a sparse BatchNorm

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], num_classes: int = 1000,
                 in_chans: int = 3, drop_path_rate: float = 0.0, zero_init_residual: bool = False, *,
                 spatial_dims: int = 2, norm: str = "batch"):
        super().__init__()
        p = parts(spatial_dims, norm)
        self.spatial_dims = spatial_dims
        self.norm = norm
        self.inplanes = 64
        self.in_chans = in_chans
        self.conv1 = p.conv(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1 = p.norm(64)
        self.relu = ReLU(inplace=True)
        self.maxpool = p.max_pool(3, 2, 1)
        total_blocks = sum(layers)
        rates = torch.linspace(0, drop_path_rate, total_blocks, device="cpu").tolist() if total_blocks else []
        start = 0
        stages = []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stages.append(self._make_layer(block, width, n, 1 if i == 0 else 2, rates[start:start + n], p))
            start += n
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = p.global_pool(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.feature_channels = tuple(w * block.expansion for w in (64, 128, 256, 512))
        self.feature_strides = (4, 8, 16, 32)
        self.num_features = self.feature_channels[-1]
        self._init_weights(zero_init_residual)

    @property
    def sparse_ops(self) -> frozenset[str]:
        """The engine ops of the masked forward (InstanceNorm instead of BatchNorm with ``norm="instance"``)."""
        return RESNET_OPS if self.norm == "batch" else (RESNET_OPS - {"batch_norm"}) | {"instance_norm"}

    def _make_layer(self, block, width: int, blocks: int, stride: int, rates: list[float],
                    p: Parts) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, width * block.expansion, stride, p),
                                       p.norm(width * block.expansion))
        layers = [block(self.inplanes, width, stride, downsample, rates[0] if rates else 0.0, parts=p)]
        self.inplanes = width * block.expansion
        for i in range(1, blocks):
            layers.append(block(self.inplanes, width, drop_path=rates[i], parts=p))
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _stages(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Dense stage maps at strides 4, 8, 16, 32."""
        return self._stages(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._stages(images)[-1]
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_masked(self, images: torch.Tensor, active: torch.Tensor, backend: str | Backend = "dense",
                       *, return_sparse: bool = False, check_finite: bool = True):
        """SparK's sparse forward: the four stage maps computed from visible patches only.

        ``active`` is a boolean ``(B, H/32, W/32)`` patch mask (``(B, D/32, H/32, W/32)`` for volumes).
        Returns dense maps with zeros at masked positions, or the ``SparseTensor`` maps with ``return_sparse``.
        """
        return masked_forward(self, images, active, backend, return_sparse=return_sparse, check_finite=check_finite)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)


def _resnet(block, layers, **kwargs) -> ResNet:
    return ResNet(block, layers, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return _resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    return _resnet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
    return _resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    return _resnet(Bottleneck, (3, 4, 23, 3), **kwargs)


def resnet152(**kwargs) -> ResNet:
    return _resnet(Bottleneck, (3, 8, 36, 3), **kwargs)


def _resnet_3d(block, layers, **kwargs) -> ResNet:
    kwargs.setdefault("in_chans", 1)
    return ResNet(block, layers, spatial_dims=3, **kwargs)


def resnet18_3d(**kwargs) -> ResNet:
    """ResNet-18 on volumes ``(B, 1, D, H, W)``; ``norm="batch"`` (default) or ``"instance"``."""
    return _resnet_3d(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34_3d(**kwargs) -> ResNet:
    return _resnet_3d(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50_3d(**kwargs) -> ResNet:
    return _resnet_3d(Bottleneck, (3, 4, 6, 3), **kwargs)


RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
           "resnet152": resnet152}
RESNETS_3D = {"resnet18_3d": resnet18_3d, "resnet34_3d": resnet34_3d, "resnet50_3d": resnet50_3d}
for _name, _factory in RESNETS.items():
    register_encoder(_name, _factory)
for _name, _factory in RESNETS_3D.items():
    register_encoder(_name, _factory, spatial_dims=3)


def create_resnet(name: str, **kwargs) -> ResNet:
    if name not in RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {', '.join(RESNETS)}")
    return create_encoder(name, **kwargs)
