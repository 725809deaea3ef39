"""max_pool2d_backward from the forward's indices (the layer's training
path) against the reference, and its refusal of indices that do not fit."""
import numpy as np
import pytest
from hypothesis import given

import convcore
import reference as ref
from _helpers import (assert_close, distinct_values, dtypes, max_pool_kwargs, pool_cases,
                      pool_shape, seeds)


@given(case=pool_cases(max_pool=True), seed=seeds, dtype=dtypes)
def test_backward_from_indices_matches_reference(case, seed, dtype):
    rng = np.random.default_rng(seed)
    x = distinct_values(rng, pool_shape(case), dtype)
    kw = max_pool_kwargs(case)
    y, idx = convcore.max_pool2d(x, return_indices=True, **kw)
    gy = rng.standard_normal(y.shape).astype(dtype)
    expect = ref.max_pool2d_backward_ref(gy, x, **kw)
    assert_close(convcore.max_pool2d_backward(gy, x, indices=idx, **kw), expect, dtype)
    assert_close(convcore.max_pool2d_backward(gy, x, **kw), expect, dtype)


def test_indices_out_of_the_plane_are_refused():
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    y, idx = convcore.max_pool2d(x, 2, return_indices=True)
    gy = np.ones_like(y)
    for bad in (idx + 36, idx - 100):
        with pytest.raises(ValueError, match="indices"):
            convcore.max_pool2d_backward(gy, x, 2, indices=bad)
    with pytest.raises(TypeError, match="indices"):
        convcore.max_pool2d_backward(gy, x, 2, indices=idx.astype(np.int32))
    with pytest.raises(ValueError, match="indices"):
        convcore.max_pool2d_backward(gy, x, 2, indices=idx[:, :1])


def test_maxpool_layer_trains_through_indices():
    """The layer keeps indices in training and searches again in eval; both
    give the same gradient."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 9, 9))
    layer = convcore.nn.MaxPool2d(3, stride=2, padding=1)
    gy = rng.standard_normal(layer(x).shape)
    g_train = layer.backward(gy)
    layer.eval()
    layer(x)
    np.testing.assert_array_equal(layer.backward(gy), g_train)
