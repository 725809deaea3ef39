"""The ResNet family: ResNet-18 and -34 (the zoo's ResNet class, with
torchvision's structure and parameter names), and the bottleneck variants
of the later case studies: ResNeXt-50 32x4d and Wide ResNet-50-2 (the same
class with groups and widths), SE-ResNet-50 (a Graph with a
squeeze-and-excitation module in every bottleneck; timm's `se` names).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from ..nn.blocks import se_bottleneck
from ..nn.graph import Graph
from ..nn.layers import AdaptiveAvgPool2d, Conv2d, Flatten, Linear, MaxPool2d
from ..nn.lowering import cannot_lower, join
from ..nn.module import Module, Sequential
from ..nn.norm import BatchNorm2d
from ..nn.residual import BasicBlock, Bottleneck
from ._common import checked, init_like_reference, input_shape_of, num_classes_of

__all__ = ["ResNet", "resnet18", "resnet34", "resnext50_32x4d", "wide_resnet50_2",
           "se_resnet50"]


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
        num_classes = num_classes_of(num_classes)
        self.block, self.layer_counts = block, [int(n) for n in layers]
        # ResNeXt (groups 32, width 4) and Wide ResNet (width 128): bottleneck only
        self.groups, self.width_per_group = int(groups), int(width_per_group)
        if (self.groups, self.width_per_group) != (1, 64) and block != "bottleneck":
            raise ValueError("groups and width_per_group need block='bottleneck'")
        self.num_classes = num_classes
        self.input_shape = input_shape_of(input_size, 3)
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
        init_like_reference(self, conv="fan_out", linear="default")

    def _stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x):
        x = self.maxpool(self.bn1.forward_fused(self.conv1(x)))  # bn1 and the ReLU in one pass
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
        g = self.fc.backward(grad_output).reshape(self._pooled_shape)
        g = self.avgpool.backward(g)
        for stage in reversed(self._stages()):
            g = stage.backward(g)
        return self.conv1.backward(self.bn1.backward_fused(self.maxpool.backward(g)))

    def input_layers(self):
        return [self.conv1]

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


def resnext50_32x4d(num_classes: int = 1000, input_size=(3, 224, 224)) -> Module:
    """ResNeXt-50 32x4d (Xie et al. 2017): ResNet-50 whose 3x3 convolutions
    have 32 groups of 4 (x stage) channels (25,028,904 parameters)."""
    return ResNet("bottleneck", (3, 4, 6, 3), num_classes, input_size, groups=32,
                  width_per_group=4)


def wide_resnet50_2(num_classes: int = 1000, input_size=(3, 224, 224)) -> Module:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016, torchvision's variant):
    ResNet-50 with the bottleneck 3x3 width doubled (68,883,240 parameters)."""
    return ResNet("bottleneck", (3, 4, 6, 3), num_classes, input_size, width_per_group=128)


def se_resnet50(num_classes: int = 1000, input_size=(3, 224, 224),
                reduction: int = 16) -> Graph:
    """SE-ResNet-50 (Hu et al. 2018): ResNet-50 with a squeeze-and-excitation
    module in every bottleneck (28,088,024 parameters with 1000 classes, as
    the common reference implementations). torchvision's ResNet names plus
    `se.fc1` / `se.fc2` (timm's)."""
    nc, shape = num_classes_of(num_classes), input_shape_of(input_size)
    m = OrderedDict(conv1=Conv2d(shape[0], 64, 7, stride=2, padding=3, bias=False),
                    bn1=BatchNorm2d(64), maxpool=MaxPool2d(3, stride=2, padding=1))
    inplanes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        blocks = []
        for i in range(count):
            blocks.append(se_bottleneck(inplanes, planes, (1 if stage == 0 else 2) if i == 0
                                        else 1, reduction=reduction))
            inplanes = planes * 4
        m[f"layer{stage + 1}"] = Sequential(*blocks)
    m["avgpool"] = AdaptiveAvgPool2d(1)
    m["flatten"] = Flatten()
    m["fc"] = Linear(inplanes, nc)
    nodes = ["c1 = conv1(x)", "b1 = bn1(c1)", "r1 = relu(b1)", "p1 = maxpool(r1)",
             "l1 = layer1(p1)", "l2 = layer2(l1)", "l3 = layer3(l2)", "l4 = layer4(l3)",
             "p = avgpool(l4)", "v = flatten(p)", "out = fc(v)"]
    model = Graph(m, nodes, name="se_resnet50", input_shape=shape)
    init_like_reference(model, conv="fan_out", linear="default")
    return checked(model)
