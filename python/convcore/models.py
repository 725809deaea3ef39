"""The model zoo: the lecture's classic CNNs.

Chains (LeNet-5, AlexNet, ZFNet, VGG-16) are written in the lecture's
notation and built by `convcore.build`; ResNets are built from residual
blocks with torchvision's structure and parameter names.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .builder import Network, build
from .nn import init
from .nn.layers import AdaptiveAvgPool2d, Conv2d, Linear, MaxPool2d
from .nn.lowering import cannot_lower, join
from .nn.module import Module, Sequential
from .nn.norm import BatchNorm2d
from .nn.residual import BasicBlock, Bottleneck

__all__ = ["lenet5", "alexnet", "zfnet", "vgg16", "resnet18", "resnet34", "ResNet", "SPECS",
           "get"]

# The lecture's notation; FC sizes of the head are filled in per num_classes.
SPECS = {
    # LeNet-5 (LeCun et al. 1998) with ReLU and max pooling: 32x32 -> 28 -> 14 -> 10 -> 5.
    "lenet5": "CONV5-6/p0-RELU-POOL2-CONV5-16/p0-RELU-POOL2-FC-120-RELU-FC-84-RELU-FC-{classes}",
    # The notes' "Full (simplified) AlexNet architecture", 227x227x3 input.
    "alexnet": ("CONV11-96/s4/p0-RELU-POOL3/s2-NORM-"
                "CONV5-256/p2-RELU-POOL3/s2-NORM-"
                "CONV3-384/p1-RELU-CONV3-384/p1-RELU-CONV3-256/p1-RELU-POOL3/s2-"
                "DROPOUT-FC-4096-RELU-DROPOUT-FC-4096-RELU-FC-{classes}"),
    # ZFNet as Zeiler and Fergus built it (2013, Figure 3), 224x224x3 input:
    # CONV1 7x7/2 and CONV2 5x5/2, each followed by a 3x3/2 pool and contrast
    # normalisation: 224 -> 110 -> 55 -> 26 -> 13 -> 13 -> 13 -> 6. CONV3-5 have
    # the notes' 512, 1024, 512 filters ("AlexNet but ... use 512, 1024, 512").
    "zfnet": ("CONV7-96/s2/p1-RELU-POOL3/s2/ceil-NORM-"
              "CONV5-256/s2/p0-RELU-POOL3/s2/ceil-NORM-"
              "CONV3-512/p1-RELU-CONV3-1024/p1-RELU-CONV3-512/p1-RELU-POOL3/s2-"
              "DROPOUT-FC-4096-RELU-DROPOUT-FC-4096-RELU-FC-{classes}"),
    # The same with the paper's CONV3-5 filters (384, 384, 256, as AlexNet's).
    "zfnet_paper": ("CONV7-96/s2/p1-RELU-POOL3/s2/ceil-NORM-"
                    "CONV5-256/s2/p0-RELU-POOL3/s2/ceil-NORM-"
                    "CONV3-384/p1-RELU-CONV3-384/p1-RELU-CONV3-256/p1-RELU-POOL3/s2-"
                    "DROPOUT-FC-4096-RELU-DROPOUT-FC-4096-RELU-FC-{classes}"),
    # VGG-16 (configuration D), torchvision's layer order.
    "vgg16": ("[(CONV3-64-RELU)*2-POOL2]-[(CONV3-128-RELU)*2-POOL2]-"
              "[(CONV3-256-RELU)*3-POOL2]-[(CONV3-512-RELU)*3-POOL2]*2-"
              "FC-4096-RELU-DROPOUT-FC-4096-RELU-DROPOUT-FC-{classes}"),
}


def _input_shape(input_size, channels: int) -> tuple:
    """input_size: an int (square side), (H, W) or (C, H, W)."""
    if isinstance(input_size, (int, np.integer)):
        return (channels, int(input_size), int(input_size))
    size = tuple(int(d) for d in input_size)
    if len(size) == 2:
        return (channels,) + size
    if len(size) == 3:
        return size
    raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")


def _chain(name: str, num_classes: int, input_size, channels: int,
           on_misfit: str = "warn") -> Network:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return build(SPECS[name].format(classes=int(num_classes)), _input_shape(input_size, channels),
                 on_misfit=on_misfit, name=name)


def lenet5(num_classes: int = 10, input_size=(1, 32, 32)) -> Network:
    """LeNet-5: two 5x5 conv + 2x2 max-pool stages, then FC 120-84-classes."""
    return _chain("lenet5", num_classes, input_size, 1)


def alexnet(num_classes: int = 1000, input_size=(3, 227, 227)) -> Network:
    """The lecture's AlexNet: CONV1 96 11x11/4, POOL1, NORM1, CONV2 256 5x5, POOL2,
    NORM2, CONV3-5 (384, 384, 256 3x3), POOL3, FC6-8 (4096, 4096, classes)."""
    return _chain("alexnet", num_classes, input_size, 3)


def zfnet(num_classes: int = 1000, input_size=(3, 224, 224), filters: str = "lecture") -> Network:
    """ZFNet (Zeiler and Fergus 2013, Figure 3): CONV1 96 7x7/2, POOL1 3x3/2,
    NORM1, CONV2 256 5x5/2, POOL2 3x3/2, NORM2, CONV3-5 3x3, POOL3 3x3/2,
    FC6-8 (4096, 4096, classes). At 224x224: 110 -> 55 -> 26 -> 13 -> 13 -> 6.

    filters="lecture" (default): CONV3-5 with 512, 1024, 512 filters, the notes'
    ZFNet (107,627,624 parameters with 1000 classes); filters="paper": 384, 384,
    256, the paper's (62,357,608). CONV1 and the pools floor and ceil their
    odd sizes on purpose, as the paper's sizes need, so no misfit warnings."""
    specs = {"lecture": "zfnet", "paper": "zfnet_paper"}
    if not isinstance(filters, str) or filters not in specs:
        raise ValueError(f"filters must be 'lecture' (CONV3-5 with 512, 1024, 512 filters) or "
                         f"'paper' (384, 384, 256), got {filters!r}")
    return _chain(specs[filters], num_classes, input_size, 3, on_misfit="ignore")


def vgg16(num_classes: int = 1000, input_size=(3, 224, 224)) -> Network:
    """VGG-16: thirteen 3x3 convs in five pooled stages, FC 4096-4096-classes
    (at 224x224 input: 138,357,544 parameters with 1000 classes)."""
    return _chain("vgg16", num_classes, input_size, 3)


class ResNet(Module):
    """ResNet with torchvision's structure and names (conv1, bn1, layer1..4,
    fc): a 7x7/2 stem, 3x3/2 max pool, four stages of residual blocks (the
    first block of stages 2-4 halves the size with a projection shortcut),
    global average pooling and one FC layer. The stride-2 layers floor odd
    sizes on purpose."""

    def __init__(self, block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2),
                 num_classes: int = 1000, input_size=(3, 224, 224), groups: int = 1,
                 width_per_group: int = 64):
        super().__init__()
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if block not in blocks:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four positive block counts, got {layers!r}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.block, self.layer_counts = block, [int(n) for n in layers]
        # ResNeXt (groups 32, width 4) and Wide ResNet (width 128): bottleneck only
        self.groups, self.width_per_group = int(groups), int(width_per_group)
        if (self.groups, self.width_per_group) != (1, 64) and block != "bottleneck":
            raise ValueError("groups and width_per_group need block='bottleneck'")
        self.num_classes = int(num_classes)
        self.input_shape = _input_shape(input_size, 3)
        Block = blocks[block]
        self.conv1 = Conv2d(self.input_shape[0], 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNorm2d(64)
        self.maxpool = MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), self.layer_counts)):
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for i in range(count):
                extra = {} if block == "basic" else dict(groups=self.groups,
                                                         base_width=self.width_per_group)
                stage_blocks.append(Block(inplanes, planes, stride if i == 0 else 1, **extra))
                inplanes = planes * Block.expansion
            setattr(self, f"layer{stage + 1}", Sequential(*stage_blocks))
        self.avgpool = AdaptiveAvgPool2d(1)
        self.fc = Linear(inplanes, self.num_classes)
        self._init_weights()
        self.output_shape(self.input_shape)  # fails early on an input too small
        self._cache = None

    def _init_weights(self) -> None:
        """torchvision's: He-normal (fan_out) convolutions, BN weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.weight.data = init.kaiming_normal(m.weight.shape, mode="fan_out",
                                                    dtype=m.weight.data.dtype)

    def _stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x):
        from . import functional as F
        x = self.bn1(self.conv1(x))
        self._stem_bn = x
        x = self.maxpool(F.relu(x))
        for stage in self._stages():
            x = stage(x)
        x = self.avgpool(x)
        self._pooled_shape = x.shape
        return self.fc(x.reshape(x.shape[0], -1))

    def lower(self, g, x, prefix):
        # as forward: F.relu is a ReLU node, the reshape to (N, -1) a Flatten
        if type(self).forward is not ResNet.forward:
            raise cannot_lower(self, prefix, "it overrides ResNet's forward, so it needs its "
                                             "own `lower` method")
        x = self.conv1.lower(g, x, join(prefix, "conv1"))
        x = self.bn1.lower(g, x, join(prefix, "bn1"))
        x = g.node("ReLU", [x], value=join(prefix, "relu"))
        x = self.maxpool.lower(g, x, join(prefix, "maxpool"))
        for i, stage in enumerate(self._stages()):
            x = stage.lower(g, x, join(prefix, f"layer{i + 1}"))
        x = self.avgpool.lower(g, x, join(prefix, "avgpool"))
        x = g.node("Flatten", [x], attrs=dict(start_dim=1, end_dim=-1),
                   value=join(prefix, "flatten"))
        return self.fc.lower(g, x, join(prefix, "fc"))

    def backward(self, grad_output):
        from . import functional as F
        g = self.fc.backward(grad_output).reshape(self._pooled_shape)
        g = self.avgpool.backward(g)
        for stage in reversed(self._stages()):
            g = stage.backward(g)
        g = F.relu_backward(self.maxpool.backward(g), self._stem_bn)
        return self.conv1.backward(self.bn1.backward(g))

    def output_shape(self, input_shape):
        shape = self.conv1.output_shape(tuple(input_shape))
        shape = self.maxpool.output_shape(shape)
        for stage in self._stages():
            shape = stage.output_shape(shape)
        shape = self.avgpool.output_shape(shape)
        return self.fc.output_shape((int(np.prod(shape)),))

    def config(self):
        config = dict(block=self.block, layers=self.layer_counts, num_classes=self.num_classes,
                      input_size=list(self.input_shape))
        if (self.groups, self.width_per_group) != (1, 64):  # (older files lack them)
            config.update(groups=self.groups, width_per_group=self.width_per_group)
        return config


def resnet18(num_classes: int = 1000, input_size=(3, 224, 224)) -> ResNet:
    """ResNet-18: BasicBlocks [2, 2, 2, 2] (11,689,512 parameters with 1000 classes)."""
    return ResNet("basic", (2, 2, 2, 2), num_classes, input_size)


def resnet34(num_classes: int = 1000, input_size=(3, 224, 224)) -> ResNet:
    """ResNet-34: BasicBlocks [3, 4, 6, 3] (21,797,672 parameters with 1000 classes)."""
    return ResNet("basic", (3, 4, 6, 3), num_classes, input_size)


_ZOO = {"lenet5": lenet5, "alexnet": alexnet, "zfnet": zfnet, "vgg16": vgg16,
        "resnet18": resnet18, "resnet34": resnet34}

# The later case studies (models_extra.py), by graph.
from .models_extra import (densenet121, efficientnet_b0, googlenet, mobilenet_v1,  # noqa: E402
                           mobilenet_v2, nasnet_a_large, nasnet_a_mobile, resnext50_32x4d,
                           se_resnet50, wide_resnet50_2)

__all__ += ["googlenet", "mobilenet_v1", "mobilenet_v2", "resnext50_32x4d", "wide_resnet50_2",
            "densenet121", "se_resnet50", "efficientnet_b0", "nasnet_a_mobile", "nasnet_a_large"]
_ZOO.update(googlenet=googlenet, mobilenet_v1=mobilenet_v1, mobilenet_v2=mobilenet_v2,
            resnext50_32x4d=resnext50_32x4d, wide_resnet50_2=wide_resnet50_2,
            densenet121=densenet121, se_resnet50=se_resnet50, efficientnet_b0=efficientnet_b0,
            nasnet_a_mobile=nasnet_a_mobile, nasnet_a_large=nasnet_a_large)


def get(name: str, **kwargs) -> Module:
    """A zoo model by name."""
    if name not in _ZOO:
        raise ValueError(f"unknown model {name!r}; the zoo has {', '.join(_ZOO)}")
    return _ZOO[name](**kwargs)
