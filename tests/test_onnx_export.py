"""convcore.onnx.export against ONNX Runtime: the zoo, builder networks and
graphs of every layer and padding mode, a dynamic batch, the round trip
through convcore.onnx.load, the `convert` command, and the errors."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import convcore as cc
from _helpers import convcore_env

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-5  # relative to the largest |output|


def rel_diff(got, expected):
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


def run_ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def randomize_batch_norm(model, rng):
    for m in model.modules():
        if type(m).__name__ == "BatchNorm2d" and m.track_running_stats:
            n = m.num_features
            m._set_buffer("running_mean", rng.normal(0, 0.2, n).astype(np.float32))
            m._set_buffer("running_var", rng.uniform(0.5, 1.5, n).astype(np.float32))
            if m.weight is not None:
                m.weight.data[...] = rng.uniform(0.5, 1.5, n)
            if m.bias is not None:
                m.bias.data[...] = rng.normal(0, 0.2, n)


def check_export(model, input_shape, tmp_path, opset=17, batches=(2,), seed=0):
    rng = np.random.default_rng(seed)
    randomize_batch_norm(model, rng)
    model.eval()
    path = tmp_path / "model.onnx"
    cc.onnx.export(model, str(path), input_shape, opset=opset)
    for batch in batches:
        x = rng.standard_normal((batch,) + tuple(input_shape)).astype(np.float32)
        expected = model(x)
        got = run_ort(path, x)
        assert got.shape == expected.shape
        assert rel_diff(got, expected) <= TOL
    return path


# (name, keyword arguments, input shape) of the default run: small inputs (ZFNet and
# Wide ResNet-50-2, the heaviest at any size, run in the slow test only)
ZOO = [
    ("lenet5", {}, None),
    ("alexnet", {"num_classes": 10}, None),
    ("vgg16", {"num_classes": 10, "input_size": (3, 32, 32)}, (3, 32, 32)),
    ("resnet18", {"num_classes": 10}, (3, 64, 64)),
    ("resnet34", {"num_classes": 10}, (3, 32, 32)),
    ("googlenet", {"num_classes": 10}, (3, 64, 64)),
    ("mobilenet_v1", {"num_classes": 10}, (3, 64, 64)),
    ("mobilenet_v2", {"num_classes": 10}, (3, 64, 64)),
    ("efficientnet_b0", {"num_classes": 10}, (3, 64, 64)),
    ("densenet121", {"num_classes": 10}, (3, 64, 64)),
    ("resnext50_32x4d", {"num_classes": 10}, (3, 32, 32)),
    ("se_resnet50", {"num_classes": 10}, (3, 32, 32)),
    ("nasnet_a_mobile", {"num_classes": 10}, (3, 64, 64)),
]


def _zoo_model(name, kwargs):
    cc.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return cc.models.get(name, **kwargs)
        except TypeError:  # a model without input_size
            kwargs = {k: v for k, v in kwargs.items() if k != "input_size"}
            return cc.models.get(name, **kwargs)


@pytest.mark.parametrize("name,kwargs,shape", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_model_runs_in_onnxruntime_with_the_same_outputs(name, kwargs, shape, tmp_path):
    model = _zoo_model(name, kwargs)
    check_export(model, shape or model.input_shape, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(cc.models._ZOO))
def test_zoo_model_at_its_own_size(name, tmp_path):
    model = _zoo_model(name, {})
    shape = model.input_shape or (3, 224, 224)
    check_export(model, shape, tmp_path, batches=(1, 2))


@pytest.mark.parametrize("opset", [11, 13, 14, 17, 19, 21])
def test_every_layer_and_padding_mode_at_every_opset(opset, tmp_path):
    nn = cc.nn
    mode = ("zeros", "reflect", "replicate") + (("circular",) if opset >= 19 else ())
    cc.manual_seed(0)
    branches = {
        "conv": nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6()),
        "pool": nn.Sequential(nn.MaxPool2d(3, 1, 1, dilation=1, ceil_mode=False),
                              nn.Conv2d(3, 4, 1), nn.Hardswish()),
    }
    layers = [nn.Conv2d(3, 3, 3, padding=(1, 2), padding_mode=m, groups=3, bias=False)
              for m in mode]
    model = nn.Sequential(
        *layers,
        nn.Conv2d(3, 3, 3, padding=(1, 0)),
        nn.Conv2d(3, 3, 4, padding="same", dilation=2),
        cc.nn.Graph(branches, ["a = conv(x)", "b = pool(x)", "y = concat(a, b)"]),
        nn.Conv2d(10, 8, 3, stride=2, groups=2), nn.SiLU(), nn.LocalResponseNorm(3),
        nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), nn.Hardsigmoid(),
        nn.Sigmoid(), nn.MaxPool2d(2, ceil_mode=True), nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(), nn.Linear(16, 5))
    check_export(model, (3, 13, 12), tmp_path, opset=opset, batches=(1, 3))


@pytest.mark.parametrize("output_size", [1, (None, 1), (2, None), (3, 2), (6, 4)])
def test_adaptive_average_pooling(output_size, tmp_path):
    check_export(cc.nn.Sequential(cc.nn.AdaptiveAvgPool2d(output_size)), (2, 6, 4), tmp_path)


def test_residual_blocks_se_and_linear_on_images(tmp_path):
    nn = cc.nn
    cc.manual_seed(1)
    se = cc.nn.Graph({"pool": nn.AdaptiveAvgPool2d(1), "fc1": nn.Conv2d(8, 2, 1),
                      "act": nn.ReLU(), "fc2": nn.Conv2d(2, 8, 1), "gate": nn.Sigmoid()},
                     ["s = pool(x)", "a = fc1(s)", "b = act(a)", "c = fc2(b)", "g = gate(c)",
                      "y = mul(x, g)", "z = add(y, x, g)"])
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.BasicBlock(8, 8), se, nn.Bottleneck(8, 4, stride=2),
                          nn.Linear(3, 4), nn.Flatten(1, 2), nn.Linear(4, 3))
    check_export(model, (3, 8, 8), tmp_path, batches=(1, 2))


def test_auxiliary_outputs_are_graph_outputs(tmp_path):
    cc.manual_seed(0)
    model = cc.models.googlenet(num_classes=10, aux_logits=True, input_size=(3, 64, 64))
    path = check_export(model, (3, 64, 64), tmp_path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    outputs = sess.run(None, {"x": x})
    assert [o.shape for o in outputs] == [(2, 10)] * 3


def test_builder_network_and_round_trip_through_import(tmp_path):
    model = cc.build("[(CONV3-8-BN-RELU)*2-POOL2]*2-GAP-FLATTEN-FC-10", (3, 16, 16))
    path = check_export(model, (3, 16, 16), tmp_path)
    back = cc.onnx.load(str(path))
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert rel_diff(back.eval()(x), model(x)) <= TOL
    # the file records the input shape (the convert command reads it)
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["convcore_input_shape"] == "3 16 16"
    # which fixes the sample shape when a tool made H and W dynamic
    for d, name in zip(proto.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        d.dim_param = name
    assert cc.onnx.load(proto.SerializeToString()).input_shape == (3, 16, 16)


def test_fully_connected_network_round_trip(tmp_path):
    model = cc.build("FC-16-RELU-DROPOUT-FC-4", (12,))
    path = check_export(model, (12,), tmp_path, batches=(1, 5))
    back = cc.onnx.load(str(path))
    x = np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32)
    assert back.input_shape == (12,)
    assert rel_diff(back.eval()(x), model(x)) <= TOL


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_softmax_exports_as_onnx_softmax(opset, tmp_path):
    nn = cc.nn
    cc.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 6), nn.Softmax(dim=1))
    path = check_export(model, (3, 4, 4), tmp_path, opset=opset, batches=(1, 3))
    softmax = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and softmax[0].attribute[0].i == 1
    x = np.random.default_rng(4).standard_normal((3, 3, 4, 4)).astype(np.float32) * 4
    assert np.abs(run_ort(path, x) - model(x)).max() <= 1e-6
    # and imported back as a Softmax
    back = cc.onnx.load(str(path))
    assert np.abs(back.eval()(x) - model(x)).max() <= 1e-6


def test_softmax_over_channels_needs_opset_13(tmp_path):
    nn = cc.nn
    cc.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Softmax(dim=1))
    check_export(model, (3, 4, 4), tmp_path, opset=13)
    with pytest.raises(NotImplementedError, match="export with opset >= 13"):
        cc.onnx.export(model, str(tmp_path / "b.onnx"), (3, 4, 4), opset=11)
    with pytest.raises(NotImplementedError, match="batch dimension"):
        cc.onnx.export(nn.Sequential(nn.Softmax(dim=0)), str(tmp_path / "b.onnx"), (3,))
    assert not os.path.exists(tmp_path / "b.onnx")


def test_export_errors(tmp_path):
    nn = cc.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="opset must be an int in 11..21"):
        cc.onnx.export(model, str(tmp_path / "a.onnx"), (3, 8, 8), opset=9)
    with pytest.raises(ValueError, match="input_shape is required"):
        cc.onnx.export(model, str(tmp_path / "a.onnx"))
    with pytest.raises(ValueError, match="input_shape must be positive ints"):
        cc.onnx.export(model, str(tmp_path / "a.onnx"), (3, 0, 8))
    with pytest.raises(NotImplementedError, match="divisor_override"):
        cc.onnx.export(nn.Sequential(nn.AvgPool2d(2, divisor_override=3)),
                       str(tmp_path / "a.onnx"), (3, 8, 8))
    with pytest.raises(NotImplementedError, match="opset 19"):
        cc.onnx.export(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")),
                       str(tmp_path / "a.onnx"), (3, 8, 8), opset=17)
    with pytest.raises(NotImplementedError, match="unequal windows"):
        cc.onnx.export(nn.Sequential(nn.AdaptiveAvgPool2d(3)), str(tmp_path / "a.onnx"),
                       (3, 8, 8))
    assert not os.path.exists(tmp_path / "a.onnx")


# --------------------------------------------------------------- the convert command

def _convert(*args):
    return subprocess.run([sys.executable, "-m", "convcore", "convert", *map(str, args)],
                          capture_output=True, text=True, env=convcore_env())


def test_convert_both_ways(tmp_path):
    model = cc.build("CONV3-4-BN-RELU-POOL2-FC-5", (3, 8, 8)).eval()
    randomize_batch_norm(model, np.random.default_rng(0))
    src = tmp_path / "m.safetensors"
    model.save(str(src))
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)

    # safetensors -> ONNX, the input shape from the file's graph
    r = _convert(src, tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert rel_diff(run_ort(tmp_path / "m.onnx", x), model(x)) <= TOL
    r = _convert(src, tmp_path / "m13.onnx", "--input-shape", 3, 8, 8, "--opset", 13)
    assert r.returncode == 0, r.stderr
    assert onnx.load(str(tmp_path / "m13.onnx")).opset_import[0].version == 13
    r = _convert(src, tmp_path / "m10.onnx", "--input-shape", 3, 10, 10)  # FC-5 takes 4*4*4
    assert r.returncode != 0 and "Linear takes 64 features" in r.stderr

    # ONNX -> safetensors, which convcore.load and the C++ reader take
    r = _convert(tmp_path / "m.onnx", tmp_path / "back.safetensors")
    assert r.returncode == 0, r.stderr
    back = cc.load(str(tmp_path / "back.safetensors"))
    assert rel_diff(back.eval()(x), model(x)) <= TOL
    assert rel_diff(cc.compile(back)(x), model(x)) <= TOL

    r = _convert(tmp_path / "missing.onnx", tmp_path / "x.safetensors")
    assert r.returncode != 0 and "missing.onnx" in r.stderr
    r = _convert(src, tmp_path / "x.txt")
    assert r.returncode != 0 and ".onnx" in r.stderr
