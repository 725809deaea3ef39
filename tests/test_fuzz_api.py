"""Property-based fuzzing of every public function and layer: each call with
wild arguments (shapes, dtypes, strides, NaN/inf, zero-size dimensions, huge
or negative paddings, wrong types) either returns a result or raises a clear
ValueError / TypeError (MemoryError for sizes no machine has). Anything else
(RuntimeError, IndexError, OverflowError, SystemError, a crash) is a bug.

Where a call on small, near-valid arguments succeeds, its result is checked
against tests/reference.py (test_*_matches_reference below).

Set CONVCORE_FUZZ_STATS=<file> to get the number of cases per entry point
(docs/reliability.md quotes them).
"""
import atexit
import collections
import json
import os

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import convcore
import reference as ref
from convcore import nn

# ----------------------------------------------------------------- bookkeeping

CASES = collections.Counter()      # entry point -> calls made
OUTCOMES = collections.Counter()   # (entry point, outcome) -> count
ALLOWED = (ValueError, TypeError, MemoryError)


def _write_stats():
    path = os.environ.get("CONVCORE_FUZZ_STATS")
    if not path or not CASES:
        return
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    for (name, outcome), n in OUTCOMES.items():
        entry = old.setdefault(name, {})
        entry[outcome] = entry.get(outcome, 0) + n
    with open(path, "w") as f:
        json.dump(old, f, indent=1, sort_keys=True)


atexit.register(_write_stats)


def call(name, fn, *args, **kwargs):
    """Runs one fuzz case: a result, or one of the allowed exceptions with a
    message (a clear error names what was wrong; an empty message is not)."""
    CASES[name] += 1
    try:
        result = fn(*args, **kwargs)
    except ALLOWED as e:
        OUTCOMES[(name, type(e).__name__)] += 1
        assert str(e), f"{name} raised {type(e).__name__} with no message"
        return None
    OUTCOMES[(name, "ok")] += 1
    for r in (result if isinstance(result, tuple) else (result,)):
        ok = isinstance(r, int) if name.endswith("_shape") else (r is None or
                                                                 isinstance(r, np.ndarray))
        assert ok, f"{name} returned {type(r)}"
    return result


@pytest.fixture(autouse=True, scope="module")
def memory_cap():
    """Caps the address space at what the process has now plus 3 GiB while
    fuzzing: a case that asks for a legitimately huge output (adaptive pooling
    to 2^31 x 1, say) then fails with MemoryError, as it would on a smaller
    machine, instead of the kernel's OOM killer ending the test run."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        # Under AddressSanitizer the cap starves ASan's own mappings (it dies
        # with exit code 1); there ASAN_OPTIONS=max_allocation_size_mb=3072:
        # allocator_may_return_null=1 bounds the allocations instead.
        yield
        return
    try:
        import resource
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + (3 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ----------------------------------------------------------------- strategies

NASTY_INTS = [0, 1, 2, 3, -1, -2, 7, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 63,
              2 ** 64, -2 ** 63, -2 ** 31]
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.bool_, np.complex64,
          np.dtype(">f4"), np.dtype(">f8")]
FLOATS = [0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e38, -1e38, 1e-45, 3.5]


def nasty_int():
    return st.one_of(st.integers(-3, 9), st.sampled_from(NASTY_INTS))


def int_arg():
    """An argument that should be an int or a pair: sometimes is, often is not."""
    valid = st.integers(0, 3)  # weighted: about half the calls get valid-looking values
    return st.one_of(
        valid, valid, valid, valid,
        nasty_int(),
        st.tuples(nasty_int(), nasty_int()),
        st.lists(nasty_int(), max_size=3),
        st.sampled_from([None, 1.5, "2", "same", "valid", True, np.int64(2), np.float32(1),
                         (1,), (1, 2, 3), [None, 2], (1.0, 2), float("nan")]),
    )


@st.composite
def arrays(draw, min_dims=0, max_dims=5, max_side=4, float_only=False):
    """Arrays of any rank, small dims (zero included), many dtypes, odd memory
    layouts (transposed, negative steps, zero strides, unaligned, read-only)
    and values (NaN, inf, huge, denormal)."""
    ndim = draw(st.one_of(st.just(min(max(4, min_dims), max_dims)), st.integers(min_dims, max_dims)))
    shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=ndim, max_size=ndim)))
    # mostly the dtypes the core takes, so that many calls get past the type checks
    dtype = np.dtype(draw(st.sampled_from(DTYPES[:2] if float_only or draw(st.booleans())
                                          else DTYPES)))
    n = int(np.prod(shape, dtype=np.int64))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n)
    special = draw(st.sampled_from(["none", "none", "nan", "inf", "huge", "mixed"]))
    if n and special != "none":
        picks = rng.integers(0, n, size=max(1, n // 4))
        pool = {"nan": [np.nan], "inf": [np.inf, -np.inf], "huge": [1e38, -1e38, 1e300],
                "mixed": FLOATS}[special]
        values[picks] = rng.choice(pool, size=picks.size)
    with np.errstate(all="ignore"):
        if dtype.kind == "c":
            a = values.astype(dtype)
        elif dtype.kind in "iub":
            a = np.nan_to_num(values, nan=0, posinf=1, neginf=-1).clip(-100, 100).astype(dtype)
        else:
            a = values.astype(dtype)
    a = a.reshape(shape)
    layout = draw(st.sampled_from(["c", "c", "transposed", "flipped", "broadcast", "unaligned",
                                   "readonly", "sliced", "fortran"]))
    if layout == "transposed" and a.ndim >= 2:
        a = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    elif layout == "flipped" and a.ndim >= 1:
        a = np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    elif layout == "broadcast" and a.ndim >= 1 and n:
        a = np.broadcast_to(a[..., :1], a.shape)  # zero strides, read-only
    elif layout == "unaligned" and n:
        raw = np.zeros(a.nbytes + 1, np.uint8)
        b = raw[1:].view(a.dtype).reshape(a.shape)
        b[...] = a
        a = b
    elif layout == "readonly":
        a = a.copy()
        a.flags.writeable = False
    elif layout == "sliced" and a.ndim >= 1:
        big = np.repeat(a, 2, axis=-1)
        a = big[..., ::2]
    elif layout == "fortran":
        a = np.asfortranarray(a)
    return a


def _like(a, shape, dtype):
    """a's values (NaN and inf included) in a new array of this shape and dtype."""
    with np.errstate(all="ignore"):
        return np.resize(np.real(a).astype(dtype), shape)


def anything():
    return st.one_of(arrays(), st.sampled_from([None, 1, 2.5, "x", [1.0, 2.0], (), [[1.0]]]))


# ------------------------------------------------------------- the functional API

@given(x=arrays(), w=arrays(), b=st.one_of(st.none(), arrays(max_dims=2)), stride=int_arg(),
       padding=int_arg(), dilation=int_arg(), groups=nasty_int(),
       algorithm=st.sampled_from(["auto", "gemm", "direct", "pointwise", "depthwise", "winograd",
                                  "grouped", "fft", 3]),
       tame=st.sampled_from([None, (1, 0, 1), (2, 1, 1), (1, 1, 2)]))
def test_fuzz_conv2d(x, w, b, stride, padding, dilation, groups, algorithm, tame):
    if tame:  # half the cases: valid window arguments and a weight (and bias) that fit the
        # input's channels and dtype, so that its values and layout reach the kernels
        stride, padding, dilation = tame
        if x.ndim == 4 and x.dtype.kind == "f" and x.shape[1]:
            g = groups if isinstance(groups, int) and 0 < groups <= x.shape[1] and \
                x.shape[1] % groups == 0 else 1
            out = g * (w.shape[0] if w.ndim and w.shape[0] else 1)
            k = tuple(min(d, 3) or 1 for d in (w.shape[2:4] if w.ndim == 4 else (1, 1)))
            w = _like(w, (out, x.shape[1] // g) + k, x.dtype)
            b = None if b is None else _like(b, (out,), x.dtype)
            groups = g
    y = call("conv2d", convcore.conv2d, x, w, b, stride=stride, padding=padding,
             dilation=dilation, groups=groups, algorithm=algorithm)
    if y is not None:
        call("conv2d_backward", convcore.conv2d_backward, np.ones_like(y), x, w, stride=stride,
             padding=padding, dilation=dilation, groups=groups, algorithm=algorithm)
    call("conv2d_backward", convcore.conv2d_backward, x, x, w, stride=stride, padding=padding,
         dilation=dilation, groups=groups)


@given(in_shape=st.lists(nasty_int(), min_size=0, max_size=5),
       w_shape=st.lists(nasty_int(), min_size=0, max_size=5), stride=int_arg(),
       padding=int_arg(), dilation=int_arg(), groups=nasty_int(),
       ceil=st.booleans(), kind=st.sampled_from(["max", "avg", "min"]))
def test_fuzz_output_shapes(in_shape, w_shape, stride, padding, dilation, groups, ceil, kind):
    call("conv2d_output_shape", convcore.conv2d_output_shape, in_shape, w_shape, stride,
         padding, dilation, groups)
    call("pool2d_output_shape", convcore.pool2d_output_shape, in_shape, w_shape[:2] or 1,
         stride, padding, dilation, ceil, kind)


@given(x=arrays(), kernel=int_arg(), stride=st.one_of(st.none(), int_arg()), padding=int_arg(),
       dilation=int_arg(), ceil=st.booleans(), indices=st.booleans(), tame=st.booleans())
def test_fuzz_max_pool2d(x, kernel, stride, padding, dilation, ceil, indices, tame):
    if tame:
        kernel, stride, padding, dilation = 2, 1, 1, 1
    r = call("max_pool2d", convcore.max_pool2d, x, kernel, stride, padding, dilation, ceil,
             indices)
    gy = r[0] if indices and r is not None else r
    call("max_pool2d_backward", convcore.max_pool2d_backward,
         np.ones_like(gy) if gy is not None else x, x, kernel, stride, padding, dilation, ceil)
    if indices and r is not None:
        idx = r[1].copy()
        if idx.size:  # a corrupted index must be refused, not written through
            idx.flat[0] = [-1, 2 ** 40, x.shape[-1] * x.shape[-2]][idx.size % 3]
        call("max_pool2d_backward(indices)", convcore.max_pool2d_backward, np.ones_like(gy), x,
             kernel, stride, padding, dilation, ceil, indices=idx)


@given(x=arrays(), kernel=int_arg(), stride=st.one_of(st.none(), int_arg()), padding=int_arg(),
       ceil=st.booleans(), include_pad=st.booleans(),
       divisor=st.one_of(st.none(), nasty_int(), st.just(1.5)), tame=st.booleans())
def test_fuzz_avg_pool2d(x, kernel, stride, padding, ceil, include_pad, divisor, tame):
    if tame:
        kernel, stride, padding = 2, 1, 1
    y = call("avg_pool2d", convcore.avg_pool2d, x, kernel, stride, padding, ceil, include_pad,
             divisor)
    call("avg_pool2d_backward", convcore.avg_pool2d_backward,
         np.ones_like(y) if y is not None else x, x, kernel, stride, padding, ceil, include_pad,
         divisor)


@given(x=arrays(), size=st.one_of(int_arg(), st.tuples(st.none(), nasty_int())), gy=arrays())
def test_fuzz_adaptive_avg_pool2d(x, size, gy):
    y = call("adaptive_avg_pool2d", convcore.adaptive_avg_pool2d, x, size)
    call("adaptive_avg_pool2d_backward", convcore.adaptive_avg_pool2d_backward,
         np.ones_like(y) if y is not None else gy, x)


@given(x=arrays(), w=arrays(max_dims=3), b=st.one_of(st.none(), arrays(max_dims=2)),
       gy=arrays(), tame=st.booleans())
def test_fuzz_linear(x, w, b, gy, tame):
    if tame and x.ndim >= 1 and x.dtype.kind == "f":  # fits the input's features and dtype
        w = _like(w, ((w.shape[0] or 1) if w.ndim else 3, x.shape[-1]), x.dtype)
        b = None if b is None else _like(b, (w.shape[0],), x.dtype)
    y = call("linear", convcore.linear, x, w, b)
    call("linear_backward", convcore.linear_backward, np.ones_like(y) if y is not None else gy,
         x, w)


@given(x=anything(), gy=anything(), out=st.one_of(st.none(), arrays()))
def test_fuzz_relu(x, gy, out):
    call("relu", convcore.relu, x, out=out)
    call("relu_backward", convcore.relu_backward, gy, x)


@given(x=arrays(), size=nasty_int(), alpha=st.sampled_from(FLOATS + [1e-4, "a", None]),
       beta=st.sampled_from(FLOATS + [0.75]), k=st.sampled_from(FLOATS + [True]), gy=arrays())
def test_fuzz_local_response_norm(x, size, alpha, beta, k, gy):
    y = call("local_response_norm", convcore.local_response_norm, x, size, alpha, beta, k)
    call("local_response_norm_backward", convcore.local_response_norm_backward,
         np.ones_like(y) if y is not None else gy, x, size, alpha, beta, k)


@given(x=arrays(), stats=st.lists(st.one_of(st.none(), arrays(max_dims=2)), min_size=4,
                                   max_size=4),
       training=st.booleans(), momentum=st.sampled_from(FLOATS), eps=st.sampled_from(FLOATS),
       tame=st.booleans())
def test_fuzz_batch_norm(x, stats, training, momentum, eps, tame):
    if tame and x.ndim >= 2:  # statistics of the input's channels
        stats = [None if a is None else _like(a, (x.shape[1],), x.dtype) for a in stats]
    rm, rv, w, b = stats
    r = call("batch_norm", convcore.batch_norm, x, rm, rv, w, b, training, momentum, eps,
             return_stats=True)
    if r is not None and r[1] is not None and r[2] is not None:
        call("batch_norm_backward", convcore.batch_norm_backward, np.ones_like(r[0]), x, r[1],
             r[2], w, training, eps)
    else:
        call("batch_norm_backward", convcore.batch_norm_backward, x, x, rm, rv, w, training, eps)


@given(n=st.one_of(nasty_int(), st.sampled_from([None, 1.5, "2"])))
def test_fuzz_set_num_threads(n):
    old = convcore.get_num_threads()
    try:
        call("set_num_threads", convcore.set_num_threads, n)
        assert convcore.get_num_threads() >= 1
    finally:
        convcore.set_num_threads(old)


# --------------------------------------------------------------------- layers

LAYERS = {
    "Conv2d": lambda a: nn.Conv2d(a[0], a[1], a[2], stride=a[3], padding=a[4],
                                  padding_mode=["zeros", "reflect", "replicate", "circular",
                                                "bad"][a[5] % 5] if isinstance(a[5], int)
                                  else a[5]),
    "MaxPool2d": lambda a: nn.MaxPool2d(a[0], a[1], a[2]),
    "AvgPool2d": lambda a: nn.AvgPool2d(a[0], a[1], a[2]),
    "AdaptiveAvgPool2d": lambda a: nn.AdaptiveAvgPool2d(a[0]),
    "Linear": lambda a: nn.Linear(a[0], a[1]),
    "ReLU": lambda a: nn.ReLU(),
    "Flatten": lambda a: nn.Flatten(a[0], a[1]),
    "Dropout": lambda a: nn.Dropout(a[0] if not isinstance(a[0], int) else 0.5),
    "LocalResponseNorm": lambda a: nn.LocalResponseNorm(a[0]),
    "BatchNorm2d": lambda a: nn.BatchNorm2d(a[0]),
    "BasicBlock": lambda a: nn.BasicBlock(a[0], a[1], a[2]),
}
SMALL_INT = st.one_of(st.integers(1, 3), st.integers(1, 3), st.integers(-1, 4),
                      st.sampled_from([2 ** 62, None, 1.5, (1, 2)]))


@pytest.mark.parametrize("layer", sorted(LAYERS))
@given(args=st.lists(SMALL_INT, min_size=6, max_size=6), x=arrays(float_only=True),
       gy=arrays(float_only=True), training=st.booleans())
@settings(max_examples=max(10, settings().max_examples // 3))
def test_fuzz_layers(layer, args, x, gy, training):
    convcore.manual_seed(0)
    CASES[f"nn.{layer}"] += 1
    try:
        m = LAYERS[layer](args)
    except ALLOWED as e:
        OUTCOMES[(f"nn.{layer}", "refused at construction")] += 1
        assert str(e)
        return
    m.train(training)
    y = call(f"nn.{layer}", m.forward, x)
    if y is not None:
        CASES[f"nn.{layer}"] -= 1  # one case, counted once
        call(f"nn.{layer}", m.backward, np.ones_like(y))
        CASES[f"nn.{layer}"] -= 1
        call(f"nn.{layer}", m.backward, gy)  # a grad of the wrong shape must be refused


# ----------------------------------------------------- results, where calls succeed

def _finite_array(draw, shape, dtype, layout):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    a = rng.standard_normal(shape).astype(dtype)
    if layout == "flipped" and a.ndim:
        a = np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    elif layout == "transposed" and a.ndim >= 2:
        a = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    return a


@given(data=st.data(), n=st.integers(0, 2), c=st.integers(1, 3), h=st.integers(0, 6),
       w=st.integers(0, 6), o=st.integers(0, 3), k=st.integers(1, 4), s=st.integers(1, 3),
       p=st.integers(0, 3), d=st.integers(1, 2), dtype=st.sampled_from([np.float32, np.float64]),
       layout=st.sampled_from(["c", "flipped", "transposed"]))
def test_conv2d_matches_reference_where_it_succeeds(data, n, c, h, w, o, k, s, p, d, dtype,
                                                    layout):
    x = _finite_array(data.draw, (n, c, h, w), dtype, layout)
    wt = _finite_array(data.draw, (o, c, k, k), dtype, layout)
    y = call("conv2d (checked)", convcore.conv2d, x, wt, stride=s, padding=p, dilation=d)
    if y is None:  # refused: the reference must find the shapes invalid too
        oh = ref.conv_out_size(h, k, s, p, p, d)
        ow = ref.conv_out_size(w, k, s, p, p, d)
        assert oh < 1 or ow < 1
        return
    expected = ref.conv2d_ref(x, wt, None, s, p, d)
    assert y.shape == expected.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, expected, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-4 if dtype == np.float32 else 1e-10)


@given(data=st.data(), shape=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(1, 6),
                                       st.integers(1, 6)),
       k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2),
       special=st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))
def test_max_pool2d_and_relu_match_reference_with_nan_and_inf(data, shape, k, s, p, special):
    """Max pooling and ReLU are exact: NaN and inf must come out where the
    reference puts them, bit for bit."""
    x = _finite_array(data.draw, shape, np.float64, "c")
    if x.size:
        x.flat[data.draw(st.integers(0, x.size - 1))] = special
    y = call("max_pool2d (checked)", convcore.max_pool2d, x, k, s, p)
    if y is not None:
        np.testing.assert_array_equal(y, ref.max_pool2d_ref(x, k, s, p))
    else:
        assume(False)
    np.testing.assert_array_equal(convcore.relu(x), ref.relu_ref(x))


@given(data=st.data(), m=st.integers(0, 4), i=st.integers(0, 5), o=st.integers(0, 4),
       layout=st.sampled_from(["c", "flipped", "transposed"]))
def test_linear_matches_reference_where_it_succeeds(data, m, i, o, layout):
    x = _finite_array(data.draw, (m, i), np.float64, layout)
    w = _finite_array(data.draw, (o, i), np.float64, layout)
    b = _finite_array(data.draw, (o,), np.float64, "c")
    y = call("linear (checked)", convcore.linear, x, w, b)
    np.testing.assert_allclose(y, ref.linear_ref(x, w, b), rtol=1e-12, atol=1e-12)
