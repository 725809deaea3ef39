"""linear / relu (+ backward) against the numpy reference: random arguments,
memory layouts and the CPU's kernel paths (fixed cases on every backend:
test_ops.py)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import convcore
import reference as ref
from _helpers import (DTYPES, check_output, dtypes, layouts, randn, seeds,
                      with_layout)

lead_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@given(lead=lead_shapes, fin=st.integers(1, 9), fout=st.integers(1, 7),
       bias=st.booleans(), dtype=dtypes, seed=seeds, xl=layouts, wl=layouts)
def test_linear_matches_reference(lead, fin, fout, bias, dtype, seed, xl, wl):
    rng = np.random.default_rng(seed)
    x = randn(rng, lead + (fin,), dtype)
    w = randn(rng, (fout, fin), dtype)
    b = randn(rng, (fout,), dtype) if bias else None
    exp = ref.linear_ref(x, w, b)
    assert exp.shape == lead + (fout,)
    out = convcore.linear(with_layout(x, xl), with_layout(w, wl),
                          None if b is None else with_layout(b, "neg"))
    check_output(out, exp, dtype, "linear")


@given(lead=lead_shapes, fin=st.integers(1, 9), fout=st.integers(1, 7),
       dtype=dtypes, seed=seeds, xl=layouts, gl=layouts)
def test_linear_backward_matches_reference(lead, fin, fout, dtype, seed, xl,
                                           gl):
    rng = np.random.default_rng(seed)
    x = randn(rng, lead + (fin,), dtype)
    w = randn(rng, (fout, fin), dtype)
    gy = randn(rng, lead + (fout,), dtype)
    egx, egw, egb = ref.linear_backward_ref(gy, x, w)
    gx, gw, gb = convcore.linear_backward(with_layout(gy, gl),
                                          with_layout(x, xl), w)
    check_output(gx, egx, dtype, "grad_input")
    check_output(gw, egw, dtype, "grad_weight")
    check_output(gb, egb, dtype, "grad_bias")
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (fout,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_on_flattened_conv_features(dtype):
    """The usual CNN head: conv features (N, C, H, W) flattened to (N, CHW)."""
    rng = np.random.default_rng(1)
    feat = randn(rng, (2, 4, 3, 3), dtype)
    flat = feat.reshape(2, -1)
    w = randn(rng, (10, 36), dtype)
    b = randn(rng, (10,), dtype)
    check_output(convcore.linear(flat, w, b), ref.linear_ref(flat, w, b),
                 dtype)
    # a transposed (non-contiguous) weight, as when tying weights
    wt = randn(rng, (36, 10), dtype).T
    check_output(convcore.linear(flat, wt), ref.linear_ref(flat, wt), dtype)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=5).map(tuple),
       dtype=dtypes, seed=seeds, xl=layouts)
def test_relu_matches_reference(shape, dtype, seed, xl):
    rng = np.random.default_rng(seed)
    x = randn(rng, shape, dtype)
    out = convcore.relu(with_layout(x, xl))
    check_output(out, ref.relu_ref(x), dtype, "relu", rtol=0)
    assert out.shape == x.shape


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=5).map(tuple),
       dtype=dtypes, seed=seeds, xl=layouts, gl=layouts)
def test_relu_backward_matches_reference(shape, dtype, seed, xl, gl):
    rng = np.random.default_rng(seed)
    x = randn(rng, shape, dtype)
    gy = randn(rng, shape, dtype)
    got = convcore.relu_backward(with_layout(gy, gl), with_layout(x, xl))
    check_output(got, ref.relu_backward_ref(gy, x), dtype, "relu_backward",
                 rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_special_values(dtype):
    x = np.array([-np.inf, -1.0, -0.0, 0.0, 1e-30, 2.0, np.inf], dtype)
    out = convcore.relu(x)
    np.testing.assert_array_equal(out, [0, 0, 0, 0, dtype(1e-30), 2, np.inf])
    g = convcore.relu_backward(np.full(x.shape, 3.0, dtype), x)
    # gradient passes only where input > 0 (so not at 0 itself)
    np.testing.assert_array_equal(g, [0, 0, 0, 0, 3, 3, 3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_nan_propagates(dtype):
    """torch.relu(nan) is nan."""
    x = np.array([np.nan, -1.0, 1.0], dtype)
    out = convcore.relu(x)
    assert np.isnan(out[0]) and out[1] == 0 and out[2] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_noncontiguous_not_inplace(dtype):
    rng = np.random.default_rng(3)
    x = randn(rng, (2, 3, 4, 5), dtype)[:, :, ::-1, ::2]
    out = convcore.relu(x)
    check_output(out, ref.relu_ref(np.ascontiguousarray(x)), dtype, rtol=0)
    assert not np.shares_memory(out, x)
    # relu doesn't modify its input in place
    assert (x < 0).any()


def test_relu_nan_follows_pytorch():
    """relu keeps NaN; its backward zeroes only where input <= 0, so a NaN
    input passes the gradient through, as torch's threshold_backward."""
    x = np.array([np.nan, -1.0, 0.0, 2.0])
    assert np.isnan(convcore.relu(x)[0])
    g = convcore.relu_backward(np.full(4, 3.0), x)
    np.testing.assert_array_equal(g, [3.0, 0.0, 0.0, 3.0])


# Batches up to 32 rows take the streaming kernels (vectors along in_features,
# register tiles of 4 x 5 / 6 x 3 (AVX2: 2 x 5 / 6 x 2) with edge tiles,
# in_features chunks of 2048; grad_input in bands of column blocks per task
# and slabs of out_features rows, its last block in whole vectors then a
# scalar edge of fewer than a vector: in_features 47, 2049 and 4100 reach
# both; grad_weight from a copy of the input whose rows are an odd number of
# cache lines apart, 4096 in_features being rows of 16 KB); these shapes
# reach every edge of them, and 33 rows the GEMM path.
@pytest.mark.parametrize("m,k,n", [(1, 100, 7), (3, 15, 4), (4, 2049, 13), (6, 47, 5),
                                   (7, 48, 6), (16, 4100, 1030), (16, 4096, 37),
                                   (17, 96, 11), (32, 4145, 521), (33, 50, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_linear_small_batch_paths(m, k, n, dtype, layout):
    rng = np.random.default_rng(m * 1000 + k)
    x = randn(rng, (m, k), dtype)
    w = randn(rng, (n, k), dtype)
    b = randn(rng, (n,), dtype)
    gy = randn(rng, (m, n), dtype)
    if layout == "strided":   # every other row and column of bigger arrays
        x = np.repeat(np.repeat(x, 2, 0), 2, 1)[::2, ::2]
        gy = np.repeat(gy, 2, 1)[:, ::2]
    check_output(convcore.linear(x, w, b), ref.linear_ref(x, w, b), dtype, "linear")
    egx, egw, egb = ref.linear_backward_ref(gy, x, w)
    gx, gw, gb = convcore.linear_backward(gy, x, w)
    check_output(gx, egx, dtype, "grad_input")
    check_output(gw, egw, dtype, "grad_weight")
    check_output(gb, egb, dtype, "grad_bias")


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_small_batch_inf_anywhere_in_a_row(m, dtype):
    """The last, partial vector of a row is loaded ending at the row's end,
    its lanes that the whole vectors summed already cleared by their bits:
    an inf there must give inf, where clearing by a product with zeros gives
    NaN. Every position of rows of 12, 20 and 28 (one vector and a tail,
    or under one vector, at every lane width)."""
    for k in (12, 20, 28):
        w = np.ones((3, k), dtype)
        for p in range(k):
            x = np.ones((m, k), dtype)
            x[:, p] = np.inf
            np.testing.assert_array_equal(convcore.linear(x, w), np.full((m, 3), np.inf, dtype),
                                          err_msg=f"in_features {k}, inf at {p}")


@pytest.mark.parametrize("m,k,n", [(0, 5, 3), (2, 0, 3), (2, 5, 0), (0, 0, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_empty_dimensions(m, k, n, dtype):
    """Sums over nothing are zeros (plus the bias), whatever path the batch takes."""
    x, w, b = np.ones((m, k), dtype), np.ones((n, k), dtype), np.full(n, 2.0, dtype)
    gy = np.ones((m, n), dtype)
    np.testing.assert_array_equal(convcore.linear(x, w, b), np.full((m, n), 2.0, dtype))
    gx, gw, gb = convcore.linear_backward(gy, x, w)
    np.testing.assert_array_equal(gx, np.full((m, k), float(n), dtype))
    np.testing.assert_array_equal(gw, np.full((n, k), float(m), dtype))
    np.testing.assert_array_equal(gb, np.full(n, float(m), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_large_batch_gemm_slabs(dtype):
    """48+ rows take the GEMM in the BLIS order: slabs of 256 rows of B and
    at most 4096 columns packed once by all threads, row blocks of C per
    thread. 97 rows (ragged row blocks), in_features 600 (three slabs, the
    last short) and out_features 4100 (two column slabs); grad_weight is a
    GEMM of 4100 rows, grad_input one of 97. Against float64, and the same
    bits at 1, 2 and 3 threads."""
    rng = np.random.default_rng(97)
    x = randn(rng, (97, 600), dtype)
    w = randn(rng, (4100, 600), dtype)
    gy = randn(rng, (97, 4100), dtype)
    expect = ref.linear_ref(x, w)
    egx, egw, _ = ref.linear_backward_ref(gy, x, w)
    before = convcore.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            convcore.set_num_threads(threads)
            runs.append((convcore.linear(x, w),) + convcore.linear_backward(gy, x, w)[:2])
    finally:
        convcore.set_num_threads(before)
    check_output(runs[0][0], expect, dtype, "linear")
    check_output(runs[0][1], egx, dtype, "grad_input")
    check_output(runs[0][2], egw, dtype, "grad_weight")
    for other in runs[1:]:
        for got, first in zip(other, runs[0]):
            np.testing.assert_array_equal(got, first)


@pytest.mark.parametrize("m,k,n", [(50, 601, 70), (61, 3, 33), (48, 130, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sliced", [False, True])
def test_linear_gemm_transposing_packs(m, k, n, dtype, sliced):
    """The GEMM packs x (rows contiguous) and weight (read as its transpose)
    by transposing copies: 4 x 4 register blocks (float32), scalar edges of
    rows and columns, 64 columns at a time. Ragged panels (50 and 61 rows:
    last A panels of 2 and 1 rows; 70, 33 and 5 columns: last B panels of 6,
    1 and 5), K tails of 89 and of 3 (no whole block), and, sliced, operands
    that are column slices of wider arrays (row stride != K)."""
    rng = np.random.default_rng(m + k + n)
    x = randn(rng, (m, k + 5), dtype)
    w = randn(rng, (n, k + 3), dtype)
    x, w = (x[:, 2:2 + k], w[:, 1:1 + k]) if sliced else (x[:, :k].copy(), w[:, :k].copy())
    check_output(convcore.linear(x, w), ref.linear_ref(x, w), dtype, "linear")
    gy = randn(rng, (m, n), dtype)
    egx, _, _ = ref.linear_backward_ref(gy, x, w)
    check_output(convcore.linear_backward(gy, x, w)[0], egx, dtype, "grad_input")


@pytest.mark.parametrize("m,k,n", [(16, 4096, 100), (6, 300, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_small_batch_same_bits_any_thread_count(m, k, n, dtype):
    """The small-batch grad_input goes down the weight in slabs of rows,
    adding each slab's partial sums into the result: the slab height sets
    the order of every sum, so it must not follow the thread count (it did,
    through the width of a thread's band of columns: 16 rows at 1 thread,
    32 at 2). 4096 in_features and 100 out_features: several slabs. 300
    in_features: a last column block narrower than a vector, whose edge
    must not write the columns of the block before it, another task's (a
    vector ending at the row's end did, and raced with that task)."""
    rng = np.random.default_rng(k)
    x = randn(rng, (m, k), dtype)
    w = randn(rng, (n, k), dtype)
    gy = randn(rng, (m, n), dtype)
    before = convcore.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            convcore.set_num_threads(threads)
            runs.append((convcore.linear(x, w),) + convcore.linear_backward(gy, x, w))
    finally:
        convcore.set_num_threads(before)
    egx, _, _ = ref.linear_backward_ref(gy, x, w)
    check_output(runs[0][1], egx, dtype, "grad_input")
    for other in runs[1:]:
        for got, first in zip(other, runs[0]):
            np.testing.assert_array_equal(got, first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fin", [512, 1024, 2048, 1040])
@pytest.mark.parametrize("fout", [1000, 40, 7])
def test_linear_one_row_with_weight_rows_4kb_apart(dtype, fin, fout):
    """One row of input against weight rows a multiple of 4 KB apart runs
    its weight rows in staggered groups (dot_tile in linear.cpp): the same
    sums, bit for bit, as that row in a batch of two (whose tiles do not
    stagger), and the reference's values."""
    rng = np.random.default_rng(fin + fout)
    x = randn(rng, (2, fin), dtype)
    w = randn(rng, (fout, fin), dtype)
    b = randn(rng, (fout,), dtype)
    one = convcore.linear(x[:1], w, b)
    np.testing.assert_array_equal(one, convcore.linear(x, w, b)[:1])
    check_output(one, ref.linear_ref(x[:1], w, b), dtype, "linear")
