"""The C++ library as a native app uses it: the installed package's CMake
config (`python -m convcore --cmake-dir`), the examples in examples/cpp built
against it with cmake in a temporary directory, and their results against
Python's for the same saved models; the loader's error messages against the
Python reader's; every zoo model through the C++ runner; and (slow) the C++
test suite through ctest.

Skipped, with the reason, where cmake or a C++ compiler is missing. Where
the imported convcore has no C++ library installed with it (a source tree
used through PYTHONPATH), the C++ library of this tree is built and
installed into a temporary prefix for the examples instead."""
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import convcore as cc
from convcore.io import load_state_dict_file, save_state_dict_file
from _helpers import convcore_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "cpp")


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _check(result, what):
    assert result.returncode == 0, (f"{what} failed ({result.returncode}):\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _generator_args():
    # Ninja when there is one (as the Python build uses), else CMake's default.
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def _require_toolchain():
    if not shutil.which("cmake"):
        pytest.skip("cmake is not installed (pip install cmake, or the system's package)")
    if not _compiler():
        pytest.skip("no C++ compiler found (c++, g++ or clang++; or set CXX)")


@pytest.fixture(scope="module")
def installed_cmake_dir():
    """`python -m convcore --cmake-dir` of the imported package (pip install . puts
    the headers, libraries and CMake config inside it)."""
    _require_toolchain()
    r = _run([sys.executable, "-m", "convcore", "--cmake-dir"])
    if r.returncode != 0:
        return None
    return r.stdout.strip()


@pytest.fixture(scope="module")
def cmake_dir(installed_cmake_dir, tmp_path_factory):
    """The installed package's CMake config; for a source tree used through
    PYTHONPATH (no C++ library installed with it), the C++ library of this
    tree built and `cmake --install`ed into a temporary prefix instead."""
    if installed_cmake_dir:
        return installed_cmake_dir
    build, prefix = tmp_path_factory.mktemp("lib-build"), tmp_path_factory.mktemp("prefix")
    _check(_run(["cmake", "-S", ROOT, "-B", str(build), "-DCONVCORE_BUILD_PYTHON=OFF",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_INSTALL_PREFIX={prefix}"]
                + _generator_args()), "cmake configure")
    _check(_run(["cmake", "--build", str(build), "--parallel", "2"]), "cmake build")
    _check(_run(["cmake", "--install", str(build)]), "cmake install")
    libdir = "lib64" if os.path.isdir(prefix / "lib64" / "cmake") else "lib"
    return str(prefix / libdir / "cmake" / "convcore")


@pytest.fixture(scope="module")
def examples(cmake_dir, tmp_path_factory):
    """examples/cpp built against the installed package, as an app would."""
    build = tmp_path_factory.mktemp("examples-build")
    _check(_run(["cmake", "-S", EXAMPLES, "-B", str(build), f"-Dconvcore_DIR={cmake_dir}",
                 "-DCMAKE_BUILD_TYPE=Release"] + _generator_args()), "cmake configure")
    _check(_run(["cmake", "--build", str(build), "--parallel", "2"]), "cmake build")
    exe = {name: str(build / name) for name in ("classify_digits", "conv2d_minimal", "run_net")}
    for path in exe.values():
        assert os.path.isfile(path), path
    return exe


def _write_digits_module():
    spec = importlib.util.spec_from_file_location("write_digits",
                                                  os.path.join(EXAMPLES, "write_digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cmake_dir_holds_the_package_config_headers_and_libraries(installed_cmake_dir):
    if not installed_cmake_dir:
        pytest.skip("the imported convcore has no C++ library installed with it (a source tree "
                    "through PYTHONPATH?); pip install . installs it")
    cmake_dir = installed_cmake_dir
    assert os.path.isfile(os.path.join(cmake_dir, "convcoreConfig.cmake"))
    assert os.path.isfile(os.path.join(cmake_dir, "convcoreTargets.cmake"))
    prefix = os.path.dirname(os.path.dirname(os.path.dirname(cmake_dir)))  # .../convcore
    for header in ("convcore.h", "net.h", "tensor.h", "ops.h", "errors.h", "safetensors.h"):
        assert os.path.isfile(os.path.join(prefix, "include", "convcore", header)), header
    assert os.path.isfile(os.path.join(prefix, "lib", "libconvcore_core.a"))
    assert os.path.isfile(os.path.join(prefix, "lib", "libconvcore_runtime.a"))
    r = _check(_run([sys.executable, "-m", "convcore", "--include-dir"]), "--include-dir")
    assert r.stdout.strip() == os.path.join(prefix, "include")
    # no Python in the C++ API
    for name in os.listdir(os.path.join(prefix, "include", "convcore")):
        with open(os.path.join(prefix, "include", "convcore", name)) as f:
            text = f.read()
        assert "Python.h" not in text and "pybind11" not in text, name


def test_example_classifies_digits_as_python_does(examples, tmp_path):
    wd = _write_digits_module()
    x, y = cc.data.load_digits(size=28, padding=2)
    model = wd.train_lenet5(x, y, epochs=3)
    model_path, digits_path = str(tmp_path / "lenet5.safetensors"), str(tmp_path / "digits.bin")
    model.save(model_path)
    wd.write_digits(digits_path, x, y)
    images, labels = wd.read_digits(digits_path)
    assert np.array_equal(images, x) and np.array_equal(labels, y)

    expected = cc.predict(cc.load(model_path), x).argmax(1)
    r = _check(_run([examples["classify_digits"], model_path, digits_path, "--batch", "50"]),
               "classify_digits")
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line)
    predictions = np.array([int(v) for v in lines["predictions"].split()])
    assert predictions.shape == (len(x),)
    assert np.array_equal(predictions, expected)
    accuracy = (expected == y).mean()
    assert accuracy > 0.8  # a trained LeNet-5, not noise
    assert f"{100 * accuracy:.2f}%" in lines["accuracy"]
    assert re.match(r" [0-9.]+ ms \(1797 images, batches of 50, \d+ threads\)",
                    lines["time per image"])
    assert "lenet5, 61706 parameters, input (1, 32, 32)" in lines["model"]


def test_minimal_conv2d_example(examples):
    r = _check(_run([examples["conv2d_minimal"]]), "conv2d_minimal")
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
    w = np.array([[1, 0, -1]] * 3, dtype=np.float32).reshape(1, 1, 3, 3)
    y = cc.conv2d(x, w, np.array([0.5], np.float32), stride=2, padding=1)[0, 0]
    rows = [[float(v) for v in line.split()] for line in r.stdout.splitlines()[1:4]]
    np.testing.assert_array_equal(np.array(rows, np.float32), y)
    assert ("ValueError: groups=2 must divide the input channels, got input with 1 channels"
            in r.stdout)


def _randomize_batch_norm(model, rng):
    for m in model.modules():
        if type(m).__name__ == "BatchNorm2d" and m.track_running_stats:
            n, dt = m.num_features, m.running_mean.dtype
            m._set_buffer("running_mean", rng.normal(0, 0.2, n).astype(dt))
            m._set_buffer("running_var", rng.uniform(0.5, 1.5, n).astype(dt))
            m.weight.data[...] = rng.uniform(0.5, 1.5, n)
            m.bias.data[...] = rng.normal(0, 0.2, n)


def _run_net(examples, model, x, tmp_path, name):
    """The saved model's output from the C++ runner, and Python's (eval mode)."""
    path = str(tmp_path / f"{name}.safetensors")
    model.eval().save(path)
    expected = cc.load(path).eval()(x)
    save_state_dict_file({"input": x}, str(tmp_path / f"{name}_in.safetensors"))
    out = str(tmp_path / f"{name}_out.safetensors")
    r = _check(_run([examples["run_net"], path, str(tmp_path / f"{name}_in.safetensors"), out]),
               f"run_net {name}")
    got = load_state_dict_file(out)[0]["output"]
    os.remove(path)
    return got, expected, r.stdout


def _assert_close(got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = max(1.0, float(np.abs(expected).max()))
    tol = 1e-5 if got.dtype == np.float32 else 1e-12
    assert float(np.abs(got - expected).max()) <= tol * scale


def test_builder_networks_and_residual_blocks_match_python(examples, tmp_path):
    import warnings

    from convcore.nn import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Identity, Linear,
                             ReLU, Sequential)
    from convcore.nn.residual import BasicBlock, Bottleneck

    rng = np.random.default_rng(0)
    cc.manual_seed(0)
    # every kind of builder layer, and every padding mode of Conv2d
    layers = cc.builder.parse("CONV3-4/p2-BN-RELU-CONV3x2-6/g2-CONV3-6/same/d2-NORM-"
                              "MAXPOOL3/s2/p1/ceil-AVGPOOL2-DROPOUT-FC-7-RELU-DROPOUT0.2-FC-3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("reflect", "replicate", "circular"):
            for conv in (0, 3, 4):  # CONV3-4/p2, CONV3x2-6/g2, CONV3-6/same/d2
                layers[conv]["padding_mode"] = mode
            model = cc.build(layers, (3, 13, 11))
            _randomize_batch_norm(model, rng)
            x = rng.standard_normal((2, 3, 13, 11)).astype(np.float32)
            got, expected, _ = _run_net(examples, model, x, tmp_path, f"pad_{mode}")
            _assert_close(got, expected)
        nets = {
            "layers": (cc.build(layers, (3, 13, 11)), (2, 3, 13, 11)),
            "gap": (cc.build("[CONV3-8-RELU]*2-POOL2-CONV1-4-GAP-FLATTEN-FC-5", (2, 10, 10)),
                    (3, 2, 10, 10)),
            "fc_only": (cc.build("FC-16-RELU-DROPOUT-FC-4", (12,)), (5, 12)),
            "residual": (Sequential(Conv2d(3, 8, 3, padding=1), BatchNorm2d(8), ReLU(),
                                    BasicBlock(8, 8), BasicBlock(8, 16, stride=2),
                                    Bottleneck(16, 4, stride=2), Identity(),
                                    AdaptiveAvgPool2d((2, None)), Flatten(),
                                    Linear(16 * 2 * 3, 5)), (2, 3, 12, 12)),
        }
    for name, (model, shape) in nets.items():
        _randomize_batch_norm(model, rng)
        for dtype in (np.float32, np.float64):
            model.to(dtype)
            x = rng.standard_normal(shape).astype(dtype)
            got, expected, _ = _run_net(examples, model, x, tmp_path, name)
            _assert_close(got, expected)


def _corrupt(src, dst, edit_header=None, data=None, length=None, truncate=None):
    """A copy of a safetensors file with its header (a dict) edited, its data
    replaced, its length field overwritten or the file cut short."""
    with open(src, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack_from("<Q", buf, 0)
    header, body = json.loads(buf[8:8 + n]), buf[8 + n:]
    if edit_header:
        edit_header(header)
    raw = json.dumps(header).encode()
    out = struct.pack("<Q", len(raw) if length is None else length) + raw + \
        (body if data is None else data)
    with open(dst, "wb") as f:
        f.write(out[:truncate] if truncate is not None else out)


def test_cpp_loader_refuses_bad_files_with_the_python_message(examples, tmp_path):
    cc.manual_seed(0)
    good = str(tmp_path / "good.safetensors")
    cc.models.lenet5().save(good)
    bad = str(tmp_path / "bad.safetensors")
    size = os.path.getsize(good)

    def rename(h):
        h["features.0.bias2"] = h.pop("features.0.bias")

    def reshape(h):
        h["classifier.4.bias"]["shape"] = [2, 5]

    def dtype(h):
        h["classifier.4.bias"]["dtype"] = "F8"

    def overlap(h):
        h["classifier.4.bias"]["data_offsets"] = [0, 40]

    def past_end(h):
        h["classifier.4.bias"]["data_offsets"][1] += 10 ** 12

    def no_graph(h):
        del h["__metadata__"]["convcore_architecture"]
        del h["__metadata__"]["convcore_graph"]

    def swish(h):
        h["__metadata__"]["convcore_graph"] = h["__metadata__"]["convcore_graph"].replace(
            '"op":"ReLU"', '"op":"Swish"', 1)

    cases = [dict(truncate=size - 100), dict(truncate=5), dict(length=10 ** 9),
             dict(length=size), dict(edit_header=rename), dict(edit_header=reshape),
             dict(edit_header=dtype), dict(edit_header=overlap), dict(edit_header=past_end),
             dict(data=b""), dict(edit_header=swish)]
    for case in cases:
        _corrupt(good, bad, **case)
        with pytest.raises(ValueError) as info:
            cc.load(bad)
        r = _run([examples["run_net"], bad])
        assert r.returncode == 1, (case, r.stdout)
        assert r.stderr.strip() == f"error: {info.value}", case
    # no graph nor architecture: the same fault, with a C++ hint instead of a Python one
    _corrupt(good, bad, edit_header=no_graph)
    r = _run([examples["run_net"], bad])
    assert r.returncode == 1
    assert f"cannot load {bad!r}: no convcore graph or architecture in the metadata" in r.stderr
    # the architecture is the module tree only Python rebuilds (to train): one
    # it cannot rebuild is refused by Python, while C++ runs the graph
    _corrupt(good, bad, edit_header=lambda h: h["__metadata__"].update(
        convcore_architecture=h["__metadata__"]["convcore_architecture"].replace(
            '"type": "relu"', '"type": "swish"', 1)))
    with pytest.raises(ValueError, match="unknown type 'swish'"):
        cc.load(bad)
    assert _run([examples["run_net"], bad]).returncode == 0


@pytest.mark.parametrize("name,kwargs,batch", [
    ("lenet5", {}, 3),
    ("alexnet", dict(num_classes=10, input_size=(3, 67, 67)), 2),
    ("zfnet", dict(num_classes=10, input_size=(3, 67, 67)), 2),
    ("vgg16", dict(num_classes=10, input_size=(3, 32, 32)), 2),
    ("resnet18", dict(num_classes=10, input_size=(3, 64, 64)), 2),
    ("resnet34", dict(num_classes=10, input_size=(3, 32, 32)), 2),
    # the later case studies (graphs): every join, SE, the new activations
    ("googlenet", dict(num_classes=10, input_size=(3, 32, 32)), 2),
    ("googlenet", dict(num_classes=10, input_size=(3, 32, 32), aux_logits=True), 2),
    # transform_input: a BatchNorm2d node with float64 statistics in a float32 file
    ("googlenet", dict(num_classes=10, input_size=(3, 32, 32), transform_input=True), 2),
    ("mobilenet_v1", dict(num_classes=10, input_size=(3, 32, 32)), 2),
    ("mobilenet_v2", dict(num_classes=10, input_size=(3, 64, 64)), 2),
    ("resnext50_32x4d", dict(num_classes=10, input_size=(3, 32, 32)), 2),
    ("wide_resnet50_2", dict(num_classes=10, input_size=(3, 32, 32)), 1),
    ("densenet121", dict(num_classes=10, input_size=(3, 32, 32)), 2),
    ("se_resnet50", dict(num_classes=10, input_size=(3, 32, 32)), 2),
    ("efficientnet_b0", dict(num_classes=10, input_size=(3, 64, 64)), 2),
])
def test_zoo_models_match_python(examples, tmp_path, name, kwargs, batch):
    rng = np.random.default_rng(1)
    cc.manual_seed(1)
    model = cc.models.get(name, **kwargs)
    _randomize_batch_norm(model, rng)
    x = rng.standard_normal((batch,) + tuple(model.input_shape)).astype(np.float32)
    got, expected, stdout = _run_net(examples, model, x, tmp_path, name)
    _assert_close(got, expected)
    assert f"output ({batch}, 10)" in stdout
    # Python's convcore.compile runs the same engine on the same graph: bit for bit
    np.testing.assert_array_equal(cc.compile(model.eval())(x), got)


@pytest.mark.slow
def test_ctest_passes(cmake_dir, tmp_path):
    """The C++ test suite (tests/cpp) built from the source tree and run by ctest."""
    build = tmp_path / "build"
    _check(_run(["cmake", "-S", ROOT, "-B", str(build), "-DCONVCORE_BUILD_TESTS=ON",
                 "-DCONVCORE_BUILD_PYTHON=OFF", "-DCMAKE_BUILD_TYPE=Release"]
                + _generator_args()), "cmake configure")
    _check(_run(["cmake", "--build", str(build), "--parallel", "2"]), "cmake build")
    r = _check(_run(["ctest", "--output-on-failure"], cwd=str(build)), "ctest")
    assert "100% tests passed" in r.stdout


def test_graph_joins_and_activations_match_python(examples, tmp_path):
    """A Graph with every join (concat, add, mul with broadcasting, relu),
    each new activation, stochastic depth, several outputs (C++ runs the
    first, as Python's eval mode), float32 and float64."""
    from collections import OrderedDict

    from convcore import nn

    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        cc.manual_seed(2)
        g = nn.Graph(OrderedDict(
            a=nn.Conv2d(3, 4, 3, padding=1), b=nn.Conv2d(3, 2, 1), act1=nn.SiLU(),
            act2=nn.Hardswish(), c=nn.Conv2d(6, 6, 1), pool=nn.AdaptiveAvgPool2d(1),
            gate=nn.Sigmoid(), clip=nn.ReLU6(), hs=nn.Hardsigmoid(),
            sd=nn.StochasticDepth(0.3), side=nn.Conv2d(6, 1, 1),
        ), ["ya = a(x)", "yb = b(x)", "za = act1(ya)", "zb = act2(yb)", "cat = concat(za, zb)",
            "z = c(cat)", "s = add(z, cat, cat)", "r0 = relu(s)", "r = add(r0, r0)", "p = pool(r)", "q = gate(p)",
            "m = mul(r, q)", "k = clip(m)", "h = hs(k)", "aux = side(h)", "out = sd(h)"],
            outputs=["out", "aux"], name="joins", input_shape=(3, 6, 5)).to(dtype)
        x = (rng.standard_normal((2, 3, 6, 5)) * 3).astype(dtype)
        got, expected, stdout = _run_net(examples, g, x, tmp_path, f"joins_{np.dtype(dtype)}")
        _assert_close(got, expected)
        assert "joins: input (2, 3, 6, 5) -> output (2, 6, 6, 5)" in stdout


def test_graph_bad_config_is_refused_as_in_python(examples, tmp_path):
    from collections import OrderedDict

    from convcore import nn

    good = str(tmp_path / "graph.safetensors")
    nn.Graph(OrderedDict(a=nn.ReLU6()), ["y = a(x)", "out = add(x, y)"]).save(good)
    tensors, meta = load_state_dict_file(good)
    for edit, words in [(lambda n: n + ["z = a(out)"], "module 'a' is called twice"),
                        (lambda n: ["y = b(x)"], "neither a child module"),
                        (lambda n: ["y = a(q)"], "which no earlier node defines"),
                        (lambda n: ["y == a(x)"], "bad graph node")]:
        arch = json.loads(meta["convcore_architecture"])
        arch["config"]["nodes"] = edit(arch["config"]["nodes"])
        bad = str(tmp_path / "bad_graph.safetensors")
        save_state_dict_file(tensors, bad, metadata={
            "format": "convcore", "convcore_architecture": json.dumps(arch)})
        with pytest.raises(ValueError, match=re.escape(words)):
            cc.load(bad)
        r = _run([examples["run_net"], bad])
        assert r.returncode == 1 and words in r.stderr, r.stderr


def test_onnx_model_converted_by_the_command_line_runs_in_run_net(examples, tmp_path):
    """An ONNX file (asymmetric 'SAME' padding, batch norm, a pooled
    classifier) through `python -m convcore convert` to a convcore file, run
    by the C++ runner: ONNX Runtime's output."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {"conv.weight": rng.normal(0, 0.3, (8, 3, 3, 3)), "conv.bias": rng.normal(0, 0.1, 8),
         "bn.weight": rng.uniform(0.5, 1.5, 8), "bn.bias": rng.normal(0, 0.2, 8),
         "bn.running_mean": rng.normal(0, 0.2, 8), "bn.running_var": rng.uniform(0.5, 1.5, 8),
         "fc.weight": rng.normal(0, 0.3, (4, 8)), "fc.bias": rng.normal(0, 0.1, 4)}
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], name="conv",
                         kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean",
                                                "bn.running_var"], ["b"], name="bn"),
        helper.make_node("Clip", ["b", "zero", "six"], ["r"], name="relu6"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k)
              for k, v in (("zero", 0.0), ("six", 6.0))]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                      ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    src, dst = str(tmp_path / "tiny.onnx"), str(tmp_path / "tiny.safetensors")
    onnx.save(model, src)
    _check(_run([sys.executable, "-m", "convcore", "convert", src, dst], env=convcore_env()),
           "convert")
    x = rng.standard_normal((3, 3, 10, 10)).astype(np.float32)
    save_state_dict_file({"input": x}, str(tmp_path / "in.safetensors"))
    out = str(tmp_path / "out.safetensors")
    _check(_run([examples["run_net"], dst, str(tmp_path / "in.safetensors"), out]), "run_net")
    got = load_state_dict_file(out)[0]["output"]
    expected = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    assert float(np.abs(got - expected).max()) <= 1e-5 * float(np.abs(expected).max())
