"""The joins of the eager layers: functional.cat (the core's concatenate):
numpy.concatenate's results for every dim, dtype and stride; functional.add
(residual sums, gradients of a value read twice); large results from the
cache of blocks; clear errors naming the argument."""
import numpy as np
import pytest

import convcore
from convcore import functional as F


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1, -3])
def test_cat_is_numpys_concatenate(dtype, dim):
    rng = np.random.default_rng(0)
    shapes = [[2, 3, 4, 5] for _ in range(3)]
    for i, s in enumerate(shapes):
        s[dim] = i + 1
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    got = F.cat(arrays, dim)
    assert got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, np.concatenate(arrays, axis=dim))


def test_cat_of_strided_and_empty_inputs():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 6, 5, 8)).astype(np.float32)[:, ::2, :, 1::2]  # strided
    b = np.asfortranarray(rng.standard_normal((2, 4, 5, 4)).astype(np.float32))
    c = np.zeros((2, 0, 5, 4), np.float32)
    np.testing.assert_array_equal(F.cat([a, c, b], 1), np.concatenate([a, c, b], axis=1))
    np.testing.assert_array_equal(F.cat([a], 1), a)


def test_a_large_cat_comes_from_the_cache_and_dense_blocks_train():
    x = np.ones((2, 64, 128, 128), np.float32)  # 8.4 MB each, 16.8 MB joined
    y = F.cat([x, 2 * x], 1)
    assert y.shape == (2, 128, 128, 128) and y[:, 64:].min() == 2 and y[:, :64].max() == 1
    convcore.manual_seed(0)
    model = convcore.models.densenet121(num_classes=3, input_size=32)
    out = model(np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32))
    model.backward(np.ones_like(out))  # the concat's backward slices the gradient


def test_cat_errors_name_the_argument():
    a = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"inputs\[1\] has shape \(2, 3, 5\)"):
        F.cat([a, np.zeros((2, 3, 5), np.float32)], 1)
    with pytest.raises(TypeError, match=r"inputs\[1\]"):
        F.cat([a, a.astype(np.float64)], 0)
    with pytest.raises(ValueError, match="dim must be in"):
        F.cat([a, a], 3)
    with pytest.raises(ValueError, match="at least one"):
        F.cat([], 0)
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a numpy.ndarray"):
        F.cat([[1.0, 2.0]], 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        F.cat([np.zeros(3, np.int64)], 0)


def test_add_is_numpys_sum_into_a_cached_block():
    # the core's sum (test_add_and_mul_on_the_cores_threads_equal_numpys)
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
        b = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
        got = F.add(a, b[:, :, :, :])
        np.testing.assert_array_equal(got, a + b)
        assert got.dtype == dtype and not np.shares_memory(got, a)
        np.testing.assert_array_equal(F.add(a[:, ::-1], b), a[:, ::-1] + b)  # strided
    big = np.ones((4, 64, 96, 96), np.float32)  # 9.4 MB: a block of the cache
    convcore.set_scratch_cache_limit(convcore.scratch_cache_limit())
    np.testing.assert_array_equal(F.add(big, big), 2 * big)


@pytest.mark.parametrize("threads", [1, 2])
def test_add_and_mul_on_the_cores_threads_equal_numpys(threads):
    """F.add and F.mul run on the core's threads (in chunks of elements, the
    gate's product plane by plane): the same values as numpy's, bit for bit,
    for one shape, a value per image and channel (either operand first),
    strided inputs and both float dtypes; other broadcasts stay numpy's."""
    rng = np.random.default_rng(5)
    before = convcore.get_num_threads()
    convcore.set_num_threads(threads)
    try:
        for dtype in (np.float32, np.float64):
            for shape in ((2, 96, 56, 56), (3, 40, 7, 7), (1, 1, 3), (5, 33, 1, 1)):
                a = rng.standard_normal(shape).astype(dtype)
                b = rng.standard_normal(shape).astype(dtype)
                s = rng.standard_normal(shape[:2] + (1,) * (len(shape) - 2)).astype(dtype)
                np.testing.assert_array_equal(F.add(a, b), a + b)
                np.testing.assert_array_equal(F.mul(a, b), a * b)
                np.testing.assert_array_equal(F.mul(a, s), a * s)
                np.testing.assert_array_equal(F.mul(s, a), s * a)
                np.testing.assert_array_equal(F.mul(a[:, ::2], s[:, ::2]), a[:, ::2] * s[:, ::2])
                np.testing.assert_array_equal(F.add(a[::-1], b), a[::-1] + b)
                one = s[:1]  # (1, C, 1, ...) against N images: numpy's broadcast
                np.testing.assert_array_equal(F.mul(a, one), a * one)
    finally:
        convcore.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mul_backward_sums_a_gates_gradient_per_plane(threads):
    """F.mul_backward: the gradient of a gate of one value per image and
    channel is each plane's sum of grad_output * input, in one pass on the
    core's threads (summed in double): against float64 numpy within
    float32's rounding at 1, 2 and 3 threads, either operand the gate; the
    full operand's gradient is F.mul's product, bit for bit; other
    shapes (one gate for all images, strided views, equal shapes) keep the
    product summed over the broadcast dimensions."""
    rng = np.random.default_rng(9)
    before = convcore.get_num_threads()
    convcore.set_num_threads(threads)
    try:
        for dtype, tol in ((np.float32, 2e-6), (np.float64, 1e-13)):
            for shape in ((2, 96, 56, 56), (3, 40, 7, 7), (1, 5, 3), (4, 33, 1, 1), (2, 7, 3, 5, 2)):
                x = rng.standard_normal(shape).astype(dtype)
                g = rng.standard_normal(shape).astype(dtype)
                s = rng.standard_normal(shape[:2] + (1,) * (len(shape) - 2)).astype(dtype)
                want_s = (g.astype(np.float64) * x).sum(axis=tuple(range(2, len(shape))),
                                                        keepdims=True)
                gx, gs = F.mul_backward(g, x, s)
                gs2, gx2 = F.mul_backward(g, s, x)
                assert gs.dtype == dtype and gs.shape == s.shape
                np.testing.assert_array_equal(gx, g * s)
                np.testing.assert_array_equal(gx2, gx)
                np.testing.assert_array_equal(gs2, gs)
                scale = max(1.0, np.abs(want_s).max())
                np.testing.assert_allclose(gs, want_s, rtol=0, atol=tol * scale * 10)
                # numpy's route for the shapes the core does not take
                one = s[:1]
                ga, gb = F.mul_backward(g, x, one)
                np.testing.assert_array_equal(ga, g * one)
                np.testing.assert_allclose(gb, (g * x).sum(axis=(0,) + tuple(range(2, len(shape))),
                                                           keepdims=True), rtol=1e-5, atol=1e-4)
                _, gsv = F.mul_backward(g[:, ::2], x[:, ::2], s[:, ::2])
                np.testing.assert_allclose(gsv, (g[:, ::2] * x[:, ::2]).sum(
                    axis=tuple(range(2, len(shape))), keepdims=True), rtol=1e-5, atol=1e-4)
                _, ge2 = F.mul_backward(g, x, s * np.ones_like(x))
                np.testing.assert_array_equal(ge2, g * x)
    finally:
        convcore.set_num_threads(before)


def test_mul_sum_planes_is_the_same_at_any_thread_count_and_checks_its_arguments():
    from convcore import _core
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 50, 9, 11)).astype(np.float32)
    g = rng.standard_normal((3, 50, 9, 11)).astype(np.float32)
    before = convcore.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 5):
            convcore.set_num_threads(threads)
            runs.append(_core.mul_sum_planes(g, x))
    finally:
        convcore.set_num_threads(before)
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])
    with pytest.raises(ValueError, match="other must have shape"):
        _core.mul_sum_planes(g, x[:, :3])
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        _core.mul_sum_planes(g[0, 0], x[0, 0])
    with pytest.raises(TypeError, match="other has dtype float64"):
        _core.mul_sum_planes(g, x.astype(np.float64))


def test_add_and_empty_errors():
    from convcore import _core
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="other must have input's shape"):
        F.add(a, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="dtype float32"):
        F.add(a, a.astype(np.float64))
    with pytest.raises(TypeError, match="other must be a numpy.ndarray"):
        F.add(a, 1.0)
    with pytest.raises(ValueError, match="negative"):
        _core.empty([2, -1], np.dtype(np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        _core.empty([2], np.dtype(np.int32))
