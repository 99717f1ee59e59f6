"""Modules with torch's names and state_dicts that run densely or on sparse maps (images or volumes)."""
from .activation import GELU, LeakyReLU, ReLU, ReLU6
from .batchnorm import BatchNorm2d, BatchNorm3d, SyncBatchNorm, convert_sync_batchnorm
from .conv import Conv2d, Conv3d
from .drop_path import DropPath
from .instancenorm import InstanceNorm3d
from .layernorm import LayerNorm, LayerNorm2d
from .linear import Linear
from .pooling import AvgPool2d, AvgPool3d, MaxPool2d, MaxPool3d

__all__ = ["Conv2d", "Conv3d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert_sync_batchnorm",
           "InstanceNorm3d", "MaxPool2d", "MaxPool3d", "AvgPool2d", "AvgPool3d", "ReLU", "ReLU6", "LeakyReLU", "GELU",
           "DropPath", "LayerNorm", "LayerNorm2d", "Linear"]
