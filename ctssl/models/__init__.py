"""Models: encoders that run densely or on masked input (by name: ``create_encoder``), SparK's decoder, heads."""
from .registry import ENCODERS, create_encoder, encoder_names, register_encoder
from .resnet import (RESNETS, BasicBlock, Bottleneck, ResNet, create_resnet, resnet18, resnet34, resnet50,
                     resnet101, resnet152)

__all__ = ["ENCODERS", "create_encoder", "encoder_names", "register_encoder", "ResNet", "BasicBlock", "Bottleneck", "RESNETS", "create_resnet", "resnet18", "resnet34", "resnet50",
           "resnet101", "resnet152"]
from .decoder import LightDecoder  # noqa: E402
from .heads import MLPHead, Prototypes  # noqa: E402

__all__ += ["LightDecoder", "MLPHead", "Prototypes"]
