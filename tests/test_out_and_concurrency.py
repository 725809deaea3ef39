"""out= buffers (written in place, checked, never overlapping inputs) and
calls from several Python threads sharing the cores."""
import threading

import numpy as np
import pytest

import convcore

RNG = np.random.default_rng(3)
X = RNG.standard_normal((2, 3, 9, 9)).astype(np.float32)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)


@pytest.mark.parametrize("fn,args,shape", [
    (convcore.conv2d, (X, W), (2, 4, 7, 7)),
    (convcore.max_pool2d, (X, 2), (2, 3, 4, 4)),
    (convcore.avg_pool2d, (X, 3, 2, 1), (2, 3, 5, 5)),
    (convcore.relu, (X,), X.shape),
    (convcore.linear, (X, RNG.standard_normal((5, 9)).astype(np.float32)), (2, 3, 9, 5)),
])
def test_out_is_written_and_returned(fn, args, shape):
    expected = fn(*args)
    out = np.full(shape, np.nan, np.float32)
    assert fn(*args, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_out_checks():
    with pytest.raises(TypeError, match="out"):
        convcore.conv2d(X, W, out=np.empty((2, 4, 7, 7)))          # float64
    with pytest.raises(ValueError, match="out"):
        convcore.conv2d(X, W, out=np.empty((2, 4, 7, 6), np.float32))
    with pytest.raises(ValueError, match="out"):
        convcore.conv2d(X, W, out=np.empty((2, 4, 7, 14), np.float32)[..., ::2])
    frozen = np.empty((2, 4, 7, 7), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        convcore.conv2d(X, W, out=frozen)
    big = np.zeros((2, 3, 9, 9), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        convcore.max_pool2d(big, 1, out=big)
    with pytest.raises(TypeError, match="out"):
        convcore.relu(X, out=[0.0])


def test_relu_in_place():
    z = X.copy()
    assert convcore.relu(z, out=z) is z
    np.testing.assert_array_equal(z, np.maximum(X, 0))


def test_concurrent_calls_share_threads_and_agree():
    """Four Python threads calling at once (the GIL is released) get the same
    bits as one call alone."""
    x = RNG.standard_normal((4, 16, 20, 20)).astype(np.float32)
    w = RNG.standard_normal((32, 16, 3, 3)).astype(np.float32)
    expected = convcore.conv2d(x, w, padding=1)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(convcore.conv2d(x, w, padding=1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 20
    for r in results:
        np.testing.assert_array_equal(r, expected)
