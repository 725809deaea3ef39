"""The PyTorch mirror of a convcore model: `to_torch(model)` is a
torch.nn.Module that computes what the model computes, with the same
state-dict keys, loaded with its weights (float32). The end-to-end
benchmark (`python -m convcore bench --e2e`) times it and exports it to
ONNX for ONNX Runtime; the tests compare against it.

PyTorch is optional: it is imported when a mirror is made or one of the
mirror's classes (`TorchGraph`, `TorchResidual`, `TorchResNet`,
`TorchNetwork`, `TorchStochasticDepth`) is looked up, never when convcore
or convcore.interop is imported.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Dict

import numpy as np

from ..builder import Network
from ..models.inception import Normalize
from ..models.nasnet import _OneHotDepthwise
from ..models.resnet import ResNet
from ..nn import activation as act
from ..nn import layers as L
from ..nn.graph import Graph
from ..nn.module import Identity, Sequential
from ..nn.norm import BatchNorm2d, LocalResponseNorm
from ..nn.residual import _Residual

__all__ = ["to_torch", "convert", "TorchGraph", "TorchResidual", "TorchResNet", "TorchNetwork",
           "TorchStochasticDepth"]

_CLASSES = ("TorchGraph", "TorchResidual", "TorchResNet", "TorchNetwork",
            "TorchStochasticDepth")


def __getattr__(name: str):
    # the torch.nn classes exist once torch is imported: made on first look-up
    if name in _CLASSES:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _classes() -> Dict[str, type]:
    """The mirror's torch.nn classes (defined once, on first use)."""
    import torch
    from torch import nn as tnn

    class TorchGraph(tnn.Module):
        """A convcore Graph: its children mirrored, its nodes run in order."""

        def __init__(self, g):
            super().__init__()
            for name, child in g._modules.items():
                self.add_module(name, convert(child))
            self.nodes, self.output = g.nodes, g.outputs[0]

        def forward(self, x):
            values = {"x": x}
            for out, op, inputs in self.nodes:
                args = [values[v] for v in inputs]
                if op == "concat":
                    values[out] = torch.cat(args, 1)
                elif op == "add":
                    values[out] = sum(args[1:], args[0])
                elif op == "mul":
                    values[out] = args[0] * args[1]
                elif op == "relu":
                    values[out] = torch.relu(args[0])
                else:
                    values[out] = getattr(self, op)(args[0])
            return values[self.output]

    class TorchResidual(tnn.Module):
        """A residual block (nn.residual): its body, ReLU after each inner BN,
        plus the identity or the downsample, then ReLU."""

        def __init__(self, block):
            super().__init__()
            self.body = [name for name in block._modules if name != "downsample"]
            for name, child in block._modules.items():
                if child is not None:
                    self.add_module(name, convert(child))
            self.has_downsample = block.downsample is not None

        def forward(self, x):
            out = x
            for i, name in enumerate(self.body):
                out = getattr(self, name)(out)
                if name.startswith("bn") and i != len(self.body) - 1:
                    out = torch.relu(out)
            identity = self.downsample(x) if self.has_downsample else x
            return torch.relu(out + identity)

    class TorchResNet(tnn.Module):
        """The zoo's ResNet (torchvision's forward)."""

        def __init__(self, m):
            super().__init__()
            for name, child in m._modules.items():
                self.add_module(name, convert(child))

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    class TorchNetwork(tnn.Module):
        """A chain built by convcore.build: features, flatten, classifier."""

        def __init__(self, m):
            super().__init__()
            self.features = convert(m.features)
            self.classifier = convert(m.classifier)

        def forward(self, x):
            x = self.features(x)
            return self.classifier(torch.flatten(x, 1)) if len(self.classifier) else x

    class TorchStochasticDepth(tnn.Module):
        """nn.activation.StochasticDepth, as torchvision.ops.StochasticDepth:
        the identity in eval mode or at p=0; while training, mode "row" drops
        each sample's branch with probability p, "batch" the whole batch's,
        and scales what survives by 1 / (1 - p)."""

        def __init__(self, p, mode):
            super().__init__()
            self.p, self.mode = p, mode

        def forward(self, x):
            if not self.training or self.p == 0.0:
                return x
            shape = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
            keep = torch.empty(shape, dtype=x.dtype).bernoulli_(1 - self.p)
            return x * keep / (1 - self.p)

    return dict(TorchGraph=TorchGraph, TorchResidual=TorchResidual, TorchResNet=TorchResNet,
                TorchNetwork=TorchNetwork, TorchStochasticDepth=TorchStochasticDepth)


def convert(m):
    """The torch.nn counterpart of one convcore module, children included,
    with torch's fresh weights (to_torch loads the model's)."""
    from torch import nn as tnn

    T = _classes()
    simple = {
        act.Sigmoid: tnn.Sigmoid, act.SiLU: tnn.SiLU, act.ReLU6: tnn.ReLU6,
        act.Hardswish: tnn.Hardswish, act.Hardsigmoid: tnn.Hardsigmoid, L.ReLU: tnn.ReLU,
        Identity: tnn.Identity,
    }
    kind = type(m)
    if kind in simple:
        return simple[kind]()
    if isinstance(m, Graph):
        return T["TorchGraph"](m)
    if isinstance(m, Sequential):
        return tnn.Sequential(OrderedDict((k, convert(c)) for k, c in m._modules.items()))
    if isinstance(m, _Residual):
        return T["TorchResidual"](m)
    if isinstance(m, ResNet):
        return T["TorchResNet"](m)
    if isinstance(m, Network):
        return T["TorchNetwork"](m)
    if isinstance(m, L.Conv2d):
        return tnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                          m.dilation, m.groups, m.bias is not None, m.padding_mode)
    if isinstance(m, L.Linear):
        return tnn.Linear(m.in_features, m.out_features, m.bias is not None)
    if isinstance(m, BatchNorm2d):
        return tnn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                               m.track_running_stats, bias=m.bias is not None or not m.affine)
    if isinstance(m, Normalize):  # its buffers are an eval batch norm's (eps 0)
        return tnn.BatchNorm2d(m.num_features, eps=0.0, affine=False)
    if isinstance(m, _OneHotDepthwise):  # NASNet's fixed resamplings, as they are saved
        return tnn.Conv2d(m.channels, m.channels, m.kernel, m.stride, m.padding,
                          groups=m.channels, bias=False)
    if isinstance(m, L.MaxPool2d):
        return tnn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation,
                             ceil_mode=m.ceil_mode)
    if isinstance(m, L.AvgPool2d):
        return tnn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                             m.count_include_pad, m.divisor_override)
    if isinstance(m, L.AdaptiveAvgPool2d):
        return tnn.AdaptiveAvgPool2d(m.output_size)
    if isinstance(m, L.Flatten):
        return tnn.Flatten(m.start_dim, m.end_dim)
    if isinstance(m, L.Dropout):
        return tnn.Dropout(m.p)
    if isinstance(m, act.StochasticDepth):
        return T["TorchStochasticDepth"](m.p, m.mode)
    if isinstance(m, LocalResponseNorm):
        return tnn.LocalResponseNorm(m.size, m.alpha, m.beta, m.k)
    raise TypeError(f"to_torch: no torch counterpart for {kind.__name__}")


def to_torch(model):
    """A torch.nn.Module computing what the convcore model computes, with the
    same state-dict keys, loaded with its weights (float32)."""
    import torch

    t = convert(model)
    t.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=v.dtype))
                       for k, v in model.state_dict().items()}, strict=True)
    return t.float()
