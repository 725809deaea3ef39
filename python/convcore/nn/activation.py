"""Element-wise activations of the later architectures (MobileNet, SENet,
EfficientNet) and stochastic depth, with PyTorch's definitions:

    Sigmoid(x)   = 1 / (1 + exp(-x))
    SiLU(x)      = x * sigmoid(x)                   (Swish with beta = 1)
    ReLU6(x)     = min(max(x, 0), 6)
    Hardswish(x) = x * ReLU6(x + 3) / 6
    Hardsigmoid(x) = ReLU6(x + 3) / 6

They are cheap next to the convolutions around them, so they are numpy
expressions over the whole array, computed in the input's dtype.
"""
from __future__ import annotations

import numpy as np

from . import init
from .module import Module


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function without overflow: exp of a non-positive number only."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


class _Elementwise(Module):
    """A parameter-free activation that keeps the shape; subclasses set
    _forward and _grad (the derivative given the saved input)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self._x = None

    def forward(self, x):
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{type(self).__name__} takes float32 or float64 input, got {x.dtype}")
        self._x = x
        return self._forward(x)

    def backward(self, grad_output):
        if self._x is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        grad_output = np.asarray(grad_output)
        if grad_output.shape != self._x.shape:
            raise ValueError(f"grad_output must have the output's shape {self._x.shape}, "
                             f"got {grad_output.shape}")
        return (grad_output * self._grad(self._x)).astype(self._x.dtype, copy=False)

    def output_shape(self, input_shape):
        return tuple(input_shape)


class Sigmoid(_Elementwise):
    def _forward(self, x):
        return sigmoid(x)

    def _grad(self, x):
        s = sigmoid(x)
        return s * (1 - s)


class SiLU(_Elementwise):
    """x * sigmoid(x), EfficientNet's Swish."""

    def _forward(self, x):
        return x * sigmoid(x)

    def _grad(self, x):
        s = sigmoid(x)
        return s * (1 + x * (1 - s))


class ReLU6(_Elementwise):
    """min(max(x, 0), 6), MobileNet v2's; the gradient is 1 strictly inside (0, 6)."""

    def _forward(self, x):
        return np.clip(x, 0, 6)

    def _grad(self, x):
        return ((x > 0) & (x < 6)).astype(x.dtype)


class Hardsigmoid(_Elementwise):
    def _forward(self, x):
        return np.clip(x + 3, 0, 6) / x.dtype.type(6)

    def _grad(self, x):
        return ((x > -3) & (x < 3)).astype(x.dtype) / x.dtype.type(6)


class Hardswish(_Elementwise):
    """x * ReLU6(x + 3) / 6 (MobileNet v3); PyTorch's gradient: 0 up to -3,
    x / 3 + 1 / 2 strictly between, 1 from 3 on (its values at the kinks)."""

    def _forward(self, x):
        return x * np.clip(x + 3, 0, 6) / x.dtype.type(6)

    def _grad(self, x):
        return np.where(x <= -3, 0, np.where(x >= 3, 1, x / 3 + 0.5)).astype(x.dtype)


class StochasticDepth(Module):
    """torchvision.ops.StochasticDepth: while training, drops the whole
    residual branch of a sample (mode='row') or of the batch (mode='batch')
    with probability p and scales the survivors by 1 / (1 - p); the identity
    in eval mode (Huang et al. 2016, as EfficientNet uses it)."""

    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        if mode not in ("row", "batch"):
            raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
        self.p, self.mode = float(p), mode
        self._mask = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.mode == "row" else (1,) * x.ndim
        keep = init.generator().random(shape) >= self.p
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        self._mask = (keep * scale).astype(x.dtype)
        return x * self._mask

    def backward(self, grad_output):
        return grad_output if self._mask is None else grad_output * self._mask

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def config(self):
        return dict(p=self.p, mode=self.mode)

    def extra_repr(self):
        return f"p={self.p}, mode={self.mode}"
