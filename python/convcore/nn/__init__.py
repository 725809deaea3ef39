"""convcore.nn: layers with forward and backward over the functional core."""
from . import init
from .layers import (AdaptiveAvgPool2d, AvgPool2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d,
                     ReLU)
from .loss import CrossEntropyLoss
from .module import (Identity, Module, Parameter, Sequential, from_architecture,
                     is_grad_enabled, no_grad)
from .norm import BatchNorm2d, LocalResponseNorm
from .residual import BasicBlock, Bottleneck
from .activation import Hardsigmoid, Hardswish, ReLU6, Sigmoid, SiLU, Softmax, StochasticDepth
from .graph import Graph
from . import blocks

__all__ = [
    "AdaptiveAvgPool2d", "AvgPool2d", "BasicBlock", "BatchNorm2d", "Bottleneck", "Conv2d",
    "CrossEntropyLoss", "Dropout", "Flatten", "Identity", "Linear", "LocalResponseNorm",
    "MaxPool2d", "Module", "Parameter", "ReLU", "Sequential", "from_architecture", "init",
    "Graph", "Sigmoid", "SiLU", "ReLU6", "Hardswish", "Hardsigmoid", "Softmax", "StochasticDepth", "blocks",
    "no_grad", "is_grad_enabled",
]
