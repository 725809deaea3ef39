"""Bad arguments raise TypeError / ValueError naming the offending argument;
degenerate-but-legal inputs (N=0, huge padding/stride) do not crash."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convcore


def f64(*shape):
    return np.ones(shape, np.float64)


def f32(*shape):
    return np.ones(shape, np.float32)


X = f64(2, 4, 6, 6)
W = f64(6, 4, 3, 3)
B = f64(6)
GY = f64(2, 6, 4, 4)          # conv2d(X, W) output shape

# the messages of these errors may legitimately name either side
CHANNELS = r"input|weight|groups|channel"
TOO_SMALL = r"input|weight|kernel|padding|dilation|output|size"


# The factories below bind their arguments when the parameter list is built,
# so each returned callable can be called any number of times.

def conv(**kw):
    x, w = kw.pop("input", X), kw.pop("weight", W)
    return lambda: convcore.conv2d(x, w, **kw)


def conv_bw(**kw):
    gy, x, w = kw.pop("grad_output", GY), kw.pop("input", X), kw.pop("weight", W)
    return lambda: convcore.conv2d_backward(gy, x, w, **kw)


P = pytest.param

# ---------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------

CONV_TYPE_ERRORS = [
    P(conv(input=None), "input", id="input-None"),
    P(conv(input=X.tolist()), "input", id="input-list"),
    P(conv(input=X.astype(np.int32)), "input", id="input-int32"),
    P(conv(input=X.astype(np.int64), weight=W.astype(np.int64)), "input",
      id="input-int64"),
    P(conv(input=X.astype(bool)), "input", id="input-bool"),
    P(conv(input=X.astype(np.complex128), weight=W.astype(np.complex128)),
      "input", id="input-complex"),
    P(conv(weight=None), "weight", id="weight-None"),
    P(conv(weight=W.tolist()), "weight", id="weight-list"),
    P(conv(weight=W.astype(np.int64)), "weight", id="weight-int"),
    P(conv(weight=W.astype(np.float32)), "weight", id="weight-f32-vs-f64"),
    P(conv(input=X.astype(np.float32)), "weight", id="input-f32-weight-f64"),
    P(conv(bias=B.astype(np.float32)), "bias", id="bias-f32"),
    P(conv(bias=B.tolist()), "bias", id="bias-list"),
    P(conv(bias=B.astype(np.int64)), "bias", id="bias-int"),
    P(conv(stride=1.5), "stride", id="stride-float"),
    P(conv(stride=1.0), "stride", id="stride-float-integral"),
    P(conv(stride=(1, 2.0)), "stride", id="stride-pair-float"),
    P(conv(stride="2"), "stride", id="stride-str"),
    P(conv(stride="same"), "stride", id="stride-same"),
    P(conv(stride=None), "stride", id="stride-None"),
    P(conv(padding=1.0), "padding", id="padding-float"),
    P(conv(padding=(1, 0.5)), "padding", id="padding-pair-float"),
    P(conv(padding=None), "padding", id="padding-None"),
    P(conv(dilation=1.0), "dilation", id="dilation-float"),
    P(conv(dilation="same"), "dilation", id="dilation-str"),
    P(conv(groups=1.0), "groups", id="groups-float"),
    P(conv(groups="1"), "groups", id="groups-str"),
    P(conv(groups=None), "groups", id="groups-None"),
]

CONV_VALUE_ERRORS = [
    P(conv(input=f64(6, 6)), "input", id="input-2d"),
    P(conv(input=f64(6)), "input", id="input-1d"),
    P(conv(input=f64(1, 2, 4, 6, 6)), "input", id="input-5d"),
    P(conv(weight=f64(4, 3, 3)), "weight", id="weight-3d"),
    P(conv(weight=f64(1, 6, 4, 3, 3)), "weight", id="weight-5d"),
    P(conv(weight=f64(6, 3, 3, 3)), CHANNELS, id="channel-mismatch"),
    P(conv(weight=f64(6, 4, 3, 3), groups=2), CHANNELS,
      id="channel-mismatch-groups"),
    P(conv(input=f64(1, 6, 5, 5), weight=f64(4, 1, 3, 3), groups=4),
      CHANNELS, id="groups-not-dividing-in"),
    P(conv(weight=f64(5, 2, 3, 3), groups=2), r"groups|weight",
      id="groups-not-dividing-out"),
    P(conv(groups=0), "groups", id="groups-0"),
    P(conv(groups=-1), "groups", id="groups-neg"),
    P(conv(input=f64(1, 1, 3, 3), weight=f64(1, 1, 4, 4)), TOO_SMALL,
      id="kernel-too-big"),
    P(conv(input=f64(1, 1, 3, 5), weight=f64(1, 1, 2, 2), dilation=(3, 1)),
      TOO_SMALL, id="dilated-kernel-too-big"),
    P(conv(input=f64(1, 1, 3, 3), weight=f64(1, 1, 6, 1), padding=1),
      TOO_SMALL, id="kernel-too-big-padded"),
    P(conv(stride=0), "stride", id="stride-0"),
    P(conv(stride=-1), "stride", id="stride-neg"),
    P(conv(stride=(1, 0)), "stride", id="stride-pair-0"),
    P(conv(stride=(1, 2, 3)), "stride", id="stride-len3"),
    # (a 1-tuple such as stride=(1,) means both dimensions, as in PyTorch:
    # test_conv2d.py checks it; an empty one is refused, as PyTorch's conv2d does)
    P(conv(stride=()), "stride", id="stride-empty"),
    P(conv(padding=-1), "padding", id="padding-neg"),
    P(conv(padding=(0, -2)), "padding", id="padding-pair-neg"),
    P(conv(padding=(1, 1, 1)), "padding", id="padding-len3"),
    P(conv(padding="full"), "padding", id="padding-unknown-str"),
    P(conv(padding="SAME"), "padding", id="padding-wrong-case"),
    P(conv(dilation=0), "dilation", id="dilation-0"),
    P(conv(dilation=(1, -1)), "dilation", id="dilation-neg"),
    P(conv(dilation=()), "dilation", id="dilation-empty"),
    P(conv(padding="same", stride=2), r"padding|stride", id="same-stride2"),
    P(conv(padding="same", stride=(1, 2)), r"padding|stride",
      id="same-stride-1-2"),
    P(conv(bias=f64(7)), "bias", id="bias-len"),
    P(conv(bias=f64(6, 1)), "bias", id="bias-2d"),
    P(conv(bias=np.ones((), np.float64)), "bias", id="bias-0d"),
]


@pytest.mark.parametrize("fn,match", CONV_TYPE_ERRORS)
def test_conv2d_type_errors(fn, match):
    with pytest.raises(TypeError, match=match):
        fn()


@pytest.mark.parametrize("fn,match", CONV_VALUE_ERRORS)
def test_conv2d_value_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_conv2d_float16_rejected():
    with pytest.raises(TypeError, match="input"):
        convcore.conv2d(X.astype(np.float16), W.astype(np.float16))


CONV_BW_TYPE_ERRORS = [
    P(conv_bw(grad_output=None), "grad_output", id="gy-None"),
    P(conv_bw(grad_output=GY.tolist()), "grad_output", id="gy-list"),
    P(conv_bw(grad_output=GY.astype(np.float32)), "grad_output", id="gy-f32"),
    P(conv_bw(grad_output=GY.astype(np.int64)), "grad_output", id="gy-int"),
    P(conv_bw(input=None), "input", id="input-None"),
    P(conv_bw(weight=W.astype(np.float32)), "weight", id="weight-f32"),
    P(conv_bw(stride=1.5), "stride", id="stride-float"),
    P(conv_bw(dilation="3"), "dilation", id="dilation-str"),
    P(conv_bw(groups=2.0), "groups", id="groups-float"),
]

CONV_BW_VALUE_ERRORS = [
    P(conv_bw(grad_output=f64(2, 6, 5, 4)), "grad_output", id="gy-H"),
    P(conv_bw(grad_output=f64(2, 6, 4, 3)), "grad_output", id="gy-W"),
    P(conv_bw(grad_output=f64(2, 5, 4, 4)), "grad_output", id="gy-C"),
    P(conv_bw(grad_output=f64(3, 6, 4, 4)), "grad_output", id="gy-N"),
    P(conv_bw(grad_output=f64(6, 4, 4)), "grad_output", id="gy-3d"),
    P(conv_bw(grad_output=f64(2, 6, 6, 6), padding=1, stride=2),
      "grad_output", id="gy-stride"),
    P(conv_bw(input=f64(4, 6)), "input", id="input-2d"),
    P(conv_bw(weight=f64(6, 3, 3, 3)), CHANNELS, id="channel-mismatch"),
    P(conv_bw(stride=0), "stride", id="stride-0"),
    P(conv_bw(padding=-1), "padding", id="padding-neg"),
    P(conv_bw(dilation=0), "dilation", id="dilation-0"),
    P(conv_bw(groups=0), "groups", id="groups-0"),
    P(conv_bw(groups=3), CHANNELS, id="groups-not-dividing"),
    P(conv_bw(padding="same", stride=2), r"padding|stride", id="same-stride2"),
    P(conv_bw(padding="bogus"), "padding", id="padding-bogus"),
    P(conv_bw(padding="3"), "padding", id="padding-digit-str"),
]


@pytest.mark.parametrize("fn,match", CONV_BW_TYPE_ERRORS)
def test_conv2d_backward_type_errors(fn, match):
    with pytest.raises(TypeError, match=match):
        fn()


@pytest.mark.parametrize("fn,match", CONV_BW_VALUE_ERRORS)
def test_conv2d_backward_value_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------

PX = f64(2, 3, 6, 6)
PGY = f64(2, 3, 3, 3)          # max/avg_pool2d(PX, 2) output


def mp(**kw):
    kw.setdefault("kernel_size", 2)
    x = kw.pop("input", PX)
    return lambda: convcore.max_pool2d(x, **kw)


def mp_bw(**kw):
    kw.setdefault("kernel_size", 2)
    gy, x = kw.pop("grad_output", PGY), kw.pop("input", PX)
    return lambda: convcore.max_pool2d_backward(gy, x, **kw)


def ap(**kw):
    kw.setdefault("kernel_size", 2)
    x = kw.pop("input", PX)
    return lambda: convcore.avg_pool2d(x, **kw)


def ap_bw(**kw):
    kw.setdefault("kernel_size", 2)
    gy, x = kw.pop("grad_output", PGY), kw.pop("input", PX)
    return lambda: convcore.avg_pool2d_backward(gy, x, **kw)


def _common_pool_errors(f, f_bw, has_dilation):
    tag = f.__name__
    te = [
        P(f(input=None), "input", id=f"{tag}-input-None"),
        P(f(input=PX.tolist()), "input", id=f"{tag}-input-list"),
        P(f(input=PX.astype(np.int32)), "input", id=f"{tag}-input-int"),
        P(f(input=PX.astype(bool)), "input", id=f"{tag}-input-bool"),
        P(f(input=PX.astype(np.complex64)), "input", id=f"{tag}-input-complex"),
        P(f(kernel_size=2.0), "kernel_size", id=f"{tag}-kernel-float"),
        P(f(kernel_size=None), "kernel_size", id=f"{tag}-kernel-None"),
        P(f(kernel_size="2"), "kernel_size", id=f"{tag}-kernel-str"),
        P(f(stride=1.5), "stride", id=f"{tag}-stride-float"),
        P(f(padding=0.0), "padding", id=f"{tag}-padding-float"),
        P(f_bw(grad_output=PGY.astype(np.float32)), "grad_output",
          id=f"{tag}-bw-gy-f32"),
        P(f_bw(grad_output=None), "grad_output", id=f"{tag}-bw-gy-None"),
        P(f_bw(input=PX.astype(np.float32)), r"input|grad_output",
          id=f"{tag}-bw-input-f32"),
    ]
    ve = [
        P(f(input=f64(6, 6)), "input", id=f"{tag}-input-2d"),
        P(f(input=f64(1, 2, 3, 6, 6)), "input", id=f"{tag}-input-5d"),
        P(f(kernel_size=0), "kernel_size", id=f"{tag}-kernel-0"),
        P(f(kernel_size=-2), "kernel_size", id=f"{tag}-kernel-neg"),
        P(f(kernel_size=(2, 0)), "kernel_size", id=f"{tag}-kernel-pair-0"),
        P(f(kernel_size=(2, 2, 2)), "kernel_size", id=f"{tag}-kernel-len3"),
        P(f(stride=0), "stride", id=f"{tag}-stride-0"),
        P(f(stride=(2, -1)), "stride", id=f"{tag}-stride-neg"),
        # (stride=(2,) and stride=() are PyTorch's forms, checked in test_pooling.py)
        P(f(kernel_size=()), "kernel_size", id=f"{tag}-kernel-empty"),
        P(f(padding=()), "padding", id=f"{tag}-padding-empty"),
        P(f(padding=-1), "padding", id=f"{tag}-padding-neg"),
        P(f(kernel_size=3, padding=2), "padding", id=f"{tag}-padding-gt-half"),
        P(f(kernel_size=(3, 1), padding=(1, 1)), "padding",
          id=f"{tag}-padding-gt-half-w"),
        P(f(kernel_size=2, padding=(1, 1, 1)), "padding",
          id=f"{tag}-padding-len3"),
        P(f(input=f64(1, 1, 2, 2), kernel_size=3), TOO_SMALL,
          id=f"{tag}-output-lt-1"),
        P(f(input=f64(1, 1, 6, 2), kernel_size=(1, 3)), TOO_SMALL,
          id=f"{tag}-output-lt-1-w"),
        P(f_bw(grad_output=f64(2, 3, 3, 4)), "grad_output",
          id=f"{tag}-bw-gy-shape"),
        P(f_bw(grad_output=f64(2, 4, 3, 3)), "grad_output",
          id=f"{tag}-bw-gy-C"),
        P(f_bw(grad_output=f64(3, 3, 3)), "grad_output",
          id=f"{tag}-bw-gy-3d"),
        P(f_bw(kernel_size=0), "kernel_size", id=f"{tag}-bw-kernel-0"),
        P(f_bw(padding=5), "padding", id=f"{tag}-bw-padding"),
    ]
    if has_dilation:
        te.append(P(f(dilation=1.5), "dilation", id=f"{tag}-dilation-float"))
        ve += [
            P(f(dilation=0), "dilation", id=f"{tag}-dilation-0"),
            P(f(dilation=(1, -2)), "dilation", id=f"{tag}-dilation-neg"),
            P(f(input=f64(1, 1, 3, 3), kernel_size=2, dilation=3), TOO_SMALL,
              id=f"{tag}-dilated-output-lt-1"),
        ]
    return te, ve


_MP_TE, _MP_VE = _common_pool_errors(mp, mp_bw, True)
_AP_TE, _AP_VE = _common_pool_errors(ap, ap_bw, False)
_AP_TE += [
    P(ap(divisor_override=1.5), "divisor_override", id="ap-divisor-float"),
    P(ap(divisor_override="2"), "divisor_override", id="ap-divisor-str"),
    P(ap_bw(divisor_override=2.0), "divisor_override", id="ap-bw-divisor-float"),
]
_AP_VE += [
    P(ap(divisor_override=0), "divisor_override", id="ap-divisor-0"),
    P(ap_bw(divisor_override=0), "divisor_override", id="ap-bw-divisor-0"),
]


@pytest.mark.parametrize("fn,match", _MP_TE + _AP_TE)
def test_pool_type_errors(fn, match):
    with pytest.raises(TypeError, match=match):
        fn()


@pytest.mark.parametrize("fn,match", _MP_VE + _AP_VE)
def test_pool_value_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def aap(**kw):
    kw.setdefault("output_size", 3)
    x = kw.pop("input", PX)
    return lambda: convcore.adaptive_avg_pool2d(x, **kw)


def aap_bw(**kw):
    gy, x = kw.pop("grad_output", PGY), kw.pop("input", PX)
    return lambda: convcore.adaptive_avg_pool2d_backward(gy, x)


ADAPTIVE_TYPE_ERRORS = [
    P(aap(input=None), "input", id="input-None"),
    P(aap(input=PX.astype(np.int64)), "input", id="input-int"),
    P(aap(output_size=1.5), "output_size", id="osize-float"),
    P(aap(output_size=(2, 2.0)), "output_size", id="osize-pair-float"),
    P(aap(output_size="3"), "output_size", id="osize-str"),
    P(aap_bw(grad_output=None), "grad_output", id="bw-gy-None"),
    P(aap_bw(grad_output=PGY.astype(np.float32)), "grad_output",
      id="bw-gy-f32"),
    P(aap_bw(input=[[1.0]]), "input", id="bw-input-list"),
]

ADAPTIVE_VALUE_ERRORS = [
    P(aap(input=f64(6, 6)), "input", id="input-2d"),
    P(aap(output_size=-1), "output_size", id="osize-neg"),
    P(aap(output_size=(2, -3)), "output_size", id="osize-pair-neg"),
    P(aap(output_size=(1, 2, 3)), "output_size", id="osize-len3"),
    P(aap(output_size=(2,)), "output_size", id="osize-len1"),
    P(aap_bw(grad_output=f64(2, 4, 3, 3)), "grad_output", id="bw-gy-C"),
    P(aap_bw(grad_output=f64(1, 3, 3, 3)), "grad_output", id="bw-gy-N"),
    P(aap_bw(grad_output=f64(3, 3)), "grad_output", id="bw-gy-2d"),
    P(aap_bw(input=f64(6, 6)), r"input|grad_output", id="bw-input-2d"),
]


@pytest.mark.parametrize("fn,match", ADAPTIVE_TYPE_ERRORS)
def test_adaptive_type_errors(fn, match):
    with pytest.raises(TypeError, match=match):
        fn()


@pytest.mark.parametrize("fn,match", ADAPTIVE_VALUE_ERRORS)
def test_adaptive_value_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


@pytest.mark.parametrize("output_size,shape", [(0, (2, 3, 0, 0)),
                                               ((2, 0), (2, 3, 2, 0)),
                                               ((0, None), (2, 3, 0, 6))])
def test_adaptive_zero_output_size_is_empty_like_torch(output_size, shape):
    """torch.nn.functional.adaptive_avg_pool2d(x, 0) returns an empty
    tensor rather than raising; convcore mirrors that."""
    out = convcore.adaptive_avg_pool2d(PX, output_size)
    assert out.shape == shape and out.dtype == PX.dtype


# ---------------------------------------------------------------------------
# linear / relu
# ---------------------------------------------------------------------------

LX = f64(3, 5)
LW = f64(4, 5)
LB = f64(4)
LGY = f64(3, 4)


def lin(**kw):
    x, w = kw.pop("input", LX), kw.pop("weight", LW)
    return lambda: convcore.linear(x, w, **kw)


def lin_bw(**kw):
    gy, x, w = kw.pop("grad_output", LGY), kw.pop("input", LX), kw.pop("weight", LW)
    return lambda: convcore.linear_backward(gy, x, w)


LINEAR_TYPE_ERRORS = [
    P(lin(input=None), "input", id="input-None"),
    P(lin(input=LX.tolist()), "input", id="input-list"),
    P(lin(input=LX.astype(np.int64), weight=LW.astype(np.int64)), "input",
      id="input-int"),
    P(lin(weight=None), "weight", id="weight-None"),
    P(lin(weight=LW.astype(np.float32)), "weight", id="weight-f32"),
    P(lin(bias=LB.astype(np.float32)), "bias", id="bias-f32"),
    P(lin(bias=[0.0] * 4), "bias", id="bias-list"),
    P(lin_bw(grad_output=LGY.astype(np.float32)), "grad_output", id="bw-gy-f32"),
    P(lin_bw(grad_output=None), "grad_output", id="bw-gy-None"),
    P(lin_bw(weight=LW.astype(np.float32)), "weight", id="bw-weight-f32"),
]

LINEAR_VALUE_ERRORS = [
    P(lin(weight=f64(4, 6)), r"input|weight", id="in-features"),
    P(lin(weight=f64(5)), "weight", id="weight-1d"),
    P(lin(weight=f64(1, 4, 5)), "weight", id="weight-3d"),
    P(lin(input=np.ones((), np.float64)), "input", id="input-0d"),
    P(lin(bias=f64(5)), "bias", id="bias-len"),
    P(lin(bias=f64(1, 4)), "bias", id="bias-2d"),
    P(lin_bw(grad_output=f64(3, 5)), "grad_output", id="bw-gy-out"),
    P(lin_bw(grad_output=f64(2, 4)), "grad_output", id="bw-gy-lead"),
    P(lin_bw(grad_output=f64(3, 1, 4)), "grad_output", id="bw-gy-ndim"),
    P(lin_bw(weight=f64(4, 6)), r"input|weight", id="bw-in-features"),
]


@pytest.mark.parametrize("fn,match", LINEAR_TYPE_ERRORS)
def test_linear_type_errors(fn, match):
    with pytest.raises(TypeError, match=match):
        fn()


@pytest.mark.parametrize("fn,match", LINEAR_VALUE_ERRORS)
def test_linear_value_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


RELU_TYPE_ERRORS = [
    P(lambda: convcore.relu(None), "input", id="None"),
    P(lambda: convcore.relu([1.0, -1.0]), "input", id="list"),
    P(lambda: convcore.relu(np.array([1, -1])), "input", id="int"),
    P(lambda: convcore.relu(np.array([True])), "input", id="bool"),
    P(lambda: convcore.relu(np.array([1j])), "input", id="complex"),
    P(lambda: convcore.relu_backward(None, f64(3)), "grad_output",
      id="bw-gy-None"),
    P(lambda: convcore.relu_backward(f32(3), f64(3)), "grad_output",
      id="bw-gy-f32"),
    P(lambda: convcore.relu_backward(f64(3), np.arange(3)), "input",
      id="bw-input-int"),
]

RELU_VALUE_ERRORS = [
    P(lambda: convcore.relu_backward(f64(3), f64(4)), "grad_output",
      id="bw-shape"),
    P(lambda: convcore.relu_backward(f64(2, 3), f64(3, 2)), "grad_output",
      id="bw-shape-2d"),
    P(lambda: convcore.relu_backward(f64(1, 3), f64(3)), "grad_output",
      id="bw-ndim"),
]


@pytest.mark.parametrize("fn,match", RELU_TYPE_ERRORS)
def test_relu_type_errors(fn, match):
    with pytest.raises(TypeError, match=match):
        fn()


@pytest.mark.parametrize("fn,match", RELU_VALUE_ERRORS)
def test_relu_value_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_errors_leave_module_usable():
    """After a burst of failing calls the module still computes correctly."""
    for bad in (conv(stride=0), conv(weight=None), mp(kernel_size=0),
                lin(weight=f64(4, 6))):
        with pytest.raises((TypeError, ValueError)):
            bad()
    out = convcore.conv2d(X, W, B, padding=1)
    np.testing.assert_allclose(out[0, 0, 2, 2], 4 * 9 + 1)
    np.testing.assert_allclose(out[0, 0, 0, 0], 4 * 4 + 1)


# ---------------------------------------------------------------------------
# degenerate but legal inputs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_batch(dtype):
    x = np.ones((0, 4, 6, 6), dtype)
    w = np.ones((6, 2, 3, 3), dtype)
    b = np.ones(6, dtype)
    out = convcore.conv2d(x, w, b, stride=2, padding=1, groups=2)
    assert out.shape == (0, 6, 3, 3) and out.dtype == dtype
    gx, gw, gb = convcore.conv2d_backward(np.ones((0, 6, 3, 3), dtype), x, w,
                                          stride=2, padding=1, groups=2)
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == w.shape and (gw == 0).all()
    assert gb.shape == (6,) and (gb == 0).all()

    mo, mi = convcore.max_pool2d(x, 3, 2, 1, ceil_mode=True,
                                 return_indices=True)
    # (6 + 2 - 3 + 1) / 2 rounded up, + 1 = 4
    assert mo.shape == (0, 4, 4, 4) and mi.shape == (0, 4, 4, 4)
    assert mi.dtype == np.int64
    assert convcore.max_pool2d_backward(np.ones((0, 4, 4, 4), dtype), x, 3, 2,
                                        1, ceil_mode=True).shape == x.shape
    assert convcore.avg_pool2d(x, 2).shape == (0, 4, 3, 3)
    assert convcore.avg_pool2d_backward(np.ones((0, 4, 3, 3), dtype), x,
                                        2).shape == x.shape
    assert convcore.adaptive_avg_pool2d(x, (5, 2)).shape == (0, 4, 5, 2)
    assert convcore.adaptive_avg_pool2d_backward(
        np.ones((0, 4, 5, 2), dtype), x).shape == x.shape

    lx = np.ones((0, 5), dtype)
    lw = np.ones((3, 5), dtype)
    lo = convcore.linear(lx, lw, np.ones(3, dtype))
    assert lo.shape == (0, 3) and lo.dtype == dtype
    lgx, lgw, lgb = convcore.linear_backward(np.ones((0, 3), dtype), lx, lw)
    assert lgx.shape == (0, 5) and (lgw == 0).all() and (lgb == 0).all()
    assert lgw.shape == (3, 5) and lgb.shape == (3,)
    assert convcore.relu(np.ones((0, 3), dtype)).shape == (0, 3)
    assert convcore.relu_backward(np.ones((0, 3), dtype),
                                  np.ones((0, 3), dtype)).shape == (0, 3)


def test_large_padding_correct_result():
    """Padding far larger than the input: all-bias output except where the
    kernel overlaps the input."""
    x = np.full((1, 1, 1, 1), 2.0)
    w = np.full((1, 1, 1, 1), 3.0)
    b = np.array([0.5])
    out = convcore.conv2d(x, w, b, padding=300)
    assert out.shape == (1, 1, 601, 601)
    expected = np.full((601, 601), 0.5)
    expected[300, 300] = 6.5
    np.testing.assert_array_equal(out[0, 0], expected)


@pytest.mark.parametrize("stride", [100, 2**20, 2**40])
def test_huge_stride_correct_result_or_clear_error(stride):
    """A stride far beyond the input gives a single output; an
    implementation may instead cap strides with a ValueError naming it."""
    x = np.ones((1, 1, 5, 5))
    try:
        out = convcore.conv2d(x, np.ones((1, 1, 2, 2)), stride=stride)
    except ValueError as e:
        assert stride > 2**31 - 1 and "stride" in str(e)
    else:
        assert out.shape == (1, 1, 1, 1) and out[0, 0, 0, 0] == 4.0
    try:
        out = convcore.max_pool2d(x, 2, stride=stride)
    except ValueError as e:
        assert stride > 2**31 - 1 and "stride" in str(e)
    else:
        assert out.shape == (1, 1, 1, 1) and out[0, 0, 0, 0] == 1.0


def test_huge_arguments_do_not_crash_the_interpreter():
    """Run in a subprocess so that a segfault / abort is reported as a test
    failure rather than killing the test run."""
    code = textwrap.dedent("""
        import numpy as np, convcore
        x = np.ones((1, 1, 2, 2)); w = np.ones((1, 1, 1, 1))
        ok = (ValueError, OverflowError, MemoryError, TypeError)
        # (callable, shape it may legitimately return or None if it must raise)
        cases = [
            (lambda: convcore.conv2d(x, w, padding=2**31), None),
            (lambda: convcore.conv2d(x, w, padding=2**40), None),
            (lambda: convcore.conv2d(x, w, padding=2**62), None),
            (lambda: convcore.conv2d(x, w, padding=2**63), None),
            (lambda: convcore.conv2d(x, w, padding=10**30), None),
            (lambda: convcore.conv2d(x, w, padding=(0, 2**33)), None),
            (lambda: convcore.conv2d(x, np.ones((1, 1, 2, 1)),
                                     dilation=2**62), None),
            (lambda: convcore.conv2d(x, np.ones((1, 1, 2, 1)),
                                     dilation=2**31), None),
            (lambda: convcore.conv2d(x, w, stride=2**63), None),
            (lambda: convcore.conv2d(x, w, groups=2**63), None),
            (lambda: convcore.conv2d_backward(np.ones((1, 1, 2, 2)), x, w,
                                              padding=2**40), None),
            (lambda: convcore.max_pool2d(x, 2**40), None),
            (lambda: convcore.max_pool2d(x, 2**31), None),
            (lambda: convcore.max_pool2d(x, 2, dilation=2**62), None),
            (lambda: convcore.avg_pool2d(x, 2**40), None),
            (lambda: convcore.avg_pool2d(x, 2**32, padding=2**31), None),
            (lambda: convcore.adaptive_avg_pool2d(x, 2**40), None),
            (lambda: convcore.adaptive_avg_pool2d(x, (2**31, 2**31)), None),
            # legal: a 1x1 kernel ignores dilation; a huge divisor is fine
            (lambda: convcore.conv2d(x, w, dilation=2**62), (1, 1, 2, 2)),
            (lambda: convcore.avg_pool2d(x, 2, divisor_override=2**40),
             (1, 1, 1, 1)),
        ]
        bad = []
        for i, (f, legal_shape) in enumerate(cases):
            try:
                r = f()
            except ok:
                continue
            if legal_shape is None or r.shape != legal_shape:
                bad.append((i, getattr(r, "shape", r)))
        print("unexpected results:", bad)
        print("SURVIVED")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "SURVIVED" in proc.stdout, proc.stdout + proc.stderr
    assert "unexpected results: []" in proc.stdout, proc.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_only_inputs_accepted(dtype):
    x = np.ones((1, 2, 4, 4), dtype)
    w = np.ones((3, 2, 3, 3), dtype)
    x.flags.writeable = False
    w.flags.writeable = False
    out = convcore.conv2d(x, w, padding=1)
    assert out.flags.writeable and out[0, 0, 1, 1] == 18
    assert convcore.max_pool2d(x, 2).shape == (1, 2, 2, 2)
    assert convcore.relu(x).flags.writeable
