"""Softmax across the stack: convcore.functional.softmax / softmax_backward
and log_softmax / log_softmax_backward (the C++ core) against PyTorch and
finite differences, the nn.Softmax layer,
its node in the network format (saved, loaded, compiled, read by the C++
reader) and its errors."""
import numpy as np
import pytest

import convcore as cc
import convcore.functional as F
from convcore import nn

torch = pytest.importorskip("torch")

# |convcore - torch| / max(1, |torch|), elementwise
ATOL = {np.float32: 1e-6, np.float64: 1e-14}

# (forward, backward, torch's forward)
OPS = {"softmax": (F.softmax, F.softmax_backward, torch.softmax),
       "log_softmax": (F.log_softmax, F.log_softmax_backward, torch.log_softmax)}

SHAPES_DIMS = [((7,), 0), ((4, 10), 1), ((4, 10), -1), ((4, 10), 0), ((2, 3, 4, 5), 0),
               ((2, 3, 4, 5), 1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 3), ((2, 3, 4, 5), -2),
               ((3, 1000), 1), ((), 0), ((0, 5), 1)]


def _torch_softmax(x, dim, op="softmax"):
    return OPS[op][2](torch.from_numpy(x), dim).numpy()


def _max_diff(a, b):
    """The largest |a - b| / max(1, |b|); NaN and infinities where b has them."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.array_equal(a[np.isinf(b)], b[np.isinf(b)])
    a, b = a[np.isfinite(b)], b[np.isfinite(b)]
    return float(np.max(np.abs(a - b) / np.maximum(1, np.abs(b)), initial=0.0))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
def test_forward_matches_torch(op, dtype, shape, dim):
    x = np.asarray((np.random.default_rng(0).standard_normal(shape) * 4).astype(dtype))
    y = OPS[op][0](x, dim)
    assert y.dtype == dtype and y.shape == x.shape
    assert _max_diff(y, _torch_softmax(x, dim, op)) <= ATOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_softmax_of_large_logits_is_finite(dtype):
    x = np.array([[1e4, 0.0, -1e4]], dtype)
    np.testing.assert_array_equal(F.log_softmax(x, 1), [[0.0, -1e4, -2e4]])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_infinities_and_nan_as_torch(op, dtype):
    big = np.finfo(dtype).max / 4
    x = np.array([[1e4, 1e4 - 1, -1e4, 0.0],       # exp(1e4) overflows without the max
                  [big, -big, big, 0.0],
                  [-np.inf, 1.0, 2.0, -np.inf],     # masked classes
                  [np.nan, 1.0, 2.0, 3.0],          # NaN: the whole row
                  [np.inf, 1.0, 2.0, 3.0],
                  [-np.inf, -np.inf, -np.inf, -np.inf]], dtype)
    y = OPS[op][0](x, 1)
    assert _max_diff(y, _torch_softmax(x, 1, op)) <= ATOL[dtype]
    assert np.isnan(y[3]).all()
    if op == "softmax":
        assert np.isfinite(y[:3]).all()
        np.testing.assert_allclose(y[:3].sum(1), 1, rtol=ATOL[dtype] * 10)


def test_strided_inputs():
    x = np.random.default_rng(1).standard_normal((6, 8, 5))
    for view in (x[::2], x[:, ::3], x.transpose(2, 0, 1)):
        for dim in range(3):
            assert _max_diff(F.softmax(view, dim), _torch_softmax(np.ascontiguousarray(view),
                                                                   dim)) <= 1e-15


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
def test_backward_matches_torch(op, dtype, shape, dim):
    forward, backward, torch_forward = OPS[op]
    rng = np.random.default_rng(2)
    x = np.asarray((rng.standard_normal(shape) * 3).astype(dtype))
    gy = np.asarray(rng.standard_normal(shape).astype(dtype))
    tx = torch.from_numpy(x).requires_grad_()
    torch_forward(tx, dim).backward(torch.from_numpy(gy))
    y = forward(x, dim)
    gx = backward(gy, y, dim)
    assert gx.dtype == dtype and gx.shape == x.shape
    assert _max_diff(gx, tx.grad.numpy()) <= 4 * ATOL[dtype]


def test_backward_of_a_nan_row_is_nan_as_torch():
    x = np.array([[np.nan, 1.0, 2.0], [0.0, 1.0, 2.0]])
    gy = np.ones_like(x)
    tx = torch.from_numpy(x).requires_grad_()
    torch.softmax(tx, 1).backward(torch.from_numpy(gy))
    assert _max_diff(F.softmax_backward(gy, F.softmax(x, 1), 1), tx.grad.numpy()) <= 1e-15


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,dim", [((3, 5), 1), ((2, 3, 4), 1), ((2, 3, 4), 0),
                                       ((2, 3, 4), -1)])
def test_gradient_by_finite_differences(op, shape, dim):
    forward, backward, _ = OPS[op]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    w = rng.standard_normal(shape)  # loss = sum(w * forward(x))
    grad = backward(w, forward(x, dim), dim)
    eps = 1e-6
    numeric = np.empty_like(x)
    for i in np.ndindex(shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        numeric[i] = ((w * forward(xp, dim)).sum() - (w * forward(xm, dim)).sum()) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-8)


def test_errors_name_the_argument():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\] for an input of 2 "
                                         r"dimensions, got 2"):
        F.softmax(x, 2)
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got -3"):
        F.softmax_backward(x, x, -3)
    with pytest.raises(TypeError, match="dim must be an int, got float"):
        F.softmax(x, 1.0)
    with pytest.raises(TypeError, match="dim must be an int"):
        F.softmax(x, None)
    with pytest.raises(TypeError, match="input must be float32 or float64"):
        F.softmax(np.zeros((2, 3), np.int64), 1)
    with pytest.raises(TypeError, match="input must be a numpy.ndarray"):
        F.softmax([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="grad_output"):
        F.softmax_backward(np.zeros((2, 4), np.float32), x, 1)
    with pytest.raises(TypeError, match="grad_output"):
        F.softmax_backward(np.zeros((2, 3)), x, 1)
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got 5"):
        F.log_softmax(x, 5)
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got -3"):
        F.log_softmax_backward(x, x, -3)


# ---------------------------------------------------------------- the layer

def test_layer_forward_backward_and_config():
    layer = nn.Softmax(dim=1)
    assert nn.Softmax().dim == 1 and repr(layer) == "Softmax(dim=1)"
    x = np.random.default_rng(4).standard_normal((3, 4, 2, 2)).astype(np.float32)
    y = layer(x)
    np.testing.assert_array_equal(y, F.softmax(x, 1))
    gy = np.ones_like(y)
    np.testing.assert_array_equal(layer.backward(gy), F.softmax_backward(gy, y, 1))
    assert layer.state_dict() == {} and layer.config() == {"dim": 1}
    assert layer.output_shape((4, 2, 2)) == (4, 2, 2)
    with pytest.raises(TypeError, match="dim must be an int"):
        nn.Softmax(dim=1.5)
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Softmax().backward(gy)
    with pytest.raises(ValueError, match="grad_output must have the output's shape"):
        layer.backward(gy[:1])


def _classifier(dtype):
    cc.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 6), nn.Softmax(dim=1))
    model.input_shape = (3, 6, 6)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequential_saves_loads_and_compiles(tmp_path, dtype):
    model = _classifier(dtype)
    x = np.random.default_rng(5).standard_normal((5, 3, 6, 6)).astype(dtype) * 3
    eager = model(x)
    np.testing.assert_allclose(eager.sum(1), 1, rtol=1e-6)
    node = model.to_graph()["nodes"][-1]
    assert node["op"] == "Softmax" and node["attrs"] == {"dim": 1}
    path = str(tmp_path / "m.safetensors")
    model.save(path)
    loaded = cc.load(path)
    assert type(loaded[5]).__name__ == "Softmax" and loaded[5].dim == 1
    np.testing.assert_array_equal(loaded.eval()(x), eager)
    # the compiled engine, from the module and from the file (the C++ reader)
    assert np.abs(cc.compile(model)(x) - eager).max() <= 1e-6
    assert np.abs(cc.compile(path)(x) - eager).max() <= 1e-6


def test_training_through_the_softmax_matches_torch():
    """Backward through Linear -> Softmax, against torch's autograd."""
    cc.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Softmax(dim=-1)).to(np.float64)
    lin = torch.nn.Linear(5, 4).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(model[0].weight.data))
        lin.bias.copy_(torch.from_numpy(model[0].bias.data))
    rng = np.random.default_rng(6)
    x, gy = rng.standard_normal((3, 5)), rng.standard_normal((3, 4))
    tx = torch.from_numpy(x).requires_grad_()
    torch.softmax(lin(tx), -1).backward(torch.from_numpy(gy))
    model(x)
    gx = model.backward(gy)
    assert np.abs(gx - tx.grad.numpy()).max() <= 1e-14
    assert np.abs(model[0].weight.grad - lin.weight.grad.numpy()).max() <= 1e-14


def test_compiled_softmax_over_blocked_channels(tmp_path):
    """Over the channels of a convolution's output, which the engine keeps
    blocked: reordered to NCHW for the softmax."""
    cc.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.Softmax(dim=1),
                          nn.Conv2d(12, 5, 1), nn.Softmax(dim=-1)).eval()
    x = np.random.default_rng(7).standard_normal((2, 3, 7, 9)).astype(np.float32)
    eager = model(x)
    assert np.abs(cc.compile(model)(x) - eager).max() <= 1e-6
    path = str(tmp_path / "c.safetensors")
    model.save(path)
    assert np.abs(cc.compile(path)(x) - eager).max() <= 1e-6


def test_softmax_over_the_batch_is_refused_by_the_runtime(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=0))
    model.input_shape = (3,)
    model.eval()
    x = np.ones((4, 3), np.float32)
    np.testing.assert_allclose(model(x).sum(0), 1, rtol=1e-6)  # eager computes it
    with pytest.raises(ValueError, match="Softmax: dim 0 is the batch dimension"):
        cc.compile(model)(x)
