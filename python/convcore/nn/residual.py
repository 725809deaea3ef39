"""Residual blocks with torchvision's structure and parameter names
(conv1, bn1, conv2, bn2, downsample.0, downsample.1), so that ResNet state
dicts carry over."""
from __future__ import annotations

import numpy as np

from .. import functional as F
from .layers import Conv2d
from .lowering import cannot_lower, join
from .module import Module, Sequential, kept, saved
from .norm import BatchNorm2d


def _projection(inplanes: int, outplanes: int, stride: int) -> Sequential:
    """The projection shortcut: a strided 1x1 convolution and batch norm."""
    return Sequential(Conv2d(inplanes, outplanes, 1, stride=stride, bias=False),
                      BatchNorm2d(outplanes))


class _Residual(Module):
    """out = relu(body(x) + shortcut(x)); subclasses define the body."""

    def _body_layers(self):
        raise NotImplementedError

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        layers = self._body_layers()
        for i, layer in enumerate(layers):
            # a ReLU after each BatchNorm2d but the last, in the same pass
            fused = isinstance(layer, BatchNorm2d) and i != len(layers) - 1
            out = layer.forward_fused(out) if fused else layer(out)
        out = F.add(out, identity)
        self._sum = kept(out)
        return F.relu(out)

    def lower(self, g, x, prefix):
        # forward's order: the shortcut, the body with a ReLU after each
        # BatchNorm2d but the last, the sum, the final ReLU
        if type(self).forward is not _Residual.forward:
            raise cannot_lower(self, prefix, "it overrides the residual block's forward, so it "
                                             "needs its own `lower` method")
        identity = x if self.downsample is None else \
            self.downsample.lower(g, x, join(prefix, "downsample"))
        out = x
        layers = self._body_layers()
        names = {id(m): name for name, m in self._modules.items()}
        for i, layer in enumerate(layers):
            out = layer.lower(g, out, join(prefix, names[id(layer)]))
            if isinstance(layer, BatchNorm2d) and i != len(layers) - 1:
                out = g.node("ReLU", [out], value=join(prefix, "relu"))
        out = g.node("add", [out, identity], value=join(prefix, "add"))
        return g.node("ReLU", [out], value=join(prefix, "relu"))

    def backward(self, grad_output):
        g = F.relu_backward(grad_output, saved(self._sum, self))
        g_shortcut = g if self.downsample is None else self.downsample.backward(g)
        layers = self._body_layers()
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            fused = isinstance(layer, BatchNorm2d) and i != len(layers) - 1
            g = layer.backward_fused(g) if fused else layer.backward(g)
        return F.add(g, g_shortcut)

    def output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self._body_layers():
            shape = layer.output_shape(shape)
        short = tuple(input_shape) if self.downsample is None else \
            self.downsample.output_shape(input_shape)
        if short != shape:
            raise ValueError(f"{type(self).__name__}: the shortcut gives {short} but the body "
                             f"gives {shape}; use a projection shortcut")
        return shape


class BasicBlock(_Residual):
    """Two 3x3 convolutions (ResNet-18/34). With stride > 1 or a change of
    width the shortcut is a projection (1x1 conv + BN), else the identity."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.inplanes, self.planes, self.stride = int(inplanes), int(planes), int(stride)
        self.conv1 = Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        if downsample is None and (stride != 1 or inplanes != planes):
            downsample = _projection(inplanes, planes, stride)
        self.downsample = downsample or None

    def _body_layers(self):
        return [self.conv1, self.bn1, self.conv2, self.bn2]

    def config(self):
        return dict(inplanes=self.inplanes, planes=self.planes, stride=self.stride)


class Bottleneck(_Residual):
    """1x1 reduce, 3x3 (stride here, as torchvision), 1x1 expand by 4 (ResNet-50+)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        self.inplanes, self.planes, self.stride = int(inplanes), int(planes), int(stride)
        self.groups, self.base_width = int(groups), int(base_width)
        width = int(planes * (base_width / 64.0)) * groups
        out = planes * self.expansion
        self.conv1 = Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = Conv2d(width, out, 1, bias=False)
        self.bn3 = BatchNorm2d(out)
        if downsample is None and (stride != 1 or inplanes != out):
            downsample = _projection(inplanes, out, stride)
        self.downsample = downsample or None

    def _body_layers(self):
        return [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]

    def config(self):
        return dict(inplanes=self.inplanes, planes=self.planes, stride=self.stride,
                    groups=self.groups, base_width=self.base_width)
