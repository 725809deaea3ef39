"""The argument forms of convcore's ops, each handled once for the CPU ops
(convcore.functional), the GPU ops (convcore.cuda.functional) and the
layers (convcore.nn): an int or an (h, w) pair, 'same'/'valid' padding, a
pooling stride that defaults to the kernel, an adaptive output size, the
loss's options. Each function checks the form and names the argument in
its error; the values (positive strides, channel counts, ...) are the C++
core's to check."""
from __future__ import annotations

import numbers
from typing import Tuple

import numpy as np

from . import _core


def is_int(value) -> bool:
    # a plain int first: the ABC check costs about a microsecond per conv call
    return type(value) is int or (isinstance(value, numbers.Integral)
                                  and not isinstance(value, (bool, np.bool_)))


_INT64_MAX = 2 ** 63 - 1


def int64(value: int, name: str) -> int:
    """Python ints are unbounded; the core's are int64 (it checks tighter limits)."""
    if not -_INT64_MAX <= value <= _INT64_MAX:
        raise ValueError(f"{name} is out of range: {value}")
    return value


def integer(value, name: str) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int64(int(value), name)


def number(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def pair(value, name: str) -> Tuple[int, int]:
    """An int, a 1-tuple (v,) or an (h, w) pair of ints: PyTorch's conv and
    pooling ops take a one-element list for both dimensions."""
    if type(value) is int:  # the common forms first: each costs under a microsecond
        return int64(value, name), value
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and \
            type(value[1]) is int:
        return int64(value[0], name), int64(value[1], name)
    if is_int(value):
        v = int64(int(value), name)
        return v, v
    if isinstance(value, (tuple, list)):
        if len(value) not in (1, 2):
            raise ValueError(f"{name} must be an int, a 1-tuple (v,) or a pair (h, w), "
                             f"got {value!r}")
        if not all(is_int(v) for v in value):
            raise TypeError(f"{name} must contain ints, got {value!r}")
        return int64(int(value[0]), name), int64(int(value[-1]), name)
    raise TypeError(f"{name} must be an int or a pair (h, w) of ints, got "
                    f"{type(value).__name__} {value!r}")


def flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def output_mask(value) -> Tuple[bool, bool, bool]:
    """Which of (grad_input, grad_weight, grad_bias) a backward computes:
    three bools, as PyTorch's convolution_backward takes them."""
    if not isinstance(value, (tuple, list)) or len(value) != 3 or \
            not all(isinstance(v, (bool, np.bool_)) for v in value):
        raise TypeError(f"output_mask must be three bools (grad_input, grad_weight, "
                        f"grad_bias), got {value!r}")
    return bool(value[0]), bool(value[1]), bool(value[2])


def conv_padding(padding, weight: np.ndarray, stride: Tuple[int, int],
                  dilation: Tuple[int, int]) -> list:
    """(top, bottom, left, right) for padding given as int, pair, 'valid' or 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions "
                                 f"(stride={stride})")
            if weight.ndim != 4:
                raise ValueError(f"weight must be 4-D (out_channels, in_channels / groups, kH, "
                                 f"kW), got shape {weight.shape}")
            top, bottom = _core.same_padding(int(weight.shape[2]), dilation[0])
            left, right = _core.same_padding(int(weight.shape[3]), dilation[1])
            return [top, bottom, left, right]
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair (h, w), "
                         f"got {padding!r}")
    ph, pw = pair(padding, "padding")
    return [ph, ph, pw, pw]


def pool_stride(stride, kernel: Tuple[int, int]) -> Tuple[int, int]:
    """A pooling stride: None or an empty tuple/list (PyTorch's default
    `stride=()`) mean the kernel size."""
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        return kernel
    return pair(stride, "stride")


def pool_args(kernel_size, stride, padding, dilation=1):
    k = pair(kernel_size, "kernel_size")
    return k, pool_stride(stride, k), pair(padding, "padding"), pair(dilation, "dilation")


def pool_divisor(divisor_override) -> int:
    if divisor_override is None:
        return 0
    value = integer(divisor_override, "divisor_override")
    if value == 0:
        raise ValueError("divisor_override must be a non-zero int or None, got 0")
    return value


def adaptive_size(output_size, x: np.ndarray) -> Tuple[int, int]:
    if output_size is None:
        raise TypeError("output_size must be an int or a pair (h, w), got None")
    if is_int(output_size):
        v = int64(int(output_size), "output_size")
        return v, v
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"output_size must be an int or a pair (h, w), got {output_size!r}")
        out = []
        for v, dim in zip(output_size, (-2, -1)):
            if v is None:
                out.append(int(x.shape[dim]) if x.ndim >= 2 else 0)
            elif is_int(v):
                out.append(int64(int(v), "output_size"))
            else:
                raise TypeError(f"output_size must contain ints or None, got {output_size!r}")
        return out[0], out[1]
    raise TypeError(f"output_size must be an int or a pair (h, w), got "
                    f"{type(output_size).__name__}")


def cross_entropy_options(ignore_index, reduction, label_smoothing):
    """cross_entropy's scalar options, checked here for the CPU and GPU paths
    and CrossEntropyLoss."""
    ignore_index = integer(ignore_index, "ignore_index")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    label_smoothing = number(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return ignore_index, reduction, label_smoothing
