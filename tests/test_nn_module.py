"""The Module mechanics of convcore.nn: names, gradients accumulating,
train/eval, state dicts, dtype conversion, initialisation, seeding,
architecture round trips (moved out of test_nn_layers.py, which checks each
layer's backward)."""
import math

import numpy as np
import pytest

import convcore
from _helpers import assert_close
from convcore import nn
from test_nn_layers import _small_net, away_from_zero

pytestmark = pytest.mark.usefixtures("one_core_thread")


# ===========================================================================
# module mechanics
# ===========================================================================

def test_named_parameters_and_buffers():
    net = _small_net(np.float32)
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias",
                     "8.weight", "8.bias"]
    assert len(net.parameters()) == len(names)
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())
    assert [n for n, _ in net.named_buffers()] == ["1.running_mean", "1.running_var",
                                                   "1.num_batches_tracked"]
    assert net.num_parameters() == (4 * 2 * 9 + 4) + 8 + (4 * 2 * 9 + 4) + (16 * 3 + 3)
    block = nn.BasicBlock(2, 4, stride=2)
    assert [n for n, _ in block.named_parameters()] == [
        "conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias",
        "downsample.0.weight", "downsample.1.weight", "downsample.1.bias"]
    assert [n for n, _ in block.named_modules()] == [
        "", "conv1", "bn1", "conv2", "bn2", "downsample", "downsample.0", "downsample.1"]


def test_parameter_grad_lazy_and_checked():
    p = nn.Parameter(np.ones((2, 3), np.float32))
    assert p._grad is None                    # nothing allocated until used
    assert p.shape == (2, 3) and p.size == 6
    np.testing.assert_array_equal(p.grad, np.zeros((2, 3), np.float32))
    p.grad = np.ones((2, 3))
    assert p.grad.dtype == np.float32
    with pytest.raises(ValueError):
        p.grad = np.ones(3)


def _one_step(net, x, seed=0):
    y = net(x)
    g = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    net.backward(g)
    return {n: p.grad.copy() for n, p in net.named_parameters()}


def test_zero_grad_and_accumulation():
    convcore.manual_seed(34)
    net = _small_net().eval()     # eval: BN uses fixed stats, both passes identical
    x = away_from_zero(np.random.default_rng(35), (2, 2, 6, 6))
    first = _one_step(net, x)
    assert any(np.abs(g).max() > 0 for g in first.values())
    second = _one_step(net, x)
    for name, g in second.items():
        assert_close(g, 2 * first[name], rtol=1e-12, what=f"accumulated {name}")
    net.zero_grad()
    for p in net.parameters():
        assert not p.grad.any()
    third = _one_step(net, x)
    for name, g in third.items():
        assert_close(g, first[name], rtol=1e-12, what=f"after zero_grad {name}")


def test_train_eval_propagate():
    net = nn.Sequential(nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(2)), nn.BasicBlock(2, 2))
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    net[1].eval()
    assert net.training and not net[1].bn1.training and net[0][1].training


def test_state_dict_round_trip():
    convcore.manual_seed(36)
    a = _small_net(np.float32)
    a(np.random.default_rng(37).standard_normal((2, 2, 6, 6)).astype(np.float32))  # BN stats
    sd = a.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                        "1.running_var", "1.num_batches_tracked", "5.weight", "5.bias",
                        "8.weight", "8.bias"]
    assert sd["1.num_batches_tracked"].dtype == np.int64 and int(sd["1.num_batches_tracked"]) == 1
    # copies, not views
    sd["0.weight"][...] = 0
    assert a[0].weight.data.any()
    sd = a.state_dict()
    convcore.manual_seed(37)
    b = _small_net(np.float32)
    assert not np.array_equal(b[0].weight.data, a[0].weight.data)
    b.load_state_dict(sd)
    for key, value in b.state_dict().items():
        np.testing.assert_array_equal(value, sd[key], err_msg=key)
        assert value.dtype == sd[key].dtype
    # the loaded arrays are not shared with the dict
    sd["8.bias"][...] = 123
    assert not (b[8].bias.data == 123).any()
    x = np.random.default_rng(38).standard_normal((2, 2, 6, 6)).astype(np.float32)
    a.eval(), b.eval()
    np.testing.assert_array_equal(a(x), b(x))


def test_load_state_dict_errors():
    net = _small_net(np.float32)
    sd = net.state_dict()
    missing = dict(sd)
    del missing["5.bias"]
    with pytest.raises(KeyError, match="5.bias"):
        net.load_state_dict(missing)
    with pytest.raises(KeyError, match="extra"):
        net.load_state_dict({**sd, "extra.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="0.weight"):
        net.load_state_dict({**sd, "0.weight": np.zeros((4, 2, 3, 2))})
    with pytest.raises(ValueError, match="running_var"):
        net.load_state_dict({**sd, "1.running_var": np.zeros(3)})
    # strict=False tolerates missing and unexpected keys and loads the rest
    partial = {"8.bias": np.full(3, 7.0), "nothing": np.zeros(2)}
    net.load_state_dict(partial, strict=False)
    np.testing.assert_array_equal(net[8].bias.data, np.full(3, 7.0, np.float32))
    assert net[8].bias.data.dtype == np.float32
    # ... but not a shape mismatch
    with pytest.raises(ValueError):
        net.load_state_dict({"8.bias": np.zeros(4)}, strict=False)


def test_to_float64():
    convcore.manual_seed(39)
    net = _small_net(np.float32)
    x32 = away_from_zero(np.random.default_rng(40), (2, 2, 6, 6)).astype(np.float32)
    net.eval()
    y32 = net(x32)
    ref32 = {k: v.copy() for k, v in net.state_dict().items()}
    assert net.to(np.float64) is net
    assert net.dtype == np.float64
    for key, value in net.state_dict().items():
        expected_dtype = np.int64 if key.endswith("num_batches_tracked") else np.float64
        assert value.dtype == expected_dtype, key
        np.testing.assert_array_equal(value, ref32[key].astype(value.dtype))
    y64 = net(x32.astype(np.float64))
    assert y64.dtype == np.float64
    assert_close(y64, y32, rtol=1e-4)
    net.backward(np.ones_like(y64))
    assert all(p.grad.dtype == np.float64 for p in net.parameters())
    net.to("float32")
    assert net.dtype == np.float32
    assert net.to("cpu") is net
    with pytest.raises(TypeError):
        net.to(np.int32)
    from convcore import cuda as cc_cuda  # to("cuda") works on a GPU (test_cuda_gpu.py)
    if not cc_cuda.is_available():
        with pytest.raises(RuntimeError, match="GPU backend cannot run"):
            net.to("cuda")


@pytest.mark.parametrize("make,fan_in", [
    (lambda: nn.Conv2d(16, 32, 3), 16 * 9),
    (lambda: nn.Conv2d(8, 64, (3, 5), groups=4), 2 * 15),
    (lambda: nn.Linear(300, 400), 300),
])
def test_default_init_as_pytorch(make, fan_in):
    """PyTorch's defaults: kaiming_uniform(a=sqrt(5)) weights, i.e. uniform in
    +-1/sqrt(fan_in), and biases uniform in +-1/sqrt(fan_in)."""
    convcore.manual_seed(41)
    m = make()
    bound = 1.0 / math.sqrt(fan_in)
    for name, p in (("weight", m.weight.data), ("bias", m.bias.data)):
        assert p.dtype == np.float32
        assert np.abs(p).max() <= bound * (1 + 1e-6), name
        # the samples come close to both ends of the interval
        assert p.max() > bound * (1 - 20.0 / p.size) - 1e-7 or p.size < 100, name
        assert p.min() < -bound * (1 - 20.0 / p.size) + 1e-7 or p.size < 100, name
    w = m.weight.data.astype(np.float64).ravel()
    n = w.size
    # mean 0 and variance bound^2 / 3, within 5 standard errors
    assert abs(w.mean()) < 5 * bound / math.sqrt(3 * n)
    assert abs(w.var() / (bound ** 2 / 3) - 1) < 5 * math.sqrt(0.8 / n)


def test_default_init_batchnorm():
    m = nn.BatchNorm2d(5)
    np.testing.assert_array_equal(m.weight.data, np.ones(5, np.float32))
    np.testing.assert_array_equal(m.bias.data, np.zeros(5, np.float32))
    np.testing.assert_array_equal(m.running_mean, np.zeros(5, np.float32))
    np.testing.assert_array_equal(m.running_var, np.ones(5, np.float32))
    assert int(m.num_batches_tracked) == 0


def test_manual_seed_reproducible():
    convcore.manual_seed(42)
    a = _small_net(np.float32).state_dict()
    convcore.manual_seed(42)
    b = _small_net(np.float32).state_dict()
    nn.init.manual_seed(42)           # the same generator under its nn.init name
    c = _small_net(np.float32).state_dict()
    convcore.manual_seed(43)
    d = _small_net(np.float32).state_dict()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        np.testing.assert_array_equal(a[key], c[key], err_msg=key)
    assert not np.array_equal(a["0.weight"], d["0.weight"])


@pytest.mark.parametrize("make,in_channels,size", [
    (lambda: _small_net(np.float32), 2, 6),
    (lambda: nn.Sequential(nn.BasicBlock(3, 4, 2), nn.Bottleneck(4, 2, groups=2, base_width=32),
                           nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(8, 2),
                           nn.Dropout(0.3)), 3, 8),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0),
                                     dilation=(1, 2), bias=False, padding_mode="circular"),
                           nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                           nn.AvgPool2d(2, 1, 1, ceil_mode=True, count_include_pad=False,
                                        divisor_override=3),
                           nn.LocalResponseNorm(3, 0.1, 0.5, 1.5),
                           nn.BatchNorm2d(4, eps=1e-3, momentum=0.2, affine=False),
                           nn.Conv2d(4, 4, 2, padding="same", padding_mode="replicate"),
                           nn.Flatten(), nn.Identity()), 3, 8),
], ids=["small_net", "residual", "options"])
def test_from_architecture_rebuilds(make, in_channels, size):
    import json
    convcore.manual_seed(44)
    a = make()
    arch = a.architecture()
    b = nn.from_architecture(json.loads(json.dumps(arch)))    # JSON-serialisable
    assert type(b) is type(a)
    assert b.architecture() == arch
    assert [(n, p.shape) for n, p in b.named_parameters()] == \
        [(n, p.shape) for n, p in a.named_parameters()]
    assert list(b.state_dict()) == list(a.state_dict())
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = np.random.default_rng(45).standard_normal((2, in_channels, size, size))
    x = x.astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))


def test_from_architecture_errors():
    with pytest.raises(ValueError, match="unknown module type"):
        nn.from_architecture({"type": "NoSuchLayer", "config": {}})
    with pytest.raises(ValueError):
        nn.from_architecture({"config": {}})
    with pytest.raises(ValueError, match="bad config"):
        nn.from_architecture({"type": "Linear", "config": {"in_features": 3, "nope": 1}})
    arch = nn.BasicBlock(2, 2).architecture()
    arch["children"]["extra"] = {"type": "ReLU", "config": {}}
    with pytest.raises(ValueError, match="children"):
        nn.from_architecture(arch)


def test_module_attribute_registration():
    m = nn.Module()
    m.w = nn.Parameter(np.zeros(2))
    m.sub = nn.Linear(2, 2)
    m.plain = 3
    assert [n for n, _ in m.named_parameters()] == ["w", "sub.weight", "sub.bias"]
    m.w = None      # reassigning removes the registration
    assert [n for n, _ in m.named_parameters()] == ["sub.weight", "sub.bias"]
    del m.sub
    assert m.parameters() == []
    with pytest.raises(NotImplementedError):
        m.forward(np.zeros(1))


def test_module_methods_carried_out_above_nn_are_registered():
    """Module.save, Module.summary and Module.to(device) call what convcore.io,
    convcore.summary and convcore.cuda.module registered with nn (which
    imports none of them); registering names the method."""
    from convcore.nn import module as nn_module
    from convcore import io, summary
    from convcore.cuda import module as cuda_module

    assert nn_module._provided("save") is io.save
    assert nn_module._provided("summary") is summary.summary
    assert nn_module._provided("to") is cuda_module.move
    with pytest.raises(ValueError, match=r"method must be one of \['save', 'summary', 'to'\], "
                                         r"got 'fit'"):
        nn_module.provide("fit", print)


def test_zero_grad_is_lazy_and_gradients_still_accumulate():
    """zero_grad marks the gradients zero without a sweep; the next backward's
    gradient takes their place, a second backward adds to it, and reading a
    gradient after zero_grad gives zeros."""
    rng = np.random.default_rng(0)
    layer = nn.Conv2d(3, 4, 3)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    gy = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    layer(x)
    layer.backward(gy)
    once = layer.weight.grad.copy()
    layer.backward(gy)  # accumulates
    np.testing.assert_allclose(layer.weight.grad, 2 * once, rtol=1e-6)
    kept = layer.weight.grad
    layer.zero_grad()
    assert not layer.weight.grad.any() and not layer.bias.grad.any()
    layer.zero_grad()
    layer(x)
    layer.backward(gy)
    np.testing.assert_array_equal(layer.weight.grad, once)
    np.testing.assert_allclose(kept, 0)  # read after zero_grad: zeroed in place then
    layer.backward(gy)
    np.testing.assert_allclose(layer.weight.grad, 2 * once, rtol=1e-6)
