"""The GPU kernels' logic, checked on the CPU: every .cu kernel is built as
C++ against tests/cuda_shim (thread blocks as fibers, real barriers) and
driven through convcore.cuda.functional, the same Python launch code the
GPU runs, with numpy arrays. Each result is checked against the naive
references in reference.py, forward and backward. The per-kernel test
counts are printed in the terminal summary."""
import os

import numpy as np
import pytest

import reference as ref
from _helpers import assert_close

from cuda_shim import shim

pytestmark = pytest.mark.skipif(shim.find_compiler() is None,
                                reason="g++ not found: the CUDA-execution shim needs it")

import convcore.cuda.functional as G  # noqa: E402  (importing it needs no cupy)

import convcore.cuda as cc_cuda  # noqa: E402

# every kernel file of the package, plus the shim's own self-test kernels
FILES = tuple(cc_cuda.SOURCES) + (os.path.join(shim.HERE, "selftest.cu"),)


@pytest.fixture(scope="session")
def backend(tmp_path_factory):
    return shim.session_backend(FILES, str(tmp_path_factory.getbasetemp() / "ccshim"))


@pytest.fixture
def sh(backend, request):
    backend.current_test = request.node.nodeid
    with G.using_backend(backend):
        yield backend
    backend.current_test = None


@pytest.fixture(params=["small", "big"])
def tile(request, monkeypatch):
    """Both tile shapes of the GEMM-shaped kernels (64 and 128 wide)."""
    monkeypatch.setattr(G, "TILE", request.param)
    return request.param


def rnd(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------- the shim itself

def test_shim_barrier_orders_shared_memory(sh):
    x = np.arange(512, dtype=np.float32)
    y = np.empty_like(x)
    sh.launch("selftest.cu", "selftest_reverse", (2, 1, 1), (256, 1, 1), (x, y))
    np.testing.assert_array_equal(y, np.concatenate([x[255::-1], x[:255:-1]]))


def test_shim_exposes_a_missing_barrier(sh):
    x = np.arange(256, dtype=np.float32) + 1
    y = np.empty_like(x)
    sh.launch("selftest.cu", "selftest_reverse_racy", (1, 1, 1), (256, 1, 1), (x, y))
    assert not np.array_equal(y, x[::-1]), "a race without __syncthreads went unnoticed"


def test_shim_reports_barrier_divergence(sh):
    x = np.ones(256, np.float32)
    with pytest.raises(RuntimeError, match="barrier divergence"):
        sh.launch("selftest.cu", "selftest_divergent", (1, 1, 1), (256, 1, 1),
                  (x, x.copy(), np.int32(100)))


def test_shim_early_exit_without_barrier_is_fine(sh):
    x = rnd(300)
    y = G.relu(x)  # relu_fwd returns early past n in its last block
    assert_close(y, ref.relu_ref(x))


def test_shim_2d_blocks_and_dynamic_shared(sh):
    x = rnd(6 * 128)
    y = np.empty(6, np.float32)
    sh.launch("selftest.cu", "selftest_block_sum", (3, 2, 1), (16, 8, 1), (x, y), 128 * 4)
    assert_close(y, x.reshape(6, 128).astype(np.float64).sum(1), np.float32)


def test_shim_catches_out_of_bounds_writes(sh):
    x = rnd(100)
    y = sh.xp.empty(99, np.float32)  # one short: relu_fwd writes y[99]
    with pytest.raises(RuntimeError, match="out-of-bounds write"):
        sh.launch("elementwise.cu", "relu_fwd", (1, 1, 1), (256, 1, 1), (x, y, np.int32(100)))
    sh.xp._buffers.clear()


def test_shim_stops_at_an_out_of_bounds_shared_memory_index(backend):
    # UBSan aborts the process, so the launch runs in a child process.
    import subprocess
    import sys
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); "
            "from cuda_shim import shim; "
            "be = shim.ShimBackend(sys.argv[2], sys.argv[3].split(',')); "
            "be.launch('selftest.cu', 'selftest_shared_overflow', (1, 1, 1), (256, 1, 1), "
            "(np.zeros(256, np.float32),)); print('not caught')")
    lib = backend.lib._name
    res = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)),
                          lib, ",".join(FILES)], capture_output=True, text=True)
    assert res.returncode != 0 and "not caught" not in res.stdout
    assert "out of bounds" in res.stderr, res.stderr[-2000:]


def test_shim_checks_argument_types(sh):
    x = rnd(10)
    with pytest.raises(TypeError, match="n is int"):
        sh.launch("elementwise.cu", "relu_fwd", (1, 1, 1), (256, 1, 1), (x, x.copy(), 10))
    with pytest.raises(RuntimeError, match="invalid launch"):
        sh.launch("elementwise.cu", "relu_fwd", (1, 1, 1), (2048, 1, 1),
                  (x, x.copy(), np.int32(10)))


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
]


def _conv_args(case):
    xs, ws, s, p, d, g, has_b = case
    x, w = rnd(*xs), rnd(*ws, seed=1)
    b = rnd(ws[0], seed=2) if has_b else None
    return x, w, b, dict(stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv2d_forward(sh, tile, case):
    x, w, b, kw = _conv_args(case)
    assert_close(G.conv2d(x, w, b, **kw), ref.conv2d_ref(x, w, b, **kw))


@pytest.mark.parametrize("case", CONV_CASES[:2] + CONV_CASES[6:7], ids=["gemm0", "gemm1", "dw"])
def test_conv2d_relu_fused(sh, tile, case):
    x, w, b, kw = _conv_args(case)
    assert_close(G.conv2d_relu(x, w, b, **kw), ref.relu_ref(ref.conv2d_ref(x, w, b, **kw)))


def test_conv2d_gemm_on_a_depthwise_shape(sh):
    x, w, b, kw = _conv_args(CONV_CASES[6])
    assert_close(G.conv2d(x, w, b, algorithm="gemm", **kw), ref.conv2d_ref(x, w, b, **kw))


@pytest.mark.parametrize("grad_input", ["gemm", "direct"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv2d_backward(sh, tile, case, grad_input, monkeypatch):
    # grad_input by either kernel, whatever the layer's channels per group
    monkeypatch.setattr(G, "GRAD_INPUT_DIRECT_MAX_CG", 0 if grad_input == "gemm" else 8)
    x, w, b, kw = _conv_args(case)
    y = ref.conv2d_ref(x, w, b, **kw)
    gy = rnd(*y.shape, seed=3)
    gx, gw, gb = G.conv2d_backward(gy, x, w, **kw)
    rx, rw, rb = ref.conv2d_backward_ref(gy, x, w, **kw)
    assert_close(gx, rx, what="grad_input")
    assert_close(gw, rw, what="grad_weight")
    assert_close(gb, rb, what="grad_bias")


@pytest.mark.parametrize("deterministic", [True, False])
def test_conv2d_backward_weight_split(sh, tile, monkeypatch, deterministic):
    # Small chunks force the split reduction: a workspace summed in order
    # (deterministic) or float atomics (opt-out).
    monkeypatch.setattr(G, "GRAD_WEIGHT_MIN_CHUNK", 16)
    x, w, b, kw = _conv_args(CONV_CASES[2])
    gy = rnd(*ref.conv2d_ref(x, w, **kw).shape, seed=3)
    kernels_before = dict(sh.launches)
    gx, gw, gb = G.conv2d_backward(gy, x, w, deterministic=deterministic, **kw)
    rx, rw, rb = ref.conv2d_backward_ref(gy, x, w, **kw)
    assert_close(gw, rw, what="grad_weight")
    assert_close(gx, rx, what="grad_input")
    used_sum = sh.launches["sum_splits"] > kernels_before.get("sum_splits", 0)
    assert used_sum == deterministic


@pytest.mark.parametrize("min_chunk", [1, 7, 50, 1 << 20])
def test_conv2d_bias_gradient_in_chunks(sh, monkeypatch, min_chunk):
    # chunks of one position, chunks that split an image, whole images, one chunk
    monkeypatch.setattr(G, "BIAS_GRAD_MIN_CHUNK", min_chunk)
    x, w, b, kw = _conv_args(CONV_CASES[2])
    gy = rnd(*ref.conv2d_ref(x, w, **kw).shape, seed=3)
    assert_close(G.conv2d_backward(gy, x, w, **kw)[2], ref.conv2d_backward_ref(gy, x, w, **kw)[2],
                 what="grad_bias")


def test_conv2d_backward_is_bit_identical_across_runs(sh, monkeypatch):
    monkeypatch.setattr(G, "GRAD_WEIGHT_MIN_CHUNK", 16)
    x, w, b, kw = _conv_args(CONV_CASES[5])
    gy = rnd(*ref.conv2d_ref(x, w, **kw).shape, seed=3)
    first = G.conv2d_backward(gy, x, w, **kw)
    second = G.conv2d_backward(gy, x, w, **kw)
    for a, c in zip(first, second):
        np.testing.assert_array_equal(a, c)


def test_conv2d_out_argument(sh):
    x, w, b, kw = _conv_args(CONV_CASES[0])
    out = np.full((2, 4, 5, 5), np.nan, np.float32)
    assert G.conv2d(x, w, b, out=out, **kw) is out
    assert_close(out, ref.conv2d_ref(x, w, b, **kw))
    with pytest.raises(ValueError, match="out must have shape"):
        G.conv2d(x, w, b, out=np.empty((2, 4, 4, 4), np.float32), **kw)
    big = np.zeros(2 * 3 * 7 * 7 + 200, np.float32)
    xs = big[:x.size].reshape(x.shape)
    xs[...] = x
    with pytest.raises(ValueError, match="out must not overlap the inputs"):
        G.conv2d(xs, w, b, out=big[50:50 + 200].reshape(2, 4, 5, 5), **kw)


# ---------------------------------------------------------------------- pooling

POOL_CASES = [  # (shape, kernel, stride, padding, dilation, ceil_mode)
    ((2, 3, 8, 8), 2, None, 0, 1, False),
    ((1, 2, 9, 7), 3, 2, 1, 1, True),
    ((2, 2, 10, 10), 3, 1, 1, 2, False),
    ((1, 1, 7, 9), (3, 2), (2, 3), (1, 0), 1, True),
    ((3, 8, 8), 3, 3, 0, 1, True),                           # unbatched
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[str(i) for i in range(len(POOL_CASES))])
def test_max_pool2d_forward_and_backward(sh, case):
    shape, k, s, p, d, cm = case
    x = rnd(*shape)
    x.reshape(-1)[::7] = x.reshape(-1)[1]  # ties
    y, idx = G.max_pool2d(x, k, s, p, d, cm, return_indices=True)
    ry, ridx = ref.max_pool2d_ref(x, k, s, p, d, cm, return_indices=True)
    assert_close(y, ry)
    np.testing.assert_array_equal(idx, ridx)
    assert_close(G.max_pool2d(x, k, s, p, d, cm), ry)
    gy = rnd(*ry.shape, seed=5)
    rgx = ref.max_pool2d_backward_ref(gy, x, k, s, p, d, cm)
    assert_close(G.max_pool2d_backward(gy, x, k, s, p, d, cm), rgx)
    assert_close(G.max_pool2d_backward(gy, x, k, s, p, d, cm, indices=idx), rgx)


def test_max_pool2d_nan_propagates(sh):
    x = rnd(1, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan
    y, idx = G.max_pool2d(x, 2, return_indices=True)
    ry, ridx = ref.max_pool2d_ref(x, 2, return_indices=True)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 5
    assert_close(y, ry)


AVG_CASES = [  # (shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    ((2, 3, 8, 8), 2, None, 0, False, True, None),
    ((1, 2, 9, 7), 3, 2, 1, True, True, None),
    ((1, 2, 9, 7), 3, 2, 1, True, False, None),
    ((2, 1, 6, 6), (3, 2), (1, 2), (1, 1), False, True, 5),
    ((2, 7, 7), 3, 2, 1, False, False, None),               # unbatched
]


@pytest.mark.parametrize("case", AVG_CASES, ids=[str(i) for i in range(len(AVG_CASES))])
def test_avg_pool2d_forward_and_backward(sh, case):
    shape, k, s, p, cm, cip, div = case
    x = rnd(*shape)
    y = G.avg_pool2d(x, k, s, p, cm, cip, div)
    ry = ref.avg_pool2d_ref(x, k, s, p, cm, cip, div)
    assert_close(y, ry)
    gy = rnd(*ry.shape, seed=5)
    assert_close(G.avg_pool2d_backward(gy, x, k, s, p, cm, cip, div),
                 ref.avg_pool2d_backward_ref(gy, x, k, s, p, cm, cip, div))


@pytest.mark.parametrize("shape,size", [((2, 3, 7, 7), 3), ((1, 2, 10, 6), (4, 5)),
                                        ((1, 1, 3, 5), (7, 2)), ((2, 4, 5), (None, 2)),
                                        ((1, 2, 6, 6), 1)])
def test_adaptive_avg_pool2d_forward_and_backward(sh, shape, size):
    x = rnd(*shape)
    y = G.adaptive_avg_pool2d(x, size)
    ry = ref.adaptive_avg_pool2d_ref(x, size)
    assert_close(y, ry)
    gy = rnd(*ry.shape, seed=5)
    assert_close(G.adaptive_avg_pool2d_backward(gy, x),
                 ref.adaptive_avg_pool2d_backward_ref(gy, x))


# -------------------------------------------------------------- linear and relu

@pytest.mark.parametrize("xs,out,has_b", [((4, 10), 3, True), ((70, 33), 65, True),
                                          ((2, 3, 17), 5, False), ((1, 1), 1, True)])
def test_linear_forward_and_backward(sh, tile, xs, out, has_b):
    x, w = rnd(*xs), rnd(out, xs[-1], seed=1)
    b = rnd(out, seed=2) if has_b else None
    assert_close(G.linear(x, w, b), ref.linear_ref(x, w, b))
    assert_close(G.linear_relu(x, w, b), ref.relu_ref(ref.linear_ref(x, w, b)))
    gy = rnd(*(xs[:-1] + (out,)), seed=3)
    gx, gw, gb = G.linear_backward(gy, x, w)
    rx, rw, rb = ref.linear_backward_ref(gy, x, w)
    assert_close(gx, rx, what="grad_input")
    assert_close(gw, rw, what="grad_weight")
    assert_close(gb, rb, what="grad_bias")


@pytest.mark.parametrize("mask", [(False, True, True), (True, False, False),
                                  (False, False, True)])
def test_backward_output_mask_skips_the_kernels(sh, mask):
    # A gradient left out is None and launches nothing; the others are as before.
    x, w, b, kw = _conv_args(CONV_CASES[2])
    gy = rnd(*ref.conv2d_ref(x, w, **kw).shape, seed=3)
    before = dict(sh.launches)
    got = G.conv2d_backward(gy, x, w, output_mask=mask, **kw)
    launched = {k for k, v in sh.launches.items() if v > before.get(k, 0)}
    for g, e, need, what in zip(got, ref.conv2d_backward_ref(gy, x, w, **kw), mask,
                                ("grad_input", "grad_weight", "grad_bias")):
        if need:
            assert_close(g, e, what=what)
        else:
            assert g is None, what
    assert any("grad_input" in k for k in launched) == mask[0]
    assert any("grad_weight" in k for k in launched) == mask[1]
    xl, wl, gyl = rnd(4, 9), rnd(5, 9, seed=1), rnd(4, 5, seed=2)
    for g, e, need in zip(G.linear_backward(gyl, xl, wl, output_mask=mask),
                          ref.linear_backward_ref(gyl, xl, wl), mask):
        if need:
            assert_close(g, e)
        else:
            assert g is None


@pytest.mark.parametrize("min_chunk", [16, 40])
def test_linear_split_reduction(sh, tile, monkeypatch, min_chunk):
    # A long reduction over few output blocks is split in fixed chunks,
    # summed in order by gemm_reduce, which also applies bias and ReLU.
    monkeypatch.setattr(G, "GEMM_MIN_CHUNK", min_chunk)
    x, w, b = rnd(6, 200), rnd(5, 200, seed=1), rnd(5, seed=2)
    before = sh.launches["gemm_reduce"]
    assert_close(G.linear(x, w, b), ref.linear_ref(x, w, b))
    assert_close(G.linear_relu(x, w, b), ref.relu_ref(ref.linear_ref(x, w, b)))
    assert sh.launches["gemm_reduce"] == before + 2
    gy = rnd(6, 5, seed=3)
    for a, e in zip(G.linear_backward(gy, x, w), ref.linear_backward_ref(gy, x, w)):
        assert_close(a, e)


def test_relu_forward_backward_and_in_place(sh):
    x = rnd(3, 5, 7)
    x[0, 0, 0] = np.nan
    assert_close(G.relu(x), ref.relu_ref(x))
    gy = rnd(3, 5, 7, seed=4)
    assert_close(G.relu_backward(gy, x), ref.relu_backward_ref(gy, x))
    z = x.copy()
    assert G.relu(z, out=z) is z
    assert_close(z, ref.relu_ref(x))


def test_empty_batches(sh, tile):
    x, w = np.zeros((0, 3, 5, 5), np.float32), rnd(4, 3, 3, 3)
    for a, e in zip((G.conv2d(x, w),) + G.conv2d_backward(np.zeros((0, 4, 3, 3), np.float32), x, w),
                    (cc.conv2d(x, w),) + cc.conv2d_backward(np.zeros((0, 4, 3, 3), np.float32), x, w)):
        assert a.shape == e.shape
        np.testing.assert_array_equal(a, e)  # zero gradients, not garbage
    assert G.max_pool2d(x, 2).shape == (0, 3, 2, 2)
    gx, gw, gb = G.linear_backward(np.zeros((0, 2), np.float32), np.zeros((0, 3), np.float32),
                                   rnd(2, 3))
    assert gx.shape == (0, 3)
    np.testing.assert_array_equal(gw, 0)
    np.testing.assert_array_equal(gb, 0)


# ----------------------------------------------------------------------- errors

def test_gpu_ops_check_arguments(sh):
    x, w = rnd(1, 3, 6, 6), rnd(4, 3, 3, 3)
    with pytest.raises(TypeError, match="input must be float32 on the GPU"):
        G.conv2d(x.astype(np.float64), w)
    with pytest.raises(ValueError, match="channels"):
        G.conv2d(rnd(1, 2, 6, 6), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        G.conv2d(x, w, rnd(3))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        G.conv2d(x, w, algorithm="winograd")
    with pytest.raises(ValueError, match="grad_output must have shape"):
        G.conv2d_backward(rnd(1, 4, 3, 3), x, w)
    with pytest.raises(ValueError, match="weight expects"):
        G.linear(rnd(2, 5), rnd(3, 4))
    with pytest.raises(TypeError, match="stride"):
        G.max_pool2d(x, 2, stride="2")
    with pytest.raises(ValueError):
        G.max_pool2d(x, 7)
    with pytest.raises(ValueError, match="output_size must be positive"):
        G.adaptive_avg_pool2d(x, 0)
    with pytest.raises(ValueError, match="32-bit ints"):
        G.adaptive_avg_pool2d(x, (50000, 50000))  # 7.5e9 outputs: refused, nothing launched


# ------------------------------------------------------ normalisation, loss, optim
# Backward references: the CPU core's gradients, which test_gradcheck.py and
# test_norm_ops.py check by finite differences and against the references.

import convcore as cc  # noqa: E402


@pytest.mark.parametrize("shape,size", [((2, 7, 3, 4), 5), ((3, 4, 5), 2), ((2, 3), 3),
                                        ((1, 9, 2, 2), 1)])
def test_local_response_norm_forward_and_backward(sh, shape, size):
    x = rnd(*shape)
    args = dict(size=size, alpha=0.3, beta=0.75, k=2.0)
    assert_close(G.local_response_norm(x, **args), ref.local_response_norm_ref(x, **args))
    gy = rnd(*shape, seed=4)
    assert_close(G.local_response_norm_backward(gy, x, **args),
                 cc.local_response_norm_backward(gy, x, **args))


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (7, 2), (2, 5, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_training_forward_and_backward(sh, shape, affine):
    x = rnd(*shape) * 3 + 1
    C = shape[1]
    w, b = (rnd(C, seed=1), rnd(C, seed=2)) if affine else (None, None)
    rm, rv = rnd(C, seed=3), np.abs(rnd(C, seed=4)) + 0.5
    grm, grv = rm.copy(), rv.copy()
    y, mean, var = G.batch_norm(x, grm, grv, w, b, training=True, momentum=0.2,
                                return_stats=True)
    ry, rmean, rvar, rrm, rrv = ref.batch_norm_ref(x, rm, rv, w, b, True, 0.2)
    assert_close(y, ry)
    assert_close(mean, rmean, np.float32)
    assert_close(var, rvar, np.float32)
    assert_close(grm, rrm, np.float32, what="running_mean")
    assert_close(grv, rrv, np.float32, what="running_var")
    gy = rnd(*shape, seed=5)
    for a, e in zip(G.batch_norm_backward(gy, x, mean, var, w, training=True),
                    cc.batch_norm_backward(gy, x, mean, var, w, training=True)):
        assert_close(a, e)


def test_batch_norm_eval_forward_and_backward(sh):
    x, C = rnd(3, 4, 2, 2), 4
    w, b = rnd(C, seed=1), rnd(C, seed=2)
    rm, rv = rnd(C, seed=3), np.abs(rnd(C, seed=4)) + 0.5
    y = G.batch_norm(x, rm, rv, w, b, training=False)
    assert_close(y, ref.batch_norm_ref(x, rm, rv, w, b, False)[0])
    gy = rnd(3, 4, 2, 2, seed=5)
    for a, e in zip(G.batch_norm_backward(gy, x, rm, rv, w, training=False),
                    cc.batch_norm_backward(gy, x, rm, rv, w, training=False)):
        assert_close(a, e)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_with_relu(sh, training):
    # relu=True / relu_output: the GPU's result is its batch norm then its ReLU
    x, C = rnd(3, 4, 5, 5), 4
    w, b = rnd(C, seed=1), rnd(C, seed=2)
    rm, rv = rnd(C, seed=3), np.abs(rnd(C, seed=4)) + 0.5
    y, mean, var = G.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training,
                                return_stats=True)
    fused, _, _ = G.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training,
                               return_stats=True, relu=True)
    np.testing.assert_array_equal(fused, G.relu(y))
    gy = rnd(3, 4, 5, 5, seed=5)
    expect = G.batch_norm_backward(G.relu_backward(gy, y), x, mean, var, w, training=training)
    got = G.batch_norm_backward(gy, x, mean, var, w, training=training, relu_output=fused)
    for a, e in zip(got, expect):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("n,classes,smoothing,reduction",
                         [(5, 10, 0.0, "mean"), (3, 300, 0.1, "sum"), (1, 2, 1.0, "mean")])
def test_cross_entropy_forward_and_backward(sh, n, classes, smoothing, reduction):
    z = rnd(n, classes) * 4
    t = np.random.default_rng(n).integers(0, classes, n)
    loss, grad = G.cross_entropy(z, t, smoothing, reduction)
    cpu = cc.nn.CrossEntropyLoss(label_smoothing=smoothing, reduction=reduction)
    expected = cpu(z.astype(np.float64), t)
    assert loss.shape == ()
    assert_close(loss, expected, np.float32)
    assert_close(grad, cpu.backward(), np.float32)


def test_cross_entropy_bad_targets(sh):
    z = rnd(2, 3)
    with pytest.raises(ValueError, match="targets must be in"):
        G.cross_entropy(z, np.array([0, 3]))
    with pytest.raises(ValueError, match="targets must be 2 integer"):
        G.cross_entropy(z, np.array([0.0, 1.0]))


@pytest.mark.parametrize("logits,targets,kwargs,words", [
    ((2, 3), [0, 1], dict(weight=np.ones(3, np.float32)), "weight"),
    ((2, 3), [0, 1], dict(reduction="none"), "reduction='none'"),
    ((2, 3), [0, 2], dict(ignore_index=1), "ignore_index"),       # a class: could occur
    ((2, 3), [0, -100], dict(), "ignore_index"),                  # host targets hold it
    ((2, 3), np.full((2, 3), 1 / 3, np.float32), dict(), "class-probability"),
    ((2, 3, 4), np.zeros((2, 4), np.int64), dict(), r"\(N, classes\)"),
], ids=["weight", "none", "ignore-class", "ignore-held", "probabilities", "3-D"])
def test_cross_entropy_options_the_kernel_lacks_say_so(sh, logits, targets, kwargs, words):
    """The CPU's cross_entropy options the GPU kernel does not have raise
    NotImplementedError naming the option (never a wrong loss)."""
    with pytest.raises(NotImplementedError, match=words):
        G.cross_entropy(rnd(*logits), np.asarray(targets), **kwargs)


def test_cross_entropy_options_are_checked_as_on_the_cpu(sh):
    with pytest.raises(ValueError, match="reduction"):
        G.cross_entropy(rnd(2, 3), np.array([0, 1]), reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        G.cross_entropy(rnd(2, 3), np.array([0, 1]), ignore_index=0.5)
    # an ignore_index that is no class and no target is fine
    loss, _ = G.cross_entropy(rnd(2, 3), np.array([0, 1]), ignore_index=-1)
    assert_close(loss, cc.nn.CrossEntropyLoss()(rnd(2, 3).astype(np.float64),
                                                np.array([0, 1])), np.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_of_an_empty_batch(sh, reduction):
    """The mean of no rows is NaN and their sum 0, as on the CPU and in PyTorch."""
    z, t = rnd(0, 4), np.zeros(0, np.int64)
    loss, grad = G.cross_entropy(z, t, reduction=reduction)
    expected = cc.nn.CrossEntropyLoss(reduction=reduction)(z, t)
    np.testing.assert_array_equal(loss, np.float32(expected))
    assert np.isnan(expected) == (reduction == "mean")
    assert grad.shape == (0, 4)


@pytest.mark.parametrize("kw", [dict(momentum=0.0), dict(momentum=0.9, weight_decay=0.01),
                                dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, dampening=0.3)])
def test_sgd_step_matches_the_cpu_optimizer(sh, kw):
    p_cpu = cc.nn.Parameter(rnd(3, 7))
    data = p_cpu.data.copy()
    buf = np.zeros_like(data)
    opt = cc.optim.SGD([p_cpu], lr=0.1, **kw)
    for step in range(3):
        grad = rnd(3, 7, seed=10 + step)
        p_cpu.grad = grad
        opt.step()
        G.sgd_step(data, grad, buf, 0.1, first=step == 0, **kw)
        assert_close(data, p_cpu.data, what=f"step {step}")


def test_adam_step_matches_the_cpu_optimizer(sh):
    import math
    p_cpu = cc.nn.Parameter(rnd(4, 5))
    data = p_cpu.data.copy()
    m, v = np.zeros_like(data), np.zeros_like(data)
    opt = cc.optim.Adam([p_cpu], lr=0.01, weight_decay=0.1)
    b1, b2 = opt.betas
    for step in range(1, 4):
        grad = rnd(4, 5, seed=20 + step)
        p_cpu.grad = grad
        opt.step()
        G.adam_step(data, grad, m, v, 0.01 / (1 - b1 ** step), b1, b2,
                    math.sqrt(1 - b2 ** step), opt.eps, 0.1)
        assert_close(data, p_cpu.data, what=f"step {step}")


# ------------------------------------------------- random valid arguments
# The same generators as the CPU tests (_helpers.py); expected values from
# the CPU core, which those tests check against the references.

from hypothesis import HealthCheck, given, settings  # noqa: E402

import _helpers as H  # noqa: E402

_property = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@_property
@given(case=H.conv_cases(), tile_shape=H.st.sampled_from(["small", "big"]))
def test_conv2d_random_arguments(backend, request, monkeypatch, case, tile_shape):
    monkeypatch.setattr(G, "TILE", tile_shape)
    backend.current_test = request.node.nodeid
    x, w, b = H.conv_arrays(case, np.random.default_rng(0), np.float32)
    kw = H.conv_kwargs(case)
    y = cc.conv2d(x, w, b, **kw)
    gy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    with G.using_backend(backend):
        assert_close(G.conv2d(x, w, b, **kw), y, what="conv2d")
        for a, e, what in zip(G.conv2d_backward(gy, x, w, **kw), cc.conv2d_backward(gy, x, w, **kw),
                              ("grad_input", "grad_weight", "grad_bias")):
            assert_close(a, e, what=what)


@_property
@given(case=H.pool_cases(max_pool=True))
def test_max_pool2d_random_arguments(backend, request, case):
    backend.current_test = request.node.nodeid
    x = np.random.default_rng(2).standard_normal(H.pool_shape(case)).astype(np.float32)
    kw = H.max_pool_kwargs(case)
    y, idx = cc.max_pool2d(x, return_indices=True, **kw)
    gy = np.random.default_rng(3).standard_normal(y.shape).astype(np.float32)
    with G.using_backend(backend):
        gy_, gidx = G.max_pool2d(x, return_indices=True, **kw)
        assert_close(gy_, y)
        np.testing.assert_array_equal(gidx, idx)
        assert_close(G.max_pool2d_backward(gy, x, **kw), cc.max_pool2d_backward(gy, x, **kw))


@_property
@given(case=H.pool_cases(max_pool=False))
def test_avg_pool2d_random_arguments(backend, request, case):
    backend.current_test = request.node.nodeid
    x = np.random.default_rng(4).standard_normal(H.pool_shape(case)).astype(np.float32)
    kw = H.avg_pool_kwargs(case)
    y = cc.avg_pool2d(x, **kw)
    gy = np.random.default_rng(5).standard_normal(y.shape).astype(np.float32)
    with G.using_backend(backend):
        assert_close(G.avg_pool2d(x, **kw), y)
        assert_close(G.avg_pool2d_backward(gy, x, **kw), cc.avg_pool2d_backward(gy, x, **kw))


@_property
@given(case=H.adaptive_cases())
def test_adaptive_avg_pool2d_random_arguments(backend, request, case):
    backend.current_test = request.node.nodeid
    x = np.random.default_rng(6).standard_normal(H.adaptive_shape(case)).astype(np.float32)
    y = cc.adaptive_avg_pool2d(x, case["output_size"])
    gy = np.random.default_rng(7).standard_normal(y.shape).astype(np.float32)
    with G.using_backend(backend):
        assert_close(G.adaptive_avg_pool2d(x, case["output_size"]), y)
        assert_close(G.adaptive_avg_pool2d_backward(gy, x), cc.adaptive_avg_pool2d_backward(gy, x))


def test_zz_every_kernel_ran_on_the_shim(backend):
    """Runs last (file order): every kernel of the package was exercised."""
    ran = set().union(*backend.tests.values()) if backend.tests else set()
    if len(ran) < 60:
        pytest.skip("only part of this module ran; the coverage check needs all of it")
    every = {name for f in FILES[:-1] for name, _ in shim.kernels(f)}
    missing = sorted(every - set(backend.tests))
    assert not missing, f"kernels never run on the shim: {missing}"
