"""Models: encoders that run densely or on masked input (by name: ``create_encoder``), SparK's decoder, heads."""
from .registry import ENCODERS, create_encoder, encoder_names, register_encoder
from .resnet import (RESNETS, BasicBlock, Bottleneck, ResNet, create_resnet, resnet18, resnet34, resnet50,
                     resnet101, resnet152)

__all__ = ["ENCODERS", "create_encoder", "encoder_names", "register_encoder", "ResNet", "BasicBlock", "Bottleneck", "RESNETS", "create_resnet", "resnet18", "resnet34", "resnet50",
           "resnet101", "resnet152"]
from .convnext import (CONVNEXTS, ConvNeXt, convnext_base, convnext_large, convnext_small,  # noqa: E402
                       convnext_tiny)
from .decoder import LightDecoder  # noqa: E402
from .heads import MLPHead, Prototypes  # noqa: E402

__all__ += ["ConvNeXt", "CONVNEXTS", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
            "LightDecoder", "MLPHead", "Prototypes"]
