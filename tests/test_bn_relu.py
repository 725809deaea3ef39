"""BatchNorm and the ReLU after it in one pass each way (batch_norm(...,
relu=True), batch_norm_backward(..., relu_output=...)), and the modules
that run them so: Sequential (a BatchNorm2d then a ReLU), the residual
blocks and ResNet's stem. Fused and unfused give the same bits."""
import numpy as np
import pytest

import convcore
from convcore import functional as F
from convcore import nn


def rnd(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 16, 9, 9), (1, 5, 33), (3, 6)])
def test_fused_equals_batch_norm_then_relu(dtype, training, shape):
    c = shape[1]
    x = rnd(*shape, dtype=dtype)
    x.flat[::7] = 0.0  # zeros and NaNs: relu's and relu_backward's edge cases
    x.flat[3] = np.nan if x.size > 3 else x.flat[0]
    w, b = rnd(c, seed=1, dtype=dtype), rnd(c, seed=2, dtype=dtype)
    stats = [rnd(c, seed=3, dtype=dtype), np.abs(rnd(c, seed=4, dtype=dtype)) + 0.5]
    stats2 = [s.copy() for s in stats]
    y, mean, var = F.batch_norm(x, *stats, w, b, training=training, return_stats=True)
    fused, mean2, var2 = F.batch_norm(x, *stats2, w, b, training=training, return_stats=True,
                                      relu=True)
    np.testing.assert_array_equal(fused, F.relu(y))
    np.testing.assert_array_equal(stats2[0], stats[0])
    g = rnd(*shape, seed=5, dtype=dtype)
    g.flat[1] = np.nan  # a NaN gradient where the output is masked stays out
    expect = F.batch_norm_backward(F.relu_backward(g, y), x, mean, var, w, training=training)
    got = F.batch_norm_backward(g, x, mean2, var2, w, training=training, relu_output=fused)
    for e, a in zip(expect, got):
        np.testing.assert_array_equal(a, e)


def test_fused_arguments_are_checked():
    x = rnd(2, 3, 4, 4)
    with pytest.raises(TypeError, match="relu must be a bool"):
        F.batch_norm(x, training=True, relu=1)
    y, mean, var = F.batch_norm(x, training=True, return_stats=True, relu=True)
    with pytest.raises(ValueError, match="output"):
        F.batch_norm_backward(y, x, mean, var, relu_output=y[:1])


def _unfused_relu():
    class PlainReLU(nn.ReLU):  # not a ReLU by type: Sequential does not fuse it
        pass
    return PlainReLU()


def _train_step(model, x, g):
    model.zero_grad()
    model.train()
    out = model(x)
    gx = model.backward(g)
    return out, gx, {k: p.grad.copy() for k, p in model.named_parameters()}


def test_sequential_fuses_batch_norm_and_relu():
    def build(relu):
        nn.init.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), relu(),
                             nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.BatchNorm2d(4),
                             relu())
    fused, plain = build(nn.ReLU), build(_unfused_relu)
    x = rnd(2, 3, 10, 10)
    g = rnd(2, 4, 8, 8, seed=1)
    a, b = _train_step(fused, x, g), _train_step(plain, x, g)
    assert fused._fused == (1, 6) and plain._fused == ()  # not the BatchNorm before ReLU6
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for k in a[2]:
        np.testing.assert_array_equal(a[2][k], b[2][k], err_msg=k)
    for m, n in zip(fused.modules(), plain.modules()):  # the running statistics too
        for (k, u), (_, v) in zip(m.named_buffers(), n.named_buffers()):
            np.testing.assert_array_equal(u, v, err_msg=k)
    fused.eval()
    np.testing.assert_array_equal(fused(x), plain.eval()(x))


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "densenet121"])
def test_models_match_their_unfused_twin(name, monkeypatch):
    # ResNet's stem, the residual blocks and the Sequential layers fuse their
    # BatchNorm2d + ReLU: the same bits as the same model with fusion undone.
    from convcore.bench import e2e as bench_e2e
    x = rnd(2, 3, 32, 32)
    fused_model = bench_e2e.build_model(name, size=32)
    out = fused_model.train()(x)
    g = rnd(*out.shape, seed=1)
    fused = _train_step(fused_model, x, g)

    def forward_fused(self, x):
        y = self.forward(x)
        self._relu_input = y
        return F.relu(y)

    def backward_fused(self, g):
        return self.backward(F.relu_backward(g, self._relu_input))

    monkeypatch.setattr(nn.BatchNorm2d, "forward_fused", forward_fused)
    monkeypatch.setattr(nn.BatchNorm2d, "backward_fused", backward_fused)
    plain = _train_step(bench_e2e.build_model(name, size=32), x, g)
    np.testing.assert_array_equal(fused[0], plain[0])
    np.testing.assert_array_equal(fused[1], plain[1])
    for k in fused[2]:
        np.testing.assert_array_equal(fused[2][k], plain[2][k], err_msg=k)


def test_backward_must_match_the_forward_that_ran():
    bn = nn.BatchNorm2d(3)
    x = rnd(2, 3, 4, 4)
    bn.forward_fused(x)
    with pytest.raises(RuntimeError, match="backward_fused"):
        bn.backward(x)
    bn(x)
    with pytest.raises(RuntimeError, match="forward_fused"):
        bn.backward_fused(x)
    with pytest.raises(RuntimeError, match="before forward"):
        nn.BatchNorm2d(3).backward(x)


def test_a_replaced_forward_still_runs_and_trains_alike():
    # viz.activations replaces a layer's forward on the instance to capture
    # its output: a fused BatchNorm2d (in a Sequential, a residual block or
    # ResNet's stem) must still call it, and train as it would unfused.
    from convcore import viz
    from convcore.bench import e2e as bench_e2e
    model = bench_e2e.build_model("resnet18", size=32)
    x = rnd(2, 3, 32, 32)
    for name in ("bn1", "layer1.0.bn1"):
        out = viz.activations(model, x[0], name)
        assert out.ndim == 3 and np.isfinite(out).all()
    bn = model.layer1[0].bn1
    calls = []
    original = bn.forward

    def hooked(inp):
        calls.append(inp.shape)
        return original(inp)

    g = rnd(*model.train()(x).shape, seed=1)
    expect = _train_step(model, x, g)
    object.__setattr__(bn, "forward", hooked)
    got = _train_step(model, x, g)
    assert calls
    for k in expect[2]:
        np.testing.assert_array_equal(got[2][k], expect[2][k], err_msg=k)


def test_a_wrapped_backward_is_called():
    # The distributed reducer wraps each module's backward on the instance to
    # send gradients as they complete: a fused pair must still call it.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    calls = []
    for m in model:
        original = m.backward

        def wrapped(g, original=original, m=m):
            calls.append(type(m).__name__)
            return original(g)

        object.__setattr__(m, "backward", wrapped)
    x = rnd(2, 3, 6, 6)
    model.train()
    y = model(x)
    model.backward(rnd(*y.shape, seed=1))
    assert calls == ["ReLU", "BatchNorm2d", "Conv2d"]
    assert model._fused == ()
