"""Element-wise activations of the later architectures (MobileNet, SENet,
EfficientNet) and stochastic depth, with PyTorch's definitions:

    Sigmoid(x)   = 1 / (1 + exp(-x))
    SiLU(x)      = x * sigmoid(x)                   (Swish with beta = 1)
    ReLU6(x)     = min(max(x, 0), 6)
    Hardswish(x) = x * ReLU6(x + 3) / 6
    Hardsigmoid(x) = ReLU6(x + 3) / 6

They run in the C++ core (one OpenMP pass over the array, forward and
backward), in the input's dtype; the gradients at the kinks are PyTorch's.
Softmax, not elementwise, is here too: a parameter-free activation over one
dimension.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import _core
from .. import functional as F
from . import init
from .module import Module, kept, saved


def _float_input(x, layer: str) -> np.ndarray:
    """x as an array, which must be float32 or float64."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{layer} takes float32 or float64 input, got {x.dtype}")
    return x


def _grad_like(grad_output, out: np.ndarray) -> np.ndarray:
    """grad_output as an array of out's shape (checked) and dtype."""
    grad_output = np.asarray(grad_output)
    if grad_output.shape != out.shape:
        raise ValueError(f"grad_output must have the output's shape {out.shape}, "
                         f"got {grad_output.shape}")
    return grad_output.astype(out.dtype, copy=False)


class _Elementwise(Module):
    """A parameter-free activation that keeps the shape; subclasses name the
    core's kernel."""

    _kernel = ""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self._x = None

    def forward(self, x):
        x = _float_input(x, type(self).__name__)
        self._x = kept(x)
        return _core.activation(self._kernel, x)

    def backward(self, grad_output):
        saved(self._x, self)
        return _core.activation_backward(self._kernel, _grad_like(grad_output, self._x), self._x)

    def output_shape(self, input_shape):
        return tuple(input_shape)


class Sigmoid(_Elementwise):
    """1 / (1 + exp(-x)), computed without overflow."""
    _kernel = "sigmoid"


class SiLU(_Elementwise):
    """x * sigmoid(x), EfficientNet's Swish."""
    _kernel = "silu"


class ReLU6(_Elementwise):
    """min(max(x, 0), 6), MobileNet v2's; the gradient is 1 strictly inside (0, 6)."""
    _kernel = "relu6"


class Hardsigmoid(_Elementwise):
    """ReLU6(x + 3) / 6; gradient 1/6 strictly inside (-3, 3)."""
    _kernel = "hardsigmoid"


class Hardswish(_Elementwise):
    """x * ReLU6(x + 3) / 6 (MobileNet v3); PyTorch's gradient: 0 up to -3,
    x / 3 + 1 / 2 strictly between, 1 from 3 on."""
    _kernel = "hardswish"


class Softmax(Module):
    """exp(x) / sum(exp(x)) along dim, as torch.nn.Softmax: probabilities
    from logits, e.g. at the end of an imported classifier. dim counts the
    batch dimension (1: the classes of (N, C) logits)."""

    def __init__(self, dim: int = 1):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
        self.dim = int(dim)
        self._y = None

    def forward(self, x):
        y = F.softmax(_float_input(x, "Softmax"), self.dim)
        self._y = kept(y)
        return y

    def backward(self, grad_output):
        saved(self._y, self)
        return F.softmax_backward(_grad_like(grad_output, self._y), self._y, self.dim)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def config(self):
        return dict(dim=self.dim)

    def extra_repr(self):
        return f"dim={self.dim}"


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
