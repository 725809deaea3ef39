"""max_pool2d / avg_pool2d / adaptive_avg_pool2d (+ backward) against the
numpy reference: random arguments, memory layouts and edge cases on the CPU
(fixed cases, ceil_mode's edges, divisor_override and NaN on every backend:
test_ops.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convcore
import reference as ref
from _helpers import (DTYPES, adaptive_cases, adaptive_shape, assert_close,
                      avg_pool_kwargs, check_output, distinct_values, dtypes,
                      layouts, max_pool_kwargs, pool_cases, pool_shape, randn,
                      seeds, with_layout)


def expected_pool_shape(case, dilation=1):
    kh, kw = ref.pair(case["kernel_size"])
    stride = case["stride"]
    sh, sw = ref.pair((kh, kw) if stride is None else stride)
    ph, pw = ref.pair(case["padding"])
    dh, dw = ref.pair(dilation)
    OH = ref.pool_out_size(case["H"], kh, sh, ph, dh, case["ceil_mode"])
    OW = ref.pool_out_size(case["W"], kw, sw, pw, dw, case["ceil_mode"])
    s = (case["C"], OH, OW)
    return s if case["unbatched"] else (case["N"],) + s


def check_indices(idx, expected_idx, x, out):
    assert isinstance(idx, np.ndarray)
    assert idx.dtype == np.int64, idx.dtype
    assert idx.flags.c_contiguous
    assert idx.shape == out.shape
    np.testing.assert_array_equal(idx, expected_idx)


# ---------------------------------------------------------------------------
# max pooling
# ---------------------------------------------------------------------------

@given(case=pool_cases(max_pool=True), dtype=dtypes, seed=seeds, xl=layouts,
       ties=st.booleans())
def test_max_pool2d_matches_reference(case, dtype, seed, xl, ties):
    rng = np.random.default_rng(seed)
    x = randn(rng, pool_shape(case), dtype)
    if ties:  # lots of equal values: the first maximum must win
        x = np.round(x).astype(dtype)
    kw = max_pool_kwargs(case)
    exp, exp_idx = ref.max_pool2d_ref(x, return_indices=True, **kw)
    assert exp.shape == expected_pool_shape(case, case["dilation"])
    xv = with_layout(x, xl)
    out = convcore.max_pool2d(xv, **kw)
    check_output(out, exp, dtype, "max_pool2d", rtol=0)
    out2, idx = convcore.max_pool2d(xv, return_indices=True, **kw)
    check_output(out2, exp, dtype, "max_pool2d", rtol=0)
    check_indices(idx, exp_idx, x, out2)


@given(case=pool_cases(max_pool=True), dtype=dtypes, seed=seeds, xl=layouts,
       gl=layouts, ties=st.booleans())
def test_max_pool2d_backward_matches_reference(case, dtype, seed, xl, gl, ties):
    rng = np.random.default_rng(seed)
    x = randn(rng, pool_shape(case), dtype)
    if ties:
        x = np.round(x).astype(dtype)
    kw = max_pool_kwargs(case)
    gy = randn(rng, expected_pool_shape(case, case["dilation"]), dtype)
    exp = ref.max_pool2d_backward_ref(gy, x, **kw)
    got = convcore.max_pool2d_backward(with_layout(gy, gl), with_layout(x, xl),
                                       **kw)
    check_output(got, exp, dtype, "max_pool2d_backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_ties_pick_first(dtype):
    x = np.ones((1, 1, 4, 4), dtype)
    out, idx = convcore.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(idx[0, 0], [[0, 2], [8, 10]])
    out, idx = convcore.max_pool2d(x, 3, stride=1, padding=1,
                                   return_indices=True)
    # the first (row-major) tap inside the input
    expected = np.array([[0, 0, 1, 2], [0, 0, 1, 2], [4, 4, 5, 6],
                         [8, 8, 9, 10]])
    np.testing.assert_array_equal(idx[0, 0], expected)
    g = convcore.max_pool2d_backward(np.ones_like(out), x, 3, stride=1,
                                     padding=1)
    np.testing.assert_array_equal(
        g[0, 0], np.bincount(expected.ravel(), minlength=16).reshape(4, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_all_negative_with_padding(dtype):
    """Padding must act as -inf, never as 0."""
    x = -np.arange(1, 10, dtype=dtype).reshape(1, 1, 3, 3)
    out, idx = convcore.max_pool2d(x, 3, stride=1, padding=1,
                                   return_indices=True)
    exp, exp_idx = ref.max_pool2d_ref(x, 3, 1, 1, return_indices=True)
    np.testing.assert_array_equal(out, exp)
    np.testing.assert_array_equal(idx, exp_idx)
    assert (out < 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_infinities(dtype):
    x = np.array([[[[-np.inf, -np.inf, 1.0],
                    [np.inf, -np.inf, -np.inf],
                    [-np.inf, -np.inf, -np.inf]]]], dtype)
    out, idx = convcore.max_pool2d(x, 2, stride=1, return_indices=True)
    exp, exp_idx = ref.max_pool2d_ref(x, 2, 1, return_indices=True)
    np.testing.assert_array_equal(out, exp)
    np.testing.assert_array_equal(idx, exp_idx)
    # an all -inf window reports its first element
    assert out[0, 0, 1, 1] == -np.inf and idx[0, 0, 1, 1] == 4


def test_ceil_mode_shape_table():
    """Exact PyTorch shapes, hand-computed."""
    x = np.zeros((1, 1, 5, 5), np.float32)
    assert convcore.max_pool2d(x, 2, 2, ceil_mode=False).shape[-2:] == (2, 2)
    assert convcore.max_pool2d(x, 2, 2, ceil_mode=True).shape[-2:] == (3, 3)
    # last window would start at padded position 6 >= 5 + 1: dropped
    assert convcore.max_pool2d(x, 2, 2, 1, ceil_mode=True).shape[-2:] == (3, 3)
    assert convcore.avg_pool2d(x, 2, 2, 1, ceil_mode=True).shape[-2:] == (3, 3)
    x = np.zeros((1, 1, 4, 4), np.float32)
    assert convcore.max_pool2d(x, 3, 2, 1, ceil_mode=True).shape[-2:] == (3, 3)
    assert convcore.max_pool2d(x, 3, 2, 1, ceil_mode=False).shape[-2:] == (2, 2)
    assert convcore.avg_pool2d(x, 3, 2, 1, ceil_mode=True).shape[-2:] == (3, 3)


def test_max_pool_stride_default_is_kernel():
    rng = np.random.default_rng(1)
    x = randn(rng, (2, 3, 7, 9), np.float64)
    a = convcore.max_pool2d(x, (2, 3))
    b = convcore.max_pool2d(x, (2, 3), stride=(2, 3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 3, 3, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_dilation(dtype):
    rng = np.random.default_rng(2)
    x = distinct_values(rng, (2, 2, 9, 8), dtype)
    kw = dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1),
              dilation=(3, 2))
    out, idx = convcore.max_pool2d(x, return_indices=True, **kw)
    e, ei = ref.max_pool2d_ref(x, return_indices=True, **kw)
    np.testing.assert_array_equal(out, e)
    np.testing.assert_array_equal(idx, ei)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_global(dtype):
    rng = np.random.default_rng(3)
    x = randn(rng, (2, 3, 5, 4), dtype)
    out, idx = convcore.max_pool2d(x, (5, 4), return_indices=True)
    np.testing.assert_array_equal(out[..., 0, 0], x.max(axis=(2, 3)))
    np.testing.assert_array_equal(idx[..., 0, 0],
                                  x.reshape(2, 3, -1).argmax(axis=2))


# ---------------------------------------------------------------------------
# average pooling
# ---------------------------------------------------------------------------

@given(case=pool_cases(max_pool=False), dtype=dtypes, seed=seeds, xl=layouts)
def test_avg_pool2d_matches_reference(case, dtype, seed, xl):
    rng = np.random.default_rng(seed)
    x = randn(rng, pool_shape(case), dtype)
    kw = avg_pool_kwargs(case)
    exp = ref.avg_pool2d_ref(x, **kw)
    assert exp.shape == expected_pool_shape(case)
    out = convcore.avg_pool2d(with_layout(x, xl), **kw)
    check_output(out, exp, dtype, "avg_pool2d")


@given(case=pool_cases(max_pool=False), dtype=dtypes, seed=seeds, xl=layouts,
       gl=layouts)
def test_avg_pool2d_backward_matches_reference(case, dtype, seed, xl, gl):
    rng = np.random.default_rng(seed)
    x = randn(rng, pool_shape(case), dtype)
    kw = avg_pool_kwargs(case)
    gy = randn(rng, expected_pool_shape(case), dtype)
    exp = ref.avg_pool2d_backward_ref(gy, x, **kw)
    got = convcore.avg_pool2d_backward(with_layout(gy, gl), with_layout(x, xl),
                                       **kw)
    check_output(got, exp, dtype, "avg_pool2d_backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_pool_count_include_pad_values(dtype):
    """Hand-computed corner: 3x3 window, pad 1, all-ones input."""
    x = np.ones((1, 1, 3, 3), dtype)
    inc = convcore.avg_pool2d(x, 3, stride=1, padding=1,
                              count_include_pad=True)
    exc = convcore.avg_pool2d(x, 3, stride=1, padding=1,
                              count_include_pad=False)
    np.testing.assert_allclose(inc[0, 0], np.array([[4, 6, 4], [6, 9, 6],
                                                    [4, 6, 4]]) / 9, rtol=1e-6)
    np.testing.assert_allclose(exc[0, 0], np.ones((3, 3)), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_pool_ceil_window_past_padding(dtype):
    """With ceil_mode a window can hang past the right padding; PyTorch
    counts only up to input + padding in count_include_pad mode."""
    x = np.ones((1, 1, 4, 4), dtype)
    # k=3, s=2, p=1: windows start at -1, 1, 3; the last one covers rows
    # 3..5 but the padded extent ends at H + p = 5, so it counts rows 3, 4
    # (2 rows, 1 real): the count_include_pad divisor there is 2*2, not 9
    out = convcore.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True,
                              count_include_pad=True)
    exp = ref.avg_pool2d_ref(x, 3, 2, 1, ceil_mode=True,
                             count_include_pad=True)
    assert out.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(out, exp, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 2, 2], 1 / 4, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1, 2], 2 / 4, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0, 0], 4 / 9, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0, 2], 2 / 6, rtol=1e-6)
    # no padding, ceil_mode: window 3..5 over H=4 holds a single row
    out = convcore.avg_pool2d(x, 3, stride=3, padding=0, ceil_mode=True)
    assert out.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(out, np.ones((1, 1, 2, 2)), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_pool_divisor_override_is_plain_sum(dtype):
    rng = np.random.default_rng(5)
    x = randn(rng, (1, 2, 4, 6), dtype)
    s = convcore.avg_pool2d(x, 2, divisor_override=1)
    expected = x.astype(np.float64).reshape(1, 2, 2, 2, 3, 2).sum(axis=(3, 5))
    check_output(s, expected, dtype)


# ---------------------------------------------------------------------------
# adaptive average pooling
# ---------------------------------------------------------------------------

@given(case=adaptive_cases(), dtype=dtypes, seed=seeds, xl=layouts)
def test_adaptive_avg_pool2d_matches_reference(case, dtype, seed, xl):
    rng = np.random.default_rng(seed)
    x = randn(rng, adaptive_shape(case), dtype)
    exp = ref.adaptive_avg_pool2d_ref(x, case["output_size"])
    OH, OW = ref.adaptive_out_size(case["H"], case["W"], case["output_size"])
    assert exp.shape[-2:] == (OH, OW)
    out = convcore.adaptive_avg_pool2d(with_layout(x, xl), case["output_size"])
    check_output(out, exp, dtype, "adaptive_avg_pool2d")


@given(case=adaptive_cases(), dtype=dtypes, seed=seeds, xl=layouts,
       gl=layouts)
def test_adaptive_avg_pool2d_backward_matches_reference(case, dtype, seed, xl,
                                                        gl):
    rng = np.random.default_rng(seed)
    x = randn(rng, adaptive_shape(case), dtype)
    OH, OW = ref.adaptive_out_size(case["H"], case["W"], case["output_size"])
    gy = randn(rng, x.shape[:-2] + (OH, OW), dtype)
    exp = ref.adaptive_avg_pool2d_backward_ref(gy, x)
    got = convcore.adaptive_avg_pool2d_backward(with_layout(gy, gl),
                                                with_layout(x, xl))
    check_output(got, exp, dtype, "adaptive_avg_pool2d_backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_non_divisible_hand_computed(dtype):
    """H=5 -> 3 outputs: windows [0,2), [1,4), [3,5)."""
    x = np.arange(5, dtype=dtype).reshape(1, 1, 5, 1)
    out = convcore.adaptive_avg_pool2d(x, (3, 1))
    np.testing.assert_allclose(out[0, 0, :, 0], [0.5, 2.0, 3.5], rtol=1e-6)
    # upsampling: H=2 -> 3 outputs: [0,1), [0,2), [1,2)
    x = np.array([1.0, 3.0], dtype).reshape(1, 1, 2, 1)
    out = convcore.adaptive_avg_pool2d(x, (3, None))
    assert out.shape == (1, 1, 3, 1)
    np.testing.assert_allclose(out[0, 0, :, 0], [1.0, 2.0, 3.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_global_and_identity(dtype):
    rng = np.random.default_rng(6)
    x = randn(rng, (2, 3, 5, 7), dtype)
    g = convcore.adaptive_avg_pool2d(x, 1)
    assert g.shape == (2, 3, 1, 1)
    check_output(g, x.astype(np.float64).mean(axis=(2, 3), keepdims=True),
                 dtype)
    same = convcore.adaptive_avg_pool2d(x, (None, None))
    assert same.shape == x.shape
    check_output(same, x.astype(np.float64), dtype)
    assert convcore.adaptive_avg_pool2d(x, (None, 2)).shape == (2, 3, 5, 2)
    assert convcore.adaptive_avg_pool2d(x, (4, None)).shape == (2, 3, 4, 7)


# ---------------------------------------------------------------------------
# unbatched
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_unbatched(dtype):
    rng = np.random.default_rng(7)
    x = randn(rng, (3, 6, 5), dtype)
    o3, i3 = convcore.max_pool2d(x, 2, 1, 1, return_indices=True)
    o4, i4 = convcore.max_pool2d(x[None], 2, 1, 1, return_indices=True)
    assert o3.shape == o4.shape[1:]
    np.testing.assert_array_equal(o3, o4[0])
    np.testing.assert_array_equal(i3, i4[0])
    gy = randn(rng, o3.shape, dtype)
    np.testing.assert_array_equal(
        convcore.max_pool2d_backward(gy, x, 2, 1, 1),
        convcore.max_pool2d_backward(gy[None], x[None], 2, 1, 1)[0])
    a3 = convcore.avg_pool2d(x, 3, 2, 1, ceil_mode=True)
    check_output(a3, ref.avg_pool2d_ref(x, 3, 2, 1, ceil_mode=True), dtype)
    ga = convcore.avg_pool2d_backward(randn(rng, a3.shape, dtype), x, 3, 2, 1,
                                      ceil_mode=True)
    assert ga.shape == x.shape
    ad = convcore.adaptive_avg_pool2d(x, (4, 3))
    assert ad.shape == (3, 4, 3)
    gad = convcore.adaptive_avg_pool2d_backward(np.ones_like(ad), x)
    assert gad.shape == x.shape
    # total gradient mass is preserved per output cell
    assert_close(gad.sum(), 3 * 4 * 3, np.float64, rtol=1e-5)


@pytest.mark.slow
@settings(max_examples=500)
@given(case=pool_cases(max_pool=True, max_hw=16), dtype=dtypes, seed=seeds,
       ties=st.booleans())
def test_max_pool2d_extended_sweep(case, dtype, seed, ties):
    rng = np.random.default_rng(seed)
    x = randn(rng, pool_shape(case), dtype)
    if ties:
        x = np.round(x).astype(dtype)
    kw = max_pool_kwargs(case)
    exp, exp_idx = ref.max_pool2d_ref(x, return_indices=True, **kw)
    out, idx = convcore.max_pool2d(x, return_indices=True, **kw)
    check_output(out, exp, dtype, rtol=0)
    check_indices(idx, exp_idx, x, out)
    gy = randn(rng, out.shape, dtype)
    check_output(convcore.max_pool2d_backward(gy, x, **kw),
                 ref.max_pool2d_backward_ref(gy, x, **kw), dtype)


@pytest.mark.slow
@settings(max_examples=500)
@given(case=pool_cases(max_pool=False, max_hw=16), dtype=dtypes, seed=seeds)
def test_avg_pool2d_extended_sweep(case, dtype, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, pool_shape(case), dtype)
    kw = avg_pool_kwargs(case)
    out = convcore.avg_pool2d(x, **kw)
    check_output(out, ref.avg_pool2d_ref(x, **kw), dtype)
    gy = randn(rng, out.shape, dtype)
    check_output(convcore.avg_pool2d_backward(gy, x, **kw),
                 ref.avg_pool2d_backward_ref(gy, x, **kw), dtype)


# ---------------------------------------------------------------------------
# PyTorch's argument forms, and how exactly pooling matches PyTorch
# ---------------------------------------------------------------------------

def _torch():
    return pytest.importorskip(
        "torch", reason="PyTorch not installed: parity with torch.nn.functional skipped")


POOL_FORMS = [  # (op, the PyTorch form, the same call spelled out)
    ("avg", dict(kernel_size=3, padding=(1,)), dict(kernel_size=3, padding=1)),
    ("avg", dict(kernel_size=3, stride=()), dict(kernel_size=3, stride=3)),
    ("avg", dict(kernel_size=(3, 2), stride=[]), dict(kernel_size=(3, 2), stride=(3, 2))),
    ("avg", dict(kernel_size=(3,), stride=(2,), padding=(1,)),
     dict(kernel_size=3, stride=2, padding=1)),
    ("max", dict(kernel_size=3, stride=(), padding=(1,)), dict(kernel_size=3, padding=1)),
    ("max", dict(kernel_size=(2,), stride=(1,), dilation=(2,)),
     dict(kernel_size=2, stride=1, dilation=2)),
]


@pytest.mark.parametrize("op,form,spelled", POOL_FORMS)
def test_pool_pytorch_argument_forms(op, form, spelled):
    """A 1-tuple means both dimensions and stride=() the default stride, as in
    PyTorch; the result is torch's exactly (float64 average pooling and max
    pooling are bit-identical to it, see below)."""
    torch = _torch()
    import torch.nn.functional as F
    x = randn(np.random.default_rng(8), (2, 3, 7, 8), np.float64)
    ours, theirs = (convcore.avg_pool2d, F.avg_pool2d) if op == "avg" else \
        (convcore.max_pool2d, F.max_pool2d)
    out = ours(x, **form)
    np.testing.assert_array_equal(out, ours(x, **spelled))
    np.testing.assert_array_equal(out, theirs(torch.from_numpy(x), **form).numpy())
    layer = (convcore.nn.AvgPool2d if op == "avg" else convcore.nn.MaxPool2d)(**form)
    np.testing.assert_array_equal(layer(x), out)
    assert convcore.pool2d_output_shape(x.shape, kind=op, **form) == out.shape


def _pool_cases(rng, count):
    """Random (N, C, H, W) inputs with average-pooling and adaptive arguments."""
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(3, 24, 2))
        k = int(rng.integers(1, min(h, w) + 1))
        kw = dict(kernel_size=k, stride=int(rng.integers(1, 4)),
                  padding=int(rng.integers(0, k // 2 + 1)), ceil_mode=bool(rng.integers(2)))
        size = (int(rng.integers(1, h + 3)), int(rng.integers(1, w + 3)))
        yield rng.standard_normal((2, 3, h, w)), kw, size


@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_exactness_against_torch(dtype):
    """What the README states: max pooling (values, indices, gradients) and
    avg_pool2d's gradient are bit-identical to PyTorch's, and so is
    avg_pool2d's float64 output. convcore sums each average-pooling window in
    double and rounds once where PyTorch sums in float32, and divides an
    adaptive bin by its area once where PyTorch divides by its height, then
    its width: those results differ from PyTorch's within PyTorch's rounding,
    |convcore - torch| <= window size * u * mean |x| + 2u |torch| (u = 2^-24
    in float32, 2^-53 in float64; for adaptive_avg_pool2d's gradient, 2m + 1
    roundings of the m shares an input position sums)."""
    torch = _torch()
    import torch.nn.functional as F
    u = 2.0 ** -24 if dtype == np.float32 else 2.0 ** -53
    rng = np.random.default_rng(9)
    worst = 0.0

    def within(ours, theirs, window, mean_abs):
        nonlocal worst
        bound = window * u * mean_abs + 2 * u * np.abs(theirs)
        worst = max(worst, float((np.abs(ours - theirs.astype(np.float64)) / bound).max()))

    for x64, kw, size in _pool_cases(rng, 40):
        x = x64.astype(dtype)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt, it = F.max_pool2d(xt, return_indices=True, **kw)
        y, idx = convcore.max_pool2d(x, return_indices=True, **kw)
        np.testing.assert_array_equal(y, yt.detach().numpy())
        np.testing.assert_array_equal(idx, it.numpy())
        gy = rng.standard_normal(y.shape).astype(dtype)
        yt.backward(torch.from_numpy(gy))
        np.testing.assert_array_equal(convcore.max_pool2d_backward(gy, x, **kw),
                                      xt.grad.numpy())

        xt = torch.from_numpy(x).requires_grad_(True)
        yt = F.avg_pool2d(xt, **kw)
        y = convcore.avg_pool2d(x, **kw)
        if dtype == np.float64:
            np.testing.assert_array_equal(y, yt.detach().numpy())
        window = kw["kernel_size"] ** 2
        within(y, yt.detach().numpy(), window, convcore.avg_pool2d(np.abs(x64), **kw))
        gy = rng.standard_normal(y.shape).astype(dtype)
        yt.backward(torch.from_numpy(gy))
        np.testing.assert_array_equal(convcore.avg_pool2d_backward(gy, x, **kw),
                                      xt.grad.numpy())

        xt = torch.from_numpy(x).requires_grad_(True)
        yt = F.adaptive_avg_pool2d(xt, size)
        window = (-(-x.shape[2] // size[0]) + 1) * (-(-x.shape[3] // size[1]) + 1)
        within(convcore.adaptive_avg_pool2d(x, size), yt.detach().numpy(), window,
               convcore.adaptive_avg_pool2d(np.abs(x64), size))
        # the gradient: each input position sums the shares of the m bins
        # over it, each share rounded once (convcore) or twice (PyTorch)
        gy = rng.standard_normal(yt.shape).astype(dtype)
        yt.backward(torch.from_numpy(gy))
        m = (-(-size[0] // x.shape[2]) + 1) * (-(-size[1] // x.shape[3]) + 1)
        shares = convcore.adaptive_avg_pool2d_backward(np.abs(gy).astype(np.float64), x64)
        within(convcore.adaptive_avg_pool2d_backward(gy, x), xt.grad.numpy(), 2 * m + 1, shares)
    assert worst <= 1.0, f"differences up to {worst:.2f} times PyTorch's rounding bound"
