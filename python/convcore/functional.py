"""The functional API: torch.nn.functional's signatures over numpy arrays (NCHW).

This module normalises the *forms* arguments come in (an int or an (h, w)
pair, 'same'/'valid', None, unbatched 3-D input), with convcore._args's
helpers, which the GPU ops and the layers share, and hands the C++ core
plain numbers. The core checks the *values* (positive strides, channel
counts, kernel vs. padded input, ...) and computes output shapes, so those
rules live in one place (csrc/cpu/shapes.cpp) for every caller.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Tuple, Union

import numpy as np

from . import _core
from ._args import (adaptive_size, conv_padding, cross_entropy_options, flag as _flag,
                    integer, number, output_mask as _output_mask, pair, pool_args, pool_divisor)
from ._arrays import array_module, is_gpu_array
from ._arrays import host_array as _array  # the numpy check of every argument (F._array)
from ._backends import gpu_functional, provide_cpu_functional

IntPair = Union[int, Tuple[int, int]]

__all__ = [
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "linear",
    "linear_backward",
    "relu",
    "relu_backward",
    "softmax",
    "softmax_backward",
    "log_softmax",
    "log_softmax_backward",
    "local_response_norm",
    "local_response_norm_backward",
    "batch_norm",
    "batch_norm_backward",
    "cross_entropy",
    "cross_entropy_backward",
    "conv2d_output_shape",
    "pool2d_output_shape",
    "set_num_threads",
    "get_num_threads",
]


# ---------------------------------------------------------------- argument forms

def _out(out, shape, dtype, inputs, inplace_ok: bool = False):
    """Checks a caller's output buffer: a writeable C-contiguous array of the
    result's exact shape and dtype that shares no memory with the inputs
    (for elementwise ops, being the input itself is fine)."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {out.shape}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be a writeable C-contiguous array")
    for a in inputs:
        if a is None or (inplace_ok and a is out):
            continue
        if np.may_share_memory(out, a):
            raise ValueError("out must not overlap the inputs")
    return out


def _batched(x: np.ndarray, name: str) -> Tuple[np.ndarray, bool]:
    """Accepts (C, H, W) like PyTorch by adding a batch dimension."""
    if x.ndim == 3:
        return x[None], True
    return x, False


# ------------------------------------------------------------------ convolution

def _algorithm(algorithm) -> str:
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a string, got {type(algorithm).__name__}")
    return algorithm


def conv2d(input, weight, bias=None, stride: IntPair = 1, padding: Union[IntPair, str] = 0,
           dilation: IntPair = 1, groups: int = 1, algorithm: str = "auto",
           out: Optional[np.ndarray] = None) -> np.ndarray:
    """2-D cross-correlation, as torch.nn.functional.conv2d.

    input (N, C_in, H, W) or (C_in, H, W); weight (C_out, C_in / groups, kH, kW);
    bias (C_out,) or None. Returns (N, C_out, H_out, W_out) with
    H_out = floor((H + pad_top + pad_bottom - dilation * (kH - 1) - 1) / stride) + 1.
    algorithm: 'auto' (chosen per shape), or 'gemm', 'direct' (the GEMM
    microkernel reading the padded image in place), 'pointwise' (1x1),
    'depthwise' (one input channel per group), 'grouped' (plane by plane, for
    groups of few channels), 'winograd' (Winograd F(2x2, 3x3))
    or 'winograd4' (F(4x4, 3x3): fewer multiplications, about 5x the float32
    rounding error of the others; both need 3x3, stride 1, dilation 1,
    groups 1) to force one. out: an array to write the result into (instead
    of a new one).
    """
    x, unbatched = _batched(_array(input, "input"), "input")
    w = _array(weight, "weight")
    b = None if bias is None else _array(bias, "bias")
    s, d = pair(stride, "stride"), pair(dilation, "dilation")
    pad = conv_padding(padding, w, s, d)
    g = integer(groups, "groups")
    if out is not None:
        shape = _core.conv2d_output_shape(list(x.shape), list(w.shape), s, pad, d, g) \
            if x.ndim == 4 and w.ndim == 4 else None
        if shape is not None:
            shape = shape[1:] if unbatched else shape
            out = _out(out, shape, x.dtype, (input, w, b))
            out = out[None] if unbatched else out
    y = _core.conv2d(x, w, b, s, pad, d, g, _algorithm(algorithm), out)
    return y[0] if unbatched else y


def conv2d_backward(grad_output, input, weight, stride: IntPair = 1, padding=0,
                    dilation: IntPair = 1, groups: int = 1, algorithm: str = "auto",
                    output_mask=(True, True, True)):
    """Gradients of conv2d: (grad_input, grad_weight, grad_bias). Those that
    output_mask leaves out are None and cost nothing (a first layer's
    grad_input takes as long as its forward)."""
    x, unbatched = _batched(_array(input, "input"), "input")
    gy = _array(grad_output, "grad_output")
    if unbatched:
        gy = gy[None] if gy.ndim == 3 else gy
    w = _array(weight, "weight")
    s, d = pair(stride, "stride"), pair(dilation, "dilation")
    pad = conv_padding(padding, w, s, d)
    gx, gw, gb = _core.conv2d_backward(gy, x, w, s, pad, d, integer(groups, "groups"),
                                       *_output_mask(output_mask), _algorithm(algorithm))
    return (gx[0] if unbatched and gx is not None else gx), gw, gb


def conv2d_output_shape(input_shape, weight_shape, stride: IntPair = 1, padding=0,
                        dilation: IntPair = 1, groups: int = 1) -> Tuple[int, int, int, int]:
    """The output shape conv2d would give (and the same errors), without computing."""
    s, d = pair(stride, "stride"), pair(dilation, "dilation")
    fake_w = np.empty(tuple(weight_shape), dtype=np.uint8) if isinstance(padding, str) else None
    pad = conv_padding(padding, fake_w, s, d)
    return _core.conv2d_output_shape(list(input_shape), list(weight_shape), s, pad, d,
                                     integer(groups, "groups"))


# ---------------------------------------------------------------------- pooling

def pool2d_output_shape(input_shape, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode: bool = False, kind: str = "max") -> Tuple[int, int, int, int]:
    """The output shape of max_pool2d (kind='max') or avg_pool2d (kind='avg')."""
    if kind not in ("max", "avg"):
        raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
    k, s, p, d = pool_args(kernel_size, stride, padding, dilation)
    return _core.pool2d_output_shape(list(input_shape), k, s, p, d, bool(ceil_mode),
                                     kind == "avg")


def _pool_out(out, x, unbatched, input, k, s, p, d, ceil_mode, kind):
    if out is None or x.ndim != 4:
        return out
    shape = _core.pool2d_output_shape(list(x.shape), k, s, p, d, bool(ceil_mode), kind == "avg")
    out = _out(out, shape[1:] if unbatched else shape, x.dtype, (input,))
    return out[None] if unbatched else out


def max_pool2d(input, kernel_size: IntPair, stride: Optional[IntPair] = None,
               padding: IntPair = 0, dilation: IntPair = 1, ceil_mode: bool = False,
               return_indices: bool = False, out: Optional[np.ndarray] = None):
    """Max pooling, as torch.nn.functional.max_pool2d.

    With return_indices, also returns int64 indices of each max, flat
    (h * W + w) within its input plane.
    """
    x, unbatched = _batched(_array(input, "input"), "input")
    k, s, p, d = pool_args(kernel_size, stride, padding, dilation)
    out = _pool_out(out, x, unbatched, input, k, s, p, d, ceil_mode, "max")
    result = _core.max_pool2d(x, k, s, p, d, bool(ceil_mode), bool(return_indices), out)
    if not unbatched:
        return result
    return (result[0][0], result[1][0]) if return_indices else result[0]


def max_pool2d_backward(grad_output, input, kernel_size: IntPair,
                        stride: Optional[IntPair] = None, padding: IntPair = 0,
                        dilation: IntPair = 1, ceil_mode: bool = False,
                        indices: Optional[np.ndarray] = None) -> np.ndarray:
    """Gradient of max_pool2d with respect to its input. The max of each
    window is found again from input (ties go to the first, as in PyTorch),
    or, faster, taken from `indices` as max_pool2d(..., return_indices=True)
    returned them."""
    x, unbatched = _batched(_array(input, "input"), "input")
    gy = _array(grad_output, "grad_output")
    if unbatched and gy.ndim == 3:
        gy = gy[None]
    k, s, p, d = pool_args(kernel_size, stride, padding, dilation)
    if indices is not None:
        idx = _array(indices, "indices")
        if unbatched and idx.ndim == 3:
            idx = idx[None]
        expected = pool2d_output_shape(x.shape, k, s, p, d, ceil_mode) if x.ndim == 4 else None
        if expected is not None and gy.shape != tuple(expected):
            raise ValueError(f"grad_output must have shape {tuple(expected)}, got {gy.shape}")
        gx = _core.max_pool2d_backward_indices(gy, idx, x)
        return gx[0] if unbatched else gx
    gx = _core.max_pool2d_backward(gy, x, k, s, p, d, bool(ceil_mode))
    return gx[0] if unbatched else gx


def avg_pool2d(input, kernel_size: IntPair, stride: Optional[IntPair] = None,
               padding: IntPair = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: Optional[int] = None,
               out: Optional[np.ndarray] = None) -> np.ndarray:
    """Average pooling, as torch.nn.functional.avg_pool2d."""
    x, unbatched = _batched(_array(input, "input"), "input")
    k, s, p, _ = pool_args(kernel_size, stride, padding)
    out = _pool_out(out, x, unbatched, input, k, s, p, (1, 1), ceil_mode, "avg")
    y = _core.avg_pool2d(x, k, s, p, bool(ceil_mode), bool(count_include_pad),
                         pool_divisor(divisor_override), out)
    return y[0] if unbatched else y


def avg_pool2d_backward(grad_output, input, kernel_size: IntPair,
                        stride: Optional[IntPair] = None, padding: IntPair = 0,
                        ceil_mode: bool = False, count_include_pad: bool = True,
                        divisor_override: Optional[int] = None) -> np.ndarray:
    """Gradient of avg_pool2d with respect to its input."""
    x, unbatched = _batched(_array(input, "input"), "input")
    gy = _array(grad_output, "grad_output")
    if unbatched and gy.ndim == 3:
        gy = gy[None]
    k, s, p, _ = pool_args(kernel_size, stride, padding)
    gx = _core.avg_pool2d_backward(gy, x, k, s, p, bool(ceil_mode), bool(count_include_pad),
                                   pool_divisor(divisor_override))
    return gx[0] if unbatched else gx


def adaptive_avg_pool2d(input, output_size) -> np.ndarray:
    """Adaptive average pooling, as torch.nn.functional.adaptive_avg_pool2d: bin i
    of n over a length L spans [floor(i L / n), ceil((i + 1) L / n))."""
    x, unbatched = _batched(_array(input, "input"), "input")
    out = _core.adaptive_avg_pool2d(x, adaptive_size(output_size, x))
    return out[0] if unbatched else out


def adaptive_avg_pool2d_backward(grad_output, input) -> np.ndarray:
    """Gradient of adaptive_avg_pool2d (the output size is grad_output's)."""
    x, unbatched = _batched(_array(input, "input"), "input")
    gy = _array(grad_output, "grad_output")
    if unbatched and gy.ndim == 3:
        gy = gy[None]
    gx = _core.adaptive_avg_pool2d_backward(gy, x)
    return gx[0] if unbatched else gx


# --------------------------------------------------------------- fully connected

def _flatten_features(x: np.ndarray) -> np.ndarray:
    if x.ndim == 0:
        raise ValueError("input must have at least 1 dimension (..., in_features), got a scalar")
    # (math.prod: np.prod took half of a small layer's call)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def linear(input, weight, bias=None, out: Optional[np.ndarray] = None) -> np.ndarray:
    """input (..., in_features) @ weight (out_features, in_features)^T + bias."""
    x = _array(input, "input")
    w = _array(weight, "weight")
    b = None if bias is None else _array(bias, "bias")
    flat = _flatten_features(x)
    if out is not None and w.ndim == 2:
        out = _out(out, x.shape[:-1] + (w.shape[0],), x.dtype, (x, w, b))
        _core.linear(flat, w, b, out.reshape(flat.shape[0], w.shape[0]))
        return out
    y = _core.linear(flat, w, b, None)
    return y.reshape(x.shape[:-1] + (y.shape[1],))


def linear_backward(grad_output, input, weight, output_mask=(True, True, True)):
    """Gradients of linear: (grad_input, grad_weight, grad_bias); None for
    those that output_mask leaves out."""
    x = _array(input, "input")
    w = _array(weight, "weight")
    gy = _array(grad_output, "grad_output")
    if w.ndim == 2 and x.ndim >= 1:
        expected = x.shape[:-1] + (w.shape[0],)
        if gy.shape != expected:
            raise ValueError(f"grad_output must have shape {expected}, got {gy.shape}")
    gx, gw, gb = _core.linear_backward(_flatten_features(gy) if gy.ndim else gy,
                                       _flatten_features(x), w, *_output_mask(output_mask))
    return (None if gx is None else gx.reshape(x.shape)), gw, gb


# ------------------------------------------------------------------- activation

def relu(input, out: Optional[np.ndarray] = None) -> np.ndarray:
    """max(input, 0) elementwise (NaN stays NaN); out=input works in place."""
    x = _array(input, "input")
    return _core.relu(x, _out(out, x.shape, x.dtype, (x,), inplace_ok=True))


def relu_backward(grad_output, input) -> np.ndarray:
    """grad_output where input > 0, else 0."""
    return _core.relu_backward(_array(grad_output, "grad_output"), _array(input, "input"))


def softmax(input, dim: int) -> np.ndarray:
    """exp(input) / sum(exp(input)) along dim, as torch.nn.functional.softmax
    (dim is required: PyTorch's implicit choice is deprecated). Computed with
    the max subtracted, so large logits do not overflow; a NaN makes its
    whole line NaN."""
    return _core.softmax(_array(input, "input"), integer(dim, "dim"))


def softmax_backward(grad_output, output, dim: int) -> np.ndarray:
    """Gradient of softmax with respect to its input, from the forward's
    output: output * (grad_output - sum(grad_output * output, dim))."""
    return _core.softmax_backward(_array(grad_output, "grad_output"), _array(output, "output"),
                                  integer(dim, "dim"))


def log_softmax(input, dim: int) -> np.ndarray:
    """log(softmax(input, dim)) in one pass, as torch.nn.functional.log_softmax:
    input - max - log(sum(exp(input - max))) along dim, finite where softmax
    underflows to 0."""
    return _core.softmax(_array(input, "input"), integer(dim, "dim"), log=True)


def log_softmax_backward(grad_output, output, dim: int) -> np.ndarray:
    """Gradient of log_softmax with respect to its input, from the forward's
    output: grad_output - exp(output) * sum(grad_output, dim)."""
    return _core.softmax_backward(_array(grad_output, "grad_output"), _array(output, "output"),
                                  integer(dim, "dim"), log=True)


# ---------------------------------------------------------------- normalisation

def local_response_norm(input, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> np.ndarray:
    """Local response normalisation across channels, as
    torch.nn.functional.local_response_norm: input / (k + alpha / size *
    sum of squares over the size neighbouring channels) ** beta."""
    return _core.local_response_norm(_array(input, "input"), integer(size, "size"),
                                     number(alpha, "alpha"), number(beta, "beta"),
                                     number(k, "k"))


def local_response_norm_backward(grad_output, input, size: int, alpha: float = 1e-4,
                                 beta: float = 0.75, k: float = 1.0) -> np.ndarray:
    """Gradient of local_response_norm with respect to its input."""
    return _core.local_response_norm_backward(
        _array(grad_output, "grad_output"), _array(input, "input"), integer(size, "size"),
        number(alpha, "alpha"), number(beta, "beta"), number(k, "k"))


def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               return_stats: bool = False, relu: bool = False):
    """Batch normalisation per channel of input (N, C, ...), as
    torch.nn.functional.batch_norm. When training, normalises with the batch
    statistics and updates running_mean / running_var in place (unbiased
    variance, weight `momentum`); otherwise uses them. An empty input gives
    an empty output and updates nothing. With return_stats, also returns the
    (mean, var) it normalised with, for batch_norm_backward. relu=True
    applies relu to the result in the same pass (a BatchNorm2d then a ReLU)."""
    x = _array(input, "input")
    rm = None if running_mean is None else _array(running_mean, "running_mean")
    rv = None if running_var is None else _array(running_var, "running_var")
    w = None if weight is None else _array(weight, "weight")
    b = None if bias is None else _array(bias, "bias")
    momentum, eps = number(momentum, "momentum"), number(eps, "eps")
    if x.ndim >= 1 and x.size == 0 and x.dtype in (np.float32, np.float64):
        # As PyTorch: an empty input (an empty batch, or an empty 1-D input)
        # gives an empty output and leaves the running statistics alone; a
        # batch of no values has no mean or variance (NaN). (Other dtypes go
        # on to the core's dtype error.)
        out = np.empty(x.shape, dtype=x.dtype)
        _flag(relu, "relu")
        if not return_stats:
            return out
        if training:
            channels = x.shape[1] if x.ndim >= 2 else 0
            return out, np.full(channels, np.nan, x.dtype), np.full(channels, np.nan, x.dtype)
        return out, rm, rv
    if x.ndim < 2:  # (the checks below index x.shape[1])
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...), got "
                         f"{x.ndim}-D with shape {x.shape}")
    if training:
        for name, stat in (("running_mean", rm), ("running_var", rv)):
            if stat is not None and (stat.dtype != x.dtype or stat.shape != (x.shape[1],)
                                     or not stat.flags.writeable):
                raise ValueError(f"{name} must be a writeable {x.dtype} array of shape "
                                 f"({x.shape[1]},) to be updated, got {stat.dtype} {stat.shape}")
    out, mean, var = _core.batch_norm(x, rm, rv, w, b, bool(training), eps, _flag(relu, "relu"))
    if training:
        count = x.size // max(x.shape[1], 1)
        # an inf running statistic with momentum 1 gives NaN (inf * 0), as
        # in PyTorch: without numpy's RuntimeWarning for it
        with np.errstate(invalid="ignore", over="ignore"):
            if rm is not None:
                rm *= 1 - momentum
                rm += momentum * mean
            if rv is not None:
                rv *= 1 - momentum
                rv += momentum * var * (count / max(count - 1, 1))
    else:
        mean, var = rm, rv
    return (out, mean, var) if return_stats else out


def batch_norm_backward(grad_output, input, mean, var, weight=None, training: bool = True,
                        eps: float = 1e-5, relu_output=None):
    """Gradients of batch_norm: (grad_input, grad_weight, grad_bias). mean and
    var are the statistics the forward normalised with (the batch's, from
    batch_norm(..., return_stats=True), when training; the running ones
    otherwise). relu_output: the output of batch_norm(..., relu=True), whose
    gradient grad_output is; it flows back only where that output is
    positive, as relu_backward's."""
    return _core.batch_norm_backward(
        _array(grad_output, "grad_output"), _array(input, "input"), _array(mean, "mean"),
        _array(var, "var"), None if weight is None else _array(weight, "weight"),
        bool(training), number(eps, "eps"),
        None if relu_output is None else _array(relu_output, "relu_output"))


# ------------------------------------------------------------------------- loss

def _cross_entropy_parts(input, target, weight, ignore_index, reduction, label_smoothing):
    """What cross_entropy and its gradient share: the log-softmax of input
    with the class axis moved last, the weighted target distribution q over
    it (each position's loss is -sum(q * log p)), the divisor of the mean,
    and where the class axis was. As PyTorch, a target of input's shape holds
    class probabilities, any other one class indices."""
    x = _array(input, "input")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"input must be float32 or float64, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("input must be logits of shape (C,), (N, C) or (N, C, d1, ...), "
                         "got a scalar")
    ignore_index, reduction, smoothing = cross_entropy_options(ignore_index, reduction,
                                                                label_smoothing)
    axis = 0 if x.ndim == 1 else 1
    classes = x.shape[axis]
    if classes == 0:
        raise ValueError(f"input must have at least one class (dimension {axis}), got shape "
                         f"{x.shape}")
    w = None
    if weight is not None:
        w = _array(weight, "weight")
        if w.dtype != x.dtype:
            raise TypeError(f"weight must have input's dtype {x.dtype}, got {w.dtype}")
        if w.shape != (classes,):
            raise ValueError(f"weight must have shape ({classes},), one value per class, got "
                             f"{w.shape}")
    if target is None:
        raise TypeError("target must be a numpy.ndarray of class indices or probabilities, "
                        "got None")
    t = np.asarray(target)
    if t.shape == x.shape:
        if t.dtype != x.dtype:
            raise TypeError(f"target has input's shape {x.shape}, so it holds class "
                            f"probabilities and must be {x.dtype}, got {t.dtype}")
        if ignore_index >= 0:
            raise ValueError(f"ignore_index is not supported for class-probability targets, "
                             f"got ignore_index={ignore_index}")
        q = np.moveaxis(t, axis, -1)
        if smoothing:
            q = q * x.dtype.type(1.0 - smoothing) + x.dtype.type(smoothing / classes)
        if w is not None:
            q = q * w
        divisor = x.dtype.type(x.size // classes)  # the number of positions
    else:
        positions = x.shape[:axis] + x.shape[axis + 1:]
        if t.shape != positions or t.dtype.kind not in "iu":
            raise ValueError(f"target must be integer class indices of shape {positions} or "
                             f"class probabilities of shape {x.shape}, got {t.dtype} {t.shape}")
        kept = t != ignore_index
        bad = kept & ((t < 0) | (t >= classes))
        if bad.any():
            raise ValueError(f"target must hold class indices in [0, {classes}) or "
                             f"ignore_index ({ignore_index}), got {t[bad].flat[0]}")
        class_weight = np.ones(classes, x.dtype) if w is None else w
        index = np.where(kept, t, 0)
        target_weight = np.where(kept, class_weight[index], 0).astype(x.dtype)
        # As PyTorch: (1 - s) of the target class's weight on the target, plus
        # s / classes of every class's weight; nothing where ignored.
        one_hot = np.arange(classes) == index[..., None]
        q = (x.dtype.type(1.0 - smoothing) * target_weight[..., None] * one_hot
             + x.dtype.type(smoothing / classes) * class_weight)
        q[~kept] = 0
        divisor = target_weight.sum(dtype=x.dtype)
    z = np.moveaxis(x, axis, -1)
    shifted = z - z.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return log_p, q, divisor, axis


def cross_entropy(input, target, weight=None, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> np.ndarray:
    """Softmax cross-entropy, as torch.nn.functional.cross_entropy.

    input: logits (C,), (N, C) or (N, C, d1, ...). target: class indices
    (the shape without C; positions equal to ignore_index count for nothing)
    or class probabilities (input's shape and dtype). weight: (C,), a
    weight per class. label_smoothing s mixes s / C of every class into the
    target. reduction 'none' returns each position's loss, 'sum' their sum,
    'mean' their sum over the total weight of the targets (class indices) or
    over the number of positions (probabilities): NaN when that is 0, as in
    PyTorch. Returns an array of input's dtype (0-d unless 'none')."""
    log_p, q, divisor, _ = _cross_entropy_parts(input, target, weight, ignore_index, reduction,
                                                label_smoothing)
    # where q is 0, a logit of -inf (a masked class) adds nothing, not 0 * inf
    with np.errstate(invalid="ignore"):
        losses = -np.where(q != 0, q * log_p, 0).sum(axis=-1)
    if reduction == "none":
        return np.asarray(losses)  # (0-d for unbatched input, where numpy gives a scalar)
    total = losses.sum(dtype=log_p.dtype)
    if reduction == "sum":
        return np.asarray(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(total / divisor)


def cross_entropy_backward(grad_output, input, target, weight=None, *, ignore_index: int = -100,
                           reduction: str = "mean", label_smoothing: float = 0.0) -> np.ndarray:
    """Gradient of cross_entropy with respect to input. grad_output: a
    number (or a 0-d array) for 'mean' and 'sum', an array of the loss's
    shape for 'none'."""
    log_p, q, divisor, axis = _cross_entropy_parts(input, target, weight, ignore_index,
                                                   reduction, label_smoothing)
    dtype = log_p.dtype
    if reduction == "none":
        if grad_output is None:
            raise TypeError(f"grad_output must be an array of the loss's shape "
                            f"{log_p.shape[:-1]} (reduction='none'), got None")
        gy = _array(grad_output, "grad_output")
        if gy.dtype != dtype:
            raise TypeError(f"grad_output must have input's dtype {dtype}, got {gy.dtype}")
        if gy.shape != log_p.shape[:-1]:
            raise ValueError(f"grad_output must have the loss's shape {log_p.shape[:-1]} "
                             f"(reduction='none'), got {gy.shape}")
        scale = gy[..., None]
    else:
        if isinstance(grad_output, np.ndarray) and grad_output.ndim == 0:
            grad_output = grad_output.item()
        scale = dtype.type(number(grad_output, "grad_output"))
        if reduction == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):
                scale = scale / divisor
    # d/dz of -sum(q * log softmax(z)) = softmax(z) * sum(q) - q
    with np.errstate(invalid="ignore"):
        grad = (np.exp(log_p) * q.sum(axis=-1, keepdims=True) - q) * scale
    # A position without a target (ignored) has no gradient, also where the
    # mean divides by 0 (all ignored: scale inf), as in PyTorch.
    grad = np.where((q != 0).any(axis=-1, keepdims=True), grad, 0)
    return np.ascontiguousarray(np.moveaxis(grad.astype(dtype, copy=False), -1, axis))


# ------------------------------------------------------------------------- joins

def add(input, other) -> np.ndarray:
    """input + other (same shape and dtype, float32 or float64), summed on the
    core's threads (numpy's loop where one is a strided view: it reads the
    view in place) into a new array that, when large, comes from the core's
    cache of blocks (see set_scratch_cache_limit): the layers' sums (residual
    blocks, a branch's gradients) then need no fresh pages. GPU arrays add by
    their own library."""
    if is_gpu_array(input) or is_gpu_array(other):
        return input + other
    a, b = _array(input, "input"), _array(other, "other")
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"other must have input's shape {a.shape} and dtype {a.dtype}, got "
                         f"{b.shape} {b.dtype}")
    if a.flags.c_contiguous and b.flags.c_contiguous:
        return _core.add(a, b)
    # a strided view (a slice of a concatenation's gradient): numpy reads it
    # in place, where the core would copy it first
    return np.add(a, b, out=_core.empty(list(a.shape), a.dtype))


def _per_channel(x: np.ndarray, s: np.ndarray) -> bool:
    """Whether s holds one value per image and channel of x: (N, C, 1, ...) against (N, C, ...)."""
    return s.ndim == x.ndim >= 3 and s.shape[:2] == x.shape[:2] and all(d == 1 for d in s.shape[2:])


def mul(input, other) -> np.ndarray:
    """input * other, broadcast as numpy does, into a new array that, when the
    product has the shape and dtype of one of them and is large, comes from
    the core's cache of blocks (as add): a squeeze-and-excitation gate's
    x * s and its gradients then need no fresh pages. Products of contiguous
    arrays of one shape, or with a value per image and channel (the gate),
    run on the core's threads. GPU arrays multiply by their own library."""
    if is_gpu_array(input) or is_gpu_array(other):
        return input * other
    a, b = _array(input, "input"), _array(other, "other")
    shape = np.broadcast_shapes(a.shape, b.shape)
    if a.dtype == b.dtype and a.dtype in (np.float32, np.float64) and shape in (a.shape, b.shape):
        contiguous = a.flags.c_contiguous and b.flags.c_contiguous  # (as in add)
        if contiguous and (a.shape == b.shape or _per_channel(a, b)):
            return _core.mul(a, b)
        if contiguous and _per_channel(b, a):  # the same products: multiplication commutes exactly
            return _core.mul(b, a)
        return np.multiply(a, b, out=_core.empty(list(shape), a.dtype))
    return a * b


def sum_to_size(grad, shape) -> np.ndarray:
    """grad summed over the dimensions that broadcasting expanded from
    `shape` to grad's shape (torch.Tensor.sum_to_size): the gradient of an
    operand that a join broadcast."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    axes = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    return grad.sum(axis=axes, keepdims=True).astype(grad.dtype, copy=False)


def mul_backward(grad_output, input, other) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients of mul(input, other): (grad_output * other, grad_output *
    input), each summed to its operand's shape. A gate of one value per
    image and channel (squeeze-and-excitation) takes its gradient in one
    pass over grad_output and the gated input, each plane's sum on the
    core's threads, with no full-size product."""
    g = grad_output

    def grad_of(operand, partner):
        if (not is_gpu_array(g) and _per_channel(partner, operand) and g.shape == partner.shape
                and g.dtype == partner.dtype == operand.dtype
                and g.dtype in (np.float32, np.float64)
                and g.flags.c_contiguous and partner.flags.c_contiguous):
            return _core.mul_sum_planes(g, partner).reshape(operand.shape)
        return sum_to_size(mul(g, partner), operand.shape)

    return grad_of(input, other), grad_of(other, input)


def cat(tensors, dim: int = 0) -> np.ndarray:
    """The arrays joined along dim, as torch.cat (numpy.concatenate): one
    dtype (float32 or float64), equal shapes outside dim. A large result
    comes from the core's cache of blocks (see set_scratch_cache_limit),
    so a training step's concatenations (DenseNet's dense blocks) need no
    fresh pages. GPU arrays are joined by their own library."""
    tensors = list(tensors)
    if any(is_gpu_array(t) for t in tensors):
        return array_module(tensors[0]).concatenate(tensors, axis=integer(dim, "dim"))
    return _core.concatenate([_array(t, f"tensors[{i}]") for i, t in enumerate(tensors)],
                             integer(dim, "dim"))


# -------------------------------------------------------------------- optimisers

def _in_place(value, name: str) -> np.ndarray:
    """An array an optimiser step updates in place: the caller's own."""
    a = _array(value, name)
    if not (a.flags.c_contiguous and a.flags.writeable and a.dtype.isnative):
        raise ValueError(f"{name} must be a writeable C-contiguous array of native byte order")
    return a


def sgd_step(data, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, first=False) -> None:
    """One step of torch.optim.SGD's rule on `data`, in place, in one pass
    over memory (convcore.optim.SGD's update):

        g = grad + weight_decay * data
        buf = g (first), else momentum * buf + (1 - dampening) * g   (momentum != 0)
        g = g + momentum * buf if nesterov else buf                   (momentum != 0)
        data -= lr * g

    momentum_buffer: an array of data's shape and dtype, written when
    momentum != 0 (read unless first). data and momentum_buffer must be
    writeable and C-contiguous; grad is copied when it is not contiguous."""
    w = _in_place(data, "data")
    g = np.ascontiguousarray(_array(grad, "grad"))
    buf = None if momentum_buffer is None else _in_place(momentum_buffer, "momentum_buffer")
    _core.sgd_step(w, g, buf, float(lr), float(momentum), float(dampening),
                   float(weight_decay), bool(nesterov), bool(first))


def adam_step(data, grad, exp_avg, exp_avg_sq, step_size, beta1, beta2, root_correction2, eps,
              weight_decay=0.0) -> None:
    """One step of torch.optim.Adam's rule on `data`, in place, in one pass
    over memory (convcore.optim.Adam's update, t the step count from 1):

        g = grad + weight_decay * data
        exp_avg = beta1 * exp_avg + (1 - beta1) * g
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        data -= step_size * exp_avg / (sqrt(exp_avg_sq) / root_correction2 + eps)

    with step_size = lr / (1 - beta1^t) and root_correction2 = sqrt(1 - beta2^t).
    data, exp_avg and exp_avg_sq (arrays of data's shape and dtype) must be
    writeable and C-contiguous; grad is copied when it is not contiguous."""
    w = _in_place(data, "data")
    g = np.ascontiguousarray(_array(grad, "grad"))
    m, v = _in_place(exp_avg, "exp_avg"), _in_place(exp_avg_sq, "exp_avg_sq")
    _core.adam_step(w, g, m, v, float(step_size), float(beta1), float(beta2),
                    float(root_correction2), float(eps), float(weight_decay))


# ---------------------------------------------------------------------- threads

def set_num_threads(n: int) -> None:
    """Threads used by the core (global; default: OMP_NUM_THREADS or all cores)."""
    _core.set_num_threads(integer(n, "n"))


def get_num_threads() -> int:
    return _core.get_num_threads()


def _byte_count(nbytes) -> int:
    nbytes = integer(nbytes, "nbytes")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return nbytes


def set_workspace_limit(nbytes: int) -> None:
    """The most bytes one piece of the core's scratch memory may take; a call
    that would need more raises MemoryError before allocating (0: the
    machine's physical memory, the default)."""
    _core.set_workspace_limit(_byte_count(nbytes))


def workspace_limit() -> int:
    """The scratch-memory limit in bytes (see set_workspace_limit)."""
    return _core.workspace_limit()


def set_scratch_cache_limit(nbytes: int) -> None:
    """Blocks of 256 KB and more of the core's scratch memory and of the
    arrays its functions return are kept when freed, for the next call that
    needs about as much, up to nbytes in all (default: an eighth of the
    machine's physical memory, within 256 MB to 4 GB; 0 frees them and keeps
    none). A fresh block costs a page fault and a zeroing by the kernel for
    every page it touches: a training step that allocates the same shapes as
    the step before finds them here."""
    _core.set_scratch_cache_limit(_byte_count(nbytes))


def scratch_cache_limit() -> int:
    """The most bytes of freed large blocks kept (see set_scratch_cache_limit)."""
    return _core.scratch_cache_limit()


def scratch_cache_bytes() -> int:
    """The bytes of freed large blocks kept now."""
    return _core.scratch_cache_bytes()


def workspace_peak() -> int:
    """The most scratch bytes this thread's calls held at once since
    reset_workspace_peak(): what a layer costs beyond its inputs and outputs."""
    return _core.workspace_peak()


def reset_workspace_peak() -> None:
    _core.reset_workspace_peak()


# ------------------------------------------------------------------ GPU dispatch
# A call with an array argument on a GPU (a cupy array, a torch CUDA tensor,
# anything exposing __cuda_array_interface__) runs the same op from the GPU
# backend instead (convcore._backends finds it; CUDA kernels through CuPy);
# all other calls take the CPU path above, which never imports cupy.

# argument types that are never GPU arrays: skipped without a closer look,
# so the CPU path pays well under a microsecond for the dispatch
_HOST_TYPES = frozenset((np.ndarray, int, float, bool, str, tuple, list, type(None)))


def _gpu_dispatch(fn):
    import functools
    import inspect

    name = fn.__name__
    signature = inspect.signature(fn)

    def on_gpu(values) -> bool:
        for v in values:  # a loop, not any() over a generator: a microsecond less per call
            if type(v) not in _HOST_TYPES and is_gpu_array(v):
                return True
        return False

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (on_gpu(args) or (kwargs and on_gpu(kwargs.values()))):
            return fn(*args, **kwargs)

        def gpu_argument() -> str:
            bound = signature.bind_partial(*args, **kwargs).arguments
            return next((k for k, v in bound.items() if is_gpu_array(v)), "input")

        return getattr(gpu_functional(name, gpu_argument), name)(*args, **kwargs)

    return wrapper


for _name in ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d",
              "avg_pool2d_backward", "adaptive_avg_pool2d", "adaptive_avg_pool2d_backward",
              "linear", "linear_backward", "relu", "relu_backward", "local_response_norm",
              "local_response_norm_backward", "batch_norm", "batch_norm_backward", "sgd_step",
              "adam_step"):
    globals()[_name] = _gpu_dispatch(globals()[_name])
del _name

# The CPU backend's ops are this module's; _backends sits below it and cannot
# import it, so it is handed over here (see convcore._backends).
provide_cpu_functional(sys.modules[__name__])
