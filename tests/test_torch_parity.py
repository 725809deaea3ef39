"""Parity with torch.nn.functional (forward, and backward via autograd).

The maximum scaled relative error seen per op/dtype is recorded in
``_helpers.PARITY_ERRORS`` and printed in the pytest terminal summary.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip(
    "torch", reason="PyTorch not installed: parity with torch.nn.functional skipped")
import torch.nn.functional as F  # noqa: E402

import convcore  # noqa: E402
from _helpers import (PARITY_ERRORS, adaptive_cases, adaptive_shape,  # noqa: E402
                      avg_pool_kwargs, conv_arrays, conv_cases, conv_kwargs,
                      dtypes, layouts, max_pool_kwargs,
                      max_pool_windows_nonempty, pool_cases, pool_shape, randn,
                      rel_err, rtol_for, seeds, with_layout)

pytestmark = pytest.mark.filterwarnings(
    # torch warns about 'same' with even kernels needing a padded copy
    "ignore:Using padding='same':UserWarning")

torch.set_num_threads(1)   # keep the CPU footprint small


def T(a, grad=False):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.requires_grad_(grad) if grad else t


def compare(name, dtype, got, expected_tensor):
    exp = expected_tensor.detach().numpy()
    assert isinstance(got, np.ndarray)
    assert got.dtype == exp.dtype, (name, got.dtype, exp.dtype)
    assert got.shape == exp.shape, (name, got.shape, exp.shape)
    assert got.flags.c_contiguous, name
    err = rel_err(got, exp)
    key = f"{name}[{np.dtype(dtype).name}]"
    PARITY_ERRORS[key] = max(PARITY_ERRORS.get(key, 0.0), err)
    assert err <= rtol_for(dtype), f"{key}: scaled error {err:.3e}"


# ---------------------------------------------------------------------------
# randomized forward + backward parity
# ---------------------------------------------------------------------------

@given(case=conv_cases(), dtype=dtypes, seed=seeds, xl=layouts)
def test_conv2d_parity(case, dtype, seed, xl):
    rng = np.random.default_rng(seed)
    x, w, b = conv_arrays(case, rng, dtype)
    kw = conv_kwargs(case)
    xt, wt = T(x, True), T(w, True)
    bt = T(b, True) if b is not None else None
    yt = F.conv2d(xt, wt, bt, **kw)
    y = convcore.conv2d(with_layout(x, xl), w, b, **kw)
    compare("conv2d", dtype, y, yt)
    gy = randn(rng, y.shape, dtype)
    yt.backward(T(gy))
    gx, gw, gb = convcore.conv2d_backward(gy, with_layout(x, xl), w, **kw)
    compare("conv2d_backward.grad_input", dtype, gx, xt.grad)
    compare("conv2d_backward.grad_weight", dtype, gw, wt.grad)
    if bt is not None:
        compare("conv2d_backward.grad_bias", dtype, gb, bt.grad)


@given(case=pool_cases(max_pool=True), dtype=dtypes, seed=seeds, xl=layouts,
       ties=st.booleans())
def test_max_pool2d_parity(case, dtype, seed, xl, ties):
    rng = np.random.default_rng(seed)
    x = randn(rng, pool_shape(case), dtype)
    if ties:
        x = np.round(x).astype(dtype)
    kw = max_pool_kwargs(case)
    xt = T(x, True)
    yt, it = F.max_pool2d(xt, return_indices=True, **kw)
    y, idx = convcore.max_pool2d(with_layout(x, xl), return_indices=True, **kw)
    compare("max_pool2d", dtype, y, yt)
    np.testing.assert_array_equal(idx, it.numpy())
    assert idx.dtype == np.int64
    gy = randn(rng, y.shape, dtype)
    yt.backward(T(gy))
    compare("max_pool2d_backward", dtype,
            convcore.max_pool2d_backward(gy, x, **kw), xt.grad)


@given(case=pool_cases(max_pool=True), dtype=dtypes, seed=seeds, xl=layouts)
def test_max_pool2d_parity_nan_and_signed_zeros(case, dtype, seed, xl):
    # Windows with several NaNs, and ties of -0 and +0: the same index and
    # the same zero as PyTorch, forward and backward.
    rng = np.random.default_rng(seed)
    x = np.round(randn(rng, pool_shape(case), dtype))
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.2] = -0.0
    x[rng.random(x.shape) < 0.2] = 0.0
    kw = max_pool_kwargs(case)
    xt = T(x, True)
    yt, it = F.max_pool2d(xt, return_indices=True, **kw)
    y, idx = convcore.max_pool2d(with_layout(x, xl), return_indices=True, **kw)
    np.testing.assert_array_equal(idx, it.numpy())
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(np.signbit(y), np.signbit(yt.detach().numpy()))
    gy = randn(rng, y.shape, dtype)
    yt.backward(T(gy))
    np.testing.assert_array_equal(convcore.max_pool2d_backward(gy, x, **kw), xt.grad.numpy())


@given(case=pool_cases(max_pool=False), dtype=dtypes, seed=seeds, xl=layouts)
def test_avg_pool2d_parity(case, dtype, seed, xl):
    rng = np.random.default_rng(seed)
    x = randn(rng, pool_shape(case), dtype)
    kw = avg_pool_kwargs(case)
    xt = T(x, True)
    yt = F.avg_pool2d(xt, **kw)
    y = convcore.avg_pool2d(with_layout(x, xl), **kw)
    compare("avg_pool2d", dtype, y, yt)
    gy = randn(rng, y.shape, dtype)
    yt.backward(T(gy))
    compare("avg_pool2d_backward", dtype,
            convcore.avg_pool2d_backward(gy, x, **kw), xt.grad)


@given(case=adaptive_cases(), dtype=dtypes, seed=seeds, xl=layouts)
def test_adaptive_avg_pool2d_parity(case, dtype, seed, xl):
    rng = np.random.default_rng(seed)
    x = randn(rng, adaptive_shape(case), dtype)
    xt = T(x, True)
    yt = F.adaptive_avg_pool2d(xt, case["output_size"])
    y = convcore.adaptive_avg_pool2d(with_layout(x, xl), case["output_size"])
    compare("adaptive_avg_pool2d", dtype, y, yt)
    gy = randn(rng, y.shape, dtype)
    yt.backward(T(gy))
    compare("adaptive_avg_pool2d_backward", dtype,
            convcore.adaptive_avg_pool2d_backward(gy, x), xt.grad)


@given(lead=st.lists(st.integers(1, 4), max_size=3).map(tuple),
       fin=st.integers(1, 40), fout=st.integers(1, 12), bias=st.booleans(),
       dtype=dtypes, seed=seeds, xl=layouts)
def test_linear_parity(lead, fin, fout, bias, dtype, seed, xl):
    rng = np.random.default_rng(seed)
    x = randn(rng, lead + (fin,), dtype)
    w = randn(rng, (fout, fin), dtype)
    b = randn(rng, (fout,), dtype) if bias else None
    xt, wt = T(x, True), T(w, True)
    bt = T(b, True) if bias else None
    yt = F.linear(xt, wt, bt)
    compare("linear", dtype, convcore.linear(with_layout(x, xl), w, b), yt)
    gy = randn(rng, yt.shape, dtype)
    yt.backward(T(gy))
    gx, gw, gb = convcore.linear_backward(gy, with_layout(x, xl), w)
    compare("linear_backward.grad_input", dtype, gx, xt.grad)
    compare("linear_backward.grad_weight", dtype, gw, wt.grad)
    if bias:
        compare("linear_backward.grad_bias", dtype, gb, bt.grad)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
       dtype=dtypes, seed=seeds, xl=layouts)
def test_relu_parity(shape, dtype, seed, xl):
    rng = np.random.default_rng(seed)
    x = randn(rng, shape, dtype)
    x.flat[0] = 0.0                 # relu'(0) == 0 in both
    xt = T(x, True)
    yt = F.relu(xt)
    compare("relu", dtype, convcore.relu(with_layout(x, xl)), yt)
    gy = randn(rng, shape, dtype)
    yt.backward(T(gy))
    compare("relu_backward", dtype, convcore.relu_backward(gy, x), xt.grad)


# ---------------------------------------------------------------------------
# larger shapes (GEMM tiling / blocking edge cases), against torch only
# ---------------------------------------------------------------------------

LARGE_CONV = [
    # x shape, w shape, kwargs
    ((2, 32, 19, 23), (48, 32, 3, 3), dict(padding=1)),
    ((3, 17, 16, 16), (33, 17, 1, 1), dict()),
    ((1, 64, 15, 14), (64, 1, 3, 3), dict(padding=1, groups=64)),
    ((2, 24, 21, 20), (36, 8, 5, 3), dict(stride=2, padding=(2, 1),
                                         groups=3)),
    ((2, 12, 25, 18), (20, 12, 3, 4), dict(dilation=(2, 3), padding="same")),
    ((1, 3, 64, 64), (16, 3, 7, 7), dict(stride=2, padding=3)),
    ((5, 40, 7, 9), (70, 40, 2, 2), dict(stride=(1, 2), padding=(1, 0))),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs,ws,kw", LARGE_CONV)
def test_conv2d_parity_larger_shapes(xs, ws, kw, dtype):
    rng = np.random.default_rng(sum(xs) + sum(ws))
    x, w = randn(rng, xs, dtype), randn(rng, ws, dtype)
    b = randn(rng, (ws[0],), dtype)
    xt, wt, bt = T(x, True), T(w, True), T(b, True)
    yt = F.conv2d(xt, wt, bt, **kw)
    y = convcore.conv2d(x, w, b, **kw)
    compare("conv2d(large)", dtype, y, yt)
    gy = randn(rng, y.shape, dtype)
    yt.backward(T(gy))
    gx, gw, gb = convcore.conv2d_backward(gy, x, w, **kw)
    compare("conv2d_backward(large).grad_input", dtype, gx, xt.grad)
    compare("conv2d_backward(large).grad_weight", dtype, gw, wt.grad)
    compare("conv2d_backward(large).grad_bias", dtype, gb, bt.grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs,out", [((37, 300), 45), ((4, 9, 129), 65),
                                    ((1, 1000), 10), ((256, 3), 1)])
def test_linear_parity_larger_shapes(xs, out, dtype):
    rng = np.random.default_rng(xs[-1] + out)
    x, w = randn(rng, xs, dtype), randn(rng, (out, xs[-1]), dtype)
    b = randn(rng, (out,), dtype)
    xt, wt, bt = T(x, True), T(w, True), T(b, True)
    yt = F.linear(xt, wt, bt)
    compare("linear(large)", dtype, convcore.linear(x, w, b), yt)
    gy = randn(rng, yt.shape, dtype)
    yt.backward(T(gy))
    gx, gw, gb = convcore.linear_backward(gy, x, w)
    compare("linear_backward(large).grad_input", dtype, gx, xt.grad)
    compare("linear_backward(large).grad_weight", dtype, gw, wt.grad)
    compare("linear_backward(large).grad_bias", dtype, gb, bt.grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooling_parity_larger_shapes(dtype):
    rng = np.random.default_rng(3)
    x = randn(rng, (3, 16, 33, 30), dtype)
    for kw in (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
               dict(kernel_size=(2, 4), stride=(3, 2), dilation=(2, 1)),
               dict(kernel_size=2)):
        xt = T(x, True)
        yt, it = F.max_pool2d(xt, return_indices=True, **kw)
        y, idx = convcore.max_pool2d(x, return_indices=True, **kw)
        compare("max_pool2d(large)", dtype, y, yt)
        np.testing.assert_array_equal(idx, it.numpy())
        gy = randn(rng, y.shape, dtype)
        yt.backward(T(gy))
        compare("max_pool2d_backward(large)", dtype,
                convcore.max_pool2d_backward(gy, x, **kw), xt.grad)
    for kw in (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                    count_include_pad=False),
               dict(kernel_size=(5, 3), stride=(2, 3), padding=(2, 0)),
               dict(kernel_size=2, divisor_override=3)):
        xt = T(x, True)
        yt = F.avg_pool2d(xt, **kw)
        compare("avg_pool2d(large)", dtype, convcore.avg_pool2d(x, **kw), yt)
        gy = randn(rng, yt.shape, dtype)
        yt.backward(T(gy))
        compare("avg_pool2d_backward(large)", dtype,
                convcore.avg_pool2d_backward(gy, x, **kw), xt.grad)
    for osz in ((7, 6), (1, 1), (40, 31), (None, 5)):
        xt = T(x, True)
        yt = F.adaptive_avg_pool2d(xt, osz)
        compare("adaptive_avg_pool2d(large)", dtype,
                convcore.adaptive_avg_pool2d(x, osz), yt)
        gy = randn(rng, yt.shape, dtype)
        yt.backward(T(gy))
        compare("adaptive_avg_pool2d_backward(large)", dtype,
                convcore.adaptive_avg_pool2d_backward(gy, x), xt.grad)


# ---------------------------------------------------------------------------
# exact parity of output shapes (and values) over exhaustive small grids,
# including ceil_mode windows that would start in the right padding
# ---------------------------------------------------------------------------

def _pool_grid(with_dilation):
    for H, k, s, d in itertools.product(range(1, 9), range(1, 5), range(1, 5),
                                        (1, 2) if with_dilation else (1,)):
        for p in range(0, k // 2 + 1):
            for ceil_mode in (False, True):
                yield H, k, s, p, d, ceil_mode


def _torch_shape_or_none(fn):
    try:
        return tuple(fn().shape)
    except RuntimeError:
        return None


def test_max_pool2d_shape_parity_grid():
    checked = 0
    for H, k, s, p, d, ceil_mode in _pool_grid(True):
        W = 9 - H                       # vary both dims at once
        x = np.arange(H * W, dtype=np.float64).reshape(1, 1, H, W)
        kw = dict(kernel_size=(k, k), stride=(s, s), padding=(p, p),
                  dilation=(d, d), ceil_mode=ceil_mode)
        tshape = _torch_shape_or_none(lambda: F.max_pool2d(T(x), **kw))
        if tshape is None:
            with pytest.raises(ValueError):
                convcore.max_pool2d(x, **kw)
            continue
        if not max_pool_windows_nonempty(H, W, **kw):
            # a window entirely in the padding: torch returns -inf with a
            # garbage index; convcore may either reject it or match shape
            try:
                got = convcore.max_pool2d(x, **kw)
            except ValueError:
                continue
            assert got.shape == tshape, kw
            continue
        yt, it = F.max_pool2d(T(x), return_indices=True, **kw)
        y, idx = convcore.max_pool2d(x, return_indices=True, **kw)
        assert y.shape == tshape, (H, W, kw)
        np.testing.assert_array_equal(y, yt.numpy())
        np.testing.assert_array_equal(idx, it.numpy())
        checked += 1
    assert checked > 500


def test_avg_pool2d_shape_and_value_parity_grid():
    checked = 0
    for H, k, s, p, _, ceil_mode in _pool_grid(False):
        W = 9 - H
        x = np.arange(H * W, dtype=np.float64).reshape(1, 1, H, W) + 1.0
        for cip in (True, False):
            kw = dict(kernel_size=k, stride=s, padding=p, ceil_mode=ceil_mode,
                      count_include_pad=cip)
            try:
                yt = F.avg_pool2d(T(x), **kw)
            except RuntimeError:
                with pytest.raises(ValueError):
                    convcore.avg_pool2d(x, **kw)
                continue
            y = convcore.avg_pool2d(x, **kw)
            assert y.shape == tuple(yt.shape), (H, W, kw)
            assert rel_err(y, yt.numpy()) <= 1e-12, (H, W, kw)
            checked += 1
    assert checked > 300


def test_conv2d_shape_parity_grid():
    for H, k, s, p, d in itertools.product(range(1, 8), range(1, 5),
                                           range(1, 4), range(0, 3),
                                           range(1, 3)):
        x = np.ones((1, 1, H, 8 - H))
        w = np.ones((1, 1, k, k))
        try:
            tshape = tuple(F.conv2d(T(x), T(w), stride=s, padding=p,
                                    dilation=d).shape)
        except RuntimeError:
            with pytest.raises(ValueError):
                convcore.conv2d(x, w, stride=s, padding=p, dilation=d)
            continue
        assert convcore.conv2d(x, w, stride=s, padding=p,
                               dilation=d).shape == tshape, (H, k, s, p, d)
    for H, kh, kw_, d in itertools.product(range(1, 7), range(1, 5),
                                           range(1, 5), range(1, 3)):
        x = np.ones((1, 1, H, 7 - H))
        w = np.ones((1, 1, kh, kw_))
        tshape = tuple(F.conv2d(T(x), T(w), padding="same", dilation=d).shape)
        assert convcore.conv2d(x, w, padding="same",
                               dilation=d).shape == tshape


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_nan_parity(dtype):
    rng = np.random.default_rng(0)
    x = randn(rng, (2, 3, 7, 6), dtype)
    x[rng.random(x.shape) < 0.1] = np.nan
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    yt, it = F.max_pool2d(T(x), return_indices=True, **kw)
    y, idx = convcore.max_pool2d(x, return_indices=True, **kw)
    np.testing.assert_array_equal(y, yt.numpy())       # NaN == NaN here
    # where the window has no NaN the index must match exactly; where it
    # has one, the index must point at a NaN
    nan_out = np.isnan(y)
    np.testing.assert_array_equal(idx[~nan_out], it.numpy()[~nan_out])
    picked = np.take_along_axis(x.reshape(2, 3, -1), idx.reshape(2, 3, -1), 2)
    assert np.isnan(picked.reshape(y.shape)[nan_out]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_nan_parity(dtype):
    x = np.array([np.nan, -np.inf, -1.0, 0.0, 2.0, np.inf], dtype)
    np.testing.assert_array_equal(convcore.relu(x), F.relu(T(x)).numpy())


def test_parity_errors_were_recorded():
    """Sanity: the randomized tests above did record their errors (this
    runs last in this module)."""
    if not PARITY_ERRORS:
        pytest.skip("randomized parity tests were deselected")
    assert all(np.isfinite(v) for v in PARITY_ERRORS.values())
