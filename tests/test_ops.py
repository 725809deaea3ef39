"""Every op, forward and backward, on every backend against the naive
references in reference.py, on the same parameters: the `device` fixture
(_backends_fixture.py) runs each test on the CPU, on the CUDA shim (the GPU
code path on the host) and on a GPU where there is one. Arrays go to the
backend, the public convcore functions dispatch by their type, and the
results come back to be compared with the backend's tolerance for the
dtype. Where a backend has several kernels for an op (the GPU's tile shapes,
its grad_input kernels), each is run. An op or option a backend does not
have is skipped there with the reason.

What is particular to one backend stays in its own file: the CPU's memory
layouts, random arguments and special values (test_conv2d.py,
test_pooling.py, ...), the GPU's kernel choices, launches, fusions and
errors (test_cuda_shim.py, test_cuda_gpu.py)."""
import functools

import numpy as np
import pytest

import convcore as cc
import reference as ref
from _helpers import assert_close, numerical_grad

GRADS = ("grad_input", "grad_weight", "grad_bias")


def rnd(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(dtype)


def ids(cases):
    return [str(i) for i in range(len(cases))]


# ------------------------------------------------------------------ convolution

# (x shape, w shape, stride, padding, dilation, groups, bias)
CONV_CASES = [
    ((2, 3, 7, 7), (4, 3, 3, 3), 1, 0, 1, 1, True),
    ((1, 3, 9, 8), (5, 3, 3, 2), 2, 1, 1, 1, True),
    ((2, 4, 8, 8), (6, 2, 3, 3), 1, 1, 2, 2, False),          # groups, dilation
    ((1, 2, 11, 11), (70, 2, 5, 5), 3, 2, 1, 1, True),        # K > one 64-row tile
    ((2, 9, 10, 9), (4, 9, 1, 1), 1, 0, 1, 1, True),          # R = 9 (< one k stage)
    ((3, 20, 6, 6), (8, 20, 3, 3), 1, "same", 1, 1, True),    # R = 180: many stages
    ((2, 6, 7, 7), (6, 1, 3, 3), 1, 1, 1, 6, True),           # depthwise
    ((1, 4, 9, 9), (8, 1, 3, 3), 2, 1, 2, 4, False),          # depthwise, multiplier 2
    ((3, 5, 5), (4, 3, 3, 3), 1, 1, 1, 1, True),              # unbatched (C, H, W)
    ((2, 3, 13, 11), (6, 3, 5, 4), 3, 1, 2, 1, True),         # stride 3 not dividing H, W
    ((1, 16, 7, 7), (6, 8, 3, 3), 2, 1, 1, 2, False),         # 8 channels a group
    ((2, 4, 9, 9), (6, 2, 3, 3), 2, 1, 1, 2, True),           # groups, stride 2
    ((2, 4, 9, 9), (8, 1, 3, 3), 1, 1, 1, 4, False),          # depthwise, multiplier 2
    ((3, 8, 8), (5, 3, 3, 3), 1, "same", 2, 1, True),         # unbatched, 'same', dilated
    ((2, 4, 6, 7), (4, 1, 3, 3), (1, 2), 1, (2, 1), 4, True),   # depthwise, pairs
    ((2, 4, 6, 7), (8, 1, 3, 3), (1, 2), 1, (2, 1), 4, True),   # ... multiplier 2
    ((2, 4, 6, 7), (12, 1, 3, 3), (1, 2), 1, (2, 1), 4, True),  # ... multiplier 3
    ((2, 3, 1, 1), (4, 3, 1, 1), 1, 0, 1, 1, True),           # 1x1 input and kernel
    ((1, 2, 1, 1), (3, 2, 3, 3), 1, 1, 1, 1, False),          # 1x1 input, padding 1
    ((1, 2, 1, 1), (3, 2, 3, 3), 1, 2, 1, 1, False),          # ... padding 2: 3x3 output
]


@functools.lru_cache(maxsize=None)
def _conv(i, dtype):
    """The case's arrays and their references (computed once for every backend)."""
    xs, ws, s, p, d, g, has_b = CONV_CASES[i]
    x, w = rnd(*xs, dtype=dtype), rnd(*ws, seed=1, dtype=dtype)
    b = rnd(ws[0], seed=2, dtype=dtype) if has_b else None
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    y = ref.conv2d_ref(x, w, b, **kw)
    gy = rnd(*y.shape, seed=3, dtype=dtype)
    return x, w, b, kw, y, gy, ref.conv2d_backward_ref(gy, x, w, **kw)


@pytest.mark.parametrize("case", range(len(CONV_CASES)), ids=ids(CONV_CASES))
def test_conv2d_and_backward(device, case):
    x, w, b, kw, y, gy, grads = _conv(case, device.dtype)
    for variant in device.variants("conv2d"):
        with variant as settings:
            out = cc.conv2d(device.put(x), device.put(w), device.put(b), **kw)
            device.check(out, y, what=f"conv2d {settings}")
    for variant in device.variants("conv2d_backward"):
        with variant as settings:
            got = cc.conv2d_backward(device.put(gy), device.put(x), device.put(w), **kw)
            for g, e, what in zip(got, grads, GRADS):
                device.check(g, e, what=f"{what} {settings}")


MASKS = [(False, True, True), (True, False, False), (False, False, True), (True, True, False)]


@pytest.mark.parametrize("mask", MASKS, ids=["".join("1" if m else "0" for m in k) for k in MASKS])
def test_backward_output_mask(device, mask):
    """A gradient left out is None; the others are as without the mask."""
    for case in (2, 6):  # grouped; depthwise
        x, w, _, kw, _, gy, expected = _conv(case, device.dtype)
        for variant in device.variants("conv2d_backward"):
            with variant as settings:
                got = cc.conv2d_backward(device.put(gy), device.put(x), device.put(w),
                                         output_mask=mask, **kw)
                for g, e, need, what in zip(got, expected, mask, GRADS):
                    if need:
                        device.check(g, e, what=f"conv2d {what} {settings}")
                    else:
                        assert g is None, what
    x, w = rnd(4, 9, dtype=device.dtype), rnd(5, 9, seed=1, dtype=device.dtype)
    gy = rnd(4, 5, seed=2, dtype=device.dtype)
    got = cc.linear_backward(device.put(gy), device.put(x), device.put(w), output_mask=mask)
    for g, e, need, what in zip(got, ref.linear_backward_ref(gy, x, w), mask, GRADS):
        if need:
            device.check(g, e, what=f"linear {what}")
        else:
            assert g is None, what


# ---------------------------------------------------------------------- pooling

# (shape, kernel, stride, padding, dilation, ceil_mode)
MAX_POOL_CASES = [
    ((2, 3, 8, 8), 2, None, 0, 1, False),
    ((1, 2, 9, 7), 3, 2, 1, 1, True),
    ((2, 2, 10, 10), 3, 1, 1, 2, False),
    ((1, 1, 7, 9), (3, 2), (2, 3), (1, 0), 1, True),
    ((3, 8, 8), 3, 3, 0, 1, True),                           # unbatched
    ((2, 3, 9, 9), 3, 2, 0, 1, True),
    ((2, 3, 9, 9), 3, 2, 0, 1, False),
]
# ceil_mode's edges: (input, kernel, stride, padding, dilation) where the last
# window would start in the right padding and must be dropped, or keeps a
# window starting at the last row; each with ceil_mode off and on
CEIL_EDGES = [(5, 2, 2, 1, 1), (4, 3, 2, 1, 1), (6, 3, 3, 1, 1), (7, 2, 3, 1, 1),
              (2, 3, 2, 1, 1), (8, 3, 2, 1, 2), (9, 4, 3, 2, 1), (1, 1, 2, 0, 1),
              (3, 3, 4, 1, 1)]
MAX_POOL_CASES += [((1, 2, h, h + 1), k, s, p, d, cm)
                   for h, k, s, p, d in CEIL_EDGES for cm in (False, True)]


@functools.lru_cache(maxsize=None)
def _max_pool(i, dtype):
    shape, k, s, p, d, cm = MAX_POOL_CASES[i]
    x = rnd(*shape, dtype=dtype)
    x.reshape(-1)[::7] = x.reshape(-1)[1]  # ties: the first maximum wins
    kw = dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=cm)
    y, idx = ref.max_pool2d_ref(x, return_indices=True, **kw)
    gy = rnd(*y.shape, seed=5, dtype=dtype)
    return x, kw, y, idx, gy, ref.max_pool2d_backward_ref(gy, x, **kw)


@pytest.mark.parametrize("case", range(len(MAX_POOL_CASES)), ids=ids(MAX_POOL_CASES))
def test_max_pool2d_and_backward(device, case):
    dtype = device.dtype
    x, kw, ry, ridx, gy, rgx = _max_pool(case, dtype)
    dx, dgy = device.put(x), device.put(gy)
    device.check(cc.max_pool2d(dx, **kw), ry, rtol=0, what="output")
    y, idx = cc.max_pool2d(dx, return_indices=True, **kw)
    device.check(y, ry, rtol=0, what="output with indices")
    device.check(idx, ridx, rtol=0, what="indices")
    device.check(cc.max_pool2d_backward(dgy, dx, **kw), rgx, what="grad_input")
    device.check(cc.max_pool2d_backward(dgy, dx, indices=idx, **kw), rgx,
                 what="grad_input from indices")


@pytest.mark.parametrize("shape,nans,kw", [
    ((1, 1, 4, 4), [(0, 0, 1, 1)], dict(kernel_size=2)),
    ((2, 2, 6, 6), [(0, 0, 1, 1), (1, 1, 4, 5), (1, 1, 5, 4)],   # two in one window
     dict(kernel_size=3, stride=2, padding=1)),
], ids=["one", "two-in-a-window"])
def test_max_pool2d_nan_propagates(device, shape, nans, kw):
    """A NaN makes its windows' outputs NaN, and their index points at a NaN."""
    dtype = device.dtype
    x = rnd(*shape, dtype=dtype)
    for i in nans:
        x[i] = np.nan
    ry, ridx = ref.max_pool2d_ref(x, return_indices=True, **kw)
    y, idx = cc.max_pool2d(device.put(x), return_indices=True, **kw)
    device.check(y, ry, rtol=0, what="output")  # NaN where the reference has NaN
    idx = device.host(idx)
    picked = np.take_along_axis(x.reshape(shape[0], shape[1], -1),
                                idx.reshape(shape[0], shape[1], -1), axis=2).reshape(idx.shape)
    assert np.isnan(ry).sum() >= len(nans) - 1
    np.testing.assert_array_equal(np.isnan(picked), np.isnan(ry))
    np.testing.assert_array_equal(idx[~np.isnan(ry)], ridx[~np.isnan(ry)])


# (shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_POOL_CASES = [
    ((2, 3, 8, 8), 2, None, 0, False, True, None),
    ((1, 2, 9, 7), 3, 2, 1, True, True, None),
    ((1, 2, 9, 7), 3, 2, 1, True, False, None),
    ((2, 1, 6, 6), (3, 2), (1, 2), (1, 1), False, True, 5),
    ((2, 7, 7), 3, 2, 1, False, False, None),               # unbatched
    ((2, 3, 9, 9), 3, 2, 1, False, False, None),
    ((2, 3, 9, 9), 3, 2, 1, False, True, None),
]
AVG_POOL_CASES += [((1, 2, h, h + 1), k, s, p, cm, cip, None)
                   for h, k, s, p, d in CEIL_EDGES if d == 1
                   for cm in (False, True) for cip in (True, False)]
AVG_POOL_CASES += [((2, 2, 5, 6), (3, 2), (2, 1), (1, 1), True, cip, div)
                   for div in (1, 2, 7, -3) for cip in (True, False)]


@functools.lru_cache(maxsize=None)
def _avg_pool(i, dtype):
    shape, k, s, p, cm, cip, div = AVG_POOL_CASES[i]
    x = rnd(*shape, dtype=dtype)
    kw = dict(kernel_size=k, stride=s, padding=p, ceil_mode=cm, count_include_pad=cip,
              divisor_override=div)
    y = ref.avg_pool2d_ref(x, **kw)
    gy = rnd(*y.shape, seed=5, dtype=dtype)
    return x, kw, y, gy, ref.avg_pool2d_backward_ref(gy, x, **kw)


@pytest.mark.parametrize("case", range(len(AVG_POOL_CASES)), ids=ids(AVG_POOL_CASES))
def test_avg_pool2d_and_backward(device, case):
    dtype = device.dtype
    x, kw, y, gy, gx = _avg_pool(case, dtype)
    device.check(cc.avg_pool2d(device.put(x), **kw), y, what="output")
    device.check(cc.avg_pool2d_backward(device.put(gy), device.put(x), **kw), gx,
                 what="grad_input")


ADAPTIVE_CASES = [((2, 3, 7, 7), 3), ((1, 2, 10, 6), (4, 5)), ((1, 1, 3, 5), (7, 2)),
                  ((2, 4, 5), (None, 2)), ((1, 2, 6, 6), 1), ((2, 3, 9, 7), (4, 3))]


@pytest.mark.parametrize("shape,size", ADAPTIVE_CASES)
def test_adaptive_avg_pool2d_and_backward(device, shape, size):
    dtype = device.dtype
    x = rnd(*shape, dtype=dtype)
    y = ref.adaptive_avg_pool2d_ref(x, size)
    gy = rnd(*y.shape, seed=5, dtype=dtype)
    device.check(cc.adaptive_avg_pool2d(device.put(x), size), y, what="output")
    device.check(cc.adaptive_avg_pool2d_backward(device.put(gy), device.put(x)),
                 ref.adaptive_avg_pool2d_backward_ref(gy, x), what="grad_input")


# -------------------------------------------------------------- linear and relu

LINEAR_CASES = [  # (input shape, out_features, bias)
    ((4, 10), 3, True), ((70, 33), 65, True), ((2, 3, 17), 5, False), ((1, 1), 1, True),
    ((3, 4, 10), 7, True), ((5, 10), 7, True), ((5, 7), 3, True),
    ((3, 2000), 4, False),                                   # a long reduction
]


@pytest.mark.parametrize("xs,out,has_b", LINEAR_CASES)
def test_linear_and_backward(device, xs, out, has_b):
    dtype = device.dtype
    x, w = rnd(*xs, dtype=dtype), rnd(out, xs[-1], seed=1, dtype=dtype)
    b = rnd(out, seed=2, dtype=dtype) if has_b else None
    gy = rnd(*(xs[:-1] + (out,)), seed=3, dtype=dtype)
    y, grads = ref.linear_ref(x, w, b), ref.linear_backward_ref(gy, x, w)
    for variant in device.variants("linear"):
        with variant as settings:
            device.check(cc.linear(device.put(x), device.put(w), device.put(b)), y,
                         what=f"linear {settings}")
            got = cc.linear_backward(device.put(gy), device.put(x), device.put(w))
            for g, e, what in zip(got, grads, GRADS):
                device.check(g, e, what=f"{what} {settings}")


@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 5), (300,)])
def test_relu_and_backward(device, shape):
    dtype = device.dtype
    x = rnd(*shape, dtype=dtype)
    x.reshape(-1)[:3] = [np.nan, 0.0, -0.0]  # NaN stays NaN; no gradient at 0
    gy = rnd(*shape, seed=4, dtype=dtype)
    device.check(cc.relu(device.put(x)), ref.relu_ref(x), rtol=0, what="relu")
    device.check(cc.relu_backward(device.put(gy), device.put(x)), ref.relu_backward_ref(gy, x),
                 rtol=0, what="relu_backward")
    z = device.put(x.copy())
    assert cc.relu(z, out=z) is z
    device.check(z, ref.relu_ref(x), rtol=0, what="relu in place")


# ---------------------------------------------------------------- normalisation

LRN_CASES = [  # (shape, sizes, alpha, beta, k)
    ((2, 5, 3, 4), (1, 2, 3, 4, 5, 8), 0.5, 0.75, 2.0),     # odd channel count
    ((1, 6, 4, 3), (1, 2, 3, 4, 5, 8), 0.5, 0.75, 2.0),     # even channel count
    ((3, 1, 2, 2), (1, 2, 3, 4, 5, 8), 0.5, 0.75, 2.0),     # a single channel
    ((2, 7, 1, 1), (1, 2, 3, 4, 5, 8), 0.5, 0.75, 2.0),     # 1x1 planes
    ((2, 4, 17, 19), (1, 2, 3, 4, 5, 8), 0.5, 0.75, 2.0),   # a plane over the CPU's 256 tile
    ((2, 7, 3, 4), (5,), 0.3, 0.75, 2.0),
    ((3, 4, 5), (2,), 0.3, 0.75, 2.0),                      # (N, C, L)
    ((1, 9, 2, 2), (1,), 0.3, 0.75, 2.0),
    ((2, 6, 3, 3), (3,), 0.1, 0.75, 2.0),
    ((2, 3), (3,), 0.3, 0.75, 2.0),                         # (N, C)
]


@pytest.mark.parametrize("shape,sizes,alpha,beta,k", LRN_CASES)
def test_local_response_norm_and_backward(device, shape, sizes, alpha, beta, k):
    dtype = device.dtype
    if len(shape) == 2 and not device.is_gpu:
        pytest.skip("the CPU refuses (N, C) input, as PyTorch (test_norm_ops.py); the GPU "
                    "takes it")
    x = rnd(*shape, dtype=dtype) * 3
    gy = rnd(*shape, seed=4, dtype=dtype)
    for size in sizes:
        kw = dict(size=size, alpha=alpha, beta=beta, k=k)
        device.check(cc.local_response_norm(device.put(x), **kw),
                     ref.local_response_norm_ref(x, **kw), what=f"output, size {size}")
        device.check(cc.local_response_norm_backward(device.put(gy), device.put(x), **kw),
                     ref.local_response_norm_backward_ref(gy, x, **kw),
                     what=f"grad_input, size {size}")


BN_SHAPES = [(4, 3, 5, 5), (2, 4, 3, 2), (5, 1, 1, 1), (8, 6), (3, 5, 7), (2, 3, 2, 3, 2),
             (7, 2), (2, 5, 3), (3, 4, 2, 2), (4, 3, 2, 2)]


def _bn_case(shape, dtype, affine):
    c = shape[1]
    x = rnd(*shape, dtype=dtype) * 3 + 1
    w, b = (rnd(c, seed=1, dtype=dtype), rnd(c, seed=2, dtype=dtype)) if affine else (None, None)
    rm, rv = rnd(c, seed=3, dtype=dtype) * 0.5, np.abs(rnd(c, seed=4, dtype=dtype)) + 0.5
    return x, w, b, rm, rv, rnd(*shape, seed=5, dtype=dtype)


# (momentum, eps): the defaults, and others
BN_OPTIONS = [(0.1, 1e-5), (0.2, 1e-5), (0.2, 1e-3)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine,relu", [(True, False), (False, False), (True, True)],
                         ids=["affine", "plain", "affine-relu"])
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_norm_and_backward(device, training, affine, relu, shape):
    """Output, the statistics it normalised with, the running statistics
    (updated in place when training, untouched otherwise) and the three
    gradients, for each of BN_OPTIONS; relu=True: the ReLU in the same pass,
    and the gradient through it (relu_output)."""
    dtype = device.dtype
    x, w, b, rm, rv, gy = _bn_case(shape, dtype, affine)
    # (in eval, momentum plays no part: each eps once)
    for momentum, eps in BN_OPTIONS if training else [(0.1, 1e-5), (0.2, 1e-3)]:
        options = dict(training=training, momentum=momentum, eps=eps)
        at = f"momentum {momentum}, eps {eps}"
        ry, rmean, rvar, rrm, rrv = ref.batch_norm_ref(x, rm, rv, w, b, **options)
        drm, drv = device.put(rm.copy()), device.put(rv.copy())
        y, mean, var = cc.batch_norm(device.put(x), drm, drv, device.put(w), device.put(b),
                                     return_stats=True, relu=relu, **options)
        device.check(y, ref.relu_ref(ry) if relu else ry, what=f"output, {at}")
        if training:
            device.check(mean, rmean.astype(dtype), what=f"batch mean, {at}")
            device.check(var, rvar.astype(dtype), what=f"batch var (biased), {at}")
            device.check(drm, rrm.astype(dtype), what=f"running_mean, {at}")
            device.check(drv, rrv.astype(dtype), what=f"running_var (unbiased), {at}")
        else:  # normalised with the running statistics, which stay as they were
            for stat, before, what in ((mean, rm, "mean"), (var, rv, "var"),
                                       (drm, rm, "running_mean"), (drv, rv, "running_var")):
                np.testing.assert_array_equal(device.host(stat), before, err_msg=what)
            alone = cc.batch_norm(device.put(x), drm, drv, device.put(w), device.put(b),
                                  relu=relu, **options)
            np.testing.assert_array_equal(device.host(alone), device.host(y))
        relu_output = device.host(y) if relu else None
        expected = ref.batch_norm_backward_ref(gy, x, device.host(mean), device.host(var), w,
                                               training, eps, relu_output=relu_output)
        got = cc.batch_norm_backward(device.put(gy), device.put(x), mean, var, device.put(w),
                                     training=training, eps=eps,
                                     relu_output=y if relu else None)
        for g, e, what in zip(got, expected, GRADS):
            device.check(g, e, what=f"{what}, {at}")


# ------------------------------------------------------------------------- loss

# (logits shape, label_smoothing, reduction, options, what the GPU's kernel
# lacks (None: it has all of it))
CROSS_ENTROPY_CASES = [
    ((5, 10), 0.0, "mean", {}, None),
    ((3, 300), 0.1, "sum", {}, None),
    ((1, 2), 1.0, "mean", {}, None),
    ((4, 10), 0.1, "sum", dict(ignore_index=-1), None),      # an ignore_index no target holds
    ((0, 4), 0.0, "mean", {}, None),                         # no rows: NaN
    ((0, 4), 0.0, "sum", {}, None),                          # no rows: 0
    ((4, 10), 0.1, "mean", dict(weight=True), "weight"),
    ((4, 10), 0.0, "mean", dict(ignore_index=1), "ignore_index"),
    ((4, 10), 0.2, "none", {}, "reduction='none'"),
    ((4, 10), 0.1, "mean", dict(probabilities=True), "class-probability targets"),
    ((2, 5, 3), 0.0, "mean", {}, "(N, classes, d1) logits"),
]


@pytest.mark.parametrize("shape,smoothing,reduction,options,gpu_lacks", CROSS_ENTROPY_CASES,
                         ids=ids(CROSS_ENTROPY_CASES))
def test_cross_entropy_and_backward(device, shape, smoothing, reduction, options,
                                    gpu_lacks):
    """Through CrossEntropyLoss, which hands the input's backend the loss."""
    dtype = device.dtype
    if device.is_gpu and gpu_lacks:
        pytest.skip(f"the GPU's cross_entropy kernel has no {gpu_lacks} (it says so: "
                    f"test_cuda_shim.py)")
    z = rnd(*shape, dtype=dtype) * 4
    classes = shape[1]
    positions = shape[:1] + shape[2:]
    rng = np.random.default_rng(sum(shape))
    t = rng.integers(0, classes, positions)
    if options.get("ignore_index") == 1:
        t.reshape(-1)[::2] = 1  # held by targets: those count for nothing
    if options.get("probabilities"):
        t = ref.softmax_ref(rnd(*shape, seed=6, dtype=dtype), 1)
    weight = np.abs(rnd(classes, seed=7, dtype=dtype)) + 0.1 if options.get("weight") else None
    kw = dict(ignore_index=options.get("ignore_index", -100), reduction=reduction,
              label_smoothing=smoothing)
    grad_output = rnd(*positions, seed=8, dtype=dtype) if reduction == "none" else 0.5
    expected = ref.cross_entropy_ref(z, t, weight, **kw)
    expected_grad = ref.cross_entropy_backward_ref(grad_output, z, t, weight, **kw)
    loss_fn = cc.nn.CrossEntropyLoss(device.put(weight), **kw)
    loss = loss_fn(device.put(z), t)
    if isinstance(loss, float):  # the CPU's 'mean' and 'sum'
        assert_close(np.asarray(loss), expected, rtol=device.rtol(dtype), what="loss")
    else:
        device.check(loss, expected, what="loss")
    device.check(loss_fn.backward(device.put(grad_output)), expected_grad, what="grad_input")


# ---------------------------------------------------------------------- softmax

SOFTMAX_CASES = [((7,), 0), ((4, 10), 1), ((4, 10), 0), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), -2),
                 ((2, 3, 4, 5), 3), ((3, 1000), 1)]


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", SOFTMAX_CASES)
def test_softmax_and_backward(device, op, shape, dim):
    dtype = device.dtype
    if not device.has(op):
        pytest.skip(f"{device.name}: the GPU backend has no {op} (convcore.cuda.functional)")
    forward, backward = getattr(cc.functional, op), getattr(cc.functional, op + "_backward")
    x = rnd(*shape, dtype=dtype) * 4
    gy = rnd(*shape, seed=1, dtype=dtype)
    y = ref.softmax_ref(x, dim) if op == "softmax" else ref.log_softmax_ref(x, dim)
    out = forward(device.put(x), dim)
    device.check(out, y, what=op)
    expected = (ref.softmax_backward_ref if op == "softmax" else ref.log_softmax_backward_ref)(
        gy, device.host(out), dim)
    device.check(backward(device.put(gy), out, dim), expected, what=f"{op}_backward")


# ---------------------------------------------------- the references themselves
# conv2d, pooling, linear and relu's backward references are checked by
# test_gradcheck.py and against PyTorch (test_torch_parity.py); these are
# the ones test_ops.py added, against finite differences of their forwards.

FD_RTOL = 1e-6


def _fd_check(forward, backward_ref, *arrays):
    """backward_ref(R) against central differences of sum(R * forward())
    for each of `arrays` (perturbed in place)."""
    R = np.random.default_rng(9).standard_normal(np.shape(forward()))
    for array, grad in zip(arrays, backward_ref(R)):
        def loss():
            return float((np.asarray(forward(), np.float64) * R).sum())
        assert_close(grad, numerical_grad(loss, array), rtol=FD_RTOL)


@pytest.mark.parametrize("shape,size", [((2, 5, 3, 2), 5), ((1, 6, 2, 3), 4), ((2, 3, 2), 1),
                                        ((2, 3, 1, 2), 7)])
def test_local_response_norm_backward_ref(shape, size):
    x = rnd(*shape, dtype=np.float64) * 2
    kw = dict(size=size, alpha=0.5, beta=0.75, k=2.0)
    _fd_check(lambda: ref.local_response_norm_ref(x, **kw),
              lambda R: [ref.local_response_norm_backward_ref(R, x, **kw)], x)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_backward_ref(training, relu):
    x, w, b, rm, rv, _ = _bn_case((3, 2, 2, 3), np.float64, True)
    x *= 0.3  # some outputs on each side of the ReLU

    def forward():
        y = ref.batch_norm_ref(x, rm, rv, w, b, training=training, eps=1e-3)[0]
        return ref.relu_ref(y) if relu else y

    def backward(R):
        _, mean, var, _, _ = ref.batch_norm_ref(x, rm, rv, w, b, training=training, eps=1e-3)
        if not training:
            mean, var = rm, rv
        return ref.batch_norm_backward_ref(R, x, mean, var, w, training, 1e-3,
                                           relu_output=forward() if relu else None)
    _fd_check(forward, backward, x, w, b)


@pytest.mark.parametrize("op,dim", [("softmax", 1), ("log_softmax", 0), ("softmax", -1)])
def test_softmax_backward_refs(op, dim):
    x = rnd(2, 3, 4, dtype=np.float64)
    forward = getattr(ref, op + "_ref")
    _fd_check(lambda: forward(x, dim),
              lambda R: [getattr(ref, op + "_backward_ref")(R, forward(x, dim), dim)], x)


@pytest.mark.parametrize("kw", [dict(), dict(reduction="sum", label_smoothing=0.3),
                                dict(weight=True, ignore_index=2), dict(reduction="none"),
                                dict(probabilities=True, label_smoothing=0.1)])
def test_cross_entropy_backward_ref(kw):
    kw = dict(kw)
    z = rnd(4, 5, 2, dtype=np.float64)
    t = np.random.default_rng(0).integers(0, 5, (4, 2))
    if kw.pop("probabilities", False):
        t = ref.softmax_ref(rnd(4, 5, 2, seed=1, dtype=np.float64), 1)
    weight = np.abs(rnd(5, seed=2, dtype=np.float64)) + 0.1 if kw.pop("weight", False) else None
    _fd_check(lambda: ref.cross_entropy_ref(z, t, weight, **kw),
              lambda R: [ref.cross_entropy_backward_ref(R if kw.get("reduction") == "none"
                                                        else float(R), z, t, weight, **kw)], z)


# ------------------------------------------------------------------ the shim

def test_zz_every_kernel_ran_on_the_shim():
    """Runs last (test_ops.py comes after test_cuda_shim.py, and this test
    last in it): every kernel of the package ran on the shim in this session.
    Skipped unless both modules ran in full."""
    from cuda_shim import shim
    from _backends_fixture import shim_files
    be = shim.ACTIVE
    if be is None:
        pytest.skip("the shim did not run")
    ran = set().union(*be.tests.values()) if be.tests else set()
    modules = {test.split("::")[0].rsplit("/", 1)[-1] for test in ran}
    if not {"test_cuda_shim.py", "test_ops.py"} <= modules or len(ran) < 200:
        pytest.skip("only part of test_cuda_shim.py and test_ops.py ran; the coverage "
                    "check needs them all")
    every = {name for f in shim_files()[:-1] for name, _ in shim.kernels(f)}
    missing = sorted(every - set(be.tests))
    assert not missing, f"kernels never run on the shim: {missing}"
