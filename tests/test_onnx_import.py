"""convcore.onnx.load against ONNX Runtime: the torchvision families exported
by torch.onnx at opsets 13 and 17, hand-written graphs of every supported op
at opsets 11 to 21, the imported model in training, compiled and saved, and
the errors of bad and unsupported files."""
import io
import os
import warnings

import numpy as np
import pytest

import convcore as cc

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

TOL = 1e-5  # relative to the largest |output|


def rel_diff(got, expected):
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


def run_ort(data, x):
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the windows it refuses raise; their log is not news
    sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def make_model(nodes, inits, input_shape, output_shape=None, opset=17, name="test"):
    """A one-input, one-output ONNX model (bytes) with the batch dynamic."""
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N"] + list(input_shape))
    out = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT,
                                        None if output_shape is None else ["N"] + output_shape)
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, name, [inp], [out], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 9
    return model.SerializeToString()


def check(data, input_shape, batch=2, seed=0, tol=TOL):
    x = np.random.default_rng(seed).standard_normal((batch,) + tuple(input_shape)).astype(
        np.float32)
    model = cc.onnx.load(data)
    expected = run_ort(data, x)
    got = model.eval()(x)
    assert got.shape == expected.shape
    assert rel_diff(got, expected) <= tol
    compiled = cc.compile(model)(x)
    assert rel_diff(compiled, expected) <= tol
    return model


def rnd(*shape, seed=1, scale=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------- torchvision families

def _torch_export(model, x, opset, **kwargs):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the export needs it")

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, opset_version=opset, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, **kwargs)
    return f.getvalue()


def _family(name, full=False):
    torch = pytest.importorskip("torch")
    from _onnx_twins import FAMILIES

    ctor, kwargs, size = FAMILIES[name]
    torch.manual_seed(0)
    model = ctor(**({} if full else kwargs)).eval()
    with torch.no_grad():  # batch norms with statistics that matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model, 224 if full else size


FAMILY_NAMES = ["resnet18", "resnet50", "resnext50_32x4d", "vgg11", "alexnet", "googlenet",
                "densenet121", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                "efficientnet_b0", "squeezenet1_1", "mnasnet0_5", "regnet_x_400mf",
                "regnet_y_400mf"]


# torchvision's parameter counts (its model docs), which the twins must have
TORCHVISION_PARAMETERS = {
    "resnet18": 11689512, "resnet50": 25557032, "resnext50_32x4d": 25028904,
    "vgg11": 132863336, "alexnet": 61100840, "googlenet": 6624904, "densenet121": 7978856,
    "mobilenet_v2": 3504872, "mobilenet_v3_small": 2542856, "mobilenet_v3_large": 5483032,
    "efficientnet_b0": 5288548, "squeezenet1_1": 1235496, "mnasnet0_5": 2218512,
    "regnet_x_400mf": 5495976, "regnet_y_400mf": 4344144}


@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if n not in ("vgg11", "alexnet")])
def test_twins_have_torchvisions_parameter_counts(name):
    pytest.importorskip("torch")
    from _onnx_twins import FAMILIES

    model = FAMILIES[name][0]()
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETERS[name]


def _check_family(name, opset, full):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the export needs it")

    model, size = _family(name, full)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    data = _torch_export(model, x, opset)
    imported = cc.onnx.load(data)
    expected = run_ort(data, x.numpy())
    got = imported.eval()(x.numpy())
    assert rel_diff(got, expected) <= TOL, name
    assert rel_diff(cc.compile(imported)(x.numpy()), expected) <= TOL, name
    with torch.no_grad():
        assert rel_diff(got, model(x).numpy()) <= TOL, name


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_torchvision_family_imports_and_matches_onnxruntime(name, opset):
    _check_family(name, opset, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_torchvision_family_at_224(name, opset):
    _check_family(name, opset, full=True)
    if opset == 17 and name in ("vgg11", "alexnet"):
        model, _ = _family(name, full=True)
        assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETERS[name]


# ------------------------------------------ a torch model of many ops, every opset

def _mixed_torch_model():
    torch = pytest.importorskip("torch")
    from torch import nn

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.pad = nn.ReflectionPad2d((1, 2, 0, 1))
            self.c2 = nn.Conv2d(8, 6, 3, stride=2)
            self.edge = nn.ReplicationPad2d(1)
            self.zero = nn.ZeroPad2d((0, 1, 1, 0))
            self.pool = nn.MaxPool2d(2, ceil_mode=True)
            self.fc = nn.Linear(6 * 4 * 5, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.c1(x)))
            x = torch.nn.functional.hardsigmoid(self.c2(self.pad(x)))
            x = torch.clamp(self.edge(x), 0, 6) * 2.0 + 1.0
            x = x.mean([2, 3], keepdim=True) * x
            x = self.pool(self.zero(x))
            x = x.view(x.size(0), -1)  # Shape -> Gather -> Unsqueeze -> Concat -> Reshape
            return torch.softmax(self.fc(x), 1)

    torch.manual_seed(0)
    model = Mixed().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("opset", [11, 13, 17, 18, 21])
def test_batch_norm_pads_shape_chains_and_final_softmax_at_every_opset(opset):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the export needs it")

    model = _mixed_torch_model()
    x = torch.randn(2, 3, 10, 10)
    # PRESERVE and no constant folding keep the BatchNormalization, the Shape
    # chains and the Constant nodes that torch.onnx writes unfolded
    data = _torch_export(model, x, opset, training=torch.onnx.TrainingMode.PRESERVE,
                         do_constant_folding=False)
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert {"BatchNormalization", "Shape", "Gather", "Pad", "ReduceMean", "Clip",
            "Softmax"} <= ops
    imported = cc.onnx.load(data)
    probs = imported.eval()(x.numpy())  # the final Softmax computed: probabilities
    assert rel_diff(probs, run_ort(data, x.numpy())) <= TOL
    kinds = {type(m).__name__ for m in imported.modules()}
    assert {"BatchNorm2d", "Pad2d", "Hardsigmoid", "ReLU6", "AdaptiveAvgPool2d",
            "Softmax"} <= kinds


# ------------------------------------------------- hand-written graphs of each op

@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("pads,auto_pad,strides,dilations,group", [
    ([1, 1, 1, 1], None, [1, 1], [1, 1], 1),
    ([0, 1, 2, 0], None, [2, 2], [1, 1], 1),      # asymmetric
    (None, "SAME_UPPER", [2, 2], [1, 1], 2),
    (None, "SAME_LOWER", [2, 1], [1, 1], 1),
    (None, "VALID", [1, 2], [2, 1], 4),
    ([2, 0, 0, 3], None, [1, 1], [2, 2], 1),
])
def test_conv(opset, pads, auto_pad, strides, dilations, group):
    attrs = dict(strides=strides, dilations=dilations, group=group, kernel_shape=[3, 3])
    if pads is not None:
        attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
    node = helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv", **attrs)
    data = make_model([node], {"w": rnd(8, 4 // group, 3, 3), "b": rnd(8)}, [4, 9, 10],
                      opset=opset)
    check(data, [4, 9, 10])


@pytest.mark.parametrize("opset", [11, 17, 21])
@pytest.mark.parametrize("kind,attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    ("MaxPool", dict(kernel_shape=[3, 2], pads=[0, 0, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1],
                         count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    ("GlobalAveragePool", {}),
])
def test_pooling(opset, kind, attrs):
    if opset < 19 and "dilations" in attrs and kind == "AveragePool":
        pytest.skip("AveragePool has dilations from opset 19")
    data = make_model([helper.make_node(kind, ["input"], ["y"], name="pool", **attrs)], {},
                      [3, 9, 8], opset=opset)
    check(data, [3, 9, 8])


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_reduce_mean_over_hw(opset):
    axes = [2, 3]
    if opset >= 18:
        node = helper.make_node("ReduceMean", ["input", "axes"], ["y"], keepdims=0)
        inits = {"axes": np.array(axes, np.int64)}
    else:
        node = helper.make_node("ReduceMean", ["input"], ["y"], axes=axes, keepdims=0)
        inits = {}
    model = check(make_model([node], inits, [5, 4, 3], opset=opset), [5, 4, 3])
    assert model.output_shape((5, 4, 3)) == (5,)


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(opset, mode):
    pads = [0, 0, 1, 2, 0, 0, 3, 0]
    inputs, inits = ["input", "pads"], {"pads": np.array(pads, np.int64)}
    if mode == "constant":
        inputs.append("value")
        inits["value"] = np.array(0.0, np.float32)
    if opset >= 18:  # the axes input: only H and W listed
        inputs += [""] * (3 - len(inputs)) + ["axes"]
        inits["pads"] = np.array([1, 2, 3, 0], np.int64)
        inits["axes"] = np.array([2, 3], np.int64)
    node = helper.make_node("Pad", inputs, ["p"], mode=mode)
    conv = helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3])
    inits["w"] = rnd(2, 3, 3, 3)
    model = check(make_model([node, conv], inits, [3, 6, 5], opset=opset), [3, 6, 5])
    assert any(type(m).__name__ == "Pad2d" for m in model.modules())


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_gemm_matmul_flatten_and_activations(opset):
    nodes = [
        helper.make_node("Clip", ["input", "lo", "hi"], ["c"]),
        helper.make_node("HardSwish", ["c"], ["hs"]) if opset >= 14 else
        helper.make_node("HardSigmoid", ["c"], ["hs"], alpha=1 / 6, beta=0.5),
        helper.make_node("LRN", ["hs"], ["lrn"], size=3, alpha=1e-3, beta=0.6, bias=2.0),
        helper.make_node("Dropout", ["lrn"], ["d"]),
        helper.make_node("Identity", ["d"], ["i"]),
        helper.make_node("Flatten", ["i"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Gemm", ["s", "w2", "b2"], ["g2"]),
        helper.make_node("Relu", ["g2"], ["r"]),
        helper.make_node("MatMul", ["r", "w3"], ["m"]),
        helper.make_node("Add", ["m", "b3"], ["y"]),
    ]
    inits = {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
             "w1": rnd(7, 48), "b1": rnd(7), "w2": rnd(7, 5), "b2": rnd(1, 5),
             "w3": rnd(5, 4), "b3": rnd(4)}
    model = check(make_model(nodes, inits, [3, 4, 4], opset=opset), [3, 4, 4])
    # MatMul + Add is one Linear with a bias
    assert [type(m).__name__ for m in model.children()].count("Linear") == 3


@pytest.mark.parametrize("opset", [11, 17])
def test_joins_and_per_channel_constants(opset):
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["a"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Sigmoid", ["a"], ["s"]),
        helper.make_node("Mul", ["a", "s"], ["silu"]),            # SiLU
        helper.make_node("Sum", ["r", "silu", "a"], ["sum"]),
        helper.make_node("Mul", ["sum", "scale"], ["m"]),          # per-channel scale
        helper.make_node("Sub", ["m", "shift"], ["sh"]),
        helper.make_node("Div", ["sh", "two"], ["dv"]),
        helper.make_node("GlobalAveragePool", ["dv"], ["gap"]),
        helper.make_node("Mul", ["dv", "gap"], ["se"]),            # squeeze-and-excitation
        helper.make_node("Concat", ["se", "r"], ["y"], axis=1),
    ]
    inits = {"w": rnd(4, 3, 1, 1), "scale": rnd(1, 4, 1, 1), "shift": rnd(4, 1, 1),
             "two": np.array(2.0, np.float32)}
    model = check(make_model(nodes, inits, [3, 5, 5], opset=opset), [3, 5, 5])
    assert any(type(m).__name__ == "SiLU" for m in model.modules())


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_torch_model_ending_in_softmax_returns_onnxruntimes_probabilities(opset, tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the export needs it")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 10), torch.nn.Softmax(dim=1)).eval()
    x = torch.randn(3, 3, 8, 8) * 4
    data = _torch_export(model, x, opset)
    assert "Softmax" in {n.op_type for n in onnx.load_from_string(data).graph.node}
    imported = cc.onnx.load(data)
    assert type(list(imported.children())[-1]).__name__ == "Softmax"
    expected = run_ort(data, x.numpy())
    eager = imported.eval()(x.numpy())
    compiled = cc.compile(imported)(x.numpy())
    assert np.abs(eager - expected).max() <= 1e-6
    assert np.abs(compiled - expected).max() <= 1e-6
    np.testing.assert_allclose(eager.sum(1), 1, rtol=1e-6)
    with torch.no_grad():
        assert np.abs(eager - model(x).numpy()).max() <= 1e-6
    # saved, the C++ reader runs it
    imported.save(str(tmp_path / "m.safetensors"))
    assert np.abs(cc.compile(str(tmp_path / "m.safetensors"))(x.numpy()) - expected).max() <= 1e-6


@pytest.mark.parametrize("opset,axis,shape", [
    (11, None, [6]), (11, 1, [6]), (11, -1, [6]), (13, None, [6]),
    (11, 3, [3, 4, 5]), (11, 1, [6, 1, 1]),      # coerced to 2-D: one dimension all the same
    (13, 1, [3, 4, 5]), (17, -2, [3, 4, 5]), (21, 2, [3, 4, 5])])
def test_softmax_axes(opset, axis, shape):
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("Softmax", ["input"], ["s"], **attrs),
             helper.make_node("Relu", ["s"], ["y"])]   # not only as the last op
    model = check(make_model(nodes, {}, shape, opset=opset), shape, tol=1e-6)
    assert any(type(m).__name__ == "Softmax" for m in model.modules())


@pytest.mark.parametrize("opset,axis,match", [
    (11, None, "normalises over dimensions 1..3 together"),
    (12, 2, "normalises over dimensions 2..3 together"),
    (13, 0, "axis=0"), (11, 0, "axis=0")])
def test_softmax_that_convcore_cannot_compute_is_refused(opset, axis, match):
    attrs = {} if axis is None else {"axis": axis}
    data = make_model([helper.make_node("Softmax", ["input"], ["y"], **attrs)], {}, [3, 4, 5],
                      opset=opset)
    with pytest.raises(NotImplementedError, match=match):
        cc.onnx.load(data)
    with pytest.raises(ValueError, match="axis=4 is out of range"):
        cc.onnx.load(make_model([helper.make_node("Softmax", ["input"], ["y"], axis=4)], {},
                                [3, 4, 5], opset=opset))


# ------------------------------------------ the imported model as a convcore model

def _small_imported(softmax=True):
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["a"],
                         kernel_shape=[3, 3], pads=[0, 0, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["a", "bn.weight", "bn.bias", "bn.running_mean",
                                                "bn.running_var"], ["b"], epsilon=1e-3),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("Pad", ["r", "pads"], ["p"], mode="reflect"),
        helper.make_node("MaxPool", ["p"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["mp"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1),
    ] + ([helper.make_node("Softmax", ["y"], ["prob"], axis=1)] if softmax else [])
    inits = {"conv1.weight": rnd(6, 3, 3, 3), "conv1.bias": rnd(6),
             "bn.weight": rnd(6) + 1, "bn.bias": rnd(6), "bn.running_mean": rnd(6),
             "bn.running_var": np.abs(rnd(6)) + 0.5,
             "pads": np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64),
             "fc.weight": rnd(5, 6 * 2 * 2), "fc.bias": rnd(5)}
    return make_model(nodes, inits, [3, 8, 8], name="small")


def test_imported_model_trains_compiles_saves_and_loads(tmp_path):
    data = _small_imported(softmax=False)  # logits, for CrossEntropyLoss
    path = tmp_path / "small.onnx"
    path.write_bytes(data)
    model = cc.onnx.load(str(path))
    assert model.name == "small" and model.input_shape == (3, 8, 8)
    # the initializers are the parameters, under PyTorch's module names
    names = dict(model.named_parameters())
    assert {"conv1.weight", "conv1.bias", "bn.weight", "bn.bias", "fc.weight",
            "fc.bias"} <= set(names)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 3])

    expected = model.eval()(x)
    assert rel_diff(cc.compile(model)(x), expected) <= TOL
    # saved and loaded back (Pad2d's one-hot kernel is a buffer in the file)
    model.save(str(tmp_path / "small.safetensors"))
    again = cc.load(str(tmp_path / "small.safetensors"))
    assert rel_diff(again.eval()(x), expected) <= 1e-6
    fixed = {k: v.copy() for k, v in model.named_buffers() if "pad" in k.lower()}
    assert fixed
    # and exported again: the Pad2d as an explicit Pad + Conv
    cc.onnx.export(model, str(tmp_path / "again.onnx"))
    assert rel_diff(run_ort(str(tmp_path / "again.onnx"), x), expected) <= TOL

    # fine-tuning: a few SGD steps lower the loss; the padding stays fixed
    model.train()
    loss_fn = cc.nn.CrossEntropyLoss()
    opt = cc.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        model.zero_grad()
        logits = model(x)
        losses.append(float(loss_fn(logits, y)))
        model.backward(loss_fn.backward())
        opt.step()
    assert losses[-1] < losses[0]
    for k, v in model.named_buffers():
        if k in fixed:
            np.testing.assert_array_equal(v, fixed[k])


def test_dynamic_spatial_size_needs_input_shape():
    node = helper.make_node("Relu", ["input"], ["y"])
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([node], "g", [inp], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match="input_shape"):
        cc.onnx.load(model.SerializeToString())
    m = cc.onnx.load(model.SerializeToString(), input_shape=(3, 5, 6))
    assert m.input_shape == (3, 5, 6)


# -------------------------------------------------------------------------- errors

def test_unsupported_op_names_the_node_its_type_and_the_file(tmp_path):
    nodes = [helper.make_node("Relu", ["input"], ["r"]),
             helper.make_node("Tanh", ["r"], ["y"], name="the_tanh")]
    path = tmp_path / "tanh.onnx"
    path.write_bytes(make_model(nodes, {}, [3, 4, 4]))
    with pytest.raises(NotImplementedError) as e:
        cc.onnx.load(str(path))
    msg = str(e.value)
    assert "the_tanh" in msg and "Tanh" in msg and str(path) in msg


@pytest.mark.parametrize("nodes,inits,match", [
    ([helper.make_node("Conv", ["input", "w"], ["y"], name="c")], {},
     r"node 'c' \(Conv\): weight \('w'\) is neither an initializer"),
    ([helper.make_node("Conv", ["input", "w"], ["y"], name="c")], {"w": rnd(4, 2, 3, 3)},
     r"node 'c' \(Conv\): the input has 3 channels"),
    ([helper.make_node("BatchNormalization", ["input", "s", "b", "m", "v"], ["y"], name="bn")],
     {"s": rnd(3), "b": rnd(3), "m": rnd(3), "v": rnd(2)}, r"input_var has shape \(2,\)"),
    ([helper.make_node("Flatten", ["input"], ["f"]),
      helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", transB=1)], {"w": rnd(2, 47)},
     r"node 'fc' \(Gemm\): weight of shape \(2, 47\) for an input of 48 features"),
    ([helper.make_node("Add", ["input", "nope"], ["y"], name="a")], {},
     r"node 'a' \(Add\): input 1 \('nope'\) is neither an initializer"),
])
def test_bad_graphs_raise_value_error_naming_the_node(nodes, inits, match):
    with pytest.raises(ValueError, match=match):
        cc.onnx.load(make_model(nodes, inits, [3, 4, 4]))


@pytest.mark.parametrize("nodes,inits,match", [
    ([helper.make_node("Clip", ["input", "lo", "hi"], ["y"], name="clip")],
     {"lo": np.array(-1.0, np.float32), "hi": np.array(1.0, np.float32)}, "min=-1.0"),
    ([helper.make_node("HardSigmoid", ["input"], ["y"])], {}, "alpha=0.2"),
    ([helper.make_node("Concat", ["input", "input"], ["y"], axis=2)], {}, "axis=2"),
    ([helper.make_node("Softmax", ["input"], ["y"], axis=0)], {}, "axis=0"),
    ([helper.make_node("Softmax", ["input"], ["y"], axis=-4)], {}, "axis=0"),
    ([helper.make_node("Pad", ["input", "p"], ["y"], mode="wrap")],
     {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}, "mode 'wrap'"),
    ([helper.make_node("ReduceMean", ["input"], ["y"], axes=[1])], {}, r"axes \[1\]"),
    ([helper.make_node("Reshape", ["input", "s"], ["y"])], {"s": np.array([0, 3, 16], np.int64)},
     "reshapes only to flatten"),
])
def test_unsupported_attributes_raise_not_implemented(nodes, inits, match):
    with pytest.raises(NotImplementedError, match=match):
        cc.onnx.load(make_model(nodes, inits, [3, 4, 4], opset=13))


def test_opset_and_file_errors(tmp_path):
    relu = [helper.make_node("Relu", ["input"], ["y"])]
    with pytest.raises(NotImplementedError, match="opset 9 is not supported"):
        cc.onnx.load(make_model(relu, {}, [3, 4, 4], opset=9))
    with pytest.raises(ValueError, match="cannot read ONNX file"):
        cc.onnx.load(str(tmp_path / "missing.onnx"))
    with pytest.raises(TypeError, match="path_or_bytes"):
        cc.onnx.load(3)
    good = _small_imported()
    for bad in (good[:len(good) // 2], b"\xff" * 64, b"", os.urandom(1000)):
        with pytest.raises(ValueError):
            cc.onnx.load(bad)


def test_random_mutations_raise_only_clear_errors():
    """Bytes of a valid file flipped, cut and spliced: every result loads or
    raises ValueError / NotImplementedError / TypeError with a message (the
    atheris fuzzer, tests/fuzz/fuzz_onnx.py, does this coverage-guided)."""
    import importlib.util

    harness = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz", "fuzz_onnx.py")
    spec = importlib.util.spec_from_file_location("fuzz_onnx", harness)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    one_input = module.one_input
    data = _small_imported()
    rng = np.random.default_rng(0)
    for _ in range(300):
        buf = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:
            for i in rng.integers(0, len(buf), rng.integers(1, 8)):
                buf[i] = int(rng.integers(256))
        elif kind == 1:
            buf = buf[:int(rng.integers(len(buf)))]
        elif kind == 2:
            i, j = sorted(rng.integers(0, len(buf), 2))
            buf = buf[:i] + buf[j:]
        else:
            i = int(rng.integers(len(buf)))
            buf = buf[:i] + bytes(rng.integers(0, 256, 16, dtype=np.uint8)) + buf[i:]
        one_input(bytes(buf))


def test_zero_pad_before_a_convolution_joins_its_padding():
    """Keras' ZeroPadding2D before a 'valid' convolution: one Conv2d with
    the asymmetric rest padded explicitly, no separate zero Pad."""
    nodes = [helper.make_node("Pad", ["input", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 0, 1, 0])]
    inits = {"pads": np.array([0, 0, 0, 1, 0, 0, 1, 2], np.int64), "w": rnd(4, 3, 3, 3)}
    model = check(make_model(nodes, inits, [3, 7, 8]), [3, 7, 8])
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds == ["Pad2d", "Conv2d"]
    # top 0+1, left 1+0, bottom 1+1, right 2+0: (1, 1) in the Conv2d, the rest before it
    assert next(model.children()).padding == [0, 1, 0, 1]  # left, right, top, bottom
    assert list(model.children())[1].padding == (1, 1)


@pytest.mark.parametrize("nodes,inits", [
    ([helper.make_node("Pad", ["input", "p"], ["y"])],
     {"p": np.array([0, 0, 0, 0, 0, 0, 10 ** 9, 0], np.int64)}),
    ([helper.make_node("Conv", ["input", "w"], ["y"], pads=[0, 0, 10 ** 6, 0])],
     {"w": rnd(2, 3, 1, 1)}),
    ([helper.make_node("Conv", ["input", "w"], ["y"], pads=[10 ** 5, 10 ** 5, 10 ** 5, 10 ** 5])],
     {"w": rnd(2, 3, 1, 1)}),
    ([helper.make_node("ConstantOfShape", ["s"], ["c"]),
      helper.make_node("Reshape", ["input", "c"], ["y"])], {"s": np.array([10 ** 6] * 3,
                                                                             np.int64)}),
])
def test_sizes_a_corrupt_file_could_claim_are_refused_before_allocating(nodes, inits):
    with pytest.raises((ValueError, NotImplementedError)):
        cc.onnx.load(make_model(nodes, inits, [3, 4, 4]))


def _window_attrs(data):
    """kernel_shape, strides, pads (symmetric or not), dilations and
    ceil_mode drawn within what a window of an 8..11 input allows."""
    from hypothesis import strategies as st

    k = [data.draw(st.integers(1, 4)) for _ in range(2)]
    pads = [data.draw(st.integers(0, (kk - 1) // 2 + 1)) for kk in k + k]
    return dict(kernel_shape=k, strides=[data.draw(st.integers(1, 3)) for _ in range(2)],
                pads=pads, dilations=[data.draw(st.integers(1, 2)) for _ in range(2)],
                ceil_mode=data.draw(st.integers(0, 1)))


@pytest.mark.parametrize("kind", ["Conv", "MaxPool", "AveragePool"])
def test_windows_match_onnxruntime_property(kind):
    """Random windows (asymmetric pads, ceil_mode, dilation) of each kind
    against ONNX Runtime: each imports and matches, or is refused with
    NotImplementedError (never a wrong answer)."""
    from hypothesis import given, strategies as st

    @given(st.data())
    def prop(data):
        attrs = _window_attrs(data)
        h, w = data.draw(st.integers(8, 11)), data.draw(st.integers(8, 11))
        inits = {}
        inputs = ["input"]
        if kind == "Conv":
            del attrs["ceil_mode"]
            inits["w"] = rnd(2, 3, *attrs["kernel_shape"])
            inputs.append("w")
        elif kind == "AveragePool":
            del attrs["dilations"]  # (opset 19+)
            attrs["count_include_pad"] = data.draw(st.integers(0, 1))
        node = helper.make_node(kind, inputs, ["y"], **attrs)
        blob = make_model([node], inits, [3, h, w], opset=17)
        try:
            run_ort(blob, np.zeros((1, 3, h, w), np.float32))
        except Exception:  # ONNX Runtime refuses it too (a window past the padding)
            return
        try:
            check(blob, [3, h, w], seed=data.draw(st.integers(0, 3)))
        except NotImplementedError:
            pass

    prop()
