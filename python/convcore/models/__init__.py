"""The model zoo: the lecture's CNNs and case studies, one module per family.

    classic      LeNet-5, AlexNet, ZFNet, VGG-16: chains in the lecture's
                 notation (SPECS), built by `convcore.build`
    resnet       ResNet-18/34 (the ResNet class), ResNeXt-50 32x4d,
                 Wide ResNet-50-2, SE-ResNet-50
    inception    GoogLeNet (Inception v1) and its Normalize layer
    mobilenet    MobileNet v1 and v2, EfficientNet-B0
    densenet     DenseNet-121
    nasnet       NASNet-A Mobile and Large (Keras' definition)

Every builder takes `num_classes` (a positive int) and `input_size` (an int,
(H, W) or (C, H, W)), checked the same way (models/_common.py); module names
are the references' (torchvision's, Keras' for NASNet), so their state dicts
load. `get(name, **kwargs)` builds a zoo model by name.
"""
from __future__ import annotations

from ..nn.module import Module
from .classic import SPECS, alexnet, lenet5, vgg16, zfnet
from .densenet import densenet121
from .inception import googlenet
from .mobilenet import efficientnet_b0, mobilenet_v1, mobilenet_v2
from .nasnet import nasnet_a_large, nasnet_a_mobile
from .resnet import ResNet, resnet18, resnet34, resnext50_32x4d, se_resnet50, wide_resnet50_2

__all__ = ["lenet5", "alexnet", "zfnet", "vgg16", "resnet18", "resnet34", "ResNet", "SPECS",
           "get", "googlenet", "mobilenet_v1", "mobilenet_v2", "resnext50_32x4d",
           "wide_resnet50_2", "densenet121", "se_resnet50", "efficientnet_b0",
           "nasnet_a_mobile", "nasnet_a_large"]

# name -> builder, in the zoo's order (python -m convcore summary, the benchmarks)
_ZOO = {"lenet5": lenet5, "alexnet": alexnet, "zfnet": zfnet, "vgg16": vgg16,
        "resnet18": resnet18, "resnet34": resnet34, "googlenet": googlenet,
        "mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2,
        "resnext50_32x4d": resnext50_32x4d, "wide_resnet50_2": wide_resnet50_2,
        "densenet121": densenet121, "se_resnet50": se_resnet50,
        "efficientnet_b0": efficientnet_b0, "nasnet_a_mobile": nasnet_a_mobile,
        "nasnet_a_large": nasnet_a_large}


def get(name: str, **kwargs) -> Module:
    """A zoo model by name."""
    if name not in _ZOO:
        raise ValueError(f"unknown model {name!r}; the zoo has {', '.join(_ZOO)}")
    return _ZOO[name](**kwargs)
