"""The new layers and blocks: activations, stochastic depth, the Graph
(concat / add / mul / relu joins, several outputs, save and load, errors),
and the blocks of the later case studies (Inception, depthwise-separable,
inverted residual, squeeze-and-excitation, MBConv, dense block, transition,
SE and grouped bottlenecks):

* finite-difference gradient checks in float64 (convcore alone);
* PyTorch twins (tests/_tv_twins.py, torchvision's definitions) given
  convcore's state dict under the same keys: outputs, input gradients and
  every parameter gradient, train and eval mode, float32 and float64. The
  errors, max|convcore - torch| / max|torch| per tensor, go to
  _helpers.PARITY_ERRORS and test_print_block_parity_table prints them (-s).
"""
from collections import OrderedDict

import numpy as np
import pytest

import convcore
from _helpers import PARITY_ERRORS, numerical_grad
from convcore import nn
from convcore.nn import blocks
from convcore.nn.graph import Graph

try:
    import torch
    from torch import nn as tnn
    import _tv_twins as tv
except ImportError:  # the twins need torch; the rest of the file does not
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")

ACTIVATIONS = ["Sigmoid", "SiLU", "ReLU6", "Hardswish", "Hardsigmoid"]
KINKS = {"ReLU6": (0.0, 6.0), "Hardswish": (-3.0, 3.0), "Hardsigmoid": (-3.0, 3.0)}


def _away_from_kinks(x, name, gap=1e-3):
    for k in KINKS.get(name, ()):
        near = np.abs(x - k) < gap
        x[near] = k + 2 * gap
    return x


# =========================================================================
# activations
# =========================================================================

@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_gradcheck(name):
    rng = np.random.default_rng(0)
    x = _away_from_kinks(rng.uniform(-8, 8, (2, 3, 4, 4)), name)
    r = rng.standard_normal(x.shape)
    layer = getattr(nn, name)()
    layer(x)
    analytic = layer.backward(r)
    numeric = numerical_grad(lambda: float(np.sum(layer(x) * r)), x)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_twin(name, dtype):
    rng = np.random.default_rng(1)
    x = _away_from_kinks(rng.uniform(-8, 8, (3, 4, 5, 5)), name).astype(dtype)
    x.flat[:6] = [-40.0, 40.0, -3.0, 3.0, 0.0, 6.0]  # far out; the kinks (PyTorch's values)
    g = rng.standard_normal(x.shape).astype(dtype)
    layer = getattr(nn, name)()
    y = layer(x)
    gx = layer.backward(g)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = getattr(tnn, name)()(xt)
    yt.backward(torch.from_numpy(g))
    assert y.dtype == dtype and gx.dtype == dtype
    _record(name, dtype, "-", "output", _err(y, yt.detach().numpy()))
    _record(name, dtype, "-", "grad input", _err(gx, xt.grad.numpy()))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    assert _err(y, yt.detach().numpy()) < tol
    # PyTorch's float64 Hardsigmoid backward scales by a float32 1/6 (3e-8 off)
    assert _err(gx, xt.grad.numpy()) < (1e-7 if name == "Hardsigmoid" else tol)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_float32_spans_match_float64(name):
    # float32 runs through vectors in spans of 4096 shared by the threads,
    # the tail in scalars: every element as the float64 path, NaN kept
    rng = np.random.default_rng(2)
    x = _away_from_kinks(rng.uniform(-10, 10, (3, 5, 37, 29)), name)
    x.flat[[7, 4100, x.size - 3]] = np.nan
    g = rng.standard_normal(x.shape)
    for x32 in (x.astype(np.float32), x.astype(np.float32).transpose(0, 1, 3, 2)):
        g32 = g.astype(np.float32).reshape(x.shape)
        if x32.shape != x.shape:
            g32 = g32.transpose(0, 1, 3, 2)
        layer32, layer64 = getattr(nn, name)(), getattr(nn, name)()
        y32, y64 = layer32(x32), layer64(x32.astype(np.float64))
        gx32 = layer32.backward(g32)
        gx64 = layer64.backward(g32.astype(np.float64))
        for a, b in ((y32, y64), (gx32, gx64)):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            ok = ~np.isnan(b)
            assert np.max(np.abs(a[ok] - b[ok])) <= 1e-6 * max(1.0, np.max(np.abs(b[ok])))


def test_activation_errors():
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.SiLU()(np.ones((2, 2), dtype=np.int64))
    layer = nn.Sigmoid()
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones(3))
    layer(np.ones((2, 3)))
    with pytest.raises(ValueError, match="grad_output must have the output's shape"):
        layer.backward(np.ones((3, 2)))


def test_sigmoid_extremes_do_not_overflow():
    with np.errstate(over="raise"):
        y = nn.Sigmoid()(np.array([-1000.0, 0.0, 1000.0], dtype=np.float32))
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])


# =========================================================================
# stochastic depth
# =========================================================================

def test_stochastic_depth_row_mode():
    convcore.manual_seed(0)
    sd = nn.StochasticDepth(0.5, "row")
    x = np.ones((64, 3, 2, 2), np.float32)
    y = sd(x)
    per_sample = y.reshape(64, -1)
    # every sample is dropped whole or kept whole and scaled by 1 / (1 - p)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))
    assert 10 < np.count_nonzero(per_sample[:, 0]) < 54
    g = sd.backward(np.ones_like(x))
    np.testing.assert_array_equal(g, y)          # d(x * mask)/dx = mask
    sd.eval()
    assert sd(x) is x and sd.backward(x) is x    # the identity in eval mode


def test_stochastic_depth_batch_mode_and_edges():
    convcore.manual_seed(1)
    y = nn.StochasticDepth(0.5, "batch")(np.ones((8, 2), np.float32))
    assert np.unique(y).size == 1
    assert np.all(nn.StochasticDepth(1.0)(np.ones((4, 2), np.float32)) == 0)
    with pytest.raises(ValueError, match="p must be a probability"):
        nn.StochasticDepth(1.5)
    with pytest.raises(ValueError, match="mode must be 'row' or 'batch'"):
        nn.StochasticDepth(0.1, "col")


# =========================================================================
# the graph
# =========================================================================

def _join_graph():
    """Every join: two conv branches concatenated, a residual add, an SE-like
    mul with a broadcast (N, C, 1, 1) factor, and a function relu."""
    return Graph(OrderedDict(
        a=nn.Conv2d(3, 2, 3, padding=1), b=nn.Conv2d(3, 4, 1), c=nn.Conv2d(6, 6, 1),
        pool=nn.AdaptiveAvgPool2d(1), gate=nn.Sigmoid(),
    ), ["ya = a(x)", "yb = b(x)", "cat = concat(ya, yb)", "z = c(cat)", "s = add(z, cat)",
        "r = relu(s)", "p = pool(r)", "g = gate(p)", "out = mul(r, g)"])


def test_graph_gradcheck():
    convcore.manual_seed(0)
    g = _join_graph().to(np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 4))
    r = rng.standard_normal((2, 6, 4, 4))
    assert g.output_shape((3, 4, 4)) == (6, 4, 4)
    g.zero_grad()
    g(x)
    gx = g.backward(r)
    loss = lambda: float(np.sum(g(x) * r))  # noqa: E731
    np.testing.assert_allclose(gx, numerical_grad(loss, x), rtol=1e-6, atol=1e-8)
    for name, p in g.named_parameters():
        np.testing.assert_allclose(p.grad, numerical_grad(loss, p.data), rtol=1e-6, atol=1e-8,
                                   err_msg=name)


def test_graph_save_load_and_architecture(tmp_path):
    convcore.manual_seed(0)
    g = _join_graph()
    arch = g.architecture()
    assert arch["type"] == "Graph"
    assert arch["config"]["nodes"][2] == "cat = concat(ya, yb)"
    g.save(tmp_path / "g.safetensors")
    h = convcore.load(tmp_path / "g.safetensors")
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    g.eval(), h.eval()
    np.testing.assert_array_equal(g(x), h(x))
    assert h.config() == g.config()


def test_graph_multiple_outputs():
    convcore.manual_seed(0)
    g = Graph(OrderedDict(main=nn.Linear(4, 3), side=nn.Linear(4, 2)),
              ["m = main(x)", "s = side(x)"], outputs=["m", "s"])
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    m, s = g(x)
    assert m.shape == (5, 3) and s.shape == (5, 2)
    gx = g.backward((np.ones_like(m), None))     # the side output unused
    np.testing.assert_allclose(gx, np.ones((5, 3), np.float32) @ g.main.weight.data, rtol=1e-6)
    assert not np.any(g.side.weight.grad)
    with pytest.raises(ValueError, match="tuple of as many gradients"):
        g.backward(np.ones_like(m))
    g.eval()
    assert g(x).shape == (5, 3)                  # eval: the first output only


@pytest.mark.parametrize("modules,nodes,match", [
    ({}, [], "at least one node"),
    ({}, ["y = concat(x, q)"], "'q', which no earlier node defines"),
    ({"a": nn.ReLU()}, ["y = a(x)", "z = a(y)"], "called twice"),
    ({"a": nn.ReLU(), "b": nn.ReLU()}, ["y = a(x)"], r"\['b'\] are not called"),
    ({}, ["y = conv(x)"], "neither a child module"),
    ({}, ["y = mul(x)"], "mul takes two inputs"),
    ({}, ["y x = relu(x)"], "bad graph node"),
    ({}, ["x = relu(x)"], "defined twice"),
    ({"concat": nn.ReLU()}, ["y = concat(x)"], "bad module name"),
    ({"outputs": nn.ReLU()}, ["y = outputs(x)"], "Graph has an attribute of that name"),
    ({"forward": nn.ReLU()}, ["y = forward(x)"], "Graph has an attribute of that name"),
])
def test_graph_errors(modules, nodes, match):
    with pytest.raises(ValueError, match=match):
        Graph(OrderedDict(modules), nodes)


def test_graph_shape_errors():
    g = Graph(OrderedDict(a=nn.Conv2d(3, 2, 3), b=nn.Conv2d(3, 2, 1)),
              ["ya = a(x)", "yb = b(x)", "out = concat(ya, yb)"])
    with pytest.raises(ValueError, match="concat needs inputs that differ only in channels"):
        g.output_shape((3, 8, 8))
    with pytest.raises(TypeError, match="modules must be a dict"):
        Graph([nn.ReLU()], ["y = relu(x)"])


# =========================================================================
# the blocks: finite differences (float64) and torch twins
# =========================================================================

def _small_blocks():
    """name -> (convcore block builder, twin builder or None, input shape)."""
    cases = OrderedDict()
    cases["inception"] = (lambda: blocks.inception(4, 2, 2, 3, 2, 3, 2),
                          lambda: tv.Inception(4, 2, 2, 3, 2, 3, 2), (2, 4, 5, 5))
    cases["depthwise_separable"] = (
        lambda: blocks.depthwise_separable(3, 4, 2),
        lambda: tnn.Sequential(tv.ConvNormActivation(3, 3, 3, 2, groups=3),
                               tv.ConvNormActivation(3, 4, 1)), (2, 3, 6, 6))
    cases["inverted_residual"] = (lambda: blocks.inverted_residual(4, 4, 1, 2),
                                  lambda: tv.InvertedResidual(4, 4, 1, 2), (2, 4, 5, 5))
    cases["inverted_residual_s2"] = (lambda: blocks.inverted_residual(4, 6, 2, 1),
                                     lambda: tv.InvertedResidual(4, 6, 2, 1), (2, 4, 6, 6))
    cases["squeeze_excitation"] = (lambda: blocks.squeeze_excitation(6, 2),
                                   lambda: tv.SqueezeExcitation(6, 2), (2, 6, 4, 4))
    cases["mbconv"] = (lambda: blocks.mbconv(8, 8, 3, 1, 2, 0.0),
                       lambda: tv.MBConv(8, 8, 3, 1, 2, 0.0), (2, 8, 4, 4))
    cases["mbconv_k5_s2"] = (lambda: blocks.mbconv(4, 8, 5, 2, 6, 0.0),
                             lambda: tv.MBConv(4, 8, 5, 2, 6, 0.0), (2, 4, 6, 6))
    cases["dense_block"] = (lambda: blocks.dense_block(3, 4, 2, 3),
                            lambda: tv.DenseBlock(3, 4, 2, 3), (2, 4, 4, 4))
    cases["transition"] = (lambda: blocks.transition(4, 2), lambda: tv.Transition(4, 2),
                           (2, 4, 4, 4))
    cases["se_bottleneck"] = (lambda: blocks.se_bottleneck(16, 8, 2),
                              lambda: tv.Bottleneck(16, 8, 2, se=True), (2, 16, 4, 4))
    cases["resnext_bottleneck"] = (lambda: nn.Bottleneck(32, 16, 2, groups=4, base_width=8),
                                   lambda: tv.Bottleneck(32, 16, 2, groups=4, base_width=8),
                                   (2, 32, 4, 4))
    return cases


BLOCKS = list(_small_blocks())


def _randomise_bn(model, seed):
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c, dt = m.num_features, m.weight.data.dtype
            m.weight.data[:] = rng.uniform(0.5, 1.5, c).astype(dt)
            m.bias.data[:] = (rng.standard_normal(c) * 0.2).astype(dt)
            m.running_mean[:] = (rng.standard_normal(c) * 0.1).astype(dt)
            m.running_var[:] = rng.uniform(0.5, 1.5, c).astype(dt)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", BLOCKS)
def test_block_gradcheck(name, train, one_core_thread):
    make, _, shape = _small_blocks()[name]
    convcore.manual_seed(3)
    block = make().to(np.float64)
    _randomise_bn(block, 3)
    block.train(train)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    out_shape = (shape[0],) + block.output_shape(shape[1:])
    r = rng.standard_normal(out_shape)
    block.zero_grad()
    assert block(x).shape == out_shape
    gx = block.backward(r)
    loss = lambda: float(np.sum(block(x) * r))  # noqa: E731
    scale = max(1.0, np.abs(gx).max())
    assert np.abs(gx - numerical_grad(loss, x)).max() < 1e-6 * scale
    # a few entries of every parameter (all of them would take minutes)
    for pname, p in block.named_parameters():
        flat = p.data.reshape(-1)
        idx = rng.choice(flat.size, size=min(3, flat.size), replace=False)
        for i in idx:
            old = flat[i]
            flat[i] = old + 1e-6
            lp = loss()
            flat[i] = old - 1e-6
            lm = loss()
            flat[i] = old
            num = (lp - lm) / 2e-6
            ana = p.grad.reshape(-1)[i]
            assert abs(num - ana) < 1e-6 * max(1.0, abs(ana)), (pname, i, num, ana)


# (block, dtype, mode) -> {what: err}
BLOCK_TABLE = OrderedDict()


def _err(actual, expected):
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = np.abs(e).max()
    return float(np.abs(a - e).max() / scale) if scale else float(np.abs(a).max())


def _record(name, dtype, mode, what, err):
    row = BLOCK_TABLE.setdefault((name, np.dtype(dtype).name, mode), OrderedDict())
    row[what] = max(row.get(what, 0.0), err)
    key = f"block {name} {mode} {what}[{np.dtype(dtype).name}]"
    PARITY_ERRORS[key] = max(PARITY_ERRORS.get(key, 0.0), err)


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", BLOCKS)
def test_block_twin(name, train, dtype):
    make, make_twin, shape = _small_blocks()[name]
    convcore.manual_seed(5)
    block = make().to(dtype)
    _randomise_bn(block, 5)
    twin = make_twin()
    sd = block.state_dict()
    assert list(sd) == list(twin.state_dict()), "state-dict keys differ from torchvision's"
    twin.to(torch.float64 if dtype == np.float64 else torch.float32)
    twin.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    block.train(train), twin.train(train)
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape).astype(dtype)
    y = block(x)
    r = rng.standard_normal(y.shape).astype(dtype)
    block.zero_grad()
    gx = block.backward(r)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = twin(xt)
    yt.backward(torch.from_numpy(r))
    mode = "train" if train else "eval"
    errors = {"output": _err(y, yt.detach().numpy()), "grad input": _err(gx, xt.grad.numpy())}
    tparams = dict(twin.named_parameters())
    largest = max(float(p.grad.abs().max()) for p in tparams.values())
    per = {}
    for pname, p in block.named_parameters():
        e = tparams[pname].grad.numpy()
        # a conv bias before a train-mode BN has zero gradient in exact arithmetic
        scale = max(np.abs(e).max(), 1e-3 * largest)
        per[pname] = float(np.abs(p.grad - e).max() / scale)
    errors["grad params"] = max(per.values())
    running = [k for k in sd if "running" in k]
    if train and running:
        tb, ours = twin.state_dict(), block.state_dict()
        errors["running stats"] = max(_err(ours[k], tb[k].numpy()) for k in running)
    for what, err in errors.items():
        _record(name, dtype, mode, what, err)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    bad = {k: v for k, v in errors.items() if v > tol}
    assert not bad, f"{name}: {bad} (worst parameter {max(per, key=per.get)})"


COLUMNS = ["output", "grad input", "grad params", "running stats"]


def format_block_table():
    lines = ["max scaled error vs PyTorch twins: max|convcore - torch| / max|torch| per tensor",
             f"{'block':22} {'dtype':8} {'mode':6} " + " ".join(f"{c:>13}" for c in COLUMNS)]
    for (name, dtype, mode), row in BLOCK_TABLE.items():
        cells = [f"{row[c]:13.2e}" if c in row else f"{'-':>13}" for c in COLUMNS]
        lines.append(f"{name:22} {dtype:8} {mode:6} " + " ".join(cells))
    return "\n".join(lines)


def test_print_block_parity_table():
    """Runs last in this file: prints the figures gathered above (-s)."""
    if not BLOCK_TABLE:
        pytest.skip("no twin test ran")
    print("\n" + format_block_table())


def test_core_activation_kernels_take_strided_views_and_name_bad_kinds():
    rng = np.random.default_rng(9)
    base = rng.standard_normal((4, 6, 5)).astype(np.float32) * 4
    view = base[:, ::2, ::-1]                         # not contiguous
    np.testing.assert_array_equal(convcore._core.activation("relu6", view),
                                  np.clip(view, 0, 6))
    g = np.ones_like(view)
    np.testing.assert_array_equal(convcore._core.activation_backward("relu6", g, view),
                                  ((view > 0) & (view < 6)).astype(np.float32))
    with pytest.raises(ValueError, match="activation must be 'sigmoid'"):
        convcore._core.activation("swish", view)


def test_build_graph_from_the_notation(tmp_path):
    """Inception 3a written with chain specs per branch: the shapes are
    inferred, the parameters are the paper's (without BN), and it saves,
    loads and trains like any graph."""
    convcore.manual_seed(0)
    g = convcore.build_graph({"b1": "CONV1-64-RELU",
                              "b2": "CONV1-96-RELU-CONV3-128-RELU",
                              "b3": "CONV1-16-RELU-CONV5-32-RELU",
                              "b4": "MAXPOOL3/s1/p1-CONV1-32-RELU"},
                             ["y1 = b1(x)", "y2 = b2(x)", "y3 = b3(x)", "y4 = b4(x)",
                              "out = concat(y1, y2, y3, y4)"], input_shape=(192, 28, 28))
    assert g.output_shape((192, 28, 28)) == (256, 28, 28)
    assert g.num_parameters() == (192 * 64 + 64) + (192 * 96 + 96) + (96 * 9 * 128 + 128) + \
        (192 * 16 + 16) + (16 * 25 * 32 + 32) + (192 * 32 + 32)
    x = np.random.default_rng(0).standard_normal((2, 192, 6, 6)).astype(np.float32)
    y = g(x)
    assert y.shape == (2, 256, 6, 6) and g.backward(np.ones_like(y)).shape == x.shape
    g.save(tmp_path / "inc.safetensors")
    np.testing.assert_array_equal(convcore.load(tmp_path / "inc.safetensors").eval()(x),
                                  g.eval()(x))
    with pytest.raises(ValueError, match="which no earlier node defines"):
        convcore.build_graph({"a": "RELU"}, ["y = a(q)"], (3, 4, 4))
    with pytest.raises(TypeError, match="Module or a spec string"):
        convcore.build_graph({"a": 3}, ["y = a(x)"], (3, 4, 4))
