"""Independent numpy reference implementations of every convcore op.

Everything here is written as direct loops over output positions (or kernel
taps), with only the innermost reduction vectorised by numpy, so that each
function can be checked by eye against its textbook definition.  Nothing is
imported from convcore.  All computations are carried out in float64 and the
result is cast back to the input dtype.

The semantics follow torch.nn.functional (the references were validated
against PyTorch while they were written, see test_torch_parity.py for the
ongoing cross-check):

* conv2d: cross-correlation, ``out[n, o, i, j] = b[o] + sum_{c, p, q}
  x_pad[n, g*Cg + c, i*s_h + p*d_h, j*s_w + q*d_w] * w[o, c, p, q]`` with
  ``g = o // (C_out / groups)``.
* padding='same': total = d*(k-1) per dim, top/left = total//2, the extra
  element (if any) on the bottom/right.
* max_pool2d: padding counts as -inf, ties pick the first maximum in row-major
  window order, NaN propagates (any NaN in the window makes the output NaN),
  indices are flat ``h*W + w`` indices into the (unpadded) input plane.
* avg_pool2d: PyTorch's divisor rules (see ``avg_pool2d_ref``).
* adaptive_avg_pool2d: window ``[floor(i*H/OH), ceil((i+1)*H/OH))``.
"""

import numpy as np

__all__ = [
    "pair",
    "conv_out_size",
    "pool_out_size",
    "resolve_conv_padding",
    "conv2d_ref",
    "conv2d_backward_ref",
    "max_pool2d_ref",
    "max_pool2d_backward_ref",
    "avg_pool2d_out_shape",
    "avg_pool2d_ref",
    "avg_pool2d_backward_ref",
    "adaptive_avg_pool2d_ref",
    "adaptive_avg_pool2d_backward_ref",
    "adaptive_out_size",
    "linear_ref",
    "linear_backward_ref",
    "relu_ref",
    "relu_backward_ref",
]


# ---------------------------------------------------------------------------
# shape helpers
# ---------------------------------------------------------------------------

def pair(v):
    """int -> (v, v); a 2-sequence -> tuple."""
    if isinstance(v, (tuple, list)):
        assert len(v) == 2
        return (v[0], v[1])
    return (v, v)


def conv_out_size(size, k, stride, pad_lo, pad_hi, dilation):
    """floor((H + pt + pb - d*(k-1) - 1) / s) + 1."""
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def pool_out_size(size, k, stride, pad, dilation, ceil_mode):
    """PyTorch's pooling_output_shape (aten/src/ATen/native/Pool.h)."""
    numer = size + 2 * pad - dilation * (k - 1) - 1
    if ceil_mode:
        out = -((-numer) // stride) + 1          # ceil division
        # the last window must start inside the input or the left padding
        if (out - 1) * stride >= size + pad:
            out -= 1
    else:
        out = numer // stride + 1
    return out


def resolve_conv_padding(padding, kernel_hw, dilation_hw):
    """Return (top, bottom, left, right) for an int / pair / 'valid' / 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            res = []
            for k, d in zip(kernel_hw, dilation_hw):
                total = d * (k - 1)
                res += [total // 2, total - total // 2]
            return tuple(res)
        raise ValueError(padding)
    ph, pw = pair(padding)
    return (ph, ph, pw, pw)


def _unbatch(x):
    """Accept (C,H,W) like torch: returns (x4d, was_unbatched)."""
    if x.ndim == 3:
        return x[None], True
    assert x.ndim == 4, x.shape
    return x, False


# ---------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------

def conv2d_ref(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    out_dtype = x.dtype
    x, unbatched = _unbatch(np.asarray(x))
    x = x.astype(np.float64)
    w = np.asarray(w, dtype=np.float64)
    N, C, H, W = x.shape
    Cout, Cg, KH, KW = w.shape
    assert C == Cg * groups and Cout % groups == 0
    Og = Cout // groups
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    pt, pb, pl, pr = resolve_conv_padding(padding, (KH, KW), (dh, dw))
    OH = conv_out_size(H, KH, sh, pt, pb, dh)
    OW = conv_out_size(W, KW, sw, pl, pr, dw)
    assert OH >= 1 and OW >= 1

    xp = np.zeros((N, C, H + pt + pb, W + pl + pr))
    xp[:, :, pt:pt + H, pl:pl + W] = x

    out = np.zeros((N, Cout, OH, OW))
    for g in range(groups):
        cin = slice(g * Cg, (g + 1) * Cg)
        cout = slice(g * Og, (g + 1) * Og)
        wg = w[cout]                                        # (Og, Cg, KH, KW)
        for i in range(OH):
            for j in range(OW):
                h0, w0 = i * sh, j * sw
                patch = xp[:, cin,
                           h0:h0 + dh * (KH - 1) + 1:dh,
                           w0:w0 + dw * (KW - 1) + 1:dw]    # (N, Cg, KH, KW)
                out[:, cout, i, j] = np.einsum("nckl,ockl->no", patch, wg)
    if b is not None:
        out += np.asarray(b, dtype=np.float64)[None, :, None, None]
    out = out.astype(out_dtype)
    return out[0] if unbatched else out


def conv2d_backward_ref(gy, x, w, stride=1, padding=0, dilation=1, groups=1):
    """Returns (grad_input, grad_weight, grad_bias)."""
    out_dtype = x.dtype
    x, unbatched = _unbatch(np.asarray(x))
    gy = np.asarray(gy)
    if unbatched:
        gy = gy[None]
    x = x.astype(np.float64)
    gy = gy.astype(np.float64)
    w = np.asarray(w, dtype=np.float64)
    N, C, H, W = x.shape
    Cout, Cg, KH, KW = w.shape
    Og = Cout // groups
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    pt, pb, pl, pr = resolve_conv_padding(padding, (KH, KW), (dh, dw))
    OH = conv_out_size(H, KH, sh, pt, pb, dh)
    OW = conv_out_size(W, KW, sw, pl, pr, dw)
    assert gy.shape == (N, Cout, OH, OW), (gy.shape, (N, Cout, OH, OW))

    xp = np.zeros((N, C, H + pt + pb, W + pl + pr))
    xp[:, :, pt:pt + H, pl:pl + W] = x
    gxp = np.zeros_like(xp)
    gw = np.zeros_like(w)
    for g in range(groups):
        cin = slice(g * Cg, (g + 1) * Cg)
        cout = slice(g * Og, (g + 1) * Og)
        wg = w[cout]
        for i in range(OH):
            for j in range(OW):
                h0, w0 = i * sh, j * sw
                hs = slice(h0, h0 + dh * (KH - 1) + 1, dh)
                ws = slice(w0, w0 + dw * (KW - 1) + 1, dw)
                g_ij = gy[:, cout, i, j]                    # (N, Og)
                # out[n,o,i,j] += sum patch[n,c,k,l] * w[o,c,k,l]
                gxp[:, cin, hs, ws] += np.einsum("no,ockl->nckl", g_ij, wg)
                gw[cout] += np.einsum("no,nckl->ockl", g_ij, xp[:, cin, hs, ws])
    gx = gxp[:, :, pt:pt + H, pl:pl + W]
    gb = gy.sum(axis=(0, 2, 3))
    gx = gx.astype(out_dtype)
    if unbatched:
        gx = gx[0]
    return gx, gw.astype(out_dtype), gb.astype(out_dtype)


# ---------------------------------------------------------------------------
# max pooling
# ---------------------------------------------------------------------------

def _max_pool_core(x, kernel_size, stride, padding, dilation, ceil_mode):
    x, unbatched = _unbatch(np.asarray(x))
    N, C, H, W = x.shape
    kh, kw = pair(kernel_size)
    sh, sw = pair(kernel_size if stride is None else stride)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    OH = pool_out_size(H, kh, sh, ph, dh, ceil_mode)
    OW = pool_out_size(W, kw, sw, pw, dw, ceil_mode)
    assert OH >= 1 and OW >= 1
    xd = x.astype(np.float64)
    out = np.empty((N, C, OH, OW))
    idx = np.empty((N, C, OH, OW), dtype=np.int64)
    for i in range(OH):
        for j in range(OW):
            # window taps that fall inside the input, in row-major order
            taps = [(i * sh - ph + p * dh, j * sw - pw + q * dw)
                    for p in range(kh) for q in range(kw)]
            taps = [(h, w) for (h, w) in taps if 0 <= h < H and 0 <= w < W]
            assert taps, "a pooling window lies entirely in the padding"
            hh = np.array([t[0] for t in taps])
            ww = np.array([t[1] for t in taps])
            vals = xd[:, :, hh, ww]                         # (N, C, T)
            first_max = np.argmax(vals, axis=2)              # first maximum
            nan = np.isnan(vals)
            # PyTorch's CPU kernel updates on ``val > max || isnan(val)``:
            # the last NaN wins.  (Tests only rely on "an index of a NaN".)
            last_nan = nan.shape[2] - 1 - np.argmax(nan[:, :, ::-1], axis=2)
            t = np.where(nan.any(axis=2), last_nan, first_max)
            out[:, :, i, j] = np.take_along_axis(vals, t[..., None], 2)[..., 0]
            idx[:, :, i, j] = hh[t] * W + ww[t]
    out = out.astype(x.dtype)
    if unbatched:
        return out[0], idx[0]
    return out, idx


def max_pool2d_ref(x, kernel_size, stride=None, padding=0, dilation=1,
                   ceil_mode=False, return_indices=False):
    out, idx = _max_pool_core(x, kernel_size, stride, padding, dilation,
                              ceil_mode)
    return (out, idx) if return_indices else out


def max_pool2d_backward_ref(gy, x, kernel_size, stride=None, padding=0,
                            dilation=1, ceil_mode=False):
    _, idx = _max_pool_core(x, kernel_size, stride, padding, dilation,
                            ceil_mode)
    x = np.asarray(x)
    gy = np.asarray(gy, dtype=np.float64)
    assert gy.shape == idx.shape
    H, W = x.shape[-2:]
    lead = x.shape[:-2]
    gx = np.zeros(lead + (H * W,))
    gy2 = gy.reshape(lead + (-1,))
    idx2 = idx.reshape(lead + (-1,))
    for plane in np.ndindex(*lead):
        for k in range(idx2.shape[-1]):
            gx[plane + (idx2[plane + (k,)],)] += gy2[plane + (k,)]
    return gx.reshape(x.shape).astype(x.dtype)


# ---------------------------------------------------------------------------
# average pooling
# ---------------------------------------------------------------------------

def _avg_windows(H, W, kernel_size, stride, padding, ceil_mode,
                 count_include_pad, divisor_override):
    """Yield (i, j, hs, he, ws, we, divisor) for every output position.

    Mirrors PyTorch's avg_pool2d: the window [hstart, hend) is first clipped
    to the padded extent [-pad, H + pad) and its size taken as the
    'count_include_pad' divisor, then clipped to the real input [0, H).
    """
    kh, kw = pair(kernel_size)
    sh, sw = pair(kernel_size if stride is None else stride)
    ph, pw = pair(padding)
    OH = pool_out_size(H, kh, sh, ph, 1, ceil_mode)
    OW = pool_out_size(W, kw, sw, pw, 1, ceil_mode)
    assert OH >= 1 and OW >= 1
    for i in range(OH):
        for j in range(OW):
            hs = i * sh - ph
            ws = j * sw - pw
            he = min(hs + kh, H + ph)
            we = min(ws + kw, W + pw)
            padded_count = (he - hs) * (we - ws)
            hs, ws = max(hs, 0), max(ws, 0)
            he, we = min(he, H), min(we, W)
            if divisor_override is not None:
                div = divisor_override
            elif count_include_pad:
                div = padded_count
            else:
                div = (he - hs) * (we - ws)
            yield i, j, hs, he, ws, we, div


def avg_pool2d_out_shape(H, W, kernel_size, stride, padding, ceil_mode):
    kh, kw = pair(kernel_size)
    sh, sw = pair(kernel_size if stride is None else stride)
    ph, pw = pair(padding)
    return (pool_out_size(H, kh, sh, ph, 1, ceil_mode),
            pool_out_size(W, kw, sw, pw, 1, ceil_mode))


def avg_pool2d_ref(x, kernel_size, stride=None, padding=0, ceil_mode=False,
                   count_include_pad=True, divisor_override=None):
    x, unbatched = _unbatch(np.asarray(x))
    N, C, H, W = x.shape
    OH, OW = avg_pool2d_out_shape(H, W, kernel_size, stride, padding,
                                  ceil_mode)
    xd = x.astype(np.float64)
    out = np.zeros((N, C, OH, OW))
    for i, j, hs, he, ws, we, div in _avg_windows(
            H, W, kernel_size, stride, padding, ceil_mode, count_include_pad,
            divisor_override):
        out[:, :, i, j] = xd[:, :, hs:he, ws:we].sum(axis=(2, 3)) / div
    out = out.astype(x.dtype)
    return out[0] if unbatched else out


def avg_pool2d_backward_ref(gy, x, kernel_size, stride=None, padding=0,
                            ceil_mode=False, count_include_pad=True,
                            divisor_override=None):
    x = np.asarray(x)
    x4, unbatched = _unbatch(x)
    gy = np.asarray(gy, dtype=np.float64)
    if unbatched:
        gy = gy[None]
    N, C, H, W = x4.shape
    gx = np.zeros((N, C, H, W))
    for i, j, hs, he, ws, we, div in _avg_windows(
            H, W, kernel_size, stride, padding, ceil_mode, count_include_pad,
            divisor_override):
        gx[:, :, hs:he, ws:we] += (gy[:, :, i, j] / div)[:, :, None, None]
    gx = gx.astype(x.dtype)
    return gx[0] if unbatched else gx


# ---------------------------------------------------------------------------
# adaptive average pooling
# ---------------------------------------------------------------------------

def adaptive_out_size(H, W, output_size):
    oh, ow = pair(output_size)
    return (H if oh is None else oh, W if ow is None else ow)


def _adaptive_bounds(i, in_size, out_size):
    start = (i * in_size) // out_size                       # floor
    end = -((-(i + 1) * in_size) // out_size)               # ceil
    return start, end


def adaptive_avg_pool2d_ref(x, output_size):
    x, unbatched = _unbatch(np.asarray(x))
    N, C, H, W = x.shape
    OH, OW = adaptive_out_size(H, W, output_size)
    xd = x.astype(np.float64)
    out = np.zeros((N, C, OH, OW))
    for i in range(OH):
        hs, he = _adaptive_bounds(i, H, OH)
        for j in range(OW):
            ws, we = _adaptive_bounds(j, W, OW)
            out[:, :, i, j] = xd[:, :, hs:he, ws:we].mean(axis=(2, 3))
    out = out.astype(x.dtype)
    return out[0] if unbatched else out


def adaptive_avg_pool2d_backward_ref(gy, x):
    x = np.asarray(x)
    x4, unbatched = _unbatch(x)
    gy = np.asarray(gy, dtype=np.float64)
    if unbatched:
        gy = gy[None]
    N, C, H, W = x4.shape
    OH, OW = gy.shape[-2:]
    gx = np.zeros((N, C, H, W))
    for i in range(OH):
        hs, he = _adaptive_bounds(i, H, OH)
        for j in range(OW):
            ws, we = _adaptive_bounds(j, W, OW)
            cnt = (he - hs) * (we - ws)
            gx[:, :, hs:he, ws:we] += (gy[:, :, i, j] / cnt)[:, :, None, None]
    gx = gx.astype(x.dtype)
    return gx[0] if unbatched else gx


# ---------------------------------------------------------------------------
# linear / relu
# ---------------------------------------------------------------------------

def linear_ref(x, w, b=None):
    x = np.asarray(x)
    xd = x.astype(np.float64)
    wd = np.asarray(w, dtype=np.float64)
    out = np.zeros(x.shape[:-1] + (wd.shape[0],))
    for o in range(wd.shape[0]):
        out[..., o] = (xd * wd[o]).sum(axis=-1)
        if b is not None:
            out[..., o] += float(b[o])
    return out.astype(x.dtype)


def linear_backward_ref(gy, x, w):
    x = np.asarray(x)
    xd = x.astype(np.float64)
    wd = np.asarray(w, dtype=np.float64)
    gyd = np.asarray(gy, dtype=np.float64)
    Out, In = wd.shape
    gx = np.zeros(x.shape)
    gw = np.zeros((Out, In))
    for o in range(Out):
        # out[..., o] = sum_k x[..., k] w[o, k]
        gx += gyd[..., o, None] * wd[o]
        gw[o] = (gyd[..., o, None] * xd).reshape(-1, In).sum(axis=0)
    gb = gyd.reshape(-1, Out).sum(axis=0)
    return gx.astype(x.dtype), gw.astype(x.dtype), gb.astype(x.dtype)


def relu_ref(x):
    x = np.asarray(x)
    # NaN propagates (like torch.relu): only strictly negative values clamp.
    return np.where(x < 0, np.zeros((), x.dtype), x).astype(x.dtype)


def relu_backward_ref(gy, x):
    # zero where x <= 0 (so a NaN input passes the gradient, as torch's
    # threshold_backward)
    x = np.asarray(x)
    return np.where(x <= 0, 0, np.asarray(gy)).astype(x.dtype)


# ---------------------------------------------------------------------------
# local response norm / batch norm
# ---------------------------------------------------------------------------

def local_response_norm_ref(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """torch.nn.functional.local_response_norm on (N, C, ...):

    ``out[:, c] = x[:, c] / (k + alpha / size * sum_{q in W(c)} x[:, q]^2) ** beta``
    with the window ``W(c) = [c - size // 2, c + (size - 1) // 2]`` clipped to
    the channels (PyTorch zero-pads size // 2 channels before and
    (size - 1) // 2 after, then averages over ``size`` channels, so the
    divisor is always ``size``)."""
    x = np.asarray(x)
    xd = x.astype(np.float64)
    C = xd.shape[1]
    out = np.empty_like(xd)
    for c in range(C):
        lo = max(0, c - size // 2)
        hi = min(C - 1, c + (size - 1) // 2)
        sq = np.zeros(xd[:, c].shape)
        for q in range(lo, hi + 1):
            sq += xd[:, q] ** 2
        out[:, c] = xd[:, c] / (k + alpha / size * sq) ** beta
    return out.astype(x.dtype)


def batch_norm_ref(x, running_mean=None, running_var=None, weight=None, bias=None,
                   training=False, momentum=0.1, eps=1e-5):
    """torch.nn.functional.batch_norm on (N, C, ...), without side effects.

    Returns ``(out, batch_mean, batch_var, new_running_mean, new_running_var)``
    (float64 except ``out``, which has x's dtype).  In training the batch
    statistics are the mean and the *biased* variance over every axis but 1,
    and the running statistics move by ``momentum`` towards the batch mean
    and the *unbiased* variance (``var * m / (m - 1)``, m values per
    channel).  Otherwise the running statistics normalise and are returned
    unchanged (batch_mean/batch_var are then None)."""
    x = np.asarray(x)
    xd = x.astype(np.float64)
    C = xd.shape[1]
    out = np.empty_like(xd)
    bmean = np.zeros(C) if training else None
    bvar = np.zeros(C) if training else None
    rm = None if running_mean is None else np.asarray(running_mean, np.float64).copy()
    rv = None if running_var is None else np.asarray(running_var, np.float64).copy()
    for c in range(C):
        v = xd[:, c]
        if training:
            m = v.size
            mu = v.sum() / m
            var = ((v - mu) ** 2).sum() / m
            bmean[c], bvar[c] = mu, var
            if rm is not None:
                rm[c] = (1 - momentum) * rm[c] + momentum * mu
            if rv is not None:
                rv[c] = (1 - momentum) * rv[c] + momentum * var * m / (m - 1)
        else:
            mu, var = float(running_mean[c]), float(running_var[c])
        w = 1.0 if weight is None else float(weight[c])
        b = 0.0 if bias is None else float(bias[c])
        out[:, c] = (v - mu) / np.sqrt(var + eps) * w + b
    return out.astype(x.dtype), bmean, bvar, rm, rv


__all__ += ["local_response_norm_ref", "batch_norm_ref"]


# ---------------------------------------------------------------------------
# backward of the normalisations, softmax, cross-entropy
# (test_ops.py checks these against finite differences of the forwards)
# ---------------------------------------------------------------------------

def local_response_norm_backward_ref(gy, x, size, alpha=1e-4, beta=0.75, k=1.0):
    """d/dx of sum(gy * local_response_norm_ref(x)): with
    ``d_c = k + alpha / size * sum_{q in W(c)} x_q^2`` and ``y_c = x_c d_c^-beta``,
    ``gx_j = gy_j d_j^-beta - 2 alpha beta / size * x_j *
    sum_{c: j in W(c)} gy_c x_c d_c^(-beta-1)``."""
    x = np.asarray(x)
    xd, gyd = x.astype(np.float64), np.asarray(gy, np.float64)
    C = xd.shape[1]
    window = [range(max(0, c - size // 2), min(C - 1, c + (size - 1) // 2) + 1)
              for c in range(C)]
    d = np.empty_like(xd)
    for c in range(C):
        d[:, c] = k + alpha / size * sum(xd[:, q] ** 2 for q in window[c])
    gx = gyd * d ** -beta
    for c in range(C):
        common = gyd[:, c] * xd[:, c] * d[:, c] ** (-beta - 1)
        for q in window[c]:
            gx[:, q] -= 2 * alpha * beta / size * xd[:, q] * common
    return gx.astype(x.dtype)


def batch_norm_backward_ref(gy, x, mean, var, weight=None, training=True, eps=1e-5,
                            relu_output=None):
    """(grad_input, grad_weight, grad_bias) of batch_norm_ref's output, given
    the statistics it normalised with (the batch's when training, then a
    function of x; the running ones, constants, otherwise). relu_output: the
    output of a fused ReLU, where <= 0 the gradient stops."""
    x = np.asarray(x)
    xd, gyd = x.astype(np.float64), np.asarray(gy, np.float64)
    if relu_output is not None:
        gyd = np.where(np.asarray(relu_output) <= 0, 0.0, gyd)
    C = xd.shape[1]
    gx, gw, gb = np.empty_like(xd), np.empty(C), np.empty(C)
    for c in range(C):
        v, g = xd[:, c], gyd[:, c]
        inv_std = 1.0 / np.sqrt(float(var[c]) + eps)
        xhat = (v - float(mean[c])) * inv_std
        w = 1.0 if weight is None else float(weight[c])
        gb[c], gw[c] = g.sum(), (g * xhat).sum()
        if training and v.size:
            gx[:, c] = w * inv_std * (g - g.mean() - xhat * (g * xhat).mean())
        else:
            gx[:, c] = w * inv_std * g
    return gx.astype(x.dtype), gw.astype(x.dtype), gb.astype(x.dtype)


def _log_softmax_lines(x, dim):
    """float64 log_softmax of x along dim, one line at a time."""
    xd = np.moveaxis(np.asarray(x, np.float64), dim, -1)
    out = np.empty_like(xd)
    for idx in np.ndindex(*xd.shape[:-1]):
        line = xd[idx]
        m = line.max()
        out[idx] = line - m - np.log(np.exp(line - m).sum())
    return np.moveaxis(out, -1, dim)


def softmax_ref(x, dim):
    return np.exp(_log_softmax_lines(x, dim)).astype(np.asarray(x).dtype)


def log_softmax_ref(x, dim):
    return _log_softmax_lines(x, dim).astype(np.asarray(x).dtype)


def softmax_backward_ref(gy, y, dim):
    """From the forward's output y: y * (gy - sum(gy * y, dim))."""
    gyd, yd = np.asarray(gy, np.float64), np.asarray(y, np.float64)
    out = yd * (gyd - (gyd * yd).sum(axis=dim, keepdims=True))
    return out.astype(np.asarray(y).dtype)


def log_softmax_backward_ref(gy, y, dim):
    """From the forward's output y: gy - exp(y) * sum(gy, dim)."""
    gyd, yd = np.asarray(gy, np.float64), np.asarray(y, np.float64)
    out = gyd - np.exp(yd) * gyd.sum(axis=dim, keepdims=True)
    return out.astype(np.asarray(y).dtype)


def _cross_entropy_targets(x, target, weight, ignore_index, label_smoothing):
    """Per position (class axis last): the target distribution q (the loss is
    -sum(q * log p)) and the position's share of the mean's divisor."""
    xd = np.moveaxis(np.asarray(x, np.float64), 0 if x.ndim == 1 else 1, -1)
    C = xd.shape[-1]
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    t = np.asarray(target)
    q = np.zeros(xd.shape)
    share = np.zeros(xd.shape[:-1])
    probabilities = t.shape == np.asarray(x).shape
    if probabilities:
        t = np.moveaxis(t.astype(np.float64), 0 if x.ndim == 1 else 1, -1)
    for idx in np.ndindex(*xd.shape[:-1]):
        if probabilities:
            q[idx] = ((1 - label_smoothing) * t[idx] + label_smoothing / C) * w
            share[idx] = 1.0
        elif t[idx] != ignore_index:
            cls = int(t[idx])
            q[idx] = label_smoothing / C * w
            q[idx][cls] += (1 - label_smoothing) * w[cls]
            share[idx] = w[cls]
    return xd, q, share


def cross_entropy_ref(x, target, weight=None, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0):
    """torch.nn.functional.cross_entropy: logits (C,), (N, C) or (N, C, ...),
    class-index targets (ignore_index counts for nothing) or class
    probabilities (x's shape); 'mean' divides by the summed target weights
    (indices) or the number of positions (probabilities): NaN when 0."""
    xd, q, share = _cross_entropy_targets(x, target, weight, ignore_index, label_smoothing)
    log_p = _log_softmax_lines(xd, -1)
    losses = -np.where(q != 0, q * log_p, 0.0).sum(axis=-1)
    if reduction == "none":
        return losses.astype(np.asarray(x).dtype)
    total = losses.sum()
    if reduction == "mean":
        total = total / share.sum() if share.sum() else np.nan
    return np.asarray(total, dtype=np.asarray(x).dtype)


def cross_entropy_backward_ref(grad_output, x, target, weight=None, ignore_index=-100,
                               reduction="mean", label_smoothing=0.0):
    """d/dx of cross_entropy_ref times grad_output (a number, or the loss's
    shape for 'none'): softmax(x) * sum(q) - q per position."""
    xd, q, share = _cross_entropy_targets(x, target, weight, ignore_index, label_smoothing)
    p = np.exp(_log_softmax_lines(xd, -1))
    grad = p * q.sum(axis=-1, keepdims=True) - q
    if reduction == "none":
        grad = grad * np.asarray(grad_output, np.float64)[..., None]
    else:
        grad = grad * float(grad_output)
        if reduction == "mean":
            grad = grad / share.sum() if share.sum() else np.zeros_like(grad)
    grad[~(q != 0).any(axis=-1)] = 0.0  # positions without a target
    axis = 0 if np.asarray(x).ndim == 1 else 1
    return np.moveaxis(grad, -1, axis).astype(np.asarray(x).dtype)


__all__ += ["local_response_norm_backward_ref", "batch_norm_backward_ref", "softmax_ref",
            "log_softmax_ref", "softmax_backward_ref", "log_softmax_backward_ref",
            "cross_entropy_ref", "cross_entropy_backward_ref"]
