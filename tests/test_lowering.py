"""The network graph (docs/format.md, format version 2) that save() writes:
every model lowers to a valid graph, and a naive interpreter of that graph
(tests/reference_graph.py) computes what the model computes in eval mode."""
import json
import warnings
from collections import OrderedDict

import numpy as np
import pytest

import convcore
import convcore.nn as nn
from convcore import io as cio
from convcore import models
from convcore.builder import MisfitWarning
from convcore.builder import build_graph
from convcore.nn.lowering import JOIN_OPS, LAYER_OPS, GraphWriter, LoweringError, to_graph
from reference_graph import check_graph, run_graph


def randomize_batch_norm(model, rng):
    """Running statistics and affine parameters away from the identity, so a
    misplaced BatchNorm2d shows in the outputs."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            dt = m.running_mean.dtype if m.track_running_stats else m.dtype
            if m.track_running_stats:
                m._set_buffer("running_mean", rng.normal(0, 0.2, n).astype(dt))
                m._set_buffer("running_var", rng.uniform(0.5, 1.5, n).astype(dt))
            if m.affine:
                m.weight.data[...] = rng.uniform(0.5, 1.5, n)
                m.bias.data[...] = rng.normal(0, 0.2, n)
    return model


def assert_graph_runs_as_model(model, input_shape, batch=2, seed=0):
    """The graph is valid, and the interpreter's output equals the model's
    eval output. Returns the graph."""
    rng = np.random.default_rng(seed)
    model = randomize_batch_norm(model, rng).eval()
    graph = to_graph(model)
    state = model.state_dict()
    check_graph(graph, state)
    x = rng.standard_normal((batch,) + tuple(input_shape)).astype(model.dtype)
    expected = model(x)
    got = run_graph(graph, state, x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    return graph


# --------------------------------------------------------------------------- the zoo

ZOO_KWARGS = {"alexnet": dict(input_size=67), "zfnet": dict(input_size=67),
              "googlenet": dict(aux_logits=True)}
# The biggest models, each lowered by the same code as a smaller one kept in
# the default run (resnet18, resnext50_32x4d, alexnet): built twice, they
# take seconds.
SLOW = {"resnet34", "wide_resnet50_2", "vgg16", "zfnet"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in models._ZOO])
def test_zoo_model_graph_runs_as_the_model(name):
    convcore.manual_seed(0)
    kwargs = dict(dict(num_classes=10, input_size=32), **ZOO_KWARGS.get(name, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MisfitWarning)
        model = models.get(name, **kwargs)
    graph = assert_graph_runs_as_model(model, model.input_shape)
    assert graph["input_shape"] == list(model.input_shape)
    assert graph["name"] == (getattr(model, "name", None) or type(model).__name__)  # "ResNet"
    assert len(graph["outputs"]) == (3 if name == "googlenet" else 1)


def test_resnet_graph_is_forward_spelled_out():
    model = models.resnet18(num_classes=10, input_size=32)
    graph = to_graph(model)
    assert graph["name"] == "ResNet" and graph["outputs"] == ["fc"]
    head = [(n["op"], n.get("name"), n["inputs"], n["outputs"]) for n in graph["nodes"][:11]]
    assert head == [
        ("Conv2d", "conv1", ["x"], ["conv1"]),
        ("BatchNorm2d", "bn1", ["conv1"], ["bn1"]),
        ("ReLU", None, ["bn1"], ["relu"]),
        ("MaxPool2d", "maxpool", ["relu"], ["maxpool"]),
        ("Conv2d", "layer1.0.conv1", ["maxpool"], ["layer1.0.conv1"]),
        ("BatchNorm2d", "layer1.0.bn1", ["layer1.0.conv1"], ["layer1.0.bn1"]),
        ("ReLU", None, ["layer1.0.bn1"], ["layer1.0.relu"]),
        ("Conv2d", "layer1.0.conv2", ["layer1.0.relu"], ["layer1.0.conv2"]),
        ("BatchNorm2d", "layer1.0.bn2", ["layer1.0.conv2"], ["layer1.0.bn2"]),
        ("add", None, ["layer1.0.bn2", "maxpool"], ["layer1.0.add"]),
        ("ReLU", None, ["layer1.0.add"], ["layer1.0.relu_1"]),
    ]
    # the first block of stage 2 projects its input (the shortcut runs first, as in forward)
    ops = [(n["op"], n.get("name")) for n in graph["nodes"]]
    start = ops.index(("Conv2d", "layer2.0.downsample.0"))
    assert ops[start + 1:start + 3] == [("BatchNorm2d", "layer2.0.downsample.1"),
                                        ("Conv2d", "layer2.0.conv1")]
    assert [n["op"] for n in graph["nodes"][-3:]] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert graph["nodes"][-2]["attrs"] == {"start_dim": 1, "end_dim": -1}


def test_googlenet_auxiliary_heads_are_the_other_outputs():
    convcore.manual_seed(0)
    model = randomize_batch_norm(models.googlenet(num_classes=10, input_size=32,
                                                  aux_logits=True),
                                 np.random.default_rng(1)).eval()
    graph = to_graph(model)
    assert graph["outputs"] == ["fc", "aux2.fc2", "aux1.fc2"]
    # The root in training mode returns all three outputs, its layers in
    # eval mode (no dropout, running statistics): what the graph computes.
    object.__setattr__(model, "training", True)
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = model(x)
    got = run_graph(graph, model.state_dict(), x, all_outputs=True)
    assert len(expected) == len(got) == 3
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6 * np.abs(e).max())


# ------------------------------------------------------------------------ builder nets

@pytest.mark.parametrize("spec,shape", [
    ("CONV3-8-BN-RELU-POOL2-NORM-CONV3-16/s2-RELU-DROPOUT-FC-32-RELU-DROPOUT0.3-FC-10",
     (3, 16, 16)),
    ("CONV3-8/d2-RELU-AVGPOOL3/s2/p1/ceil-CONV3-8/same-BN-RELU-GAP-FC-5", (2, 15, 15)),
    ("CONV5x3-6/valid/g2-RELU-MAXPOOL3/s2/d1/ceil-FLATTEN-FC-4", (4, 12, 11)),
    ("FC-16-RELU-DROPOUT-FC-4-SOFTMAX", (12,)),
    ("CONV3-4-RELU-GAP", (3, 8, 8)),
])
def test_builder_network_graph_runs_as_the_network(spec, shape):
    convcore.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MisfitWarning)
        model = convcore.build(spec, shape, name="net")
    graph = assert_graph_runs_as_model(model, shape)
    assert graph["name"] == "net" and graph["input_shape"] == list(shape)
    flattens = [n for n in graph["nodes"] if n["op"] == "Flatten" and "name" not in n]
    assert len(flattens) == (1 if len(model.classifier) else 0)


def test_build_graph_inception_block_runs_as_the_graph():
    convcore.manual_seed(0)
    model = build_graph({"b1": "CONV1-8-BN-RELU", "b2": "CONV1-6-RELU-CONV3-8-RELU",
                         "b3": "CONV1-4-RELU-CONV5-4-RELU", "b4": "MAXPOOL3/s1/p1-CONV1-4-RELU"},
                        ["y1 = b1(x)", "y2 = b2(x)", "y3 = b3(x)", "y4 = b4(x)",
                         "out = concat(y1, y2, y3, y4)"], input_shape=(5, 9, 9), name="inc")
    graph = assert_graph_runs_as_model(model, (5, 9, 9))
    assert graph["name"] == "inc" and graph["input_shape"] == [5, 9, 9]
    assert graph["nodes"][-1]["op"] == "concat" and graph["outputs"] == ["concat"]
    # each branch is a builder Network: its layers are named by its path
    assert graph["nodes"][0]["name"] == "b1.features.0"


# ------------------------------------------------------------------ plain module trees

def every_layer_net():
    """A user's Sequential of every layer type the format knows: input (3, 10, 10)."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 8, 3, padding=1), bn=nn.BatchNorm2d(8, eps=1e-3), relu=nn.ReLU(),
        pool=nn.MaxPool2d(2, ceil_mode=True), lrn=nn.LocalResponseNorm(3, 1e-3, 0.7, 2.0),
        block=nn.Sequential(nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.ReLU6(),
                            nn.BatchNorm2d(8, affine=False), nn.Sigmoid(),
                            nn.BatchNorm2d(8, track_running_stats=False), nn.SiLU()),
        hswish=nn.Hardswish(), hsig=nn.Hardsigmoid(), avg=nn.AvgPool2d(2, 1, 1, False, False),
        ident=nn.Identity(), depth=nn.StochasticDepth(0.3, "batch"),
        adapt=nn.AdaptiveAvgPool2d((2, 3)), flat=nn.Flatten(), drop=nn.Dropout(0.2),
        fc=nn.Linear(8 * 2 * 3, 5), softmax=nn.Softmax(dim=1)))


def residual_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.BasicBlock(8, 8), nn.BasicBlock(8, 16, stride=2),
                         nn.Bottleneck(16, 4), nn.Bottleneck(16, 8, stride=2, groups=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


def test_every_layer_type_lowers_to_its_node():
    convcore.manual_seed(0)
    model = every_layer_net()
    graph = assert_graph_runs_as_model(model, (3, 10, 10))
    assert {n["op"] for n in graph["nodes"]} == LAYER_OPS
    assert graph["name"] == "Sequential" and graph["input_shape"] is None
    conv = graph["nodes"][0]
    assert conv == {"op": "Conv2d", "name": "conv", "inputs": ["x"], "outputs": ["conv"],
                    "attrs": model.conv.config()}
    assert [n["name"] for n in graph["nodes"][5:7]] == ["block.0", "block.1"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_blocks_lower_as_their_forward(dtype):
    convcore.manual_seed(0)
    assert_graph_runs_as_model(residual_net().to(dtype), (3, 8, 8))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [0, 2, (1, 2), "same", "valid"])
def test_conv2d_padding_in_the_graph(padding_mode, padding):
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, (3, 4), padding=padding, dilation=(1, 2),
                                    padding_mode=padding_mode))
    graph = assert_graph_runs_as_model(model, (2, 7, 9))
    attrs = graph["nodes"][0]["attrs"]
    assert attrs["padding_mode"] == padding_mode
    assert attrs["padding"] == (padding if isinstance(padding, str) else list(
        (padding, padding) if isinstance(padding, int) else padding))


def test_a_layer_as_the_model_holds_its_tensors_without_a_prefix():
    convcore.manual_seed(0)
    model = nn.Conv2d(2, 3, 3)
    graph = assert_graph_runs_as_model(model, (2, 5, 5))
    assert [(n["name"], n["outputs"]) for n in graph["nodes"]] == [("", ["conv2d"])]


def test_nested_graph_gives_its_first_output():
    convcore.manual_seed(0)
    inner = nn.Graph(OrderedDict(a=nn.Conv2d(2, 2, 1), b=nn.Conv2d(2, 4, 1)),
                     ["p = a(x)", "q = b(p)", "s = add(p, x, p)", "m = mul(s, p)",
                      "r = relu(m)"], outputs=["r", "q"])
    model = nn.Sequential(OrderedDict(g=inner, head=nn.Conv2d(2, 3, 1)))
    graph = assert_graph_runs_as_model(model, (2, 4, 4))
    assert graph["outputs"] == ["head"]
    # the node only the second output needs is written too: it holds tensors
    assert "g.b" in [n.get("name") for n in graph["nodes"]]
    assert [n["outputs"][0] for n in graph["nodes"] if "name" not in n] == \
        ["g.add", "g.mul", "g.relu"]


def test_value_names_are_unique_and_the_input_keeps_x():
    model = nn.Sequential(OrderedDict(x=nn.ReLU(), relu=nn.Sequential(nn.ReLU())))
    graph = to_graph(model)
    check_graph(graph, model.state_dict())
    assert [n["outputs"][0] for n in graph["nodes"]] == ["x_1", "relu.0"]
    g = GraphWriter()
    assert [g.node("add", ["x", "x"], value="y") for _ in range(3)] == ["y", "y_1", "y_2"]
    assert g.node("ReLU", ["y_2"]) == "relu"
    with pytest.raises(ValueError, match="'nope'"):
        g.node("ReLU", ["nope"])
    assert JOIN_OPS == ("add", "mul", "concat")
    long = "a" * 300  # a value name is cut to the format's 256 characters; a name cannot be
    assert len(g.node("add", ["x", "x"], value=long)) <= 256
    with pytest.raises(LoweringError, match="300 characters"):
        g.node("ReLU", ["x"], name=long)


def test_an_empty_model_is_one_identity_node():
    graph = to_graph(nn.Sequential())
    check_graph(graph, {})
    assert [n["op"] for n in graph["nodes"]] == ["Identity"]
    x = np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(run_graph(graph, {}, x), x)


# ----------------------------------------------------------------- what cannot lower

class Doubler(nn.Module):
    """A user's module with its own forward."""

    def forward(self, x):
        return 2 * x

    def output_shape(self, input_shape):
        return tuple(input_shape)


class LoudSequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + 1


class HalfGraph(nn.Graph):
    """A Graph subclass with its own forward and the lower that matches it."""

    def forward(self, x):
        return super().forward(x) * 0.5


class LoweredHalfGraph(HalfGraph):
    def lower(self, g, x, prefix):
        raise NotImplementedError("its own lower ran")


def test_a_graph_subclass_needs_a_lower_for_its_own_forward():
    model = HalfGraph(OrderedDict(a=nn.ReLU()), ["y = a(x)"])
    with pytest.raises(LoweringError, match=r"the model \(HalfGraph\).*forward"):
        to_graph(model)
    with pytest.raises(NotImplementedError, match="its own lower ran"):  # at the root too
        to_graph(LoweredHalfGraph(OrderedDict(a=nn.ReLU()), ["y = a(x)"]))


def test_a_custom_module_cannot_be_lowered_and_is_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), Doubler()))
    with pytest.raises(TypeError, match=r"module '1\.1' \(Doubler\).*needs a `lower"):
        to_graph(model)
    with pytest.raises(LoweringError, match=r"the model \(Doubler\)"):
        Doubler().to_graph()
    with pytest.raises(LoweringError, match=r"module 'body' \(LoudSequential\).*forward"):
        to_graph(nn.Sequential(OrderedDict(body=LoudSequential(nn.ReLU()))))


def test_save_warns_for_a_custom_module_and_the_file_loads_in_python(tmp_path):
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), Doubler()).eval()
    path = tmp_path / "custom.safetensors"
    with pytest.warns(UserWarning, match=r"Doubler.*convcore\.load.*C\+\+ runtime and "
                                         r"convcore\.compile cannot run it"):
        cio.save(model, path)
    _, metadata = cio.load_state_dict_file(path)
    assert "convcore_graph" not in metadata and "convcore_architecture" in metadata
    loaded = convcore.load(path)
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))


def test_save_stores_the_graph_compactly(tmp_path):
    model = convcore.build("CONV3-4-BN-RELU-POOL2-FC-3", (1, 8, 8), name="tiny")
    path = tmp_path / "tiny.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that lowers saves without a warning
        cio.save(model, path)
    _, metadata = cio.load_state_dict_file(path)
    assert metadata["convcore_graph"] == json.dumps(to_graph(model), separators=(",", ":"))
    assert json.loads(metadata["convcore_graph"])["name"] == "tiny"
    with pytest.raises(ValueError, match="reserved"):
        cio.save(model, path, metadata={"convcore_graph": "{}"})
