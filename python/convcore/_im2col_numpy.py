"""The peer convcore is compared with: convolution by im2col in numpy.

This is the textbook approach (expand every input window into a column,
then one matrix product on numpy's BLAS) that people write when they do not
have a convolution library. It is used by the benchmark only; the tests
have their own, independent references.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _padded(x: np.ndarray, pad: int) -> np.ndarray:
    if pad == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def _columns(x: np.ndarray, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """(N * Ho * Wo, C * kh * kw): one row per output position (a full im2col copy)."""
    windows = sliding_window_view(_padded(x, pad), (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw), (ho, wo)


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int) -> np.ndarray:
    cout, _, kh, kw = w.shape
    cols, (ho, wo) = _columns(x, kh, kw, stride, pad)
    y = cols @ w.reshape(cout, -1).T
    if b is not None:
        y += b
    return y.reshape(x.shape[0], ho, wo, cout).transpose(0, 3, 1, 2)


def conv2d_backward(gy: np.ndarray, x: np.ndarray, w: np.ndarray, stride: int, pad: int):
    cout, cin, kh, kw = w.shape
    n, _, ho, wo = gy.shape
    cols, _ = _columns(x, kh, kw, stride, pad)
    gy_mat = gy.transpose(0, 2, 3, 1).reshape(n * ho * wo, cout)
    gw = (gy_mat.T @ cols).reshape(w.shape)
    gb = gy_mat.sum(axis=0)
    dcols = (gy_mat @ w.reshape(cout, -1)).reshape(n, ho, wo, cin, kh, kw)
    # col2im: one strided add per kernel offset.
    gxp = np.zeros((n, cin, x.shape[2] + 2 * pad, x.shape[3] + 2 * pad), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            gxp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += \
                dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    gx = gxp[:, :, pad:pad + x.shape[2], pad:pad + x.shape[3]] if pad else gxp
    return gx, gw, gb
