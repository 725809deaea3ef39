"""convcore.conv2d / conv2d_backward against the numpy reference: random
arguments, memory layouts and edge cases on the CPU (fixed cases on every
backend: test_ops.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convcore
import reference as ref
from _helpers import (DTYPES, check_output, conv_arrays, conv_cases,
                      conv_kwargs, dtypes, layouts, randn, seeds, with_layout)


def expected_conv_shape(case):
    kh, kw = case["kh"], case["kw"]
    dh, dw = ref.pair(case["dilation"])
    sh, sw = ref.pair(case["stride"])
    pt, pb, pl, pr = ref.resolve_conv_padding(case["padding"], (kh, kw),
                                              (dh, dw))
    OH = (case["H"] + pt + pb - dh * (kh - 1) - 1) // sh + 1
    OW = (case["W"] + pl + pr - dw * (kw - 1) - 1) // sw + 1
    shape = (case["Cout"], OH, OW)
    return shape if case["unbatched"] else (case["N"],) + shape


# ---------------------------------------------------------------------------
# randomized
# ---------------------------------------------------------------------------

@given(case=conv_cases(), dtype=dtypes, seed=seeds, xl=layouts, wl=layouts)
def test_conv2d_forward_matches_reference(case, dtype, seed, xl, wl):
    rng = np.random.default_rng(seed)
    x, w, b = conv_arrays(case, rng, dtype)
    kw = conv_kwargs(case)
    expected = ref.conv2d_ref(x, w, b, **kw)
    assert expected.shape == expected_conv_shape(case)
    xv, wv = with_layout(x, xl), with_layout(w, wl)
    x_before, w_before = xv.copy(), wv.copy()
    out = convcore.conv2d(xv, wv, b, **kw)
    check_output(out, expected, dtype, "conv2d")
    # inputs untouched, output is a fresh array
    np.testing.assert_array_equal(xv, x_before)
    np.testing.assert_array_equal(wv, w_before)
    assert not np.shares_memory(out, xv)


@given(case=conv_cases(), dtype=dtypes, seed=seeds, xl=layouts, gl=layouts)
def test_conv2d_backward_matches_reference(case, dtype, seed, xl, gl):
    rng = np.random.default_rng(seed)
    x, w, _ = conv_arrays(case, rng, dtype)
    kw = conv_kwargs(case)
    gy = randn(rng, expected_conv_shape(case), dtype)
    egx, egw, egb = ref.conv2d_backward_ref(gy, x, w, **kw)
    gx, gw, gb = convcore.conv2d_backward(with_layout(gy, gl),
                                          with_layout(x, xl), w, **kw)
    check_output(gx, egx, dtype, "grad_input")
    check_output(gw, egw, dtype, "grad_weight")
    check_output(gb, egb, dtype, "grad_bias")
    assert gx.shape == x.shape and gw.shape == w.shape
    assert gb.shape == (w.shape[0],)


# ---------------------------------------------------------------------------
# targeted cases
# ---------------------------------------------------------------------------

def _run_and_compare(x, w, b=None, backward=True, **kw):
    dtype = x.dtype
    check_output(convcore.conv2d(x, w, b, **kw), ref.conv2d_ref(x, w, b, **kw),
                 dtype, "conv2d")
    if backward:
        rng = np.random.default_rng(123)
        out_shape = ref.conv2d_ref(x, w, b, **kw).shape
        gy = randn(rng, out_shape, dtype)
        got = convcore.conv2d_backward(gy, x, w, **kw)
        exp = ref.conv2d_backward_ref(gy, x, w, **kw)
        for g, e, name in zip(got, exp, ("grad_input", "grad_weight", "grad_bias")):
            check_output(g, e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,padding,dilation", [
    ((3, 2), 0, 1), ((3, 3), 1, 1), ((5, 2), (2, 0), (1, 2)),
    ((3, 2), 0, (2, 3)), ((4, 4), (1, 1), (2, 1)), ((1, 1), 0, 1)])
def test_kernel_as_large_as_padded_input(dtype, kernel, padding, dilation):
    rng = np.random.default_rng(2)
    ph, pw = ref.pair(padding)
    dh, dw = ref.pair(dilation)
    kh, kw = kernel
    H = dh * (kh - 1) + 1 - 2 * ph
    W = dw * (kw - 1) + 1 - 2 * pw
    assert H >= 1 and W >= 1
    x = randn(rng, (2, 2, H, W), dtype)
    w = randn(rng, (3, 2, kh, kw), dtype)
    b = randn(rng, (3,), dtype)
    out = convcore.conv2d(x, w, b, padding=padding, dilation=dilation)
    assert out.shape == (2, 3, 1, 1)
    _run_and_compare(x, w, b, padding=padding, dilation=dilation)
    # one more row than fits with stride 2: still a single output row
    x2 = randn(rng, (2, 2, H + 1, W + 1), dtype)
    assert convcore.conv2d(x2, w, b, stride=2, padding=padding,
                           dilation=dilation).shape == (2, 3, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [(1, 1), (2, 2), (2, 3), (4, 1), (3, 4)])
@pytest.mark.parametrize("dilation", [1, 2, (1, 3)])
def test_same_padding_keeps_size(dtype, k, dilation):
    """'same' with even kernels puts the extra padding on the bottom/right."""
    rng = np.random.default_rng(3)
    x = randn(rng, (2, 3, 7, 6), dtype)
    w = randn(rng, (4, 3) + k, dtype)
    out = convcore.conv2d(x, w, padding="same", dilation=dilation)
    assert out.shape == (2, 4, 7, 6)
    _run_and_compare(x, w, padding="same", dilation=dilation)


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_even_kernel_asymmetric_values(dtype):
    """Pin down where the extra zero row/column of 'same' goes: with a 2x2
    kernel that only has its bottom-right tap set, out[i, j] = x[i+1, j+1]
    when the extra padding is on the bottom/right (PyTorch convention)."""
    x = np.arange(12, dtype=dtype).reshape(1, 1, 3, 4)
    w = np.zeros((1, 1, 2, 2), dtype=dtype)
    w[0, 0, 1, 1] = 1
    out = convcore.conv2d(x, w, padding="same")
    expected = np.zeros((3, 4), dtype=dtype)
    expected[:2, :3] = x[0, 0, 1:, 1:]
    np.testing.assert_array_equal(out[0, 0], expected)
    # top-left tap: out[i, j] = x[i, j] (no padding on the top/left)
    w = np.zeros((1, 1, 2, 2), dtype=dtype)
    w[0, 0, 0, 0] = 1
    np.testing.assert_array_equal(convcore.conv2d(x, w, padding="same"), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_valid_padding_equals_zero(dtype):
    rng = np.random.default_rng(4)
    x = randn(rng, (2, 3, 6, 5), dtype)
    w = randn(rng, (2, 3, 3, 2), dtype)
    a = convcore.conv2d(x, w, padding="valid", stride=(2, 1))
    b = convcore.conv2d(x, w, padding=0, stride=(2, 1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 2, 2, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_groups_equal_to_separate_convs(dtype):
    rng = np.random.default_rng(6)
    g = 3
    x = randn(rng, (2, 2 * g, 5, 5), dtype)
    w = randn(rng, (4 * g, 2, 2, 3), dtype)
    out = convcore.conv2d(x, w, groups=g, padding=(1, 0))
    for i in range(g):
        part = convcore.conv2d(np.ascontiguousarray(x[:, 2 * i:2 * i + 2]),
                               np.ascontiguousarray(w[4 * i:4 * i + 4]),
                               padding=(1, 0))
        check_output(np.ascontiguousarray(out[:, 4 * i:4 * i + 4]),
                     part.astype(np.float64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_one_and_unbatched(dtype):
    rng = np.random.default_rng(7)
    x = randn(rng, (3, 6, 5), dtype)
    w = randn(rng, (2, 3, 3, 3), dtype)
    b = randn(rng, (2,), dtype)
    kw = dict(stride=2, padding=1)
    out3 = convcore.conv2d(x, w, b, **kw)
    out4 = convcore.conv2d(x[None], w, b, **kw)
    assert out3.shape == (2, 3, 3)
    assert out4.shape == (1, 2, 3, 3)
    check_output(out3, ref.conv2d_ref(x, w, b, **kw), dtype)
    np.testing.assert_array_equal(out3, out4[0])
    gy = randn(rng, out3.shape, dtype)
    gx3, gw3, gb3 = convcore.conv2d_backward(gy, x, w, **kw)
    gx4, gw4, gb4 = convcore.conv2d_backward(gy[None], x[None], w, **kw)
    assert gx3.shape == x.shape
    np.testing.assert_array_equal(gx3, gx4[0])
    np.testing.assert_array_equal(gw3, gw4)
    np.testing.assert_array_equal(gb3, gb4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_none_vs_zero_bias(dtype):
    rng = np.random.default_rng(8)
    x = randn(rng, (2, 3, 5, 5), dtype)
    w = randn(rng, (4, 3, 3, 3), dtype)
    a = convcore.conv2d(x, w, None)
    b = convcore.conv2d(x, w, np.zeros(4, dtype))
    np.testing.assert_array_equal(a, b)
    c = convcore.conv2d(x, w, np.full(4, 2.5, dtype))
    check_output(c, a.astype(np.float64) + 2.5, dtype)


def test_output_dtype_follows_input():
    rng = np.random.default_rng(9)
    for dtype in DTYPES:
        x = randn(rng, (1, 2, 4, 4), dtype)
        w = randn(rng, (3, 2, 2, 2), dtype)
        assert convcore.conv2d(x, w).dtype == dtype
        assert all(g.dtype == dtype for g in convcore.conv2d_backward(
            randn(rng, (1, 3, 3, 3), dtype), x, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["F", "step", "neg", "perm"])
def test_noncontiguous_everything(dtype, layout):
    """Non-contiguous input, weight, bias and grad_output at once."""
    rng = np.random.default_rng(10)
    x = randn(rng, (2, 4, 7, 6), dtype)
    w = randn(rng, (6, 2, 3, 2), dtype)
    b = randn(rng, (6,), dtype)
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    expected = ref.conv2d_ref(x, w, b, **kw)
    out = convcore.conv2d(with_layout(x, layout), with_layout(w, layout),
                          with_layout(b, "step" if layout == "step" else "neg"),
                          **kw)
    check_output(out, expected, dtype)
    gy = randn(rng, expected.shape, dtype)
    got = convcore.conv2d_backward(with_layout(gy, layout),
                                   with_layout(x, layout),
                                   with_layout(w, layout), **kw)
    exp = ref.conv2d_backward_ref(gy, x, w, **kw)
    for g, e in zip(got, exp):
        check_output(g, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sliced_views_from_brief(dtype):
    """x[:, :, ::2, ::-1] and an NHWC->NCHW transposed view."""
    rng = np.random.default_rng(11)
    big = randn(rng, (2, 3, 10, 5), dtype)
    x = big[:, :, ::2, ::-1]
    w = randn(rng, (2, 3, 2, 2), dtype)
    check_output(convcore.conv2d(x, w, padding=1),
                 ref.conv2d_ref(np.ascontiguousarray(x), w, padding=1), dtype)
    nhwc = randn(rng, (2, 5, 4, 3), dtype)
    xt = nhwc.transpose(0, 3, 1, 2)
    check_output(convcore.conv2d(xt, w), ref.conv2d_ref(
        np.ascontiguousarray(xt), w), dtype)
    # a weight that is itself a transposed view (out and in swapped)
    wt = randn(rng, (3, 2, 2, 2), dtype).transpose(1, 0, 2, 3)
    check_output(convcore.conv2d(x, wt), ref.conv2d_ref(
        np.ascontiguousarray(x), np.ascontiguousarray(wt)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_strided_broadcast_input(dtype):
    """A broadcast view (stride 0) is a legal ndarray, too."""
    rng = np.random.default_rng(12)
    plane = randn(rng, (1, 1, 5, 6), dtype)
    x = np.broadcast_to(plane, (2, 3, 5, 6))
    w = randn(rng, (2, 3, 3, 3), dtype)
    check_output(convcore.conv2d(x, w, padding=1),
                 ref.conv2d_ref(np.ascontiguousarray(x), w, padding=1), dtype)


def _pair_case():
    rng = np.random.default_rng(13)
    x = randn(rng, (1, 2, 7, 8), np.float64)
    w = randn(rng, (2, 2, 3, 2), np.float64)
    expected = ref.conv2d_ref(x, w, stride=(2, 3), padding=(1, 0),
                              dilation=(1, 2))
    return x, w, expected


def test_numpy_integer_scalars_accepted():
    x, w, expected = _pair_case()
    out = convcore.conv2d(x, w, stride=(np.int64(2), np.int32(3)),
                          padding=(1, 0), dilation=(1, np.int64(2)),
                          groups=np.int64(1))
    check_output(out, expected, np.float64)


def test_pairs_given_as_lists():
    x, w, expected = _pair_case()
    out = convcore.conv2d(x, w, stride=[2, 3], padding=[1, 0],
                          dilation=[1, 2])
    check_output(out, expected, np.float64)


def test_large_values_and_cancellation_float64():
    """float64 accumulation: exact results on integer-valued data."""
    rng = np.random.default_rng(14)
    x = rng.integers(-1000, 1000, (2, 5, 9, 9)).astype(np.float64)
    w = rng.integers(-1000, 1000, (3, 5, 4, 4)).astype(np.float64)
    out = convcore.conv2d(x, w, padding=(2, 1), stride=(1, 2))
    np.testing.assert_array_equal(out, ref.conv2d_ref(x, w, padding=(2, 1),
                                                      stride=(1, 2)))


@given(seed=seeds, dtype=dtypes, n=st.integers(1, 3),
       k=st.integers(1, 3), s=st.integers(1, 3))
def test_stride_larger_than_kernel(seed, dtype, n, k, s):
    """Strides larger than the kernel skip input rows/columns entirely."""
    rng = np.random.default_rng(seed)
    x = randn(rng, (n, 2, 9, 8), dtype)
    w = randn(rng, (3, 2, k, k), dtype)
    stride = (s + k, s)
    _run_and_compare(x, w, stride=stride)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_medium_size_against_reference(dtype):
    rng = np.random.default_rng(15)
    x = randn(rng, (4, 16, 20, 18), dtype)
    w = randn(rng, (24, 8, 3, 5), dtype)
    b = randn(rng, (24,), dtype)
    _run_and_compare(x, w, b, stride=(1, 2), padding=(1, 2), dilation=(2, 1),
                     groups=2)


@pytest.mark.slow
@settings(max_examples=500)
@given(case=conv_cases(max_extra=10), dtype=dtypes, seed=seeds, xl=layouts,
       gl=layouts)
def test_conv2d_extended_sweep(case, dtype, seed, xl, gl):
    """Bigger inputs, more examples: forward and backward."""
    rng = np.random.default_rng(seed)
    x, w, b = conv_arrays(case, rng, dtype)
    kw = conv_kwargs(case)
    expected = ref.conv2d_ref(x, w, b, **kw)
    check_output(convcore.conv2d(with_layout(x, xl), w, b, **kw), expected,
                 dtype, "conv2d")
    gy = randn(rng, expected.shape, dtype)
    got = convcore.conv2d_backward(with_layout(gy, gl), with_layout(x, xl), w,
                                   **kw)
    for g, e, name in zip(got, ref.conv2d_backward_ref(gy, x, w, **kw),
                          ("grad_input", "grad_weight", "grad_bias")):
        check_output(g, e, dtype, name)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("special", [np.nan, np.inf])
def test_nonfinite_values_propagate_to_receptive_field_only(dtype, special):
    """A NaN/inf input affects exactly the outputs whose window covers it
    (zero padding must never inject NaN, and nothing may be skipped)."""
    rng = np.random.default_rng(16)
    x = randn(rng, (2, 3, 7, 6), dtype)
    x[1, 2, 3, 4] = special
    x[0, 0, 0, 0] = special
    w = rng.uniform(0.5, 1.5, (4, 3, 3, 2)).astype(dtype)   # no zero weights
    kw = dict(stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    out = convcore.conv2d(x, w, **kw)
    exp = ref.conv2d_ref(x, w, **kw)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(exp))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(exp))
    assert np.isfinite(exp).sum() > 0 and (~np.isfinite(exp)).sum() > 0
    fin = np.isfinite(exp)
    check_output(np.ascontiguousarray(np.where(fin, out, 0)),
                 np.where(fin, exp, 0), dtype)
    gy = randn(rng, out.shape, dtype)
    gy[0, 1, 2, 2] = special
    got = convcore.conv2d_backward(gy, x, w, **kw)
    for g, e in zip(got, ref.conv2d_backward_ref(gy, x, w, **kw)):
        np.testing.assert_array_equal(np.isfinite(g), np.isfinite(e))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_arrays(dtype):
    """numpy arrays need not be aligned to their itemsize."""
    rng = np.random.default_rng(17)

    def unaligned(a):
        buf = np.zeros(a.nbytes + 1, np.uint8)
        u = np.ndarray(a.shape, a.dtype, buffer=buf, offset=1)
        u[...] = a
        assert not u.flags.aligned
        return u

    x = randn(rng, (2, 3, 6, 5), dtype)
    w = randn(rng, (4, 3, 3, 3), dtype)
    b = randn(rng, (4,), dtype)
    check_output(convcore.conv2d(unaligned(x), unaligned(w), unaligned(b),
                                 padding=1),
                 ref.conv2d_ref(x, w, b, padding=1), dtype)
    gy = randn(rng, (2, 4, 6, 5), dtype)
    got = convcore.conv2d_backward(unaligned(gy), unaligned(x), unaligned(w),
                                   padding=1)
    for g, e in zip(got, ref.conv2d_backward_ref(gy, x, w, padding=1)):
        check_output(g, e, dtype)
    check_output(convcore.max_pool2d(unaligned(x), 2),
                 ref.max_pool2d_ref(x, 2), dtype, rtol=0)
    check_output(convcore.relu(unaligned(x)), ref.relu_ref(x), dtype, rtol=0)
    lx, lw = x.reshape(6, -1)[:, :27], w.reshape(4, -1)
    check_output(convcore.linear(unaligned(lx), unaligned(lw)),
                 ref.linear_ref(lx, lw), dtype)


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", ">f8"])
def test_byte_order_correct_or_rejected(dtype):
    """A non-native byte order must never be read as native: either the
    result is right or a TypeError says so."""
    rng = np.random.default_rng(18)
    x = rng.standard_normal((1, 2, 5, 5)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    try:
        out = convcore.conv2d(x, w, padding=1)
    except TypeError as e:
        assert "input" in str(e) or "weight" in str(e)
        assert not np.dtype(dtype).isnative
        return
    exp = ref.conv2d_ref(x.astype(np.float64), w.astype(np.float64), padding=1)
    check_output(out, exp, np.dtype(dtype).newbyteorder("="))


def test_one_element_tuples_as_pytorch():
    """PyTorch's conv2d takes stride=(2,), padding=(1,), dilation=(2,) for
    both dimensions (its pooling does too: test_pooling.py)."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: parity skipped")
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((4, 3, 3, 3))
    out = convcore.conv2d(x, w, stride=(2,), padding=(1,), dilation=(2,))
    np.testing.assert_array_equal(out, convcore.conv2d(x, w, stride=2, padding=1, dilation=2))
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                          stride=(2,), padding=(1,), dilation=(2,))
    check_output(out, expected.numpy(), np.float64)


# ---------------------------------------------------------------------------
# plans: cached per shape, shared by threads, bounded
# ---------------------------------------------------------------------------

def test_plans_shared_by_concurrent_calls():
    """Python threads (the GIL released) planning and reusing the same and
    different shapes, while another empties the plan cache, get the results
    of a lone call, bit for bit."""
    import threading
    from convcore import _core
    rng = np.random.default_rng(0)
    cases = [((2, 8, 12, 12), (8, 8, 3, 3), dict(padding=1)),
             ((1, 6, 11, 9), (4, 6, 1, 1), dict()),
             ((2, 4, 13, 13), (4, 1, 3, 3), dict(padding=1, groups=4)),
             ((1, 3, 17, 15), (5, 3, 5, 5), dict(stride=2, padding=2))]
    arrays = [(randn(rng, xs, np.float32), randn(rng, ws, np.float32), kw)
              for xs, ws, kw in cases]
    expect = [convcore.conv2d(x, w, **kw) for x, w, kw in arrays]
    errors = []

    def work(offset):
        try:
            for i in range(24):
                k = (i + offset) % len(arrays)
                x, w, kw = arrays[k]
                if convcore.conv2d(x, w, **kw).tobytes() != expect[k].tobytes():
                    errors.append(k)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    def clear():
        for _ in range(24):
            _core.clear_conv_plan_cache()

    threads = [threading.Thread(target=work, args=(j,)) for j in range(3)]
    threads.append(threading.Thread(target=clear))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_plan_cache_stays_bounded():
    """The cache is emptied when it reaches its bound (4096 plans in
    conv_plan.cpp), so a program making new shapes forever keeps it small."""
    from convcore import _core
    _core.clear_conv_plan_cache()
    w = np.ones((1, 1, 1, 1), np.float32)
    for width in range(2, 4201):  # (a 1x1 image runs as a linear layer, unplanned)
        convcore.conv2d(np.ones((1, 1, 1, width), np.float32), w)
        assert _core.conv_plan_cache_size() <= 4096
    assert _core.conv_plan_cache_size() == 4199 - 4096  # emptied once, at shape 4097


@pytest.mark.parametrize("algorithm", ["auto", "gemm", "direct", "winograd", "winograd4"])
def test_no_input_channels_gives_the_bias(algorithm):
    """in_channels=0: every output is its bias; grad_bias sums grad_output
    (once a division by zero in the direct kernel's chunking)."""
    x = np.ones((2, 0, 8, 8), np.float32)
    w = np.ones((4, 0, 3, 3), np.float32)
    b = np.arange(4, dtype=np.float32)
    y = convcore.conv2d(x, w, b, algorithm=algorithm)
    assert y.shape == (2, 4, 6, 6)
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None, None], y.shape))
    gx, gw, gb = convcore.conv2d_backward(np.ones(y.shape, np.float32), x, w,
                                          algorithm=algorithm)
    assert gx.shape == x.shape and gw.shape == w.shape
    np.testing.assert_array_equal(gb, np.full(4, 2 * 6 * 6, np.float32))


@pytest.mark.parametrize("algorithm", ["auto", "gemm", "direct"])
@pytest.mark.parametrize("stride", [1, 2])
def test_no_output_channels_gives_zero_grad_input(algorithm, stride):
    """out_channels=0: grad_input is zero (once a division by zero in the
    direct grad_input paths)."""
    x = np.ones((1, 16, 8, 8), np.float32)
    w = np.ones((0, 16, 3, 3), np.float32)
    y = convcore.conv2d(x, w, stride=stride, padding=1, algorithm=algorithm)
    gx, gw, gb = convcore.conv2d_backward(np.ones(y.shape, np.float32), x, w, stride=stride,
                                          padding=1, algorithm=algorithm)
    np.testing.assert_array_equal(gx, np.zeros_like(x))
    assert gw.shape == w.shape and gb.shape == (0,)
