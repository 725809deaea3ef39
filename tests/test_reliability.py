"""Reliability: out-of-memory, large tensors, 64-bit shape rules, and
determinism / thread safety of every op (forward and backward, every conv
algorithm). See docs/reliability.md for what each proves."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import convcore
from convcore import _core


@pytest.fixture
def workspace_limit():
    yield
    _core.set_workspace_limit(0)


@pytest.fixture
def restore_threads():
    before = convcore.get_num_threads()
    yield
    convcore.set_num_threads(before)


# ---------------------------------------------------------------- out of memory

def test_workspace_limit_defaults_to_physical_memory(workspace_limit):
    limit = _core.workspace_limit()
    assert limit > 1 << 26
    _core.set_workspace_limit(12345)
    assert _core.workspace_limit() == 12345
    _core.set_workspace_limit(0)
    assert _core.workspace_limit() == limit
    with pytest.raises(ValueError, match="non-negative"):
        _core.set_workspace_limit(-1)


def test_public_workspace_functions(workspace_limit):
    default = convcore.workspace_limit()
    convcore.set_workspace_limit(1 << 20)
    assert convcore.workspace_limit() == 1 << 20
    x = np.ones((1, 4, 16, 16), np.float32)[..., ::2]     # strided: copied into scratch
    convcore.reset_workspace_peak()
    convcore.conv2d(x, np.ones((2, 4, 3, 3), np.float32))
    assert 0 < convcore.workspace_peak() <= 1 << 20
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        convcore.set_workspace_limit(-5)
    with pytest.raises(TypeError, match="nbytes must be an int"):
        convcore.set_workspace_limit(1.5)
    convcore.set_workspace_limit(0)
    assert convcore.workspace_limit() == default


def test_workspace_over_the_limit_is_a_memory_error_before_allocating(workspace_limit):
    """A strided input is copied (scratch memory); over the limit the call
    fails with a MemoryError naming the bytes, and the next call works."""
    x = np.ones((2, 8, 64, 128), np.float32)[:, :, :, ::2]  # 512 KiB, not contiguous
    w = np.ones((4, 8, 3, 3), np.float32)
    expected = convcore.conv2d(np.ascontiguousarray(x), w)
    _core.set_workspace_limit(64 << 10)
    for call in (lambda: convcore.conv2d(x, w), lambda: convcore.linear(x, np.ones((3, 64),
                                                                                  np.float32)),
                 lambda: convcore.relu(x)):
        with pytest.raises(MemoryError, match=r"needs \d+ bytes of scratch memory, more than "
                                              r"the workspace limit of 65536 bytes"):
            call()
    convcore.max_pool2d(x, 2)  # reads the strides directly: 16 KiB of scratch, under the limit
    _core.set_workspace_limit(0)
    np.testing.assert_array_equal(convcore.conv2d(x, w), expected)


def test_workspace_beyond_the_machine_is_a_memory_error():
    """A zero-strided 2^40-element view costs nothing; the contiguous copy it
    needs (4 TiB) is refused up front (not attempted, not OOM-killed)."""
    x = as_strided(np.zeros(1, np.float32), shape=(1, 2 ** 40), strides=(0, 0))
    with pytest.raises(MemoryError, match="4398046511104 bytes|scratch memory"):
        convcore.linear(x, x)


def test_huge_outputs_are_memory_errors():
    x = as_strided(np.zeros(1, np.float32), shape=(2 ** 40, 1, 1, 1), strides=(0, 0, 0, 0))
    for call in (lambda: convcore.conv2d(x, np.ones((1, 1, 1, 1), np.float32)),
                 lambda: convcore.relu(x), lambda: convcore.max_pool2d(x, 1),
                 lambda: convcore.adaptive_avg_pool2d(np.ones((1, 1, 2, 2), np.float32),
                                                      2 ** 20)):
        with pytest.raises(MemoryError):
            call()


def test_empty_outputs_whose_bytes_overflow_are_value_errors():
    """An empty batch pooled to 2^31 - 1 on each side has no elements, but
    its C strides do not fit in 64 bits: refused with a ValueError before
    pybind11 computes them (it does so without an overflow check, which
    UBSan caught in CI), as numpy refuses such an array."""
    x = np.zeros((0, 2, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"shape \(0, 2, 2147483647, 2147483647\) is too large"):
        convcore.adaptive_avg_pool2d(x, (2**31 - 1, 2**31 - 1))
    assert convcore.adaptive_avg_pool2d(x, (2**20, 2**20)).shape == (0, 2, 2**20, 2**20)


def test_workspace_peak_is_reported_and_bounded():
    x = np.ones((4, 16, 32, 32), np.float32)
    w = np.ones((32, 16, 3, 3), np.float32)
    _core.reset_workspace_peak()
    convcore.conv2d(x, w, padding=1, algorithm="gemm")
    peak = _core.workspace_peak()
    # the implicit-im2col GEMM holds packed blocks, never the im2col matrix
    im2col_bytes = 4 * 16 * 9 * 32 * 32 * 4
    assert 0 < peak < im2col_bytes


# ------------------------------------------------------------------ large tensors

def test_shape_rules_are_64_bit_and_reject_overflow():
    # 2^31 + 5 one-pixel images: the shape is computed in 64 bits
    assert convcore.conv2d_output_shape((2 ** 31 + 5, 1, 1, 1), (1, 1, 1, 1)) == \
        (2 ** 31 + 5, 1, 1, 1)
    assert convcore.pool2d_output_shape((1, 1, 2 ** 40, 3), 2) == (1, 1, 2 ** 39, 1)
    # dimensions whose arithmetic would overflow int64 are a clear error (they
    # wrapped around before: UBSan's finding through a fuzzed model file)
    for shape in ((1, 1, 2 ** 63 - 1, 1), (1, 2 ** 62 + 1, 1, 1), (-1, 1, 1, 1)):
        with pytest.raises(ValueError, match=r"dimensions in \[0, 2\^62\]"):
            convcore.conv2d_output_shape(shape, (1, 1, 1, 1), padding=1)
        with pytest.raises(ValueError, match=r"dimensions in \[0, 2\^62\]"):
            convcore.pool2d_output_shape(shape, 1)
    with pytest.raises(ValueError, match="output elements|more elements than fit in 64 bits"):
        convcore.conv2d_output_shape((2 ** 40, 2 ** 30, 2 ** 20, 1), (2 ** 30, 2 ** 30, 1, 1))


def test_size_rules_of_the_core_reject_stride_zero():
    """_core.conv_output_size / pool_output_size divided by a zero stride
    (SIGFPE: the interpreter died)."""
    with pytest.raises(ValueError, match="stride must be positive"):
        _core.conv_output_size(5, 3, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="stride must be positive"):
        _core.pool_output_size(5, 3, 0, 0, 1, False)
    with pytest.raises(ValueError, match="at most"):
        _core.same_padding(3, 2 ** 62)


def _tall_view():
    """(1, 1, 2^16, 2^15 + 3): 2,147,680,256 elements (> 2^31) in 256 KiB,
    element [h, w] = h (zero stride along w)."""
    h, w = 2 ** 16, 2 ** 15 + 3
    return as_strided(np.arange(h, dtype=np.float32), shape=(1, 1, h, w), strides=(0, 0, 4, 0))


def test_convolution_indexes_a_view_of_more_than_2_31_elements(workspace_limit):
    x = _tall_view()
    assert x.size > 2 ** 31
    _core.set_workspace_limit(256 << 20)  # it must not copy the 8 GiB view
    y = convcore.conv2d(x, np.ones((1, 1, 1, 3), np.float32), stride=(4096, x.shape[3]))
    np.testing.assert_array_equal(y.ravel(), 3 * np.arange(0, 2 ** 16, 4096, dtype=np.float32))
    y = convcore.conv2d(x, np.full((1, 1, 1, 1), 2, np.float32), stride=2 ** 14)
    np.testing.assert_array_equal(y[0, 0, :, 0], 2 * np.arange(0, 2 ** 16, 2 ** 14))


@pytest.mark.slow
def test_pooling_over_more_than_2_31_elements(workspace_limit):
    """Each window reads 2^31 / 4 elements: exact means (sums are in double;
    in float32 the adaptive mean came out 512 instead of 8191.5)."""
    x = _tall_view()
    _core.set_workspace_limit(256 << 20)
    y = convcore.adaptive_avg_pool2d(x, (4, 1))
    np.testing.assert_array_equal(y.ravel(), [8191.5, 24575.5, 40959.5, 57343.5])
    y = convcore.avg_pool2d(x, (1, x.shape[3]))
    np.testing.assert_array_equal(y.ravel(), np.arange(2 ** 16, dtype=np.float32))


# ------------------------------------------------- determinism and threads, every op

def _every_op(dtype, seed=0):
    """Forward and backward of every op and conv algorithm on one input set;
    returns a list of arrays."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    x, gy3 = r(2, 8, 30, 30), r(2, 8, 28, 28)
    out = []
    for algo, w, kw in (("gemm", r(8, 8, 3, 3), {}), ("winograd", r(8, 8, 3, 3), {}),
                        ("pointwise", r(8, 8, 1, 1), {}),
                        ("depthwise", r(8, 1, 3, 3), {"groups": 8}),
                        ("gemm", r(8, 4, 3, 3), {"stride": 2, "padding": 1, "groups": 2}),
                        ("direct", r(8, 4, 3, 3), {"stride": 2, "padding": 1, "groups": 2}),
                        ("direct", r(8, 8, 5, 5), {"padding": 4, "dilation": 2})):
        y = convcore.conv2d(x, w, r(8), algorithm=algo, **kw)
        out.append(y)
        out += list(convcore.conv2d_backward(np.ones_like(y) * 0.5, x, w, algorithm=algo, **kw))
    y, idx = convcore.max_pool2d(x, 3, 2, 1, return_indices=True)
    out += [y, idx, convcore.max_pool2d_backward(y, x, 3, 2, 1),
            convcore.max_pool2d_backward(y, x, 3, 2, 1, indices=idx)]
    y = convcore.avg_pool2d(x, 3, 2, 1, ceil_mode=True)
    out += [y, convcore.avg_pool2d_backward(y, x, 3, 2, 1, ceil_mode=True)]
    y = convcore.adaptive_avg_pool2d(x, (7, 5))
    out += [y, convcore.adaptive_avg_pool2d_backward(y, x)]
    lx, lw = r(16, 200), r(30, 200)
    y = convcore.linear(lx, lw, r(30))
    out += [y] + list(convcore.linear_backward(y, lx, lw))
    out += [convcore.relu(x), convcore.relu_backward(r(*x.shape), x)]
    out += [convcore.local_response_norm(x, 5),
            convcore.local_response_norm_backward(r(*x.shape), x, 5)]
    y, m, v = convcore.batch_norm(x, training=True, return_stats=True)
    out += [y, m, v] + list(convcore.batch_norm_backward(r(*x.shape), x, m, v, r(8)))
    assert gy3.shape == (2, 8, 28, 28)
    return out


def _bits(arrays):
    return [(a.dtype.str, a.shape, a.tobytes()) for a in arrays]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_op_is_bit_identical_across_runs(restore_threads, dtype, threads):
    convcore.set_num_threads(threads)
    first = _bits(_every_op(dtype))
    for _ in range(2):
        assert _bits(_every_op(dtype)) == first


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_op_is_bit_identical_across_thread_counts(restore_threads, dtype):
    """What the README promises (each output element reduced by one thread in
    a fixed order); docs/reliability.md records it."""
    convcore.set_num_threads(1)
    one = _bits(_every_op(dtype))
    for n in (2, 4):
        convcore.set_num_threads(n)
        for i, (a, b) in enumerate(zip(one, _bits(_every_op(dtype)))):
            assert a == b, f"result {i} differs between 1 and {n} threads"


def test_every_op_from_python_threads_matches_sequential(restore_threads):
    """Four Python threads (the GIL is released) running every op at once,
    while a fifth changes the thread count, get the sequential bits."""
    convcore.set_num_threads(2)
    expected = {s: _bits(_every_op(np.float32, seed=s)) for s in range(4)}
    stop = threading.Event()

    def toggler():
        n = 1
        while not stop.is_set():
            convcore.set_num_threads(n)
            n = n % 3 + 1

    t = threading.Thread(target=toggler)
    t.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(lambda s: (s, _bits(_every_op(np.float32, seed=s))),
                                [0, 1, 2, 3] * 3))
    finally:
        stop.set()
        t.join()
    assert len(got) == 12
    for s, bits in got:
        assert bits == expected[s], f"seed {s} differs when run concurrently"


# ------------------------------------------------------------------ alignment

def _unaligned(a):
    raw = np.zeros(a.nbytes + 1, np.uint8)
    b = raw[1:].view(a.dtype).reshape(a.shape)
    b[...] = a
    assert not b.flags.aligned and b.flags.c_contiguous
    return b


def test_unaligned_arrays_are_copied_and_unaligned_out_is_refused():
    """An unaligned C-contiguous input reached the core as it was
    (np.ascontiguousarray keeps it): misaligned float64 loads, found by UBSan
    on the Python fuzz. Now it is copied; an unaligned `out` is refused."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    xu, wu = _unaligned(x), _unaligned(w)
    np.testing.assert_array_equal(convcore.max_pool2d(xu, 2), convcore.max_pool2d(x, 2))
    np.testing.assert_array_equal(convcore.conv2d(xu, wu), convcore.conv2d(x, w))
    np.testing.assert_array_equal(convcore.relu(xu), convcore.relu(x))
    with pytest.raises(ValueError, match="out must be aligned"):
        convcore.relu(x, out=_unaligned(np.zeros_like(x)))
