"""Skipping the input's gradient: output_mask of the functional backwards,
and Module.set_input_grad, which a training loop uses so that a network's
first layer computes only its parameters' gradients (as PyTorch does for an
input that does not require grad)."""
import numpy as np
import pytest

import convcore as cc
from convcore import functional as F
from convcore import nn
from convcore import optim
from convcore.bench import e2e as bench_e2e

MASKS = [(True, True, True), (False, True, True), (True, False, False), (False, False, True),
         (False, False, False)]


def rnd(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("unbatched", [False, True])
def test_conv2d_backward_output_mask(mask, unbatched):
    x, w = rnd(2, 3, 9, 8), rnd(4, 3, 3, 3, seed=1)
    if unbatched:
        x = x[0]
    gy = rnd(*F.conv2d(x, w, stride=2, padding=1).shape, seed=2)
    full = F.conv2d_backward(gy, x, w, stride=2, padding=1)
    got = F.conv2d_backward(gy, x, w, stride=2, padding=1, output_mask=mask)
    for g, f, need in zip(got, full, mask):
        if need:
            np.testing.assert_array_equal(g, f)
        else:
            assert g is None


@pytest.mark.parametrize("mask", MASKS)
def test_linear_backward_output_mask(mask):
    x, w = rnd(2, 3, 7), rnd(5, 7, seed=1)
    gy = rnd(2, 3, 5, seed=2)
    full = F.linear_backward(gy, x, w)
    got = F.linear_backward(gy, x, w, output_mask=mask)
    for g, f, need in zip(got, full, mask):
        if need:
            np.testing.assert_array_equal(g, f)
        else:
            assert g is None


@pytest.mark.parametrize("bad", [(True, True), [1, 1, 1], "all", None, (True, True, None)])
def test_output_mask_must_be_three_bools(bad):
    x, w = rnd(1, 2, 5, 5), rnd(3, 2, 3, 3, seed=1)
    gy = rnd(1, 3, 3, 3, seed=2)
    with pytest.raises(TypeError, match="output_mask must be three bools"):
        F.conv2d_backward(gy, x, w, output_mask=bad)
    with pytest.raises(TypeError, match="output_mask must be three bools"):
        F.linear_backward(rnd(2, 3), rnd(2, 4), rnd(3, 4), output_mask=bad)


def _grads(model, x, gy):
    model.zero_grad()
    model.train()
    nn.init.manual_seed(5)  # the same dropout masks each time
    model(x)
    gx = model.backward(gy)
    return gx, {k: p.grad.copy() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["lenet5", "resnet18", "googlenet", "mobilenet_v2",
                                  "se_resnet50"])
def test_set_input_grad_skips_only_the_input_gradient(name):
    # Network (builder), ResNet, and Graphs whose input one layer reads: the
    # parameters' gradients are bit for bit those of the full backward.
    model = bench_e2e.build_model(name, size=32 if name != "lenet5" else None)
    x = rnd(2, *model.input_shape[:1], *((32, 32) if name != "lenet5" else model.input_shape[1:]))
    out = model.train()(x)
    gy = rnd(*(out[0] if isinstance(out, tuple) else out).shape, seed=3)
    if isinstance(out, tuple):  # auxiliary heads: no gradient through them
        gy = (gy,) + (None,) * (len(out) - 1)
    gx_full, full = _grads(model, x, gy)
    assert gx_full.shape == x.shape
    first = model.input_layers()
    assert first, "the model names the layer that reads its input"
    assert model.set_input_grad(False) is model
    gx, skipped = _grads(model, x, gy)
    assert gx is None
    assert skipped.keys() == full.keys()
    for k in full:
        np.testing.assert_array_equal(skipped[k], full[k], err_msg=k)
    model.set_input_grad(True)
    gx_again, _ = _grads(model, x, gy)
    np.testing.assert_array_equal(gx_again, gx_full)


def test_input_grad_reaches_the_first_layer_only():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Conv2d(4, 2, 3))
    model.set_input_grad(False)
    assert not model.input_grad and not model[0].input_grad and not model[0][0].input_grad
    assert model[1].input_grad and model[0][1].input_grad
    model.set_input_grad(True)
    assert all(m.input_grad for m in model.modules())


def test_graph_input_read_twice_keeps_its_gradient():
    # Two nodes read the input: neither is told to skip, and backward still
    # returns the input's gradient (from both branches).
    g = nn.Graph({"a": nn.Conv2d(2, 2, 3, padding=1), "b": nn.Conv2d(2, 2, 1)},
                 ["ya = a(x)", "yb = b(x)", "y = add(ya, yb)"])
    assert g.input_layers() == []
    x, gy = rnd(1, 2, 5, 5), rnd(1, 2, 5, 5, seed=1)
    g(x)
    full = g.backward(gy)
    g.set_input_grad(False)
    g(x)
    np.testing.assert_array_equal(g.backward(gy), full)


def test_module_without_input_layers_still_returns_its_gradient():
    class Twice(nn.Module):  # a user's module that names no input layers
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(x)

        def backward(self, g):
            return self.conv.backward(g)

    m = Twice().set_input_grad(False)
    x = rnd(1, 1, 3, 3)
    m(x)
    assert m.backward(rnd(1, 1, 3, 3, seed=1)).shape == x.shape
    with pytest.raises(TypeError, match="flag must be a bool"):
        m.set_input_grad(1)


def test_padding_mode_layer_skips_the_fold():
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    x = rnd(1, 2, 6, 6)
    gy = rnd(*conv(x).shape, seed=1)
    conv.backward(gy)
    gw = conv.weight.grad.copy()
    conv.zero_grad()
    conv.set_input_grad(False)
    conv(x)
    assert conv.backward(gy) is None
    np.testing.assert_array_equal(conv.weight.grad, gw)


def test_fit_turns_the_input_gradient_off_and_back():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    seen = []
    conv_backward = model[0].backward

    def spy(g):
        seen.append(model[0].input_grad)
        return conv_backward(g)

    model[0].backward = spy
    x, y = rnd(8, 1, 6, 6), np.arange(8) % 3
    loader = cc.data.DataLoader(x, y, 4)
    cc.train.fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1), loader,
                 epochs=1, progress=False)
    assert seen == [False, False]
    assert model.input_grad and model[0].input_grad
