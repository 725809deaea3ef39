"""The layer API (convcore.nn): every layer's backward (input gradient and
parameter gradients) against central finite differences in float64, and the
loss. The Module mechanics are in test_nn_module.py."""

import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest

import convcore
import convcore.functional as F
import reference as ref
from _helpers import numerical_grad
from _helpers import assert_close, distinct_values
from convcore import _core, nn

EPS = 1e-6  # the finite-difference step of numerical_grad (tests/_helpers.py)
FD_RTOL = 1e-6      # scaled: |num - ana| <= FD_RTOL * max(1, max|ana|)


pytestmark = pytest.mark.usefixtures("one_core_thread")




def gradcheck_module(module, x, seed=0, rtol=FD_RTOL, check_params=True):
    """Checks module.backward against finite differences of
    L = sum(module(x) * R): the returned input gradient and the gradient
    accumulated into every parameter's .grad."""
    rng = np.random.default_rng(seed)
    assert x.dtype == np.float64
    y = module(x)
    assert y.dtype == np.float64, y.dtype
    R = rng.standard_normal(y.shape)
    module.zero_grad()
    gx = module.backward(R.copy())
    assert gx.shape == x.shape, (gx.shape, x.shape)
    analytic = OrderedDict((name, p.grad.copy()) for name, p in module.named_parameters())

    def loss():
        return float((module(x) * R).sum())

    assert_close(gx, numerical_grad(loss, x), rtol=rtol, what="grad_input")
    if check_params:
        for name, p in module.named_parameters():
            assert p.data.dtype == np.float64
            assert_close(analytic[name], numerical_grad(loss, p.data), rtol=rtol,
                         what=f"grad of {name}")
    return y, gx, analytic


def away_from_zero(rng, shape, margin=0.05):
    """Normal values with |v| >= margin (ReLU kinks stay out of reach of FD)."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < margin, np.sign(x + 1e-12) * margin + x, x)


# ===========================================================================
# convolution
# ===========================================================================

CONV_CONFIGS = [
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=(2, 3), stride=(2, 1), padding=(1, 2)),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2,
         groups=2),
    dict(in_channels=3, out_channels=6, kernel_size=3, padding="same", groups=3),   # depthwise
    dict(in_channels=2, out_channels=2, kernel_size=4, padding="same", dilation=(1, 2)),
    dict(in_channels=2, out_channels=3, kernel_size=2, padding="valid", stride=2, bias=False),
    dict(in_channels=2, out_channels=2, kernel_size=(3, 1), padding=(2, 0)),
]


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=range(len(CONV_CONFIGS)))
def test_conv2d_layer_gradcheck(config, padding_mode):
    convcore.manual_seed(1)
    m = nn.Conv2d(**config, padding_mode=padding_mode, dtype=np.float64)
    assert m.weight.data.dtype == np.float64
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, config["in_channels"], 5, 6))
    y, _, grads = gradcheck_module(m, x)
    assert y.shape[1:] == m.output_shape(x.shape[1:])
    assert ("bias" in grads) == config.get("bias", True)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (4, 1), (2, 3), ((3, 2), (1, 2))])
def test_conv2d_same_keeps_size(padding_mode, kernel, dilation):
    m = nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation, padding_mode=padding_mode,
                  dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((1, 2, 7, 6))
    y = m(x)
    assert y.shape == (1, 3, 7, 6)
    assert m.output_shape((2, 7, 6)) == (3, 7, 6)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_padding_modes_match_explicit_padding(padding_mode):
    """The forward equals a valid conv of the input padded with np.pad's
    mode of the same name (the reference conv from reference.py)."""
    np_mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
               "circular": "wrap"}[padding_mode]
    m = nn.Conv2d(2, 3, 3, padding=(2, 1), padding_mode=padding_mode, dtype=np.float64)
    x = np.random.default_rng(4).standard_normal((2, 2, 4, 5))
    xp = np.pad(x, [(0, 0), (0, 0), (2, 2), (1, 1)], mode=np_mode)
    expected = ref.conv2d_ref(xp, m.weight.data, m.bias.data)
    assert_close(m(x), expected, rtol=1e-12, what=padding_mode)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [(2, 1), (1, 3), "same"])
def test_conv2d_padding_mode_gradients_match_torch(padding_mode, padding):
    """The layer's backward through the core's pad2d_backward: grad_input and
    grad_weight as PyTorch's Conv2d(padding_mode=...)."""
    torch = pytest.importorskip("torch")
    kernel = (3, 4) if padding == "same" else 3
    m = nn.Conv2d(2, 3, kernel, padding=padding, padding_mode=padding_mode, dtype=np.float64)
    t = torch.nn.Conv2d(2, 3, kernel, padding=padding, padding_mode=padding_mode,
                        dtype=torch.float64)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(m.weight.data))
        t.bias.copy_(torch.from_numpy(m.bias.data))
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 2, 5, 6))
    y = m(x)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = t(xt)
    assert_close(y, yt.detach().numpy(), rtol=1e-12, what="output")
    g = rng.standard_normal(y.shape)
    gx = m.backward(g)
    yt.backward(torch.from_numpy(g))
    assert_close(gx, xt.grad.numpy(), rtol=1e-12, what="grad_input")
    assert_close(m.weight.grad, t.weight.grad.numpy(), rtol=1e-12, what="grad_weight")


@pytest.mark.parametrize("mode, np_mode", [("zeros", "constant"), ("reflect", "reflect"),
                                           ("replicate", "edge"), ("circular", "wrap")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pad2d_is_numpy_pad_and_its_gradient(mode, np_mode, dtype):
    """_core.pad2d / pad2d_backward (the C++ core's padding, shared with the
    engine): numpy.pad's modes, and the sum of each padded position's
    gradient into the position it was copied from (strided input too)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 5)).astype(dtype)[:, ::2]  # strided channels
    pads = [2, 1, 0, 3]
    width = [(0, 0), (0, 0), (2, 1), (0, 3)]
    y = _core.pad2d(x, pads, mode)
    np.testing.assert_array_equal(y, np.pad(x, width, mode=np_mode))
    g = rng.standard_normal(y.shape).astype(dtype)
    expect = np.zeros(x.shape, np.float64)
    extra = dict(constant_values=-1) if mode == "zeros" else {}  # -1: a zero, from no input
    rows = np.pad(np.arange(6), (2, 1), mode=np_mode, **extra)
    cols = np.pad(np.arange(5), (0, 3), mode=np_mode, **extra)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if r >= 0 and c >= 0:
                expect[..., r, c] += g[..., i, j]
    np.testing.assert_allclose(_core.pad2d_backward(g, pads, mode), expect, rtol=1e-6)
    with pytest.raises(ValueError, match="padding_mode"):
        _core.pad2d(x, pads, "edge")
    with pytest.raises(ValueError, match="pads"):
        _core.pad2d(x, [1, 2], mode)


def test_conv2d_unbatched_input_with_padding_mode():
    m = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", dtype=np.float64)
    x = np.random.default_rng(5).standard_normal((2, 4, 5))
    y = m(x)
    assert y.shape == (3, 4, 5)
    gx = m.backward(np.ones_like(y))
    assert gx.shape == x.shape
    assert_close(y, m(x[None])[0], rtol=1e-14)


@pytest.mark.parametrize("mode,padding", [("reflect", 3), ("reflect", (1, 3)),
                                          ("circular", 4)])
def test_conv2d_padding_beyond_input_raises(mode, padding):
    """PyTorch raises where the padded copy would need more than the input
    ('Padding size should be less than the corresponding input dimension'
    for reflect, 'wrapping around more than once' for circular); np.pad would
    silently reflect or wrap again."""
    m = nn.Conv2d(1, 1, 3, padding=padding, padding_mode=mode, dtype=np.float64)
    with pytest.raises(ValueError):
        m(np.zeros((1, 1, 3, 3)))


@pytest.mark.parametrize("kwargs,exc", [
    (dict(in_channels=3, out_channels=4, kernel_size=3, groups=2), ValueError),
    (dict(in_channels=0, out_channels=4, kernel_size=3), ValueError),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding="full"), ValueError),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", stride=2), ValueError),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding_mode="mirror"), ValueError),
    (dict(in_channels=3, out_channels=4, kernel_size=3, dtype=np.int32), TypeError),
    (dict(in_channels=3, out_channels=4, kernel_size=2.5), TypeError),
])
def test_conv2d_bad_arguments(kwargs, exc):
    with pytest.raises(exc):
        nn.Conv2d(**kwargs)


def test_conv2d_backward_before_forward_raises():
    with pytest.raises(RuntimeError):
        nn.Conv2d(1, 1, 3).backward(np.zeros((1, 1, 1, 1), np.float32))


# ===========================================================================
# pooling
# ===========================================================================

@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1)),
    dict(kernel_size=3, stride=2, ceil_mode=True),
])
def test_max_pool2d_layer_gradcheck(kwargs):
    m = nn.MaxPool2d(**kwargs)
    rng = np.random.default_rng(6)
    x = distinct_values(rng, (2, 2, 7, 6), np.float64, gap=0.01)   # no ties within EPS
    y, _, grads = gradcheck_module(m, x)
    assert grads == {}
    assert y.shape[1:] == m.output_shape(x.shape[1:])


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    dict(kernel_size=(3, 2), stride=1, ceil_mode=True),
    dict(kernel_size=3, stride=2, ceil_mode=True, divisor_override=4),
])
def test_avg_pool2d_layer_gradcheck(kwargs):
    m = nn.AvgPool2d(**kwargs)
    x = np.random.default_rng(7).standard_normal((2, 3, 7, 6))
    y, _, _ = gradcheck_module(m, x)
    assert y.shape[1:] == m.output_shape(x.shape[1:])


@pytest.mark.parametrize("output_size", [1, 3, (2, 4), (None, 2), (5, 7)])
def test_adaptive_avg_pool2d_layer_gradcheck(output_size):
    m = nn.AdaptiveAvgPool2d(output_size)
    x = np.random.default_rng(8).standard_normal((2, 2, 5, 6))
    y, _, _ = gradcheck_module(m, x)
    assert y.shape[1:] == m.output_shape(x.shape[1:])
    assert_close(y, ref.adaptive_avg_pool2d_ref(x, output_size), rtol=1e-12)


def test_pool_stride_defaults_to_kernel():
    assert nn.MaxPool2d(3).stride == (3, 3)
    assert nn.AvgPool2d((2, 3)).stride == (2, 3)
    # PyTorch's default stride=() and a 1-tuple mean the same
    assert nn.MaxPool2d(3, stride=()).stride == (3, 3)
    assert nn.AvgPool2d((2, 3), stride=[], padding=(1,)).padding == (1, 1)


@pytest.mark.parametrize("training", [True, False])
def test_max_pool2d_layer_return_indices_vs_torch(training):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pooling parity skipped")
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    m = nn.MaxPool2d(return_indices=True, **kw).train(training)
    t = torch.nn.MaxPool2d(return_indices=True, **kw).train(training)
    x = distinct_values(np.random.default_rng(9), (2, 3, 7, 6), np.float64, gap=0.01)
    out, idx = m(x)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    out_t, idx_t = t(xt)
    np.testing.assert_array_equal(out, out_t.detach().numpy())
    np.testing.assert_array_equal(idx, idx_t.numpy())
    assert idx.dtype == np.int64
    gy = np.random.default_rng(10).standard_normal(out.shape)
    out_t.backward(torch.from_numpy(gy))
    np.testing.assert_array_equal(m.backward(gy), xt.grad.numpy())
    assert "return_indices=True" in repr(m)
    again = nn.from_architecture(m.architecture())
    assert again.return_indices and again.config() == m.config()


def test_max_pool2d_return_indices_cannot_be_a_graph_node():
    from convcore.nn.lowering import LoweringError
    with pytest.raises(LoweringError, match="return_indices"):
        nn.Sequential(nn.MaxPool2d(2, return_indices=True)).to_graph()
    node = nn.Sequential(nn.MaxPool2d(2)).to_graph()["nodes"][0]
    assert "return_indices" not in node["attrs"]    # not an attribute of the format


# ===========================================================================
# linear, relu, flatten
# ===========================================================================

@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5), (5,), (2, 1, 2, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_layer_gradcheck(shape, bias):
    convcore.manual_seed(9)
    m = nn.Linear(5, 4, bias=bias, dtype=np.float64)
    x = np.random.default_rng(9).standard_normal(shape)
    y, _, grads = gradcheck_module(m, x)
    assert y.shape == shape[:-1] + (4,)
    assert_close(y, ref.linear_ref(x, m.weight.data, m.bias.data if bias else None),
                 rtol=1e-12)
    assert sorted(grads) == (["bias", "weight"] if bias else ["weight"])


def test_relu_layer_gradcheck():
    x = away_from_zero(np.random.default_rng(10), (2, 3, 4, 4))
    y, gx, _ = gradcheck_module(nn.ReLU(), x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


@pytest.mark.parametrize("start_dim,end_dim,out_shape", [
    (1, -1, (2, 60)), (0, -1, (120,)), (2, 3, (2, 3, 20)), (1, 2, (2, 12, 5)),
])
def test_flatten_layer(start_dim, end_dim, out_shape):
    m = nn.Flatten(start_dim, end_dim)
    x = np.random.default_rng(11).standard_normal((2, 3, 4, 5))
    y, gx, _ = gradcheck_module(m, x)
    assert y.shape == out_shape
    np.testing.assert_array_equal(y.reshape(x.shape), x)
    if start_dim == 1 and end_dim == -1:
        assert m.output_shape((3, 4, 5)) == (60,)


# ===========================================================================
# dropout
# ===========================================================================

@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_dropout_train_mask_consistent(p):
    convcore.manual_seed(12)
    m = nn.Dropout(p)
    assert m.training
    x = np.random.default_rng(12).uniform(0.5, 1.5, (40, 50, 10))
    y = m(x)
    mask = y / x
    kept = mask != 0
    # kept values are scaled by 1 / (1 - p), dropped ones are exactly 0
    np.testing.assert_allclose(mask[kept], 1.0 / (1.0 - p), rtol=1e-12)
    frac = 1.0 - kept.mean()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / x.size), frac
    g = np.random.default_rng(13).standard_normal(x.shape)
    # backward uses the mask of the last forward
    np.testing.assert_allclose(m.backward(g), g * mask, rtol=1e-12)
    # a new forward draws a new mask
    assert not np.array_equal(m(x) != 0, kept)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_keeps_dtype(dtype):
    m = nn.Dropout(0.5)
    x = np.ones((4, 5), dtype)
    assert m(x).dtype == dtype
    assert m.backward(np.ones((4, 5), dtype)).dtype == dtype


def test_dropout_eval_is_identity():
    m = nn.Dropout(0.5).eval()
    x = np.random.default_rng(14).standard_normal((3, 4))
    np.testing.assert_array_equal(m(x), x)
    g = np.random.default_rng(15).standard_normal((3, 4))
    np.testing.assert_array_equal(m.backward(g), g)


def test_dropout_p0_and_p1():
    x = np.random.default_rng(16).standard_normal((3, 4))
    m0 = nn.Dropout(0.0)
    np.testing.assert_array_equal(m0(x), x)
    np.testing.assert_array_equal(m0.backward(x), x)
    m1 = nn.Dropout(1.0)
    np.testing.assert_array_equal(m1(x), np.zeros_like(x))
    np.testing.assert_array_equal(m1.backward(x), np.zeros_like(x))


def test_dropout_seeded():
    x = np.ones((10, 10))
    convcore.manual_seed(17)
    a = nn.Dropout(0.5)(x)
    convcore.manual_seed(17)
    b = nn.Dropout(0.5)(x)
    np.testing.assert_array_equal(a, b)


def test_dropout_of_inf_is_nan_where_dropped_without_a_warning():
    """As PyTorch's dropout (inf * 0): NaN where dropped, inf kept where kept,
    and no numpy RuntimeWarning (the API fuzz met one with an inf input)."""
    x = np.array([np.inf, -np.inf, np.nan, 1.0] * 16)
    convcore.manual_seed(18)
    m = nn.Dropout(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = m(x)
        g = m.backward(np.full_like(x, np.inf))
    kept = m._mask != 0
    assert 0 < kept.sum() < x.size
    np.testing.assert_array_equal(y, np.where(kept, x * 2, np.where(np.isfinite(x), 0, np.nan)))
    assert np.isnan(g[~kept]).all()
    assert np.isposinf(g[kept]).all()


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_bad_p(p):
    with pytest.raises(ValueError):
        nn.Dropout(p)


# ===========================================================================
# normalisation layers
# ===========================================================================

@pytest.mark.parametrize("size,alpha,beta,k", [(5, 1e-4, 0.75, 2.0), (3, 0.5, 0.75, 1.0),
                                               (2, 1.0, 1.2, 0.5)])
def test_local_response_norm_layer(size, alpha, beta, k):
    m = nn.LocalResponseNorm(size, alpha, beta, k)
    x = np.random.default_rng(18).standard_normal((2, 6, 3, 3)) * 3
    y, _, grads = gradcheck_module(m, x)
    assert grads == {}
    assert_close(y, ref.local_response_norm_ref(x, size, alpha, beta, k), rtol=1e-12)


def test_local_response_norm_defaults_as_pytorch():
    m = nn.LocalResponseNorm(5)
    assert (m.size, m.alpha, m.beta, m.k) == (5, 1e-4, 0.75, 1.0)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm2d_layer_gradcheck(training, affine):
    m = nn.BatchNorm2d(3, affine=affine, dtype=np.float64)
    rng = np.random.default_rng(19)
    if affine:
        m.weight.data[:] = rng.standard_normal(3)
        m.bias.data[:] = rng.standard_normal(3)
    m.running_mean[:] = rng.standard_normal(3) * 0.2
    m.running_var[:] = rng.uniform(0.5, 2.0, 3)
    m.train(training)
    x = rng.standard_normal((3, 3, 2, 3)) * 2 + 1
    y, _, grads = gradcheck_module(m, x)
    assert sorted(grads) == (["bias", "weight"] if affine else [])


def test_batchnorm2d_running_stats_as_pytorch():
    m = nn.BatchNorm2d(3, momentum=0.3, dtype=np.float64)
    rng = np.random.default_rng(20)
    erm, erv = np.zeros(3), np.ones(3)
    for step in range(3):
        x = rng.standard_normal((4, 3, 2, 2)) * (step + 1) + step
        out = m(x)
        exp, _, _, erm, erv = ref.batch_norm_ref(x, erm, erv, m.weight.data, m.bias.data,
                                                 training=True, momentum=0.3)
        assert_close(out, exp, rtol=1e-12, what=f"output step {step}")
    assert_close(m.running_mean, erm, rtol=1e-12, what="running_mean")
    assert_close(m.running_var, erv, rtol=1e-12, what="running_var")
    assert int(m.num_batches_tracked) == 3
    sd = m.state_dict()
    np.testing.assert_array_equal(sd["running_mean"], m.running_mean)
    assert int(sd["num_batches_tracked"]) == 3
    # eval: normalises with the running stats, leaves them (and the count) alone
    m.eval()
    x = rng.standard_normal((2, 3, 2, 2))
    exp = ref.batch_norm_ref(x, erm, erv, m.weight.data, m.bias.data, training=False)[0]
    assert_close(m(x), exp, rtol=1e-12, what="eval output")
    assert_close(m.running_mean, erm, rtol=1e-12)
    assert int(m.num_batches_tracked) == 3


def test_batchnorm2d_running_stats_vs_torch():
    torch = pytest.importorskip("torch", reason="PyTorch not installed: BN parity skipped")
    m = nn.BatchNorm2d(4, dtype=np.float64)
    t = torch.nn.BatchNorm2d(4).double()
    rng = np.random.default_rng(21)
    for _ in range(3):
        x = rng.standard_normal((3, 4, 3, 2)) * 2 - 1
        y = m(x)
        yt = t(torch.from_numpy(x)).detach().numpy()
        assert_close(y, yt, rtol=1e-12)
    for key, value in t.state_dict().items():
        assert_close(m.state_dict()[key], value.numpy(), rtol=1e-12, what=key)
    m.eval(), t.eval()
    x = rng.standard_normal((2, 4, 3, 2))
    assert_close(m(x), t(torch.from_numpy(x)).detach().numpy(), rtol=1e-12)


def _bn_twins(torch, *args, **kwargs):
    m = nn.BatchNorm2d(*args, dtype=np.float64, **kwargs)
    t = torch.nn.BatchNorm2d(*args, **kwargs).double()
    rng = np.random.default_rng(23)
    if m.weight is not None:
        m.weight.data[:] = rng.uniform(0.5, 1.5, m.num_features)
        t.weight.data[:] = torch.from_numpy(m.weight.data)
    if m.bias is not None:
        m.bias.data[:] = rng.standard_normal(m.num_features)
        t.bias.data[:] = torch.from_numpy(m.bias.data)
    return m, t


def _bn_step(m, t, torch, x, gy):
    """One forward and backward of both twins; returns the largest differences
    of output, input gradient and parameter gradients."""
    t.zero_grad()
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = t(xt)
    yt.backward(torch.from_numpy(gy))
    m.zero_grad()
    y = m(x)
    gx = m.backward(gy)
    assert y.shape == tuple(yt.shape) and gx.shape == x.shape
    diffs = [np.abs(y - yt.detach().numpy()).max(initial=0),
             np.abs(gx - xt.grad.numpy()).max(initial=0)]
    for name, p in m.named_parameters():
        diffs.append(np.abs(p.grad - getattr(t, name).grad.numpy()).max(initial=0))
    return max(diffs)


def _bn_state_diff(m, t):
    sd = m.state_dict()
    assert list(sd) == list(t.state_dict())
    return max(np.abs(np.asarray(sd[k], np.float64) - v.double().numpy()).max(initial=0)
               for k, v in t.state_dict().items())


def test_batchnorm2d_momentum_none_is_a_cumulative_average_as_torch():
    torch = pytest.importorskip("torch", reason="PyTorch not installed: BN parity skipped")
    m, t = _bn_twins(torch, 3, 0.001, None)       # PyTorch's positional form
    assert m.momentum is None and m.eps == 0.001
    rng = np.random.default_rng(24)
    for step in range(4):
        x = rng.standard_normal((4, 3, 2, 3)) * (step + 1) + step
        assert _bn_step(m, t, torch, x, rng.standard_normal(x.shape)) <= 1e-12
        assert _bn_state_diff(m, t) <= 1e-12
    assert int(m.num_batches_tracked) == 4
    # the running mean is the mean of the four batch means, not a decayed one
    m.eval(), t.eval()
    x = rng.standard_normal((2, 3, 2, 3))
    assert _bn_step(m, t, torch, x, rng.standard_normal(x.shape)) <= 1e-12
    assert m.config()["momentum"] is None
    assert nn.from_architecture(m.architecture()).momentum is None
    node = nn.Sequential(m).to_graph()["nodes"][0]
    assert "momentum" not in node["attrs"]    # the format's momentum is a number (unused)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(momentum="0.1"), TypeError, "momentum"),
    (dict(momentum=True), TypeError, "momentum"),
    (dict(eps=None), TypeError, "eps"),
])
def test_batchnorm2d_bad_arguments_name_themselves(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        nn.BatchNorm2d(3, **kwargs)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm2d_without_bias_as_torch(training):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: BN parity skipped")
    m, t = _bn_twins(torch, 3, bias=False)
    assert m.bias is None and t.bias is None
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]
    m.train(training), t.train(training)
    rng = np.random.default_rng(25)
    x = rng.standard_normal((3, 3, 2, 2)) * 2 + 1
    assert _bn_step(m, t, torch, x, rng.standard_normal(x.shape)) <= 1e-12
    assert _bn_state_diff(m, t) <= 1e-12
    assert "bias=False" in repr(m)
    gradcheck_module(m, x)
    again = nn.from_architecture(m.architecture())
    assert again.bias is None and again.weight is not None


def test_batchnorm2d_without_bias_saves_loads_and_compiles(tmp_path):
    import convcore
    # the attribute only when False: files of default norms stay as they were
    attrs = nn.Sequential(nn.BatchNorm2d(3)).to_graph()["nodes"][0]["attrs"]
    assert attrs == {"num_features": 3, "eps": 1e-5, "momentum": 0.1, "affine": True,
                     "track_running_stats": True}
    convcore.manual_seed(0)
    rng = np.random.default_rng(3)
    # folded into a convolution, as a scale on its own (after a ReLU), and
    # normalising with the batch's statistics
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, bias=False), nn.ReLU(),
                          nn.BatchNorm2d(8, bias=False),
                          nn.BatchNorm2d(8, bias=False, track_running_stats=False))
    for bn in (model[1], model[3]):
        bn.running_mean[:] = rng.standard_normal(8)
        bn.running_var[:] = rng.uniform(0.5, 2, 8)
    for bn in (model[1], model[3], model[4]):
        bn.weight.data[:] = rng.standard_normal(8)
    model.eval()
    assert model.to_graph()["nodes"][1]["attrs"]["bias"] is False
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    expected = model(x)
    path = tmp_path / "bn.safetensors"
    model.save(path)
    loaded = convcore.load(path)
    assert loaded[1].bias is None and loaded[1].weight is not None
    np.testing.assert_array_equal(loaded.eval()(x), expected)
    for compiled in (convcore.compile(model), convcore.compile(path)):
        assert np.abs(compiled(x) - expected).max() <= 1e-5 * max(1, np.abs(expected).max())


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_batchnorm2d_empty_batch_as_torch(momentum, track_running_stats):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: BN parity skipped")
    m, t = _bn_twins(torch, 3, momentum=momentum, track_running_stats=track_running_stats)
    rng = np.random.default_rng(26)
    x = rng.standard_normal((4, 3, 2, 2))
    _bn_step(m, t, torch, x, rng.standard_normal(x.shape))      # running stats away from init
    before = m.state_dict()
    empty = np.zeros((0, 3, 5, 5))
    assert _bn_step(m, t, torch, empty, empty) == 0      # empty output and input gradient,
    for p in m.parameters():                             # zero parameter gradients
        assert p.grad.shape == (3,) and not p.grad.any()
    assert _bn_state_diff(m, t) <= 1e-12  # statistics kept, num_batches_tracked counted
    if track_running_stats:
        assert int(m.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
        np.testing.assert_array_equal(m.running_mean, before["running_mean"])
        np.testing.assert_array_equal(m.running_var, before["running_var"])
    m.eval(), t.eval()
    assert _bn_step(m, t, torch, empty, empty) == 0


def test_batchnorm2d_without_running_stats_uses_batch_stats_in_eval():
    m = nn.BatchNorm2d(2, track_running_stats=False, dtype=np.float64).eval()
    assert m.state_dict().keys() == {"weight", "bias"}
    x = np.random.default_rng(22).standard_normal((4, 2, 3, 3))
    assert_close(m(x), ref.batch_norm_ref(x, training=True)[0], rtol=1e-12)
    gradcheck_module(m, x)


# ===========================================================================
# residual blocks and containers
# ===========================================================================

@pytest.mark.parametrize("inplanes,planes,stride", [(4, 4, 1), (4, 6, 1), (4, 4, 2),
                                                    (3, 5, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_basic_block_gradcheck(inplanes, planes, stride, training):
    convcore.manual_seed(23)
    m = nn.BasicBlock(inplanes, planes, stride).to(np.float64)
    projection = stride != 1 or inplanes != planes
    assert (m.downsample is not None) == projection
    _randomise_bn(m, np.random.default_rng(24))
    m.train(training)
    x = np.random.default_rng(25).standard_normal((2, inplanes, 5, 5))
    y, _, grads = gradcheck_module(m, x)
    assert y.shape[1:] == m.output_shape(x.shape[1:])
    assert y.shape == (2, planes, (5 - 1) // stride + 1, (5 - 1) // stride + 1)
    assert ("downsample.0.weight" in grads) == projection


@pytest.mark.parametrize("inplanes,planes,stride,groups,base_width",
                         [(8, 2, 1, 1, 64), (4, 2, 1, 1, 64), (4, 2, 2, 1, 64),
                          (8, 2, 2, 2, 64)])
def test_bottleneck_gradcheck(inplanes, planes, stride, groups, base_width):
    convcore.manual_seed(26)
    m = nn.Bottleneck(inplanes, planes, stride, groups=groups, base_width=base_width)
    m.to(np.float64)
    projection = stride != 1 or inplanes != planes * 4
    assert (m.downsample is not None) == projection
    _randomise_bn(m, np.random.default_rng(27))
    x = np.random.default_rng(28).standard_normal((2, inplanes, 4, 4))
    y, _, _ = gradcheck_module(m, x)
    assert y.shape[1] == planes * 4


def test_residual_identity_shortcut_adds_input():
    """With zero conv weights and BN bias 0 the body gives 0 and the block
    is relu(x)."""
    m = nn.BasicBlock(3, 3).to(np.float64)
    for p in (m.conv1.weight, m.conv2.weight):
        p.data[:] = 0
    x = np.random.default_rng(29).standard_normal((2, 3, 4, 4))
    np.testing.assert_allclose(m(x), np.maximum(x, 0), atol=1e-12)


def _randomise_bn(module, rng):
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            c = sub.num_features
            sub.weight.data[:] = rng.uniform(0.5, 1.5, c)
            sub.bias.data[:] = rng.standard_normal(c) * 0.3
            sub.running_mean[:] = rng.standard_normal(c) * 0.2
            sub.running_var[:] = rng.uniform(0.5, 2.0, c)


def _small_net(dtype=np.float64):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", dtype=dtype),
        nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(),
        nn.LocalResponseNorm(3, alpha=0.5, beta=0.75, k=2.0),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding="same", groups=2, dtype=dtype),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3, dtype=dtype),
    )


def test_sequential_gradcheck():
    convcore.manual_seed(30)
    net = _small_net()
    x = away_from_zero(np.random.default_rng(31), (2, 2, 6, 6))
    y, _, grads = gradcheck_module(net, x)
    assert y.shape == (2, 3)
    assert list(grads) == ["0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias",
                           "8.weight", "8.bias"]


def test_sequential_container():
    a, b, c = nn.ReLU(), nn.Flatten(), nn.Linear(3, 2)
    s = nn.Sequential(a, b)
    assert len(s) == 2 and s[0] is a and s[-1] is b and list(s) == [a, b]
    s.append(c)
    assert len(s) == 3 and s[2] is c
    sub = s[1:]
    assert isinstance(sub, nn.Sequential) and list(sub) == [b, c]
    named = nn.Sequential(OrderedDict([("fc", nn.Linear(3, 2)), ("act", nn.ReLU())]))
    assert [n for n, _ in named.named_parameters()] == ["fc.weight", "fc.bias"]
    with pytest.raises(TypeError):
        nn.Sequential(nn.ReLU(), "relu")
    assert s.output_shape((1, 3)) == (2,)


def test_identity():
    m = nn.Identity()
    x = np.arange(6.0).reshape(2, 3)
    assert m(x) is x and m.backward(x) is x and m.output_shape((3,)) == (3,)


# ===========================================================================
# loss
# ===========================================================================

@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_finite_differences(label_smoothing, reduction):
    rng = np.random.default_rng(32)
    logits = rng.standard_normal((5, 7)) * 3
    targets = rng.integers(0, 7, 5)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction=reduction)
    value = loss_fn(logits, targets)
    assert isinstance(value, float)
    grad = loss_fn.backward()
    assert grad.shape == logits.shape and grad.dtype == np.float64
    num = numerical_grad(lambda: loss_fn(logits, targets), logits)
    assert_close(grad, num, rtol=FD_RTOL, what="d loss / d logits")
    # by hand: -sum t * log softmax
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    t = np.full(logits.shape, label_smoothing / 7)
    t[np.arange(5), targets] += 1 - label_smoothing
    expected = -(t * logp).sum() / (5 if reduction == "mean" else 1)
    assert value == pytest.approx(expected, rel=1e-12)


def _ce_case(rng, shape, dtype, target, weighted, ignore_index):
    """Logits of `shape` (classes on dimension 1, or 0 when 1-D), targets of
    kind `target` ('index': class indices, the first one set to
    ignore_index when that is a class; 'prob': class probabilities) and
    an optional weight per class."""
    axis = 0 if len(shape) == 1 else 1
    classes = shape[axis]
    logits = (rng.standard_normal(shape) * 3).astype(dtype)
    if target == "prob":
        t = rng.random(shape).astype(dtype)
        t /= t.sum(axis=axis, keepdims=True)
    else:
        t = rng.integers(0, classes, shape[:axis] + shape[axis + 1:])
        if 0 <= ignore_index < classes and t.size:
            t.flat[0] = ignore_index
    weight = rng.uniform(0.5, 2.0, classes).astype(dtype) if weighted else None
    return logits, t, weight


CE_OPTIONS = [  # (target, weighted, ignore_index)
    ("index", False, -100), ("index", True, -100), ("index", False, 2), ("index", True, 2),
    ("prob", False, -100), ("prob", True, -100)]


@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 2, 3), (5,), (0, 5)],
                         ids=["N,C", "N,C,d1,d2", "C", "empty"])
@pytest.mark.parametrize("target,weighted,ignore_index", CE_OPTIONS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_vs_torch(shape, target, weighted, ignore_index, reduction,
                                label_smoothing, dtype):
    """Loss and gradient of every option against torch's autograd (an empty
    batch's mean is NaN in both)."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: loss parity skipped")
    rng = np.random.default_rng(33)
    logits, t, weight = _ce_case(rng, shape, dtype, target, weighted, ignore_index)
    options = dict(ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=label_smoothing)
    lt = torch.from_numpy(logits.copy()).requires_grad_(True)
    vt = torch.nn.functional.cross_entropy(
        lt, torch.from_numpy(t), None if weight is None else torch.from_numpy(weight),
        **options)
    gy = rng.standard_normal(tuple(vt.shape)).astype(dtype) if reduction == "none" else None
    vt.backward(None if gy is None else torch.from_numpy(gy))
    loss_fn = nn.CrossEntropyLoss(weight, **options)
    value = loss_fn(logits, t)
    grad = loss_fn.backward(gy)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    if reduction == "none":
        assert isinstance(value, np.ndarray) and value.dtype == dtype
        assert_close(value, vt.detach().numpy(), rtol=tol, what="losses")
    else:
        assert isinstance(value, float)
        expected = float(vt.detach())
        assert (math.isnan(value) and math.isnan(expected)) or \
            value == pytest.approx(expected, rel=tol, abs=tol)
    assert grad.dtype == dtype and grad.flags.c_contiguous
    assert_close(grad, lt.grad.numpy(), rtol=tol, what="grad")
    # the functional form computes the same
    np.testing.assert_array_equal(F.cross_entropy(logits, t, weight, **options),
                                  value if reduction == "none" else np.asarray(value, dtype))


@pytest.mark.parametrize("target,weighted,ignore_index", CE_OPTIONS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_options_finite_differences(target, weighted, ignore_index, reduction):
    rng = np.random.default_rng(34)
    logits, t, weight = _ce_case(rng, (3, 4, 2), np.float64, target, weighted, ignore_index)
    options = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=0.1)
    loss_fn = nn.CrossEntropyLoss(**options)
    R = rng.standard_normal((3, 2)) if reduction == "none" else 1.0

    def loss():
        return float((np.asarray(loss_fn(logits, t)) * R).sum())

    loss()
    grad = loss_fn.backward(R if reduction == "none" else None)
    assert_close(grad, numerical_grad(loss, logits), rtol=FD_RTOL, what="d loss / d logits")
    if ignore_index == 2:     # an ignored position has no gradient
        assert not grad[0, :, 0].any()


def test_cross_entropy_all_ignored_and_masked_classes_as_torch():
    torch = pytest.importorskip("torch", reason="PyTorch not installed: loss parity skipped")
    rng = np.random.default_rng(35)
    for logits, t, kw in [
            (rng.standard_normal((2, 3)), np.array([-100, -100]), {}),       # mean of nothing
            (rng.standard_normal((2, 3)), np.array([-100, -100]), dict(label_smoothing=0.3)),
            (np.array([[0.0, -np.inf, 1.0]]), np.array([0]), {}),           # a masked class
            (np.array([[0.0, -np.inf, 1.0]]), np.array([0]), dict(label_smoothing=0.1))]:
        lt = torch.from_numpy(logits.copy()).requires_grad_(True)
        vt = torch.nn.functional.cross_entropy(lt, torch.from_numpy(t), **kw)
        vt.backward()
        loss_fn = nn.CrossEntropyLoss(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")    # no numpy RuntimeWarning on the way
            value = loss_fn(logits, t)
            grad = loss_fn.backward()
        np.testing.assert_allclose(value, float(vt.detach()), rtol=1e-12)   # NaN == NaN
        np.testing.assert_allclose(grad, lt.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_cross_entropy_large_logits_stable():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 1e4, 0.0]])
    loss_fn = nn.CrossEntropyLoss()
    value = loss_fn(logits, np.array([0, 1]))
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(loss_fn.backward()).all()


def _ce_backward_none(grad_output):
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    loss_fn(np.zeros((2, 3)), np.array([0, 1]))
    return loss_fn.backward(grad_output)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: nn.CrossEntropyLoss(label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda: nn.CrossEntropyLoss(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (lambda: nn.CrossEntropyLoss(reduction="avg"), ValueError, "reduction"),
    (lambda: nn.CrossEntropyLoss(ignore_index=1.5), TypeError, "ignore_index"),
    (lambda: nn.CrossEntropyLoss()(np.zeros(3), np.array([0])), ValueError, "target"),
    (lambda: nn.CrossEntropyLoss()(np.zeros(()), np.array(0)), ValueError, "input"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 0)), np.zeros(2, int)), ValueError, "class"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 3), int), np.array([0, 1])), TypeError, "input"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0, 3])), ValueError, "target"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0, -1])), ValueError, "target"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0.0, 1.0])), ValueError, "target"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0])), ValueError, "target"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 3, 4)), np.zeros((2, 5), int)), ValueError,
     r"target must be integer class indices of shape \(2, 4\)"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 3)), None), TypeError, "target"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 3)), np.zeros((2, 3), int)), TypeError,
     "target"),
    (lambda: nn.CrossEntropyLoss()(np.zeros((2, 3)), np.zeros((2, 3), np.float32)), TypeError,
     "target"),
    (lambda: nn.CrossEntropyLoss(ignore_index=0)(np.zeros((2, 3)), np.zeros((2, 3))),
     ValueError, "ignore_index"),
    (lambda: nn.CrossEntropyLoss(np.ones(4))(np.zeros((2, 3)), np.array([0, 1])), ValueError,
     "weight"),
    (lambda: nn.CrossEntropyLoss(np.ones(3, np.float32))(np.zeros((2, 3)), np.array([0, 1])),
     TypeError, "weight"),
    (lambda: nn.CrossEntropyLoss([1.0, 1.0, 1.0])(np.zeros((2, 3)), np.array([0, 1])),
     TypeError, "weight"),
    (lambda: nn.CrossEntropyLoss().backward(), RuntimeError, "before"),
    (lambda: _ce_backward_none(None), TypeError, "grad_output"),
    (lambda: _ce_backward_none(np.ones(3)), ValueError, "grad_output"),
    (lambda: _ce_backward_none(np.ones(2, np.float32)), TypeError, "grad_output"),
])
def test_cross_entropy_errors(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
