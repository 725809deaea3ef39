"""Without a usable GPU (CuPy missing, or no device), GPU arrays get a clear
error naming the argument, never a crash, and the CPU package never imports
CuPy."""
import subprocess
import sys
import types

import numpy as np
import pytest

import convcore as cc
import convcore.cuda as cc_cuda


class FakeDeviceArray:
    """Anything exposing __cuda_array_interface__ (as a torch CUDA tensor)."""
    __cuda_array_interface__ = {"shape": (1, 3, 4, 4), "typestr": "<f4", "data": (0, False),
                                "version": 3}


@pytest.fixture(params=["no-cupy", "no-device"])
def no_gpu(request, monkeypatch):
    if request.param == "no-cupy":
        monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    else:
        fake = types.ModuleType("cupy")
        fake.cuda = types.SimpleNamespace(is_available=lambda: False)
        monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cc_cuda, "_backend", None)
    return request.param


def test_availability_says_why(no_gpu):
    ok, why = cc_cuda.availability()
    assert not ok
    assert ("not importable" in why) if no_gpu == "no-cupy" else ("no CUDA GPU" in why)
    assert not cc_cuda.is_available()


@pytest.mark.parametrize("call,arg", [
    (lambda g: cc.conv2d(g, np.ones((2, 3, 3, 3), np.float32)), "input"),
    (lambda g: cc.conv2d(np.ones((1, 3, 4, 4), np.float32), g), "weight"),
    (lambda g: cc.linear(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), bias=g), "bias"),
    (lambda g: cc.max_pool2d(g, 2), "input"),
    (lambda g: cc.relu_backward(g, g), "grad_output"),
    (lambda g: cc.batch_norm(g, training=True), "input"),
])
def test_gpu_array_without_gpu_is_a_clear_error(no_gpu, call, arg):
    with pytest.raises(RuntimeError, match=f"{arg} is a GPU array but convcore's GPU backend "
                                           f"cannot run"):
        call(FakeDeviceArray())


def test_module_to_cuda_without_gpu(no_gpu):
    net = cc.nn.Sequential(cc.nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match=r"to\('cuda'\): convcore's GPU backend cannot run"):
        net.to("cuda")
    assert isinstance(net[0].weight.data, np.ndarray)  # nothing moved
    assert net.to("cpu") is net


def test_cpu_package_never_imports_cupy():
    code = ("import sys, numpy as np, convcore as cc\n"
            "x = np.ones((1, 3, 6, 6), np.float32)\n"
            "cc.relu(cc.max_pool2d(cc.conv2d(x, np.ones((2, 3, 3, 3), np.float32)), 2))\n"
            "import convcore.cuda.functional\n"
            "assert 'cupy' not in sys.modules, 'cupy was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_benchmark_stops_with_a_clear_message_without_gpu():
    if cc_cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    res = subprocess.run([sys.executable, "-m", "convcore", "bench", "--gpu", "--quick"],
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "bench --gpu needs a CUDA GPU" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
