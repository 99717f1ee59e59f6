"""Modules with torch's names and state_dicts that run densely or on sparse maps."""
from .activation import GELU, ReLU, ReLU6
from .batchnorm import BatchNorm2d, SyncBatchNorm, convert_sync_batchnorm
from .conv import Conv2d
from .drop_path import DropPath
from .layernorm import LayerNorm, LayerNorm2d
from .linear import Linear
from .pooling import AvgPool2d, MaxPool2d

__all__ = ["Conv2d", "BatchNorm2d", "SyncBatchNorm", "convert_sync_batchnorm", "MaxPool2d", "AvgPool2d",
           "ReLU", "ReLU6", "GELU", "DropPath", "LayerNorm", "LayerNorm2d", "Linear"]
