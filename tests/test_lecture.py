"""The lecture's worked examples, run through the real ops.

The lecture writes volumes as H x W x C; convcore is NCHW, so a
"32x32x3" input is an array of shape (1, 3, 32, 32).
"""

import numpy as np
import pytest

import convcore
import reference as ref
from _helpers import check_output, randn


def n_params(weight, bias):
    return weight.size + bias.size


def test_32x32x3_ten_5x5_filters_stride1_pad2():
    rng = np.random.default_rng(0)
    x = randn(rng, (1, 3, 32, 32), np.float32)
    w = randn(rng, (10, 3, 5, 5), np.float32)
    b = randn(rng, (10,), np.float32)
    out = convcore.conv2d(x, w, b, stride=1, padding=2)
    assert out.shape == (1, 10, 32, 32)              # 32x32x10
    assert n_params(w, b) == 760 == 5 * 5 * 3 * 10 + 10
    check_output(out, ref.conv2d_ref(x, w, b, stride=1, padding=2),
                 np.float32, "lecture conv")
    # "same" padding gives the same thing for an odd kernel
    np.testing.assert_array_equal(
        out, convcore.conv2d(x, w, b, padding="same"))


def _direct_conv_at(x, w, b, n, o, i, j, stride, pad):
    """out[n, o, i, j] computed by hand from the definition."""
    C, H, W = x.shape[1:]
    K = w.shape[-1]
    total = float(b[o])
    for c in range(C):
        for p in range(K):
            for q in range(K):
                h, v = i * stride - pad + p, j * stride - pad + q
                if 0 <= h < H and 0 <= v < W:
                    total += float(x[n, c, h, v]) * float(w[o, c, p, q])
    return total


def test_alexnet_conv1_and_pool1():
    rng = np.random.default_rng(1)
    x = randn(rng, (1, 3, 227, 227), np.float32)
    w = randn(rng, (96, 3, 11, 11), np.float32) * np.float32(0.05)
    b = randn(rng, (96,), np.float32)
    out = convcore.conv2d(x, w, b, stride=4, padding=0)
    assert out.shape == (1, 96, 55, 55)              # (227 - 11)/4 + 1 = 55
    assert n_params(w, b) == 34_944 == 11 * 11 * 3 * 96 + 96
    assert out.dtype == np.float32 and out.flags.c_contiguous
    # spot-check a few output values, including the corners
    for (o, i, j) in [(0, 0, 0), (95, 54, 54), (17, 3, 50), (50, 27, 27),
                      (3, 54, 0)]:
        exp = _direct_conv_at(x, w, b, 0, o, i, j, 4, 0)
        assert abs(out[0, o, i, j] - exp) <= 1e-4 * max(1.0, abs(exp)), (
            o, i, j)

    pool = convcore.max_pool2d(out, 3, stride=2)     # POOL1: 3x3, stride 2
    assert pool.shape == (1, 96, 27, 27)             # (55 - 3)/2 + 1 = 27
    assert pool.dtype == np.float32
    np.testing.assert_array_equal(pool[0, :, 0, 0],
                                  out[0, :, 0:3, 0:3].max(axis=(1, 2)))
    np.testing.assert_array_equal(pool[0, :, 26, 26],
                                  out[0, :, 52:55, 52:55].max(axis=(1, 2)))


@pytest.mark.parametrize("stride,pad,expected", [
    (1, 0, 5),     # (7 - 3)/1 + 1
    (2, 0, 3),     # (7 - 3)/2 + 1
    (3, 0, 2),     # (7 - 3)/3 + 1 = 2.33: "doesn't fit" -> PyTorch floors
    (3, 1, 3),     # (7 - 3 + 2)/3 + 1 = 3
    (1, 1, 7),     # pad 1 keeps 7x7
])
def test_7x7_input_3x3_filter(stride, pad, expected):
    rng = np.random.default_rng(2)
    x = randn(rng, (1, 1, 7, 7), np.float64)
    w = randn(rng, (1, 1, 3, 3), np.float64)
    out = convcore.conv2d(x, w, stride=stride, padding=pad)
    assert out.shape == (1, 1, expected, expected)
    check_output(out, ref.conv2d_ref(x, w, stride=stride, padding=pad),
                 np.float64)


def test_7x7_stride3_floor_ignores_last_column():
    """With stride 3 and no padding the last input row/column (index 6) is
    never visited, so its gradient is exactly zero."""
    rng = np.random.default_rng(3)
    x = randn(rng, (1, 1, 7, 7), np.float64)
    w = randn(rng, (1, 1, 3, 3), np.float64)
    gx, _, _ = convcore.conv2d_backward(np.ones((1, 1, 2, 2)), x, w, stride=3)
    assert (gx[0, 0, 6, :] == 0).all() and (gx[0, 0, :, 6] == 0).all()
    assert (gx[0, 0, :6, :6] != 0).all()


def test_lecture_formula_general():
    """(N - F + 2P)/S + 1 for a grid of lecture-style sizes."""
    x = np.zeros((1, 1, 13, 13), np.float32)
    for F in (1, 3, 5):
        w = np.zeros((2, 1, F, F), np.float32)
        for S in (1, 2, 3):
            for P in range(0, (F - 1) // 2 + 1):
                out = convcore.conv2d(x, w, stride=S, padding=P)
                n = (13 - F + 2 * P) // S + 1
                assert out.shape == (1, 2, n, n), (F, S, P)


def test_1x1_convolution_is_per_pixel_linear():
    """The lecture's 1x1 conv: a 56x56x64 volume with 32 1x1x64 filters ->
    56x56x32, i.e. a dot product over depth at every pixel."""
    rng = np.random.default_rng(4)
    x = randn(rng, (1, 64, 56, 56), np.float32)
    w = randn(rng, (32, 64, 1, 1), np.float32)
    out = convcore.conv2d(x, w)
    assert out.shape == (1, 32, 56, 56)
    pixels = x[0].reshape(64, -1).T                  # (56*56, 64)
    lin = convcore.linear(np.ascontiguousarray(pixels), w.reshape(32, 64))
    check_output(out, lin.T.reshape(1, 32, 56, 56).astype(np.float64),
                 np.float32)
