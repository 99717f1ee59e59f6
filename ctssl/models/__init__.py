"""Models: encoders that run densely or on masked input (by name: ``create_encoder``), SparK's decoder, heads."""
from .registry import ENCODERS, create_encoder, encoder_names, register_encoder
from .resnet import (
    RESNETS,
    RESNETS_3D,
    BasicBlock,
    Bottleneck,
    ResNet,
    create_resnet,
    resnet18,
    resnet18_3d,
    resnet34,
    resnet34_3d,
    resnet50,
    resnet50_3d,
    resnet101,
    resnet152,
)

# isort: split
# (ResNets register first, so they lead every list of architectures)
from .convnext import CONVNEXTS, ConvNeXt, convnext_base, convnext_large, convnext_small, convnext_tiny
from .decoder import LightDecoder
from .heads import MLPHead, Prototypes

__all__ = ["ENCODERS", "create_encoder", "encoder_names", "register_encoder", "ResNet", "BasicBlock", "Bottleneck",
           "RESNETS", "RESNETS_3D", "create_resnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnet18_3d", "resnet34_3d", "resnet50_3d",
           "ConvNeXt", "CONVNEXTS", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
           "LightDecoder", "MLPHead", "Prototypes"]
