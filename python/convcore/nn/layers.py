"""Convolution, pooling, fully connected, activation, flatten and dropout
layers over the functional API."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np

from .. import functional as F
from .. import _core
from .._args import adaptive_size, is_int, pair, pool_stride
from .._backends import backend_of
from . import init
from .lowering import cannot_lower
from .module import Module, Parameter, is_grad_enabled, kept, saved

IntPair = Union[int, Tuple[int, int]]


def _layer_array(value, name: str):
    """value as an array of its backend: checked as a numpy array, or a GPU
    array (a cupy view): the layers that do their own arithmetic run on either."""
    return backend_of(value).asarray(value, name)


def _positive_int(value, name: str) -> int:
    if not is_int(value) or int(value) <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _sample_shape(input_shape, ndim: int, layer: str, layout: str) -> Tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != ndim:
        raise ValueError(f"{layer} expects one sample of shape {layout}, got {shape}")
    return shape


# ------------------------------------------------------------------- convolution

_PAD_MODES = ("circular", "reflect", "replicate", "zeros")  # the core's pad2d modes


class Conv2d(Module):
    """2-D convolution layer with PyTorch's arguments and default initialisation
    (weights and bias uniform in +-1/sqrt(fan_in))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair,
                 stride: IntPair = 1, padding: Union[IntPair, str] = 0, dilation: IntPair = 1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 dtype=np.float32):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.groups = _positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.kernel_size = pair(kernel_size, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid', an int or a pair, "
                                 f"got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = pair(padding, "padding")
        if padding_mode not in _PAD_MODES:
            raise ValueError(f"padding_mode must be one of {list(_PAD_MODES)}, "
                             f"got {padding_mode!r}")
        self.padding_mode = padding_mode
        dt = _dtype(dtype)
        shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        self.weight = Parameter(init.kaiming_uniform(shape, dtype=dt))
        bound = 1.0 / math.sqrt(init.fan_in_of(shape))
        self.bias = Parameter(init.uniform((self.out_channels,), bound, dt)) if bias else None
        self._x = None

    def _pads(self) -> list:
        """(top, bottom, left, right)"""
        if self.padding == "valid":
            return [0, 0, 0, 0]
        if self.padding == "same":
            t, b = _core.same_padding(self.kernel_size[0], self.dilation[0])
            left, right = _core.same_padding(self.kernel_size[1], self.dilation[1])
            return [t, b, left, right]
        return [self.padding[0], self.padding[0], self.padding[1], self.padding[1]]

    def _explicit_pad(self, x: np.ndarray) -> np.ndarray:
        t, b, left, right = self._pads()
        h, w = x.shape[-2:]
        # As PyTorch: reflect needs padding < the size, circular <= the size
        # (numpy would reflect or wrap again and again).
        for pad, size, name in ((max(t, b), h, "height"), (max(left, right), w, "width")):
            if self.padding_mode == "reflect" and pad >= size:
                raise ValueError(f"padding {pad} must be smaller than the input {name} {size} "
                                 f"for padding_mode='reflect'")
            if self.padding_mode == "circular" and pad > size:
                raise ValueError(f"padding {pad} must be at most the input {name} {size} for "
                                 f"padding_mode='circular' (it would wrap around more than once)")
        return _core.pad2d(x, [t, b, left, right], self.padding_mode)

    def forward(self, x):
        bias = self.bias.data if self.bias is not None else None
        if self.padding_mode == "zeros":
            self._x = kept(x)
            return F.conv2d(x, self.weight.data, bias, self.stride, self.padding,
                            self.dilation, self.groups)
        if backend_of(x).is_gpu:
            raise NotImplementedError(f"Conv2d(padding_mode={self.padding_mode!r}) runs on the "
                                      f"CPU only; on the GPU use padding_mode='zeros'")
        padded = self._explicit_pad(F._array(x, "input"))
        self._x = kept(padded)
        return F.conv2d(padded, self.weight.data, bias, self.stride, 0, self.dilation,
                        self.groups)

    def backward(self, grad_output):
        x = saved(self._x, self)
        padding = self.padding if self.padding_mode == "zeros" else 0
        gx, gw, gb = F.conv2d_backward(grad_output, x, self.weight.data, self.stride,
                                       padding, self.dilation, self.groups,
                                       output_mask=(self.input_grad, True, self.bias is not None))
        self.weight.accumulate_grad(gw)
        if self.bias is not None:
            self.bias.accumulate_grad(gb)
        if gx is not None and self.padding_mode != "zeros":
            # each padded position's gradient back to the one it was copied from
            gx = _core.pad2d_backward(gx, self._pads(), self.padding_mode)
        return gx

    def output_shape(self, input_shape):
        c, h, w = _sample_shape(input_shape, 3, "Conv2d", "(C, H, W)")
        t, b, left, right = self._pads()
        _, co, ho, wo = _core.conv2d_output_shape([1, c, h, w], list(self.weight.shape),
                                                  self.stride, [t, b, left, right],
                                                  self.dilation, self.groups)
        return (co, ho, wo)

    def macs(self, input_shape):
        co, ho, wo = self.output_shape(input_shape)
        return co * ho * wo * int(np.prod(self.weight.shape[1:]))

    def config(self):
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=list(self.kernel_size), stride=list(self.stride),
                    padding=self.padding if isinstance(self.padding, str) else list(self.padding),
                    dilation=list(self.dilation), groups=self.groups, bias=self.bias is not None,
                    padding_mode=self.padding_mode)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s


# ------------------------------------------------------------------------ pooling

class MaxPool2d(Module):
    """Max pooling; with return_indices, forward returns (output, indices) as
    max_pool2d(..., return_indices=True) does, and backward takes the
    gradient of the output."""

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None,
                 padding: IntPair = 0, dilation: IntPair = 1, return_indices: bool = False,
                 ceil_mode: bool = False):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pool_stride(stride, self.kernel_size)
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.return_indices = bool(return_indices)
        self.ceil_mode = bool(ceil_mode)
        self._x = self._indices = None

    def _args(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, ceil_mode=self.ceil_mode)

    def forward(self, x):
        self._x = kept(x)
        if not ((self.training and is_grad_enabled()) or self.return_indices):
            self._indices = None
            return F.max_pool2d(x, **self._args())
        # Training keeps where each max came from, so backward is a scatter.
        out, indices = F.max_pool2d(x, return_indices=True, **self._args())
        self._indices = kept(indices)
        return (out, indices) if self.return_indices else out

    def backward(self, grad_output):
        return F.max_pool2d_backward(grad_output, saved(self._x, self), indices=self._indices,
                                     **self._args())

    def output_shape(self, input_shape):
        c, h, w = _sample_shape(input_shape, 3, "MaxPool2d", "(C, H, W)")
        return tuple(F.pool2d_output_shape((1, c, h, w), kind="max", **self._args())[1:])

    def config(self):
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._args().items()}
        if self.return_indices:  # only when True: the C++ readers know no such attribute
            config["return_indices"] = True
        return config

    def lower(self, g, x, prefix):
        if self.return_indices:
            raise cannot_lower(self, prefix, "return_indices=True gives a second output, the "
                                             "indices, which the graph format has no node for")
        return super().lower(g, x, prefix)

    def extra_repr(self):
        s = ", ".join(f"{k}={v}" for k, v in self._args().items())
        return s + ", return_indices=True" if self.return_indices else s


class AvgPool2d(Module):
    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None,
                 padding: IntPair = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: Optional[int] = None):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pool_stride(stride, self.kernel_size)
        self.padding = pair(padding, "padding")
        self.ceil_mode = bool(ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        self.divisor_override = divisor_override
        self._x = None

    def _args(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad,
                    divisor_override=self.divisor_override)

    def forward(self, x):
        self._x = kept(x)
        return F.avg_pool2d(x, **self._args())

    def backward(self, grad_output):
        return F.avg_pool2d_backward(grad_output, saved(self._x, self), **self._args())

    def output_shape(self, input_shape):
        c, h, w = _sample_shape(input_shape, 3, "AvgPool2d", "(C, H, W)")
        return tuple(F.pool2d_output_shape((1, c, h, w), self.kernel_size, self.stride,
                                           self.padding, 1, self.ceil_mode, kind="avg")[1:])

    def config(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._args().items()}

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self._args().items())


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size
        self._x = None

    def forward(self, x):
        self._x = kept(x)
        return F.adaptive_avg_pool2d(x, self.output_size)

    def backward(self, grad_output):
        return F.adaptive_avg_pool2d_backward(grad_output, saved(self._x, self))

    def output_shape(self, input_shape):
        c, h, w = _sample_shape(input_shape, 3, "AdaptiveAvgPool2d", "(C, H, W)")
        oh, ow = adaptive_size(self.output_size, np.empty((h, w), dtype=np.uint8))
        return (c, oh, ow)

    def config(self):
        size = self.output_size
        return dict(output_size=list(size) if isinstance(size, (tuple, list)) else size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


# ----------------------------------------------------------------- fully connected

class Linear(Module):
    """y = x @ weight.T + bias, PyTorch's default initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype=np.float32):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        dt = _dtype(dtype)
        shape = (self.out_features, self.in_features)
        self.weight = Parameter(init.kaiming_uniform(shape, dtype=dt))
        bound = 1.0 / math.sqrt(self.in_features)
        self.bias = Parameter(init.uniform((self.out_features,), bound, dt)) if bias else None
        self._x = None

    def forward(self, x):
        self._x = kept(x)
        return F.linear(x, self.weight.data, None if self.bias is None else self.bias.data)

    def backward(self, grad_output):
        gx, gw, gb = F.linear_backward(grad_output, saved(self._x, self), self.weight.data,
                                       output_mask=(self.input_grad, True, self.bias is not None))
        self.weight.accumulate_grad(gw)
        if self.bias is not None:
            self.bias.accumulate_grad(gb)
        return gx

    def output_shape(self, input_shape):
        shape = tuple(int(d) for d in input_shape)
        if not shape or shape[-1] != self.in_features:
            raise ValueError(f"Linear expects {self.in_features} input features, got an input "
                             f"of shape {shape}")
        return shape[:-1] + (self.out_features,)

    def macs(self, input_shape):
        return int(np.prod(input_shape[:-1], dtype=np.int64)) * self.in_features * \
            self.out_features

    def config(self):
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


# ------------------------------------------------------------ activation and shape

class ReLU(Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self._x = None

    def forward(self, x):
        self._x = kept(x)
        return F.relu(x)

    def backward(self, grad_output):
        return F.relu_backward(grad_output, saved(self._x, self))

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def config(self):
        return {}


class Flatten(Module):
    """Flattens dims start_dim..end_dim (of the batched input) into one."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)
        self._shape = None

    def _flat_shape(self, shape):
        nd = len(shape)
        s = self.start_dim % nd if nd else 0
        e = self.end_dim % nd if nd else 0
        if s > e:
            raise ValueError(f"Flatten: start_dim {self.start_dim} comes after end_dim "
                             f"{self.end_dim} for an input of shape {tuple(shape)}")
        return tuple(shape[:s]) + (int(math.prod(shape[s:e + 1])),) + \
            tuple(shape[e + 1:])

    def forward(self, x):
        x = _layer_array(x, "input")
        self._shape = x.shape
        return x.reshape(self._flat_shape(x.shape))  # numpy or cupy

    def backward(self, grad_output):
        gy = _layer_array(grad_output, "grad_output")
        if self._shape is None or gy.size != math.prod(self._shape):
            raise ValueError(f"grad_output of shape {gy.shape} does not match the input of "
                             f"shape {self._shape} of the last forward")
        return gy.reshape(self._shape)  # numpy or cupy

    def output_shape(self, input_shape):
        return self._flat_shape((1,) + tuple(input_shape))[1:]

    def config(self):
        return dict(start_dim=self.start_dim, end_dim=self.end_dim)


def _masked(a, mask):
    """a * mask as an array (numpy turns a 0-d product into a scalar), where a
    dropped inf or NaN gives NaN, as PyTorch's dropout does (inf * 0),
    without numpy's RuntimeWarning for it."""
    with np.errstate(invalid="ignore"):
        product = a * mask
    return np.asarray(product) if isinstance(product, np.generic) else product


class Dropout(Module):
    """Zeroes each element with probability p while training and scales the
    rest by 1 / (1 - p); the identity in eval mode."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.p = float(p)
        self._mask = None

    def forward(self, x):
        backend = backend_of(x)
        x = backend.asarray(x, "input")
        if x.dtype.kind != "f":
            raise TypeError(f"input must be a floating-point array, got {x.dtype}")
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        if self.p == 1.0:
            self._mask = backend.xp.zeros_like(x)
        else:
            # the backend draws it where x lives; on the GPU with a generator
            # of this layer's, which it hands back to be kept for the next mask
            self._mask, device_random = backend.dropout_mask(
                x.shape, x.dtype, self.p, init.generator(), self.__dict__.get("_device_random"))
            if device_random is not None:
                object.__setattr__(self, "_device_random", device_random)
        return _masked(x, self._mask)

    def backward(self, grad_output):
        if self._mask is None:
            return grad_output
        gy = _layer_array(grad_output, "grad_output")
        if gy.shape != self._mask.shape:  # no silent broadcasting
            raise ValueError(f"grad_output must have shape {self._mask.shape}, got {gy.shape}")
        return _masked(gy, self._mask)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def config(self):
        return dict(p=self.p)

    def extra_repr(self):
        return f"p={self.p}"
