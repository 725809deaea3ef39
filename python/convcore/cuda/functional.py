"""The GPU versions of convcore's functional ops (float32, NCHW).

Same signatures, argument forms and shape rules as convcore.functional:
arguments are normalised by the helpers both use (convcore._args) and
output shapes come from the core's shape functions
(`_core.conv2d_output_shape`, ...), so each rule lives in one place. This
module imports neither convcore.functional nor convcore.nn: they reach it
through convcore._backends. Each op here only checks what is GPU-specific (dtype,
device, size), picks a launch configuration and launches kernels through
a backend:

- the CuPy backend (convcore.cuda.backend()) on a real GPU;
- the CPU-execution shim in tests/cuda_shim, which runs the same kernels
  compiled as C++ on numpy arrays: `with using_backend(shim): ...`.

Results are new C-contiguous arrays of the backend (cupy on the GPU).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np

from .. import _core
from .._args import (adaptive_size, conv_padding, cross_entropy_options, flag as _flag,
                     integer, number, output_mask as _output_mask, pair, pool_args, pool_divisor)
from .._arrays import is_cupy
from . import backend as _default_backend

_THREADS = 256
_INT32_MAX = 2 ** 31 - 1
# The GEMM-shaped kernels come in two tile shapes (common.cuh): "small"
# (64 x 64, kernel `name`) and "big" (128 x 128, kernel `name_big`). Big
# tiles reuse each load twice as often, but a problem needs enough of them
# to fill the GPU: big is used when it still gives at least one block per SM.
_TILES = {"small": ("", 64), "big": ("_big", 128)}
# Tests force one shape with this ("small" / "big"); None: chosen per call.
TILE = None
# conv2d_grad_weight splits its reduction over (n, oh, ow) into chunks of at
# least this many positions when the weight alone gives too few blocks.
GRAD_WEIGHT_MIN_CHUNK = 1024
# conv2d_backward computes grad_input with the direct kernel, not the GEMM,
# when a group has at most this many input channels (a GEMM tile's rows).
GRAD_INPUT_DIRECT_MAX_CG = 8
_DIRECT_MAX_CG = 8  # the kernel's register array (CC_DIRECT_MAX_CG in conv.cu)
# The bias gradient splits each channel's sum into chunks of at least this
# many positions when there are too few channels to fill the GPU.
BIAS_GRAD_MIN_CHUNK = 16384
# Enough blocks to fill a big GPU (132 SMs on an H100, a few blocks each).
_TARGET_BLOCKS = 512

_override = None


@contextlib.contextmanager
def using_backend(be):
    """Runs the ops on `be` (an object with xp, asarray(value, name) and
    launch(file, kernel, grid, block, args, shared_mem)) inside the block.
    A backend's launch with a zero grid dimension (an empty array) does
    nothing; the ops rely on that, and on every kernel writing each element
    of its output, for empty batches."""
    global _override
    old, _override = _override, be
    try:
        yield be
    finally:
        _override = old


def _be():
    return _override if _override is not None else _default_backend()


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _i32(v) -> np.int32:
    return np.int32(v)


def _f32(v) -> np.float32:
    return np.float32(v)


def _arr(be, value, name: str, optional: bool = False):
    """The backend array for argument `name`: float32, C-contiguous (copied
    on the device if it was not), under 2^31 elements."""
    if value is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a GPU array, got None")
    a = be.asarray(value, name)
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be float32 on the GPU, got {a.dtype}")
    if a.size > _INT32_MAX:
        raise ValueError(f"{name} has {a.size} elements; the GPU kernels index with 32-bit "
                         f"ints (at most {_INT32_MAX})")
    return be.xp.ascontiguousarray(a)


def _dest(be, out, shape, name: str = "out"):
    """The output array: `out` checked, or a new one. Either way under 2^31
    elements (the kernels index in int)."""
    elems = int(np.prod(shape, dtype=np.int64))
    if elems > _INT32_MAX:
        raise ValueError(f"the result would have {elems} elements (shape {tuple(shape)}); the "
                         f"GPU kernels index with 32-bit ints (at most {_INT32_MAX})")
    if out is None:
        return be.xp.empty(tuple(shape), dtype=np.float32)
    o = be.asarray(out, name)
    if o.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {o.dtype}")
    if tuple(o.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(o.shape)}")
    if not o.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous array")
    return o


def _span(a):
    """[first, last) byte addresses of a contiguous array (device or host)."""
    iface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    start = int(iface["data"][0])
    return start, start + a.nbytes


def _no_overlap(out, *inputs):
    """An output written while its inputs are read must not share memory."""
    lo, hi = _span(out)
    for a in inputs:
        if a is not None and a.nbytes and out.nbytes:
            a_lo, a_hi = _span(a)
            if a_lo < hi and lo < a_hi:
                raise ValueError("out must not overlap the inputs")


def _batched(be, value, name):
    a = _arr(be, value, name)
    return (a[None], True) if a.ndim == 3 else (a, False)


def _grad_out(be, value, unbatched, expected, name="grad_output"):
    g = _arr(be, value, name)
    if unbatched and g.ndim == 3:
        g = g[None]
    if tuple(g.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(g.shape)}")
    return g


def _grid1(n: int):
    return (max(_ceil(n, _THREADS), 1), 1, 1)


def _sm_count(be) -> int:
    """Multiprocessors of the current device (132, an H100's, where the
    backend cannot tell: the CPU shim)."""
    count = getattr(be, "multiprocessors", None)
    return int(count()) if callable(count) else 132


def _tile(be, rows: int, cols: int, layers: int = 1):
    """(kernel name suffix, tile edge) for an output of rows x cols per layer."""
    if TILE is not None:
        return _TILES[TILE]
    big_blocks = _ceil(rows, 128) * _ceil(cols, 128) * layers
    return _TILES["big" if big_blocks >= _sm_count(be) else "small"]


# ------------------------------------------------------------------ convolution

_ALGORITHMS = ("auto", "gemm", "depthwise")


def _conv_setup(x, w, stride, padding, dilation, groups, algorithm):
    if not isinstance(algorithm, str) or algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS} on the GPU, got {algorithm!r}")
    s, d = pair(stride, "stride"), pair(dilation, "dilation")
    pad = conv_padding(padding, w, s, d)
    g = integer(groups, "groups")
    # The core's shape rules and errors (channels, groups, kernel vs input).
    shape = _core.conv2d_output_shape(list(x.shape), list(w.shape), s, pad, d, g)
    N, C, H, W = (int(v) for v in x.shape)
    K, _, KH, KW = (int(v) for v in w.shape)
    dims = (N, C, H, W, K, KH, KW, int(shape[2]), int(shape[3]),
            s[0], s[1], pad[0], pad[2], d[0], d[1])
    depthwise = g == C and w.shape[1] == 1 and K % C == 0 and C > 1
    if algorithm == "depthwise" and not depthwise:
        raise ValueError(f"algorithm='depthwise' needs groups == input channels and weight "
                         f"(C * multiplier, 1, kH, kW); got groups={g}, weight "
                         f"{tuple(w.shape)}, {C} input channels")
    use_depthwise = depthwise and algorithm in ("auto", "depthwise")
    return tuple(int(v) for v in shape), dims, g, use_depthwise


def _conv2d(input, weight, bias, stride, padding, dilation, groups, algorithm, out, relu):
    be = _be()
    x, unbatched = _batched(be, input, "input")
    w = _arr(be, weight, "weight")
    b = _arr(be, bias, "bias", optional=True)
    if x.ndim != 4:
        raise ValueError(f"input must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    if w.ndim != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels / groups, kH, kW), "
                         f"got shape {tuple(w.shape)}")
    shape, dims, g, depthwise = _conv_setup(x, w, stride, padding, dilation, groups, algorithm)
    if b is not None and tuple(b.shape) != (shape[1],):
        raise ValueError(f"bias must have shape ({shape[1]},), got {tuple(b.shape)}")
    y = _dest(be, out, shape[1:] if unbatched else shape)
    if out is not None:
        _no_overlap(y, x, w, b)
    y4 = y[None] if unbatched else y
    flags = (_i32(b is not None), _i32(relu))
    if depthwise:
        be.launch("conv.cu", "depthwise_fwd", _grid1(y4.size), (_THREADS, 1, 1),
                  (x, w, b, y4) + tuple(map(_i32, dims)) + flags)
    else:
        N, K, OH, OW = shape
        suffix, edge = _tile(be, K // g, N * OH * OW, g)
        grid = (_ceil(N * OH * OW, edge), _ceil(K // g, edge), g)
        be.launch("conv.cu", "conv2d_fwd" + suffix, grid, (_THREADS, 1, 1),
                  (x, w, b, y4) + tuple(map(_i32, dims)) + (_i32(g),) + flags)
    return y


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           algorithm="auto", out=None):
    """conv2d on the GPU: implicit GEMM (or the direct depthwise kernel)."""
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, algorithm, out,
                   relu=False)


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                algorithm="auto", out=None):
    """relu(conv2d(...)) with bias and ReLU fused into the kernel's epilogue."""
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, algorithm, out,
                   relu=True)


def _grad_weight_splits(P: int, blocks: int) -> int:
    """How many fixed chunks to split the weight gradient's reduction into:
    enough blocks to fill the GPU, chunks of at least GRAD_WEIGHT_MIN_CHUNK."""
    by_work = max(P // GRAD_WEIGHT_MIN_CHUNK, 1)
    by_blocks = max(_ceil(_TARGET_BLOCKS, max(blocks, 1)), 1)
    return int(min(by_work, by_blocks, 65535 // max(blocks, 1) or 1))


def _channel_sum(be, g, out, N: int, C: int, HW: int) -> None:
    """out[c] = sum of g[n, c, hw] (a conv's bias gradient), in fixed chunks of
    at least BIAS_GRAD_MIN_CHUNK positions when C blocks alone are too few,
    the chunks summed in order."""
    total = N * HW
    splits = min(max(total // BIAS_GRAD_MIN_CHUNK, 1), _ceil(_TARGET_BLOCKS, max(C, 1)), 65535)
    chunk = max(_ceil(total, splits), 1)
    splits = max(_ceil(total, chunk), 1)
    target = out if splits == 1 else be.xp.empty((splits, C), dtype=np.float32)
    be.launch("elementwise.cu", "channel_sum", (C, splits, 1), (_THREADS, 1, 1),
              (g, target, _i32(N), _i32(C), _i32(HW), _i32(chunk)))
    if splits > 1:
        be.launch("conv.cu", "sum_splits", _grid1(C), (_THREADS, 1, 1),
                  (target, out, _i32(splits), _i32(C)))


def _conv_grad_input(be, gy, w, gx, dims, g, depthwise):
    d32 = tuple(map(_i32, dims))
    if depthwise:
        be.launch("conv.cu", "depthwise_grad_input", _grid1(gx.size), (_THREADS, 1, 1),
                  (gy, w, gx) + d32)
        return
    N, C, H, W = dims[:4]
    Cg, sh, sw = C // g, dims[9], dims[10]
    threads = N * g * sh * sw * _ceil(H, sh) * _ceil(W, sw)  # phases padded
    if Cg <= min(GRAD_INPUT_DIRECT_MAX_CG, _DIRECT_MAX_CG) and threads <= _INT32_MAX:
        be.launch("conv.cu", "conv2d_grad_input_direct", _grid1(threads), (_THREADS, 1, 1),
                  (gy, w, gx) + d32 + (_i32(g),))
    else:
        suffix, edge = _tile(be, Cg, N * H * W, g)
        be.launch("conv.cu", "conv2d_grad_input" + suffix,
                  (_ceil(N * H * W, edge), _ceil(Cg, edge), g),
                  (_THREADS, 1, 1), (gy, w, gx) + d32 + (_i32(g),))


def _conv_grad_weight(be, gy, x, gw, dims, g, depthwise, deterministic):
    d32 = tuple(map(_i32, dims))
    if depthwise:
        be.launch("conv.cu", "depthwise_grad_weight", (gw.size, 1, 1), (_THREADS, 1, 1),
                  (gy, x, gw) + d32)
        return
    N, C, H, W, K, KH, KW, OH, OW = dims[:9]
    Cg, Kg = C // g, K // g
    R, P = Cg * KH * KW, N * OH * OW
    # the tile from the output alone; splitting the reduction adds blocks
    suffix, edge = _tile(be, Kg, R, g * max(P // GRAD_WEIGHT_MIN_CHUNK, 1))
    blocks = _ceil(R, edge) * _ceil(Kg, edge) * g
    splits = _grad_weight_splits(P, blocks)
    chunk = _ceil(_ceil(max(P, 1), splits), 16) * 16
    splits = max(_ceil(P, chunk), 1)  # an empty batch: one (zero) chunk
    grid = (_ceil(R, edge), _ceil(Kg, edge), g * splits)
    if splits == 1:
        target, atomic = gw, 0
    elif deterministic:
        if splits * gw.size > _INT32_MAX:
            raise ValueError("the weight gradient's workspace is too large for 32-bit indexing")
        target, atomic = be.xp.empty((splits,) + tuple(gw.shape), dtype=np.float32), 0
    else:
        gw.fill(0)
        target, atomic = gw, 1
    be.launch("conv.cu", "conv2d_grad_weight" + suffix, grid, (_THREADS, 1, 1),
              (gy, x, target) + d32 + (_i32(g), _i32(splits), _i32(chunk), _i32(atomic)))
    if target is not gw:
        be.launch("conv.cu", "sum_splits", _grid1(gw.size), (_THREADS, 1, 1),
                  (target, gw, _i32(splits), _i32(gw.size)))


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1,
                    algorithm="auto", output_mask=(True, True, True),
                    deterministic: bool = True):
    """(grad_input, grad_weight, grad_bias) of conv2d on the GPU; None for
    those that output_mask leaves out.

    deterministic=True (default): every sum in a fixed order, bit-identical
    runs. False lets the weight gradient add its split partial sums with
    float atomics (no workspace, one kernel less; order varies)."""
    be, xp = _be(), _be().xp
    need_x, need_w, need_b = _output_mask(output_mask)
    x, unbatched = _batched(be, input, "input")
    w = _arr(be, weight, "weight")
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"input must be 3-D or 4-D and weight 4-D, got shapes "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    shape, dims, g, depthwise = _conv_setup(x, w, stride, padding, dilation, groups, algorithm)
    gy = _grad_out(be, grad_output, unbatched, shape)
    gx = gw = gb = None
    if need_x:
        gx = xp.empty(x.shape, dtype=np.float32)
        _conv_grad_input(be, gy, w, gx, dims, g, depthwise)
        gx = gx[0] if unbatched else gx
    if need_w:
        gw = xp.empty(w.shape, dtype=np.float32)
        _conv_grad_weight(be, gy, x, gw, dims, g, depthwise, deterministic)
    if need_b:
        N, K, OH, OW = dims[0], dims[4], dims[7], dims[8]
        gb = xp.empty((K,), dtype=np.float32)
        _channel_sum(be, gy, gb, N, K, OH * OW)
    return gx, gw, gb


# ---------------------------------------------------------------------- pooling

def _pool_planes(be, input):
    x, unbatched = _batched(be, input, "input")
    if x.ndim != 4:
        raise ValueError(f"input must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    return x, unbatched


def _pool_setup(be, input, kernel_size, stride, padding, dilation, ceil_mode, avg):
    """The batched input, the pooling arguments as pairs and the output shape
    (by the CPU core's shape rule): (x, unbatched, k, s, p, d, shape)."""
    x, unbatched = _pool_planes(be, input)
    k, s, p, d = pool_args(kernel_size, stride, padding, dilation)
    shape = tuple(int(v) for v in _core.pool2d_output_shape(
        list(x.shape), k, s, p, d, bool(ceil_mode), avg))
    return x, unbatched, k, s, p, d, shape


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, out=None):
    be, xp = _be(), _be().xp
    x, unbatched, k, s, p, d, shape = _pool_setup(be, input, kernel_size, stride, padding,
                                                  dilation, ceil_mode, False)
    N, C, H, W = (int(v) for v in x.shape)
    y = _dest(be, out, shape[1:] if unbatched else shape)
    if out is not None:
        _no_overlap(y, x)
    idx = xp.empty(shape, dtype=np.int64) if return_indices else None
    be.launch("pool.cu", "max_pool_fwd", _grid1(y.size), (_THREADS, 1, 1),
              (x, y, idx) + tuple(map(_i32, (N * C, H, W, shape[2], shape[3], k[0], k[1],
                                             s[0], s[1], p[0], p[1], d[0], d[1],
                                             bool(return_indices)))))
    if not return_indices:
        return y
    return (y, idx[0]) if unbatched else (y, idx)


def max_pool2d_backward(grad_output, input, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False, indices=None):
    be, xp = _be(), _be().xp
    x, unbatched, k, s, p, d, shape = _pool_setup(be, input, kernel_size, stride, padding,
                                                  dilation, ceil_mode, False)
    gy = _grad_out(be, grad_output, unbatched, shape)
    if indices is None:
        _, idx = max_pool2d(x, k, s, p, d, ceil_mode, return_indices=True)
    else:
        idx = be.asarray(indices, "indices")
        if idx.dtype != np.int64:
            raise TypeError(f"indices must be int64, got {idx.dtype}")
        idx = xp.ascontiguousarray(idx[None] if unbatched and idx.ndim == 3 else idx)
        if tuple(idx.shape) != shape:
            raise ValueError(f"indices must have shape {shape}, got {tuple(idx.shape)}")
    N, C, H, W = (int(v) for v in x.shape)
    gx = xp.empty(x.shape, dtype=np.float32)
    be.launch("pool.cu", "max_pool_bwd", _grid1(gx.size), (_THREADS, 1, 1),
              (gy, idx, gx) + tuple(map(_i32, (N * C, H, W, shape[2], shape[3], k[0], k[1],
                                               s[0], s[1], p[0], p[1], d[0], d[1]))))
    return gx[0] if unbatched else gx


def _avg_setup(be, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override):
    x, unbatched, k, s, p, _, shape = _pool_setup(be, input, kernel_size, stride, padding, 1,
                                                  ceil_mode, True)
    N, C, H, W = (int(v) for v in x.shape)
    args = tuple(map(_i32, (N * C, H, W, shape[2], shape[3], k[0], k[1], s[0], s[1],
                            p[0], p[1], bool(count_include_pad), pool_divisor(divisor_override))))
    return x, unbatched, shape, args


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None, out=None):
    be = _be()
    x, unbatched, shape, args = _avg_setup(be, input, kernel_size, stride, padding, ceil_mode,
                                           count_include_pad, divisor_override)
    y = _dest(be, out, shape[1:] if unbatched else shape)
    if out is not None:
        _no_overlap(y, x)
    be.launch("pool.cu", "avg_pool_fwd", _grid1(y.size), (_THREADS, 1, 1), (x, y) + args)
    return y


def avg_pool2d_backward(grad_output, input, kernel_size, stride=None, padding=0,
                        ceil_mode=False, count_include_pad=True, divisor_override=None):
    be = _be()
    x, unbatched, shape, args = _avg_setup(be, input, kernel_size, stride, padding, ceil_mode,
                                           count_include_pad, divisor_override)
    gy = _grad_out(be, grad_output, unbatched, shape)
    gx = be.xp.empty(x.shape, dtype=np.float32)
    be.launch("pool.cu", "avg_pool_bwd", _grid1(gx.size), (_THREADS, 1, 1), (gy, gx) + args)
    return gx[0] if unbatched else gx


def _adaptive_check(oh, ow):
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output_size must be positive, got ({oh}, {ow})")


def adaptive_avg_pool2d(input, output_size):
    be = _be()
    x, unbatched = _pool_planes(be, input)
    oh, ow = adaptive_size(output_size, x)
    _adaptive_check(oh, ow)
    N, C, H, W = (int(v) for v in x.shape)
    y = _dest(be, None, (N, C, oh, ow))
    be.launch("pool.cu", "adaptive_avg_fwd", _grid1(y.size), (_THREADS, 1, 1),
              (x, y) + tuple(map(_i32, (N * C, H, W, oh, ow))))
    return y[0] if unbatched else y


def adaptive_avg_pool2d_backward(grad_output, input):
    be = _be()
    x, unbatched = _pool_planes(be, input)
    gy = _arr(be, grad_output, "grad_output")
    if unbatched and gy.ndim == 3:
        gy = gy[None]
    N, C, H, W = (int(v) for v in x.shape)
    if gy.ndim != 4 or tuple(gy.shape[:2]) != (N, C):
        raise ValueError(f"grad_output must have shape ({N}, {C}, out_h, out_w), got "
                         f"{tuple(gy.shape)}")
    _adaptive_check(int(gy.shape[2]), int(gy.shape[3]))
    gx = be.xp.empty(x.shape, dtype=np.float32)
    be.launch("pool.cu", "adaptive_avg_bwd", _grid1(gx.size), (_THREADS, 1, 1),
              (gy, gx) + tuple(map(_i32, (N * C, H, W, gy.shape[2], gy.shape[3]))))
    return gx[0] if unbatched else gx


# --------------------------------------------------------------- fully connected

# A long reduction is split in chunks of at least this many when the output
# alone gives too few blocks (e.g. a batch-16 fully connected layer).
GEMM_MIN_CHUNK = 256


def _gemm(be, A, B, bias, C, M, N, K, strides, relu=False):
    """C (M, N) = A (M, K) @ B (K, N) [+ bias, ReLU], A and B by strides."""
    suffix, edge = _tile(be, M, N, max(K // GEMM_MIN_CHUNK, 1))
    blocks = max(_ceil(M, edge) * _ceil(N, edge), 1)
    target = 2 * _sm_count(be)
    splits = max(min(K // GEMM_MIN_CHUNK, _ceil(target, blocks)), 1) if blocks < target else 1
    chunk = _ceil(_ceil(max(K, 1), splits), 16) * 16
    splits = max(_ceil(K, chunk), 1)
    flags = (_i32(bias is not None), _i32(relu), _i32(chunk))
    grid = (_ceil(N, edge), _ceil(M, edge), splits)
    if splits == 1:
        be.launch("linear.cu", "gemm" + suffix, grid, (_THREADS, 1, 1),
                  (A, B, bias, C) + tuple(map(_i32, (M, N, K) + tuple(strides))) + flags)
        return
    if splits * M * N > _INT32_MAX:
        raise ValueError("the split GEMM's workspace is too large for 32-bit indexing")
    ws = be.xp.empty((splits, M, N), dtype=np.float32)
    be.launch("linear.cu", "gemm" + suffix, grid, (_THREADS, 1, 1),
              (A, B, bias, ws) + tuple(map(_i32, (M, N, K) + tuple(strides))) + flags)
    be.launch("linear.cu", "gemm_reduce", _grid1(M * N), (_THREADS, 1, 1),
              (ws, bias, C, _i32(M), _i32(N), _i32(splits), _i32(bias is not None),
               _i32(relu)))


def _linear_shapes(x, w, b=None):
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape "
                         f"{tuple(w.shape)}")
    if x.ndim == 0:
        raise ValueError("input must have at least 1 dimension (..., in_features), got a scalar")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features (input.shape[-1]) but weight "
                         f"expects {w.shape[1]} (weight.shape[1])")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    return rows, int(w.shape[0]), int(w.shape[1])


def _linear(input, weight, bias, out, relu):
    be = _be()
    x, w = _arr(be, input, "input"), _arr(be, weight, "weight")
    b = _arr(be, bias, "bias", optional=True)
    M, O, I = _linear_shapes(x, w, b)
    y = _dest(be, out, tuple(x.shape[:-1]) + (O,))
    if out is not None:
        _no_overlap(y, x, w, b)
    # y (M, O) = x (M, I) @ w^T: B(k, n) = w[n, k]
    _gemm(be, x, w, b, y, M, O, I, (I, 1, 1, I), relu)
    return y


def linear(input, weight, bias=None, out=None):
    return _linear(input, weight, bias, out, relu=False)


def linear_relu(input, weight, bias=None, out=None):
    """relu(linear(...)) with bias and ReLU fused into the GEMM's epilogue."""
    return _linear(input, weight, bias, out, relu=True)


def linear_backward(grad_output, input, weight, output_mask=(True, True, True)):
    be, xp = _be(), _be().xp
    need_x, need_w, need_b = _output_mask(output_mask)
    x, w = _arr(be, input, "input"), _arr(be, weight, "weight")
    M, O, I = _linear_shapes(x, w)
    gy = _arr(be, grad_output, "grad_output")
    expected = tuple(x.shape[:-1]) + (O,)
    if tuple(gy.shape) != expected:
        raise ValueError(f"grad_output must have shape {expected}, got {tuple(gy.shape)}")
    gx = gw = gb = None
    if need_x:
        gx = xp.empty(x.shape, dtype=np.float32)
        _gemm(be, gy, w, None, gx, M, I, O, (O, 1, I, 1))      # gx = gy @ w
    if need_w:
        gw = xp.empty((O, I), dtype=np.float32)
        _gemm(be, gy, x, None, gw, O, I, M, (1, O, I, 1))      # gw = gy^T @ x
    if need_b:
        gb = xp.empty((O,), dtype=np.float32)
        be.launch("linear.cu", "column_sum", _grid1(O), (_THREADS, 1, 1),
                  (gy, gb, _i32(M), _i32(O)))
    return gx, gw, gb


# ------------------------------------------------------------------- activation

def relu(input, out=None):
    be = _be()
    x = _arr(be, input, "input")
    y = _dest(be, out, x.shape)
    be.launch("elementwise.cu", "relu_fwd", _grid1(x.size), (_THREADS, 1, 1),
              (x, y, _i32(x.size)))
    return y


def relu_backward(grad_output, input):
    be = _be()
    gy, x = _arr(be, grad_output, "grad_output"), _arr(be, input, "input")
    if tuple(gy.shape) != tuple(x.shape):
        raise ValueError(f"grad_output must have the shape of input {tuple(x.shape)}, got "
                         f"{tuple(gy.shape)}")
    gx = be.xp.empty(x.shape, dtype=np.float32)
    be.launch("elementwise.cu", "relu_bwd", _grid1(x.size), (_THREADS, 1, 1),
              (gy, x, gx, _i32(x.size)))
    return gx


# ---------------------------------------------------------------- normalisation

def _ncs(x, name="input"):
    """(N, C, S) of an (N, C, ...) array."""
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (N, C, ...), got shape "
                         f"{tuple(x.shape)}")
    N, C = int(x.shape[0]), int(x.shape[1])
    S = int(np.prod(x.shape[2:], dtype=np.int64))
    return N, C, S


def _lrn_args(size, alpha, beta, k):
    size = integer(size, "size")
    if size <= 0:
        raise ValueError(f"size must be a positive int, got {size}")
    return (_i32(size), _f32(number(alpha, "alpha")), _f32(number(beta, "beta")),
            _f32(number(k, "k")))


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    be = _be()
    x = _arr(be, input, "input")
    N, C, S = _ncs(x)
    args = _lrn_args(size, alpha, beta, k)
    y = be.xp.empty(x.shape, dtype=np.float32)
    be.launch("norm.cu", "lrn_fwd", _grid1(x.size), (_THREADS, 1, 1),
              (x, y, _i32(N), _i32(C), _i32(S)) + args)
    return y


def local_response_norm_backward(grad_output, input, size, alpha=1e-4, beta=0.75, k=1.0):
    be = _be()
    x = _arr(be, input, "input")
    gy = _grad_out(be, grad_output, False, x.shape)
    N, C, S = _ncs(x)
    args = _lrn_args(size, alpha, beta, k)
    gx = be.xp.empty(x.shape, dtype=np.float32)
    be.launch("norm.cu", "lrn_bwd", _grid1(x.size), (_THREADS, 1, 1),
              (gy, x, gx, _i32(N), _i32(C), _i32(S)) + args)
    return gx


def _channel_vec(be, value, name, C, optional=True):
    v = _arr(be, value, name, optional=optional)
    if v is not None and tuple(v.shape) != (C,):
        raise ValueError(f"{name} must have shape ({C},), got {tuple(v.shape)}")
    return v


def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, return_stats=False, relu=False):
    """As convcore.batch_norm; running_mean / running_var are updated in
    place on the device when training. relu: a ReLU pass after it."""
    be, xp = _be(), _be().xp
    x = _arr(be, input, "input")
    N, C, S = _ncs(x)
    momentum, eps = number(momentum, "momentum"), number(eps, "eps")
    if not eps >= 0:
        raise ValueError("eps must be a non-negative number")
    # running stats are updated in place: no contiguous copy may stand in
    rm = None if running_mean is None else be.asarray(running_mean, "running_mean")
    rv = None if running_var is None else be.asarray(running_var, "running_var")
    for name, stat in (("running_mean", rm), ("running_var", rv)):
        if stat is not None and (stat.dtype != np.float32 or tuple(stat.shape) != (C,)
                                 or not stat.flags.c_contiguous):
            raise ValueError(f"{name} must be a contiguous float32 GPU array of shape ({C},), "
                             f"got {stat.dtype} {tuple(stat.shape)}")
    w = _channel_vec(be, weight, "weight", C)
    b = _channel_vec(be, bias, "bias", C)
    if training:
        if N * S <= 1:
            raise ValueError(f"input: batch_norm in training needs more than one value per "
                             f"channel, got shape {tuple(x.shape)}")
        mean = xp.empty((C,), dtype=np.float32)
        var = xp.empty((C,), dtype=np.float32)
        be.launch("norm.cu", "bn_stats", (C, 1, 1), (_THREADS, 1, 1),
                  (x, mean, var, _i32(N), _i32(C), _i32(S)))
    else:
        if rm is None or rv is None:
            raise ValueError("running_mean and running_var are needed when not training")
        mean, var = rm, rv
    apply_relu = _flag(relu, "relu")
    y = xp.empty(x.shape, dtype=np.float32)
    be.launch("norm.cu", "bn_apply", _grid1(x.size), (_THREADS, 1, 1),
              (x, mean, var, w, b, y, _i32(N), _i32(C), _i32(S), _f32(eps),
               _i32(w is not None), _i32(b is not None)))
    if apply_relu:  # in place
        be.launch("elementwise.cu", "relu_fwd", _grid1(y.size), (_THREADS, 1, 1),
                  (y, y, _i32(y.size)))
    if training and (rm is not None or rv is not None):
        m = N * S
        be.launch("norm.cu", "bn_update_running", _grid1(C), (_THREADS, 1, 1),
                  (rm, rv, mean, var, _i32(C), _f32(momentum), _f32(m / max(m - 1, 1)),
                   _i32(rm is not None), _i32(rv is not None)))
    return (y, mean, var) if return_stats else y


def batch_norm_backward(grad_output, input, mean, var, weight=None, training=True, eps=1e-5,
                        relu_output=None):
    be, xp = _be(), _be().xp
    x = _arr(be, input, "input")
    N, C, S = _ncs(x)
    gy = _grad_out(be, grad_output, False, x.shape)
    if relu_output is not None:  # a ReLU pass first (zero where its output is <= 0)
        gy = relu_backward(gy, _grad_out(be, relu_output, False, x.shape))
    mean, var = _channel_vec(be, mean, "mean", C, False), _channel_vec(be, var, "var", C, False)
    w = _channel_vec(be, weight, "weight", C)
    eps = number(eps, "eps")
    gx = xp.empty(x.shape, dtype=np.float32)
    gw = xp.empty((C,), dtype=np.float32)
    gb = xp.empty((C,), dtype=np.float32)
    be.launch("norm.cu", "bn_bwd_reduce", (C, 1, 1), (_THREADS, 1, 1),
              (gy, x, mean, var, gw, gb, _i32(N), _i32(C), _i32(S), _f32(eps)))
    be.launch("norm.cu", "bn_grad_input", _grid1(x.size), (_THREADS, 1, 1),
              (gy, x, mean, var, w, gw, gb, gx, _i32(N), _i32(C), _i32(S), _f32(eps),
               _i32(w is not None), _i32(bool(training))))
    return gx, gw, gb


# ------------------------------------------------------------------------- loss

def cross_entropy(logits, targets, label_smoothing: float = 0.0, reduction: str = "mean", *,
                  weight=None, ignore_index: int = -100):
    """Softmax cross-entropy on the GPU: (loss as a 0-d device array, gradient
    with respect to the logits). The loss stays on the device (no sync).
    The kernel covers (N, classes) logits against class indices, with label
    smoothing, 'mean' or 'sum'; the other options of
    convcore.functional.cross_entropy raise NotImplementedError here."""
    be, xp = _be(), _be().xp
    ignore_index, reduction, smoothing = cross_entropy_options(ignore_index, reduction,
                                                                  label_smoothing)
    z = _arr(be, logits, "logits")
    on_cpu = "; compute the loss on the CPU (numpy logits) for it"
    if weight is not None:
        raise NotImplementedError(f"cross_entropy on the GPU: weight is not supported{on_cpu}")
    if reduction == "none":
        raise NotImplementedError(f"cross_entropy on the GPU: reduction='none' is not "
                                  f"supported{on_cpu}")
    if z.ndim != 2:
        raise NotImplementedError(f"cross_entropy on the GPU: logits must be (N, classes), got "
                                  f"shape {tuple(z.shape)}{on_cpu}")
    host_targets = isinstance(targets, (np.ndarray, list, tuple))
    t = np.asarray(targets) if host_targets else be.asarray(targets, "targets")
    n, classes = int(z.shape[0]), int(z.shape[1])
    if tuple(t.shape) == (n, classes) and t.dtype.kind == "f":
        raise NotImplementedError(f"cross_entropy on the GPU: class-probability targets are not "
                                  f"supported{on_cpu}")
    if tuple(t.shape) != (n,) or t.dtype.kind not in "iu":
        raise ValueError(f"targets must be {n} integer class indices, got {t.dtype} "
                         f"{tuple(t.shape)}")
    # The kernel ignores no target: an ignore_index that is a class, or one
    # that host targets hold, cannot be honoured. (Device targets are not
    # read back: one equal to an out-of-range ignore_index makes its row NaN.)
    if 0 <= ignore_index < classes or (host_targets and n and (t == ignore_index).any()):
        raise NotImplementedError(f"cross_entropy on the GPU: targets equal to ignore_index "
                                  f"({ignore_index}) cannot be ignored{on_cpu}")
    # Host targets are range-checked here for free; checking device targets
    # would cost a sync, so the kernel turns an out-of-range row into NaN.
    if host_targets and n and (t.min() < 0 or t.max() >= classes):
        raise ValueError(f"targets must be in [0, {classes}), got values in "
                         f"[{t.min()}, {t.max()}]")
    t = xp.ascontiguousarray(xp.asarray(t).astype(np.int64, copy=False))
    # the mean of no rows is NaN, as on the CPU and in PyTorch
    scale = (1.0 / n if n else float("nan")) if reduction == "mean" else 1.0
    rows = xp.empty((n,), dtype=np.float32)
    grad = xp.empty(z.shape, dtype=np.float32)
    if n:
        be.launch("loss.cu", "xent_rows", (n, 1, 1), (_THREADS, 1, 1),
                  (z, t, rows, grad, _i32(n), _i32(classes), _f32(smoothing), _f32(scale)))
    loss = xp.empty((1,), dtype=np.float32)
    be.launch("loss.cu", "sum_all", (1, 1, 1), (_THREADS, 1, 1),
              (rows, loss, _i32(n), _f32(scale)))
    return loss.reshape(()), grad


# -------------------------------------------------------------------- optimiser

def _param_pair(be, data, grad):
    w = be.asarray(data, "param")
    g = _arr(be, grad, "grad")
    if w.dtype != np.float32 or not w.flags.c_contiguous:
        raise TypeError(f"param must be a contiguous float32 GPU array, got {w.dtype}")
    if tuple(g.shape) != tuple(w.shape):
        raise ValueError(f"grad must have shape {tuple(w.shape)}, got {tuple(g.shape)}")
    return w, g


def sgd_step(data, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, first=False):
    """One SGD update of `data` in place (and of momentum_buffer, a float32
    array of data's shape, when momentum != 0)."""
    be = _be()
    w, g = _param_pair(be, data, grad)
    buf = None if momentum_buffer is None else be.asarray(momentum_buffer, "momentum_buffer")
    if momentum and (buf is None or tuple(buf.shape) != tuple(w.shape)):
        raise ValueError("momentum_buffer must be an array of the parameter's shape")
    be.launch("optim.cu", "sgd_step", _grid1(w.size), (_THREADS, 1, 1),
              (w, g, buf, _i32(w.size), _f32(lr), _f32(momentum), _f32(dampening),
               _f32(weight_decay), _i32(bool(nesterov)), _i32(bool(first))))


def adam_step(data, grad, exp_avg, exp_avg_sq, step_size, beta1, beta2, root_correction2, eps,
              weight_decay=0.0):
    """One Adam update of `data`, exp_avg and exp_avg_sq in place."""
    be = _be()
    w, g = _param_pair(be, data, grad)
    m, v = be.asarray(exp_avg, "exp_avg"), be.asarray(exp_avg_sq, "exp_avg_sq")
    be.launch("optim.cu", "adam_step", _grid1(w.size), (_THREADS, 1, 1),
              (w, g, m, v, _i32(w.size), _f32(step_size), _f32(beta1), _f32(beta2),
               _f32(root_correction2), _f32(eps), _f32(weight_decay)))


# ------------------------------------------------------------- device context

def _on_array_device(fn):
    """Runs fn with the device of its first cupy array argument current, so
    kernels launch (and compile, once per device) where the data lives."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in list(args) + list(kwargs.values()):
            if is_cupy(a) and hasattr(a, "device"):
                with a.device:
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


for _name in ("conv2d", "conv2d_relu", "conv2d_backward", "max_pool2d", "max_pool2d_backward",
              "avg_pool2d", "avg_pool2d_backward", "adaptive_avg_pool2d",
              "adaptive_avg_pool2d_backward", "linear", "linear_relu", "linear_backward", "relu",
              "relu_backward", "local_response_norm", "local_response_norm_backward",
              "batch_norm", "batch_norm_backward", "cross_entropy", "sgd_step", "adam_step"):
    globals()[_name] = _on_array_device(globals()[_name])
del _name
