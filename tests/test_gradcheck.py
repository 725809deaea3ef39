"""Finite-difference gradient checks (float64, central differences).

For every op we use the scalar loss ``L = sum(op(inputs) * R)`` with a fixed
random projection ``R``; then ``grad_output = R`` and a single backward call
gives dL/d(every input), which we compare with ``(L(p + eps) - L(p - eps)) /
(2 eps)`` for every element ``p`` of every differentiable argument.  Only
convcore itself is used here (no reference), so this checks that each
backward is consistent with its own forward.
"""

import numpy as np
import pytest
from hypothesis import given, settings

import convcore
from _helpers import numerical_grad
from _helpers import assert_close, conv_arrays, conv_cases, conv_kwargs, seeds

EPS = 1e-6  # the finite-difference step of numerical_grad (tests/_helpers.py)
RTOL = 1e-6     # scaled: |num - ana| <= RTOL * max(1, max|ana|)




def projection(rng, shape):
    return rng.standard_normal(shape)


# ---------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------

CONV_CASES = [
    # x shape, w shape, kwargs
    ((2, 3, 5, 6), (4, 3, 3, 3), dict(stride=1, padding=1)),
    ((1, 2, 7, 6), (3, 2, 2, 3), dict(stride=(2, 1), padding=(0, 2),
                                      dilation=(1, 2))),
    ((1, 4, 6, 5), (6, 2, 2, 3), dict(stride=2, padding=1, dilation=2,
                                      groups=2)),
    ((2, 3, 5, 5), (6, 1, 3, 3), dict(padding="same", groups=3)),
    ((1, 2, 5, 4), (3, 2, 2, 4), dict(padding="same", dilation=(2, 1))),
    ((2, 2, 7, 7), (2, 2, 3, 2), dict(padding="valid", stride=3)),
    ((3, 5, 5), (2, 3, 3, 3), dict(padding=(2, 0), stride=(1, 2))),     # unbatched
    ((1, 2, 2, 3), (2, 2, 4, 3), dict(padding=1)),  # kernel == padded input
]


def _conv_gradcheck(x, w, b, kw, rng):
    R = projection(rng, convcore.conv2d(x, w, b, **kw).shape)

    def loss():
        return float((convcore.conv2d(x, w, b, **kw) * R).sum())

    gx, gw, gb = convcore.conv2d_backward(R, x, w, **kw)
    assert_close(gx, numerical_grad(loss, x), rtol=RTOL, what="grad_input")
    assert_close(gw, numerical_grad(loss, w), rtol=RTOL, what="grad_weight")
    assert_close(gb, numerical_grad(loss, b), rtol=RTOL, what="grad_bias")


@pytest.mark.parametrize("xs,ws,kw", CONV_CASES)
def test_conv2d_gradcheck(xs, ws, kw):
    rng = np.random.default_rng(abs(hash((xs, ws))) % 2**32)
    x = rng.standard_normal(xs)
    w = rng.standard_normal(ws)
    b = rng.standard_normal(ws[0])
    _conv_gradcheck(x, w, b, kw, rng)


@settings(max_examples=15)
@given(case=conv_cases(max_extra=3), seed=seeds)
def test_conv2d_gradcheck_random(case, seed):
    rng = np.random.default_rng(seed)
    x, w, _ = conv_arrays(case, rng, np.float64)
    b = rng.standard_normal(w.shape[0])
    _conv_gradcheck(x, w, b, conv_kwargs(case), rng)


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------

MAX_POOL_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1)),
    dict(kernel_size=(3, 2), stride=(2, 3), padding=(0, 1), dilation=2,
         ceil_mode=True),
    dict(kernel_size=3, stride=1, padding=1),        # overlapping windows
]


@pytest.mark.parametrize("kw", MAX_POOL_CASES)
@pytest.mark.parametrize("shape", [(2, 2, 7, 6), (3, 5, 5)])
def test_max_pool2d_gradcheck(kw, shape):
    rng = np.random.default_rng(0)
    # distinct values, far apart compared with EPS: the argmax is unique and
    # stays put under perturbation
    n = int(np.prod(shape))
    x = (rng.permutation(n) * 0.01).reshape(shape).astype(np.float64)
    R = projection(rng, convcore.max_pool2d(x, **kw).shape)

    def loss():
        return float((convcore.max_pool2d(x, **kw) * R).sum())

    g = convcore.max_pool2d_backward(R, x, **kw)
    assert_close(g, numerical_grad(loss, x), rtol=RTOL, what="max_pool2d")


AVG_POOL_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
         count_include_pad=False),
    dict(kernel_size=(2, 3), stride=(3, 1), padding=(1, 0), ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, divisor_override=5),
    dict(kernel_size=(3, 2), stride=1, padding=(1, 1), divisor_override=-2,
         count_include_pad=False),
]


@pytest.mark.parametrize("kw", AVG_POOL_CASES)
@pytest.mark.parametrize("shape", [(2, 2, 7, 6), (3, 5, 5)])
def test_avg_pool2d_gradcheck(kw, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    R = projection(rng, convcore.avg_pool2d(x, **kw).shape)

    def loss():
        return float((convcore.avg_pool2d(x, **kw) * R).sum())

    g = convcore.avg_pool2d_backward(R, x, **kw)
    assert_close(g, numerical_grad(loss, x), rtol=RTOL, what="avg_pool2d")


@pytest.mark.parametrize("shape,output_size", [
    ((2, 2, 5, 7), (3, 4)),
    ((1, 3, 4, 4), (6, 5)),       # upsampling: overlapping windows
    ((2, 1, 6, 5), (None, 2)),
    ((3, 7, 3), 2),               # unbatched
    ((1, 2, 5, 5), 1),            # global
])
def test_adaptive_avg_pool2d_gradcheck(shape, output_size):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    R = projection(rng, convcore.adaptive_avg_pool2d(x, output_size).shape)

    def loss():
        return float((convcore.adaptive_avg_pool2d(x, output_size) * R).sum())

    g = convcore.adaptive_avg_pool2d_backward(R, x)
    assert_close(g, numerical_grad(loss, x), rtol=RTOL,
                 what="adaptive_avg_pool2d")


# ---------------------------------------------------------------------------
# linear / relu
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(), (4,), (2, 3)])
def test_linear_gradcheck(lead):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(lead + (5,))
    w = rng.standard_normal((4, 5))
    b = rng.standard_normal(4)
    R = projection(rng, lead + (4,))

    def loss():
        return float((convcore.linear(x, w, b) * R).sum())

    gx, gw, gb = convcore.linear_backward(R, x, w)
    assert_close(gx, numerical_grad(loss, x), rtol=RTOL, what="grad_input")
    assert_close(gw, numerical_grad(loss, w), rtol=RTOL, what="grad_weight")
    assert_close(gb, numerical_grad(loss, b), rtol=RTOL, what="grad_bias")


def test_relu_gradcheck():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5))
    x = np.where(np.abs(x) < 0.1, np.sign(x) * 0.1 + x, x)   # away from 0
    x[x == 0] = 0.5
    R = projection(rng, x.shape)

    def loss():
        return float((convcore.relu(x) * R).sum())

    g = convcore.relu_backward(R, x)
    assert_close(g, numerical_grad(loss, x), rtol=RTOL, what="relu")


def test_small_cnn_chain_gradcheck():
    """conv -> relu -> max_pool -> linear, backpropagated by hand through
    the convcore backward ops, against finite differences of the whole net
    w.r.t. the first conv's weight."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 6, 6))
    w1 = rng.standard_normal((3, 2, 3, 3))
    b1 = rng.standard_normal(3)
    w2 = rng.standard_normal((4, 3 * 3 * 3))
    b2 = rng.standard_normal(4)
    R = rng.standard_normal((2, 4))

    def forward():
        h = convcore.conv2d(x, w1, b1, padding=1)
        a = convcore.relu(h)
        p = convcore.max_pool2d(a, 2)
        return h, a, p, convcore.linear(p.reshape(2, -1), w2, b2)

    def loss():
        return float((forward()[3] * R).sum())

    h, a, p, _ = forward()
    gp, gw2, gb2 = convcore.linear_backward(R, p.reshape(2, -1), w2)
    ga = convcore.max_pool2d_backward(gp.reshape(p.shape), a, 2)
    gh = convcore.relu_backward(ga, h)
    gx, gw1, gb1 = convcore.conv2d_backward(gh, x, w1, padding=1)
    # (ties/kinks are measure-zero for random data; eps is tiny)
    assert_close(gw1, numerical_grad(loss, w1), rtol=1e-5, what="w1")
    assert_close(gb1, numerical_grad(loss, b1), rtol=1e-5, what="b1")
    assert_close(gx, numerical_grad(loss, x), rtol=1e-5, what="x")
    assert_close(gw2, numerical_grad(loss, w2), rtol=1e-5, what="w2")
