"""Shared helpers for the convcore test suite: array layouts, tolerances and
hypothesis strategies that generate *valid* argument combinations."""

import os

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import reference as ref

DTYPES = (np.float32, np.float64)

# relative tolerances (the expected values are computed in float64)
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}

# max relative error observed per op in the torch parity tests; printed in
# the terminal summary by conftest.py
PARITY_ERRORS = {}


def rtol_for(dtype):
    return RTOL[np.dtype(dtype)]


def rel_err(actual, expected):
    """max |a - e| / max(1, max|e|), NaN-safe (NaN must match NaN)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.size == 0:
        return 0.0
    scale = max(1.0, float(np.nanmax(np.abs(e))) if np.isfinite(e).any() else 1.0)
    diff = np.abs(a - e)
    both_nan = np.isnan(a) & np.isnan(e)
    same_inf = np.isinf(a) & (a == e)
    diff = np.where(both_nan | same_inf, 0.0, diff)
    if np.isnan(diff).any():
        return float("inf")
    return float(diff.max() / scale)


def assert_close(actual, expected, dtype=None, rtol=None, what=""):
    """Compare with an absolute tolerance scaled by the magnitude of the
    expected values: |a - e| <= rtol * max(1, max|e|) elementwise (sums can
    be long, so a pure elementwise relative check would be too strict near
    cancellations)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape} != expected {expected.shape}")
    if rtol is None:
        rtol = rtol_for(dtype if dtype is not None else expected.dtype)
    err = rel_err(actual, expected)
    assert err <= rtol, (
        f"{what}: max scaled error {err:.3e} > {rtol:.1e}\n"
        f"actual={actual!r}\nexpected={expected!r}")


def check_output(out, expected, dtype, what="output", rtol=None):
    """A new, C-contiguous ndarray of the right dtype/shape and values."""
    assert isinstance(out, np.ndarray), f"{what}: got {type(out)}"
    assert out.dtype == np.dtype(dtype), f"{what}: dtype {out.dtype} != {np.dtype(dtype)}"
    assert out.flags.c_contiguous, f"{what}: not C-contiguous"
    assert_close(out, expected, dtype, rtol=rtol, what=what)


# ---------------------------------------------------------------------------
# memory layouts: same values, different strides
# ---------------------------------------------------------------------------

LAYOUTS = ("C", "F", "step", "neg", "perm")


def with_layout(a, layout):
    """Return an array equal to ``a`` (same values, same dtype) whose memory
    layout is ``layout``:

    * 'C'    - C-contiguous copy
    * 'F'    - Fortran order
    * 'step' - every other element of a bigger buffer along the last axis
               and the first axis (non-unit, non-contiguous strides)
    * 'neg'  - negative strides along the last two axes
    * 'perm' - a transposed view: an NHWC buffer viewed as NCHW (for 4-D;
               for other ndims a reversed-axes buffer transposed back)
    """
    a = np.asarray(a)
    if layout == "C":
        return np.ascontiguousarray(a).copy()
    if layout == "F":
        return np.asfortranarray(a).copy()
    if layout == "step":
        big_shape = list(a.shape)
        big_shape[-1] *= 2
        if a.ndim >= 2:
            big_shape[0] = big_shape[0] * 2 + 1
        big = np.full(big_shape, np.nan, dtype=a.dtype)
        if a.ndim >= 2:
            big[1::2, ..., ::2] = a
            out = big[1::2, ..., ::2]
        else:
            big[::2] = a
            out = big[::2]
        assert a.size <= 1 or not out.flags.c_contiguous
        return out
    if layout == "neg":
        axes = tuple(range(max(0, a.ndim - 2), a.ndim))
        buf = np.ascontiguousarray(np.flip(a, axes))
        return np.flip(buf, axes)
    if layout == "perm":
        if a.ndim == 4:
            buf = np.ascontiguousarray(a.transpose(0, 2, 3, 1))
            return buf.transpose(0, 3, 1, 2)
        buf = np.ascontiguousarray(a.T)
        return buf.T
    raise ValueError(layout)


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def distinct_values(rng, shape, dtype, gap=0.05):
    """Values that are pairwise at least ``gap`` apart (no ties anywhere)."""
    n = int(np.prod(shape))
    vals = (rng.permutation(n) - n / 2) * gap
    return vals.reshape(shape).astype(dtype)


# ---------------------------------------------------------------------------
# hypothesis strategies
# ---------------------------------------------------------------------------

seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)


def _as_arg(draw, h, w):
    """Spell a pair either as an int (when equal, sometimes) or a tuple."""
    if h == w and draw(st.booleans()):
        return h
    return (h, w)


@st.composite
def conv_cases(draw, max_extra=5, allow_unbatched=True):
    """A dict of valid conv2d arguments (shapes + hyper-parameters)."""
    depthwise = draw(st.booleans()) and draw(st.booleans())
    if depthwise:
        groups = draw(st.integers(1, 4))
        cg = 1
        og = draw(st.integers(1, 2))         # channel multiplier
    else:
        groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
        cg = draw(st.integers(1, 3))
        og = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pad_kind = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    if pad_kind == "same":
        sh = sw = 1
        padding = "same"
    else:
        sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        if pad_kind == "valid":
            padding = "valid"
        elif pad_kind == "int":
            padding = draw(st.integers(0, 3))
        else:
            padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    pt, pb, pl, pr = ref.resolve_conv_padding(padding, (kh, kw), (dh, dw))
    # smallest input such that the dilated kernel fits in the padded input;
    # extra == 0 exercises "kernel exactly as large as the padded input"
    min_h = max(1, dh * (kh - 1) + 1 - pt - pb)
    min_w = max(1, dw * (kw - 1) + 1 - pl - pr)
    H = min_h + draw(st.integers(0, max_extra))
    W = min_w + draw(st.integers(0, max_extra))
    N = draw(st.integers(1, 3))
    unbatched = allow_unbatched and N == 1 and draw(st.booleans())
    return dict(
        N=N, unbatched=unbatched, C=cg * groups, H=H, W=W,
        Cout=og * groups, Cg=cg, kh=kh, kw=kw,
        stride=_as_arg(draw, sh, sw),
        padding=padding,
        dilation=_as_arg(draw, dh, dw),
        groups=groups,
        bias=draw(st.booleans()),
    )


def conv_arrays(case, rng, dtype):
    shape = (case["C"], case["H"], case["W"])
    if not case["unbatched"]:
        shape = (case["N"],) + shape
    x = randn(rng, shape, dtype)
    w = randn(rng, (case["Cout"], case["Cg"], case["kh"], case["kw"]), dtype)
    b = randn(rng, (case["Cout"],), dtype) if case["bias"] else None
    return x, w, b


def conv_kwargs(case):
    return dict(stride=case["stride"], padding=case["padding"],
                dilation=case["dilation"], groups=case["groups"])


def max_pool_windows_nonempty(H, W, kernel_size, stride, padding, dilation,
                              ceil_mode):
    """True when every pooling window contains at least one real input
    element (PyTorch returns -inf and out-of-range indices otherwise, which
    is not something worth pinning down)."""
    kh, kw = ref.pair(kernel_size)
    sh, sw = ref.pair(kernel_size if stride is None else stride)
    ph, pw = ref.pair(padding)
    dh, dw = ref.pair(dilation)
    OH = ref.pool_out_size(H, kh, sh, ph, dh, ceil_mode)
    OW = ref.pool_out_size(W, kw, sw, pw, dw, ceil_mode)
    if OH < 1 or OW < 1:
        return False
    ok_h = all(any(0 <= i * sh - ph + p * dh < H for p in range(kh))
               for i in range(OH))
    ok_w = all(any(0 <= j * sw - pw + q * dw < W for q in range(kw))
               for j in range(OW))
    return ok_h and ok_w


@st.composite
def pool_cases(draw, max_pool=True, max_hw=9, allow_unbatched=True):
    """Valid (max|avg)_pool2d arguments, biased towards ceil_mode edge
    cases (windows hanging over the right/bottom edge, dropped windows that
    would start in the right padding)."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride_none = draw(st.integers(0, 4)) == 0
    sh, sw = ((kh, kw) if stride_none else
              (draw(st.integers(1, 4)), draw(st.integers(1, 4))))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    if max_pool:
        dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    else:
        dh = dw = 1
    ceil_mode = draw(st.booleans())
    # start from the smallest input the (dilated) window fits in, so that
    # few draws are rejected and the tight cases are common
    min_h = max(1, dh * (kh - 1) + 1 - 2 * ph)
    min_w = max(1, dw * (kw - 1) + 1 - 2 * pw)
    H = draw(st.integers(min_h, max(min_h, max_hw)))
    W = draw(st.integers(min_w, max(min_w, max_hw)))
    assume(max_pool_windows_nonempty(H, W, (kh, kw), (sh, sw), (ph, pw),
                                     (dh, dw), ceil_mode))
    N = draw(st.integers(1, 2))
    C = draw(st.integers(1, 3))
    unbatched = allow_unbatched and N == 1 and draw(st.booleans())
    case = dict(N=N, C=C, H=H, W=W, unbatched=unbatched,
                kernel_size=_as_arg(draw, kh, kw),
                stride=None if stride_none else _as_arg(draw, sh, sw),
                padding=_as_arg(draw, ph, pw),
                ceil_mode=ceil_mode)
    if max_pool:
        case["dilation"] = _as_arg(draw, dh, dw)
    else:
        case["count_include_pad"] = draw(st.booleans())
        case["divisor_override"] = draw(
            st.one_of(st.none(), st.none(), st.integers(1, 5),
                      st.integers(-3, -1)))
    return case


def pool_shape(case):
    s = (case["C"], case["H"], case["W"])
    return s if case["unbatched"] else (case["N"],) + s


def max_pool_kwargs(case):
    return dict(kernel_size=case["kernel_size"], stride=case["stride"],
                padding=case["padding"], dilation=case["dilation"],
                ceil_mode=case["ceil_mode"])


def avg_pool_kwargs(case):
    return dict(kernel_size=case["kernel_size"], stride=case["stride"],
                padding=case["padding"], ceil_mode=case["ceil_mode"],
                count_include_pad=case["count_include_pad"],
                divisor_override=case["divisor_override"])


@st.composite
def adaptive_cases(draw, max_hw=10):
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    oh = draw(st.one_of(st.none(), st.integers(1, max_hw + 2)))
    ow = draw(st.one_of(st.none(), st.integers(1, max_hw + 2)))
    if oh is not None and oh == ow and draw(st.booleans()):
        output_size = oh
    else:
        output_size = (oh, ow)
    N = draw(st.integers(1, 2))
    C = draw(st.integers(1, 3))
    unbatched = N == 1 and draw(st.booleans())
    return dict(N=N, C=C, H=H, W=W, unbatched=unbatched,
                output_size=output_size)


def adaptive_shape(case):
    s = (case["C"], case["H"], case["W"])
    return s if case["unbatched"] else (case["N"],) + s


def numerical_grad(loss, arr, eps=1e-6):
    """Central differences of the scalar ``loss()`` w.r.t. every element of
    ``arr`` (perturbed in place and restored)."""
    g = np.zeros(arr.shape, dtype=np.float64)
    for idx in np.ndindex(*arr.shape):
        old = arr[idx]
        arr[idx] = old + eps
        lp = loss()
        arr[idx] = old - eps
        lm = loss()
        arr[idx] = old
        g[idx] = (lp - lm) / (2 * eps)
    return g


def convcore_env(**extra):
    """os.environ for a child Python (python -m convcore ..., a job script)
    that imports the convcore these tests imported: installed, or a source
    tree with its extension, never the checkout's python/ folder, which has
    no extension after pip install . on a clean clone (as in CI)."""
    import convcore
    root = os.path.dirname(os.path.dirname(os.path.abspath(convcore.__file__)))
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
