"""Local response norm and batch norm (functional API): forward against the
numpy references in reference.py, backward against central finite
differences (float64), both against torch.nn.functional when PyTorch is
installed, and argument errors."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import convcore
import reference as ref
from _helpers import numerical_grad
from _helpers import (DTYPES, LAYOUTS, PARITY_ERRORS, assert_close, check_output, randn,
                      rel_err, rtol_for, seeds, with_layout)

FD_RTOL = 1e-6      # scaled: |num - ana| <= FD_RTOL * max(1, max|ana|)


pytestmark = pytest.mark.usefixtures("one_core_thread")


def _torch():
    return pytest.importorskip(
        "torch", reason="PyTorch not installed: parity with torch.nn.functional skipped")


def _record(name, dtype, got, expected, rtol=None):
    err = rel_err(got, expected)
    key = f"{name}[{np.dtype(dtype).name}]"
    PARITY_ERRORS[key] = max(PARITY_ERRORS.get(key, 0.0), err)
    tol = rtol_for(dtype) if rtol is None else rtol
    assert err <= tol, f"{key}: scaled error {err:.3e} > {tol:.1e}"


# ===========================================================================
# local response norm: forward (against the reference on every backend,
# forward and backward: test_ops.py)
# ===========================================================================


@pytest.mark.parametrize("dtype", DTYPES)
def test_lrn_defaults_match_pytorch_defaults(dtype):
    # torch.nn.functional.local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0)
    rng = np.random.default_rng(1)
    x = randn(rng, (2, 6, 3, 3), dtype) * 30
    check_output(convcore.local_response_norm(x, 5),
                 ref.local_response_norm_ref(x, 5, alpha=1e-4, beta=0.75, k=1.0), dtype)


def test_lrn_needs_three_dimensions():
    """As PyTorch: local_response_norm wants (N, C, ...) with at least one
    more dimension; a 2-D input is refused."""
    with pytest.raises(ValueError, match="input"):
        convcore.local_response_norm(np.ones((3, 5)), 3)


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 6, 2, 3, 2)])
def test_lrn_any_trailing_dims(shape):
    """(N, C, L) and (N, C, D, H, W) inputs normalise across dim 1."""
    rng = np.random.default_rng(2)
    x = randn(rng, shape, np.float64)
    kw = dict(size=3, alpha=0.3, beta=0.6, k=1.5)
    check_output(convcore.local_response_norm(x, **kw), ref.local_response_norm_ref(x, **kw),
                 np.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lrn_non_contiguous_input(layout, dtype):
    rng = np.random.default_rng(3)
    x = randn(rng, (2, 5, 4, 6), dtype)
    kw = dict(size=3, alpha=0.2, beta=0.75, k=1.0)
    expected = ref.local_response_norm_ref(x, **kw)
    check_output(convcore.local_response_norm(with_layout(x, layout), **kw), expected, dtype)


@given(seed=seeds, dtype=st.sampled_from(DTYPES), n=st.integers(1, 3), c=st.integers(1, 9),
       h=st.integers(1, 5), w=st.integers(1, 5), size=st.integers(1, 11),
       alpha=st.floats(1e-4, 2.0), beta=st.floats(0.0, 2.0), k=st.floats(0.5, 3.0),
       layout=st.sampled_from(LAYOUTS))
def test_lrn_property(seed, dtype, n, c, h, w, size, alpha, beta, k, layout):
    rng = np.random.default_rng(seed)
    x = randn(rng, (n, c, h, w), dtype)
    kw = dict(size=size, alpha=alpha, beta=beta, k=k)
    out = convcore.local_response_norm(with_layout(x, layout), **kw)
    check_output(out, ref.local_response_norm_ref(x, **kw), dtype)


def test_lrn_empty_batch():
    x = np.zeros((0, 4, 3, 3), np.float32)
    out = convcore.local_response_norm(x, 3)
    assert out.shape == x.shape and out.dtype == x.dtype
    gx = convcore.local_response_norm_backward(x, x, 3)
    assert gx.shape == x.shape


# ===========================================================================
# local response norm: backward
# ===========================================================================

@pytest.mark.parametrize("shape,size,alpha,beta,k", [
    ((2, 5, 3, 2), 5, 0.5, 0.75, 2.0),       # AlexNet's size/beta/k, a big alpha
    ((1, 6, 2, 3), 4, 0.3, 0.75, 1.0),       # even size: asymmetric window
    ((2, 3, 2, 2), 2, 1.0, 1.5, 0.5),
    ((1, 4, 2, 2), 1, 0.7, 0.6, 1.0),        # size 1: each channel alone
    ((2, 3, 1, 2), 7, 0.9, 0.75, 2.0),       # window wider than the channels
    ((2, 4, 3), 3, 0.5, 0.75, 1.0),          # 3-D input
])
def test_lrn_backward_finite_differences(shape, size, alpha, beta, k):
    rng = np.random.default_rng(hash(shape) % 2**32)
    x = rng.standard_normal(shape) * 2
    kw = dict(size=size, alpha=alpha, beta=beta, k=k)
    R = rng.standard_normal(shape)

    def loss():
        return float((convcore.local_response_norm(x, **kw) * R).sum())

    gx = convcore.local_response_norm_backward(R, x, **kw)
    assert gx.dtype == np.float64 and gx.flags.c_contiguous
    assert_close(gx, numerical_grad(loss, x), rtol=FD_RTOL, what="lrn grad_input")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lrn_backward_non_contiguous(layout):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 3, 4))
    gy = rng.standard_normal(x.shape)
    kw = dict(size=3, alpha=0.4, beta=0.75, k=2.0)
    expected = convcore.local_response_norm_backward(gy, x, **kw)
    got = convcore.local_response_norm_backward(with_layout(gy, layout), with_layout(x, layout),
                                                **kw)
    check_output(got, expected, np.float64, rtol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lrn_backward_float32_matches_float64(dtype):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 8, 5, 5))
    gy = rng.standard_normal(x.shape)
    kw = dict(size=5, alpha=1e-2, beta=0.75, k=2.0)
    expected = convcore.local_response_norm_backward(gy, x, **kw)
    got = convcore.local_response_norm_backward(gy.astype(dtype), x.astype(dtype), **kw)
    check_output(got, expected.astype(dtype), dtype)


# ===========================================================================
# local response norm vs torch
# ===========================================================================

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,size", [((2, 5, 4, 3), 5), ((2, 6, 3, 3), 4), ((3, 3, 2, 5), 1),
                                        ((1, 4, 3, 3), 9), ((2, 7, 5), 3),
                                        ((1, 96, 27, 27), 5)])
def test_lrn_torch_parity(shape, size, dtype):
    torch = _torch()
    import torch.nn.functional as F
    rng = np.random.default_rng(hash((shape, size)) % 2**32)
    x = randn(rng, shape, dtype) * 4
    kw = dict(size=size, alpha=0.1, beta=0.75, k=2.0)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = F.local_response_norm(xt, **kw)
    y = convcore.local_response_norm(x, **kw)
    _record("local_response_norm", dtype, y, yt.detach().numpy())
    gy = randn(rng, shape, dtype)
    yt.backward(torch.from_numpy(gy))
    gx = convcore.local_response_norm_backward(gy, x, **kw)
    _record("local_response_norm_backward", dtype, gx, xt.grad.numpy())


# ===========================================================================
# batch norm: forward (training and eval against the reference on every
# backend, with the running statistics and the gradients: test_ops.py)
# ===========================================================================


def _bn_params(rng, c, dtype):
    return (randn(rng, (c,), dtype) * 0.5, np.abs(randn(rng, (c,), dtype)) + 0.5,
            randn(rng, (c,), dtype), randn(rng, (c,), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_training_without_running_stats(dtype):
    rng = np.random.default_rng(7)
    x = randn(rng, (4, 3, 2, 2), dtype)
    out = convcore.batch_norm(x, None, None, training=True)
    assert isinstance(out, np.ndarray)
    check_output(out, ref.batch_norm_ref(x, training=True)[0], dtype)
    # normalised per channel: mean 0, variance 1 - eps / (var + eps)
    per_channel = out.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(per_channel.mean(axis=1), 0, atol=1e-5)


def test_batch_norm_running_stats_over_steps():
    """Three training steps move the running statistics as PyTorch's
    exponential average with momentum (and only the running stats)."""
    rng = np.random.default_rng(8)
    rm, rv = np.zeros(3), np.ones(3)
    erm, erv = rm.copy(), rv.copy()
    for step in range(3):
        x = rng.standard_normal((6, 3, 2, 2)) * (step + 1) + step
        convcore.batch_norm(x, rm, rv, training=True, momentum=0.1)
        _, _, _, erm, erv = ref.batch_norm_ref(x, erm, erv, training=True, momentum=0.1)
    assert_close(rm, erm, rtol=1e-12, what="running_mean")
    assert_close(rv, erv, rtol=1e-12, what="running_var")


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.5])
def test_batch_norm_momentum_extremes(momentum):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 2, 3, 3))
    rm, rv = np.full(2, 0.25), np.full(2, 2.0)
    _, _, _, erm, erv = ref.batch_norm_ref(x, rm, rv, training=True, momentum=momentum)
    convcore.batch_norm(x, rm, rv, training=True, momentum=momentum)
    assert_close(rm, erm, rtol=1e-12, what="running_mean")
    assert_close(rv, erv, rtol=1e-12, what="running_var")


def test_batch_norm_inf_running_stats_give_nan_without_a_warning():
    """momentum 1 replaces the running statistics; an inf one gives NaN
    (inf * 0), as PyTorch's does (checked: the same values), and numpy must
    not warn (the API fuzz met it)."""
    x = np.random.default_rng(11).standard_normal((4, 3, 2, 2))
    rm, rv = np.array([np.inf, 1.0, -np.inf]), np.array([1.0, np.inf, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convcore.batch_norm(x, rm, rv, training=True, momentum=1.0)
    _, _, _, erm, erv = ref.batch_norm_ref(x, np.zeros(3), np.ones(3), training=True,
                                           momentum=1.0)
    assert np.isnan(rm[[0, 2]]).all() and np.isnan(rv[1])
    assert_close(rm[1], erm[1], rtol=1e-12, what="running_mean")
    assert_close(rv[[0, 2]], erv[[0, 2]], rtol=1e-12, what="running_var")


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_large_offset_is_stable(dtype):
    """Mean 1e4, spread 1: a one-pass E[x^2] - E[x]^2 would lose the variance
    in float32."""
    rng = np.random.default_rng(10)
    x = (1e4 + rng.standard_normal((8, 2, 4, 4))).astype(dtype)
    out, mean, var = convcore.batch_norm(x, None, None, training=True, return_stats=True)
    exp, emean, evar, _, _ = ref.batch_norm_ref(x, training=True)
    assert_close(var, evar.astype(dtype), dtype, rtol=1e-4 if dtype == np.float32 else 1e-10,
                 what="var")
    assert_close(out, exp, dtype, rtol=1e-3 if dtype == np.float32 else 1e-9, what="out")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_non_contiguous(layout, training):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 3, 5))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    rm_buf = np.zeros(8)
    rm_buf[::2] = rng.standard_normal(4) * 0.1
    rv = np.abs(rng.standard_normal(4)) + 0.5
    rm = rm_buf[::2] if not training else rm_buf[::2].copy()   # strided stats when reading
    exp = ref.batch_norm_ref(x, rm, rv, w, b, training=training)[0]
    out = convcore.batch_norm(with_layout(x, layout), rm, rv, with_layout(w, layout),
                              with_layout(b, layout), training=training)
    check_output(out, exp, np.float64)


@given(seed=seeds, dtype=st.sampled_from(DTYPES), n=st.integers(1, 4), c=st.integers(1, 5),
       h=st.integers(1, 4), w=st.integers(1, 4), training=st.booleans(), affine=st.booleans(),
       layout=st.sampled_from(LAYOUTS))
def test_batch_norm_property(seed, dtype, n, c, h, w, training, affine, layout):
    if training and n * h * w < 2:
        n = 2      # PyTorch needs more than one value per channel when training
    rng = np.random.default_rng(seed)
    x = randn(rng, (n, c, h, w), dtype)
    rm, rv, wt, bs = _bn_params(rng, c, dtype)
    if not affine:
        wt = bs = None
    exp, _, _, erm, erv = ref.batch_norm_ref(x, rm, rv, wt, bs, training=training)
    out = convcore.batch_norm(with_layout(x, layout), rm, rv, wt, bs, training=training)
    check_output(out, exp, dtype)
    assert_close(rm, erm.astype(dtype), dtype, what="running_mean")
    assert_close(rv, erv.astype(dtype), dtype, what="running_var")


# ===========================================================================
# batch norm: backward
# ===========================================================================

@pytest.mark.parametrize("shape", [(3, 2, 2, 3), (4, 3), (2, 2, 3), (1, 2, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_backward_finite_differences(shape, training, affine):
    rng = np.random.default_rng(hash((shape, training, affine)) % 2**32)
    c = shape[1]
    x = rng.standard_normal(shape) * 1.5 + 0.5
    w = rng.standard_normal(c) if affine else None
    b = rng.standard_normal(c) if affine else None
    rm = rng.standard_normal(c) * 0.3
    rv = np.abs(rng.standard_normal(c)) + 0.5
    eps = 1e-3
    R = rng.standard_normal(shape)

    def forward():
        # fresh copies: training updates the running stats in place
        return convcore.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, eps=eps,
                                   return_stats=True)

    def loss():
        return float((forward()[0] * R).sum())

    _, mean, var = forward()
    gx, gw, gb = convcore.batch_norm_backward(R, x, mean, var, w, training=training, eps=eps)
    assert gx.shape == shape and gw.shape == (c,) and gb.shape == (c,)
    assert_close(gx, numerical_grad(loss, x), rtol=FD_RTOL, what="grad_input")
    if affine:
        assert_close(gw, numerical_grad(loss, w), rtol=FD_RTOL, what="grad_weight")
        assert_close(gb, numerical_grad(loss, b), rtol=FD_RTOL, what="grad_bias")
    else:
        # the gradients an affine layer with weight 1, bias 0 would get
        ones = np.ones(c)
        _, gw1, gb1 = convcore.batch_norm_backward(R, x, mean, var, ones, training=training,
                                                   eps=eps)
        assert_close(gw, gw1, rtol=1e-14, what="grad_weight (no affine)")
        assert_close(gb, gb1, rtol=1e-14, what="grad_bias (no affine)")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_norm_backward_non_contiguous(layout):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 4, 2, 5))
    gy = rng.standard_normal(x.shape)
    w = rng.standard_normal(4)
    _, mean, var = convcore.batch_norm(x, None, None, w, None, training=True, return_stats=True)
    expected = convcore.batch_norm_backward(gy, x, mean, var, w, training=True)
    got = convcore.batch_norm_backward(with_layout(gy, layout), with_layout(x, layout),
                                       with_layout(mean, layout), with_layout(var, layout),
                                       with_layout(w, layout), training=True)
    for g, e, what in zip(got, expected, ("grad_input", "grad_weight", "grad_bias")):
        check_output(g, e, np.float64, what=what, rtol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_backward_dtypes(dtype):
    rng = np.random.default_rng(13)
    x64 = rng.standard_normal((4, 3, 3, 3))
    gy64 = rng.standard_normal(x64.shape)
    w64 = rng.standard_normal(3)
    _, m64, v64 = convcore.batch_norm(x64, None, None, w64, None, training=True,
                                      return_stats=True)
    expected = convcore.batch_norm_backward(gy64, x64, m64, v64, w64)
    x, gy, w = x64.astype(dtype), gy64.astype(dtype), w64.astype(dtype)
    _, m, v = convcore.batch_norm(x, None, None, w, None, training=True, return_stats=True)
    got = convcore.batch_norm_backward(gy, x, m, v, w)
    for g, e, what in zip(got, expected, ("grad_input", "grad_weight", "grad_bias")):
        check_output(g, e.astype(dtype), dtype, what=what)


# ===========================================================================
# batch norm vs torch
# ===========================================================================

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 8, 3, 2), (16, 5), (3, 4, 7)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_torch_parity(shape, dtype, training):
    torch = _torch()
    import torch.nn.functional as F
    rng = np.random.default_rng(hash((shape, training)) % 2**32)
    c = shape[1]
    x = randn(rng, shape, dtype) * 2 + 0.5
    rm, rv, w, b = _bn_params(rng, c, dtype)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True)
    bt = torch.from_numpy(b.copy()).requires_grad_(True)
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, training=training, momentum=0.1, eps=1e-5)
    y, mean, var = convcore.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1,
                                       eps=1e-5, return_stats=True)
    mode = "train" if training else "eval"
    _record(f"batch_norm({mode})", dtype, y, yt.detach().numpy())
    _record(f"batch_norm({mode}).running_mean", dtype, rm, rmt.numpy())
    _record(f"batch_norm({mode}).running_var", dtype, rv, rvt.numpy())
    gy = randn(rng, shape, dtype)
    yt.backward(torch.from_numpy(gy))
    gx, gw, gb = convcore.batch_norm_backward(gy, x, mean, var, w, training=training, eps=1e-5)
    _record(f"batch_norm_backward({mode}).grad_input", dtype, gx, xt.grad.numpy())
    _record(f"batch_norm_backward({mode}).grad_weight", dtype, gw, wt.grad.numpy())
    _record(f"batch_norm_backward({mode}).grad_bias", dtype, gb, bt.grad.numpy())


# ===========================================================================
# errors
# ===========================================================================

def _x(shape=(2, 4, 3, 3), dtype=np.float64):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


LRN_ERRORS = [
    # (call, exception, words the message must contain)
    (lambda: convcore.local_response_norm(_x(), 0), ValueError, ["size"]),
    (lambda: convcore.local_response_norm(_x(), -2), ValueError, ["size"]),
    (lambda: convcore.local_response_norm(_x(), 2.0), TypeError, ["size"]),
    (lambda: convcore.local_response_norm(_x(), True), TypeError, ["size"]),
    (lambda: convcore.local_response_norm(_x(), None), TypeError, ["size"]),
    (lambda: convcore.local_response_norm(_x(), 3, alpha="a"), TypeError, ["alpha"]),
    (lambda: convcore.local_response_norm(_x(), 3, beta=None), TypeError, ["beta"]),
    (lambda: convcore.local_response_norm(_x(), 3, k=[1.0]), TypeError, ["k"]),
    (lambda: convcore.local_response_norm(_x(), 3, alpha=float("nan")), ValueError, ["alpha"]),
    (lambda: convcore.local_response_norm(_x(), 3, beta=float("inf")), ValueError, ["beta"]),
    (lambda: convcore.local_response_norm(_x().astype(np.int32), 3), TypeError, ["input"]),
    (lambda: convcore.local_response_norm(_x().tolist(), 3), TypeError, ["input"]),
    (lambda: convcore.local_response_norm(None, 3), TypeError, ["input"]),
    (lambda: convcore.local_response_norm(_x((5,)), 3), ValueError, ["input"]),
    (lambda: convcore.local_response_norm_backward(_x(dtype=np.float32), _x(), 3), TypeError,
     ["grad_output", "dtype"]),
    (lambda: convcore.local_response_norm_backward(_x((1, 4, 3, 3)), _x(), 3), ValueError,
     ["grad_output", "shape"]),
    (lambda: convcore.local_response_norm_backward(_x(), _x(), 0), ValueError, ["size"]),
    (lambda: convcore.local_response_norm_backward(None, _x(), 3), TypeError, ["grad_output"]),
]

BN_ERRORS = [
    (lambda: convcore.batch_norm(_x(), None, None, np.ones(3), training=True), ValueError,
     ["weight", "shape"]),
    (lambda: convcore.batch_norm(_x(), None, None, None, np.ones(5), training=True), ValueError,
     ["bias", "shape"]),
    (lambda: convcore.batch_norm(_x(), None, None, np.ones(4, np.float32), training=True),
     TypeError, ["weight", "dtype"]),
    (lambda: convcore.batch_norm(_x(), None, None, [1.0] * 4, training=True), TypeError,
     ["weight"]),
    (lambda: convcore.batch_norm(_x(), np.zeros(3), np.ones(4), training=True), ValueError,
     ["running_mean"]),
    (lambda: convcore.batch_norm(_x(), np.zeros(4), np.ones(4, np.float32), training=True),
     ValueError, ["running_var"]),
    (lambda: convcore.batch_norm(_x(), np.broadcast_to(np.zeros(1), (4,)), np.ones(4),
                                 training=True), ValueError, ["running_mean", "writeable"]),
    (lambda: convcore.batch_norm(_x(), np.zeros(3), np.ones(4), training=False), ValueError,
     ["running_mean", "shape"]),
    (lambda: convcore.batch_norm(_x(), np.zeros(4), np.ones(4, np.float32), training=False),
     TypeError, ["running_var", "dtype"]),
    (lambda: convcore.batch_norm(_x(), None, None, training=False), ValueError,
     ["running_mean"]),
    (lambda: convcore.batch_norm(_x(), None, None, training=True, eps=-1.0), ValueError,
     ["eps"]),
    (lambda: convcore.batch_norm(_x(), None, None, training=True, eps="a"), TypeError, ["eps"]),
    (lambda: convcore.batch_norm(_x(), None, None, training=True, momentum=None), TypeError,
     ["momentum"]),
    (lambda: convcore.batch_norm(_x().astype(np.int64), None, None, training=True), TypeError,
     ["input"]),
    (lambda: convcore.batch_norm(_x((5,)), None, None, training=True), ValueError, ["input"]),
    (lambda: convcore.batch_norm_backward(_x(), _x(), np.zeros(3), np.ones(4)), ValueError,
     ["mean", "shape"]),
    (lambda: convcore.batch_norm_backward(_x(), _x(), np.zeros(4), np.ones(4, np.float32)),
     TypeError, ["var", "dtype"]),
    (lambda: convcore.batch_norm_backward(_x((1, 4, 3, 3)), _x(), np.zeros(4), np.ones(4)),
     ValueError, ["grad_output", "shape"]),
    (lambda: convcore.batch_norm_backward(_x(), _x(), np.zeros(4), np.ones(4), np.ones(5)),
     ValueError, ["weight", "shape"]),
    (lambda: convcore.batch_norm_backward(_x(), _x(), None, np.ones(4)), TypeError, ["mean"]),
    (lambda: convcore.batch_norm_backward(_x(), _x(), np.zeros(4), np.ones(4), eps=-1e-5),
     ValueError, ["eps"]),
]


@pytest.mark.parametrize("call,exc,words", LRN_ERRORS + BN_ERRORS,
                         ids=[f"lrn{i}" for i in range(len(LRN_ERRORS))]
                         + [f"bn{i}" for i in range(len(BN_ERRORS))])
def test_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_batch_norm_rank_error_message_is_accurate():
    """A 1-D input is rejected; the message must not claim that only 4-D
    input is accepted, since (N, C), (N, C, L) and 5-D inputs all work."""
    with pytest.raises(ValueError) as info:
        convcore.batch_norm(_x((5,)), None, None, training=True)
    assert "input" in str(info.value)
    assert "must be 4-D" not in str(info.value), str(info.value)


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (1, 3), (1, 2, 1)])
def test_batch_norm_training_needs_more_than_one_value_per_channel(shape):
    """As torch.nn.functional.batch_norm: 'Expected more than 1 value per
    channel when training' (the variance of one value is undefined, and the
    unbiased running variance would divide by zero)."""
    with pytest.raises(ValueError, match="input|value"):
        convcore.batch_norm(_x(shape), np.zeros(shape[1]), np.ones(shape[1]), training=True)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (0, 3, 4, 4), (2, 3, 0, 4)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_empty_input_as_torch(shape, training, dtype):
    """PyTorch returns an empty result for an empty input (an empty batch, or
    an empty 1-D input), in training too, and leaves the running statistics
    alone."""
    torch = _torch()
    import torch.nn.functional as F
    x = np.zeros(shape, dtype)
    channels = shape[1] if len(shape) > 1 else 0
    rng = np.random.default_rng(3)
    rm, rv = rng.standard_normal(channels).astype(dtype), rng.uniform(1, 2, channels).astype(dtype)
    w, b = rng.standard_normal(channels).astype(dtype), rng.standard_normal(channels).astype(dtype)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    yt = F.batch_norm(torch.from_numpy(x), rmt, rvt, None, None, training, 0.1, 1e-5)
    out, mean, var = convcore.batch_norm(x, rm, rv, None, None, training=training,
                                         return_stats=True)
    check_output(out, yt.numpy(), dtype)
    np.testing.assert_array_equal(rm, rmt.numpy())
    np.testing.assert_array_equal(rv, rvt.numpy())
    if training:  # the statistics of no values
        assert mean.shape == var.shape == (channels,) and np.isnan(mean).all()
    if len(shape) == 4:  # ... and what backward makes of them: zero weight and bias gradients
        xt = torch.from_numpy(x).requires_grad_(True)
        wt, bt = torch.from_numpy(w).requires_grad_(True), torch.from_numpy(b).requires_grad_(True)
        F.batch_norm(xt, torch.from_numpy(rm), torch.from_numpy(rv), wt, bt, training).sum() \
            .backward()
        gx, gw, gb = convcore.batch_norm_backward(out, x, mean, var, w, training=training)
        check_output(gx, xt.grad.numpy(), dtype)
        np.testing.assert_array_equal(gw, wt.grad.numpy())
        np.testing.assert_array_equal(gb, bt.grad.numpy())


def test_batch_norm_empty_input_is_still_checked():
    with pytest.raises(TypeError, match="input"):
        convcore.batch_norm(np.zeros((0, 3), np.int64), None, None, training=True)
    with pytest.raises(TypeError, match="momentum"):
        convcore.batch_norm(np.zeros(0), None, None, training=True, momentum=None)


def test_batch_norm_one_value_per_channel_fine_in_eval():
    x = _x((1, 4, 1, 1))
    out = convcore.batch_norm(x, np.zeros(4), np.ones(4), training=False, eps=0.0)
    check_output(out, x, np.float64)
