"""The core's cache of blocks (csrc/cpu/scratch.h): scratch memory and the
arrays the bindings return (256 KB and more) are kept when freed and handed
to the next call that needs about as much. What must hold: a block is never
handed out while any array or view still uses it, results are the same with
the cache on or off, and the limit bounds what is kept."""
import gc
import os

import numpy as np
import pytest

import convcore

BIG = (4, 64, 96, 96)  # 9.4 MB of float32: a large block, in 2 MB pages


@pytest.fixture
def cache_limit():
    before = convcore.scratch_cache_limit()
    yield
    convcore.set_scratch_cache_limit(before)


def test_limit_defaults_and_validation(cache_limit):
    # an eighth of the physical memory (what sysconf says), within [256 MB, 4 GB]
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert convcore.scratch_cache_limit() == min(max(memory // 8, 256 << 20), 4 << 30)
    convcore.set_scratch_cache_limit(12 << 20)
    assert convcore.scratch_cache_limit() == 12 << 20
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        convcore.set_scratch_cache_limit(-1)
    with pytest.raises(TypeError, match="nbytes"):
        convcore.set_scratch_cache_limit(1.5)


def test_a_freed_output_is_reused_and_the_limit_bounds_what_is_kept(cache_limit):
    convcore.set_scratch_cache_limit(0)  # starts empty
    assert convcore.scratch_cache_bytes() == 0
    convcore.set_scratch_cache_limit(256 << 20)
    x = np.random.default_rng(0).standard_normal(BIG).astype(np.float32)
    y = convcore.relu(x)
    address = y.__array_interface__["data"][0]
    del y
    gc.collect()
    block = -(-x.nbytes // (2 << 20)) * (2 << 20)  # whole 2 MB pages
    assert convcore.scratch_cache_bytes() == block
    y = convcore.relu(x)  # the same size: the block kept
    assert y.__array_interface__["data"][0] == address
    assert convcore.scratch_cache_bytes() == 0  # taken
    del y
    gc.collect()
    convcore.set_scratch_cache_limit(0)  # frees what is kept
    assert convcore.scratch_cache_bytes() == 0
    y = convcore.relu(x)
    del y
    gc.collect()
    assert convcore.scratch_cache_bytes() == 0  # limit 0: nothing kept


@pytest.mark.parametrize("shape, kept", [((1, 64, 40, 40), True),    # 400 KB: kept
                                          ((1, 16, 40, 40), False)])  # 100 KB: malloc's
def test_mid_size_blocks_are_kept_in_whole_pages(cache_limit, shape, kept):
    convcore.set_scratch_cache_limit(0)
    convcore.set_scratch_cache_limit(256 << 20)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    y = convcore.relu(x)
    address = y.__array_interface__["data"][0]
    del y
    gc.collect()
    assert convcore.scratch_cache_bytes() == (-(-x.nbytes // 4096) * 4096 if kept else 0)
    if kept:
        y = convcore.relu(x)
        assert y.__array_interface__["data"][0] == address
        np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_mid_size_workspaces_are_kept_in_huge_pages(cache_limit):
    # a workspace of 256 KB and more is 2 MB aligned and in whole 2 MB pages
    # (4 KB pages let the kernel crowd a few L2 sets); arrays are not (above)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 512, 14, 14)).astype(np.float32)
    w = rng.standard_normal((512, 512, 3, 3)).astype(np.float32) * 0.05

    def conv():  # the padded frame alone is 460 KB, whatever the ISA's panels
        return convcore.conv2d(x, w, None, stride=2, padding=1, algorithm="direct")

    def kept_after_calls():
        gc.collect()  # no earlier test's array freed into the cache meanwhile
        convcore.set_scratch_cache_limit(0)
        convcore.set_scratch_cache_limit(256 << 20)
        y = conv()
        assert y.nbytes < 256 << 10  # malloc's: only the workspaces are kept
        kept = convcore.scratch_cache_bytes()
        np.testing.assert_array_equal(conv(), y)
        return kept, convcore.scratch_cache_bytes()  # the same blocks again

    # another thread of an earlier test may free an array into the cache
    # meanwhile: one clean try of three suffices
    tries = [kept_after_calls() for _ in range(3)]
    assert any(k > 0 and k % (2 << 20) == 0 and again == k for k, again in tries), tries


def test_live_arrays_and_views_keep_their_block(cache_limit):
    """A caller that keeps outputs (or a view of one) across calls of the
    same shapes gets correct results: a block is reused only when every
    array using it is gone."""
    rng = np.random.default_rng(1)
    x1 = rng.standard_normal(BIG).astype(np.float32)
    x2 = rng.standard_normal(BIG).astype(np.float32)
    kept = convcore.relu(x1)
    view = convcore.relu(x2)[1:, ::2]  # the array itself is dropped, the view lives
    gc.collect()
    for _ in range(3):
        a = convcore.relu(-x1)
        b = convcore.relu(-x2)
        assert not np.shares_memory(a, kept) and not np.shares_memory(a, view)
        assert not np.shares_memory(b, kept) and not np.shares_memory(b, view)
        del a, b
        gc.collect()
    np.testing.assert_array_equal(kept, np.maximum(x1, 0))
    np.testing.assert_array_equal(view, np.maximum(x2, 0)[1:, ::2])


def test_results_are_the_same_with_the_cache_on_and_off(cache_limit):
    """conv2d and its backward at a size whose scratch and outputs go
    through the cache, repeated, against the same calls with the cache off."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 64, 112, 112)).astype(np.float32)
    w = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)
    gy = rng.standard_normal((2, 64, 112, 112)).astype(np.float32)

    def run():
        y = convcore.conv2d(x, w, padding=1)
        return [y, *convcore.conv2d_backward(gy, x, w, padding=1)]

    convcore.set_scratch_cache_limit(0)
    off = run()
    convcore.set_scratch_cache_limit(256 << 20)
    for _ in range(3):
        on = run()
        for a, b in zip(on, off):
            np.testing.assert_array_equal(a, b)
        del on
        gc.collect()
    assert convcore.scratch_cache_bytes() > 0


def test_pool_indices_and_float64_outputs_use_the_cache(cache_limit):
    convcore.set_scratch_cache_limit(256 << 20)
    x = np.random.default_rng(3).standard_normal((4, 64, 128, 128))
    y, idx = convcore.max_pool2d(x.astype(np.float32), 2, return_indices=True)  # 8.4 MB of int64
    y64 = convcore.relu(x)  # 33.5 MB of float64
    assert idx.dtype == np.int64 and y64.dtype == np.float64
    np.testing.assert_array_equal(y64, np.maximum(x, 0))
    expected = x.astype(np.float32).reshape(4, 64, 64, 2, 64, 2).max(axis=(3, 5))
    np.testing.assert_array_equal(y, expected)
    before = convcore.scratch_cache_bytes()
    del y, idx, y64
    gc.collect()
    assert convcore.scratch_cache_bytes() >= before + 8 * 4 * 64 * 64 * 64 + x.nbytes


def test_a_gate_product_and_its_gradients_use_the_cache(cache_limit):
    # a squeeze-and-excitation gate: x * s with s (N, C, 1, 1), forward and
    # backward (Graph's mul), into blocks of the cache, equal to numpy's
    convcore.set_scratch_cache_limit(256 << 20)
    from convcore import functional as F
    from convcore.nn import Graph, Sigmoid
    rng = np.random.default_rng(4)
    x = rng.standard_normal(BIG).astype(np.float32)
    s = rng.standard_normal(BIG[:2] + (1, 1)).astype(np.float32)
    np.testing.assert_array_equal(F.mul(x, s), x * s)
    np.testing.assert_array_equal(F.mul(s, x), s * x)
    small = F.mul(s, s)  # the shape of both, under the cache's smallest block
    np.testing.assert_array_equal(small, s * s)
    with pytest.raises(ValueError):
        F.mul(x, s[:, :3])
    np.testing.assert_array_equal(F.mul(x.astype(np.float16), s.astype(np.float16)),
                                  x.astype(np.float16) * s.astype(np.float16))  # numpy's
    gate = Graph({"sig": Sigmoid()}, ["s = sig(x)", "y = mul(x, s)"])
    y = gate(x)
    g = rng.standard_normal(BIG).astype(np.float32)
    gx = gate.backward(g)
    sig = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(y, x * sig, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gx, g * sig + g * x * sig * (1 - sig), rtol=1e-4, atol=1e-5)
    before = convcore.scratch_cache_bytes()
    del y, gx
    gc.collect()
    assert convcore.scratch_cache_bytes() > before  # the product and a gradient were blocks
