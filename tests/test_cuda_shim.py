"""The GPU kernels' logic, checked on the CPU: every .cu kernel is built as
C++ against tests/cuda_shim (thread blocks as fibers, real barriers) and
driven through convcore.cuda.functional, the same Python launch code the
GPU runs, with numpy arrays. The ops' results against the naive references
are test_ops.py's, on every backend (the shim among them); here: the shim
itself, and what is particular to the GPU backend (kernel choices,
launches, fused epilogues, its errors, its optimiser steps), against the
references or the CPU core. The per-kernel test counts are printed in the
terminal summary."""
import os

import numpy as np
import pytest

import reference as ref
from _helpers import assert_close

from cuda_shim import shim

pytestmark = pytest.mark.skipif(shim.find_compiler() is None,
                                reason="g++ not found: the CUDA-execution shim needs it")

import convcore.cuda.functional as G  # noqa: E402  (importing it needs no cupy)

from _backends_fixture import shim_backend, shim_files  # noqa: E402
from test_ops import CONV_CASES  # noqa: E402  (the convolutions test_ops.py checks)

FILES = shim_files()


@pytest.fixture(scope="session")
def backend(tmp_path_factory):
    return shim_backend(tmp_path_factory)


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



def _conv_args(case):
    xs, ws, s, p, d, g, has_b = case
    x, w = rnd(*xs), rnd(*ws, seed=1)
    b = rnd(ws[0], seed=2) if has_b else None
    return x, w, b, dict(stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize("case", CONV_CASES[:2] + CONV_CASES[6:7], ids=["gemm0", "gemm1", "dw"])
def test_conv2d_relu_fused(sh, tile, case):
    x, w, b, kw = _conv_args(case)
    assert_close(G.conv2d_relu(x, w, b, **kw), ref.relu_ref(ref.conv2d_ref(x, w, b, **kw)))


def test_conv2d_gemm_on_a_depthwise_shape(sh):
    x, w, b, kw = _conv_args(CONV_CASES[6])
    assert_close(G.conv2d(x, w, b, algorithm="gemm", **kw), ref.conv2d_ref(x, w, b, **kw))


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


# -------------------------------------------------------------- linear and relu

@pytest.mark.parametrize("xs,out,has_b", [((4, 10), 3, True), ((70, 33), 65, True),
                                          ((2, 3, 17), 5, False), ((1, 1), 1, True)])
def test_linear_relu_fused(sh, tile, xs, out, has_b):
    x, w = rnd(*xs), rnd(out, xs[-1], seed=1)
    b = rnd(out, seed=2) if has_b else None
    assert_close(G.linear_relu(x, w, b), ref.relu_ref(ref.linear_ref(x, w, b)))


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


