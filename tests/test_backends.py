"""The backend layer (convcore._backends): backend_of picks the CPU or the GPU
backend by where the arrays live; the CPU backend's methods; and the layers,
the loss, the optimisers and training ask it rather than checking array
types themselves. (The GPU backend's methods run on the stand-in cupy in
test_cuda_gpu.py.)"""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest

import convcore as cc
from convcore import _backends
from convcore._backends import CPU, GPU, backend_of

from cuda_shim import fake_cupy

PACKAGE = os.path.dirname(os.path.abspath(cc.__file__))


class FakeDeviceArray:
    """Anything exposing __cuda_array_interface__ (as a torch CUDA tensor)."""
    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False),
                                "version": 3}


def device_array():
    """An array whose type says cupy (the stand-in's), without installing the
    stand-in module: backend_of looks at the type only."""
    return np.ones(3, np.float32).view(fake_cupy.ndarray)


# ------------------------------------------------------------------ backend_of

@pytest.mark.parametrize("arrays", [
    (), (np.ones(3),), (np.float32(1.0),), (None,), ([1.0, 2.0],), (3,),
    (np.ones(3), None, np.zeros(2)),
], ids=["nothing", "numpy", "numpy-scalar", "None", "list", "int", "several-host"])
def test_host_arrays_get_the_cpu_backend(arrays):
    assert backend_of(*arrays) is CPU
    assert not CPU.is_gpu and CPU.xp is np


@pytest.mark.parametrize("make", [device_array, FakeDeviceArray], ids=["cupy", "cuda-interface"])
def test_gpu_arrays_get_the_gpu_backend(make):
    assert backend_of(make()) is GPU and GPU.is_gpu
    # one GPU array among host ones is enough: the ops run on the GPU
    assert backend_of(np.ones(3), None, make()) is GPU


def test_the_cpu_backend_runs_convcore_functional():
    assert CPU.functional is cc.functional


def test_importing_convcore_or_picking_a_backend_imports_no_gpu_module():
    code = ("import sys, numpy as np, convcore\n"
            "from convcore._backends import backend_of, GPU\n"
            "class A:\n"
            "    __cuda_array_interface__ = {}\n"
            "assert backend_of(np.ones(2), A()) is GPU\n"
            "for name in ('cupy', 'convcore.cuda.functional'):\n"
            "    assert name not in sys.modules, name + ' was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------ the CPU backend

def test_cpu_asarray_checks_numpy_and_names_the_argument():
    x = np.ones(3)
    assert CPU.asarray(x, "input") is x
    assert CPU.asarray(np.float32(2), "input").shape == ()
    with pytest.raises(TypeError, match="input must be a numpy.ndarray, got list"):
        CPU.asarray([1.0], "input")
    class CupyArray:  # not a numpy subclass, as real cupy arrays are not
        __module__ = "cupy"
    with pytest.raises(TypeError, match=r"grad_output is a cupy array; .*\.get\(\)"):
        CPU.asarray(CupyArray(), "grad_output")


def test_cpu_host_copies_are_the_arrays_themselves():
    x = np.ones(3)
    assert CPU.to_host(x) is x and CPU.from_host(x) is x
    assert _backends.to_host(x) is x


def test_cpu_updatable_copies_only_odd_arrays():
    x = np.ones((3, 4), np.float32)
    assert CPU.updatable(x) is x
    readonly = x.copy()
    readonly.flags.writeable = False
    for odd in (x[:, ::2], x.astype(">f4"), readonly):
        copy = CPU.updatable(odd)
        assert copy is not odd and copy.flags.c_contiguous and copy.flags.writeable
        assert copy.dtype.isnative
        np.testing.assert_array_equal(copy, odd)


def test_cpu_dropout_mask():
    kept = object()  # a layer's GPU generator: handed back untouched
    mask, back = CPU.dropout_mask((50, 40), np.dtype(np.float32), 0.25,
                                  np.random.default_rng(0), kept)
    assert back is kept and mask.dtype == np.float32 and mask.shape == (50, 40)
    assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.75)}
    again, _ = CPU.dropout_mask((50, 40), np.dtype(np.float32), 0.25, np.random.default_rng(0))
    np.testing.assert_array_equal(mask, again)  # convcore's generator decides it


def test_cpu_cross_entropy_is_the_functional_one():
    rng = np.random.default_rng(1)
    z, t = rng.standard_normal((4, 5)).astype(np.float32), np.array([1, 0, 4, 2])
    options = dict(ignore_index=2, reduction="sum", label_smoothing=0.1)
    loss, saved = CPU.cross_entropy(z, t, None, **options)
    assert isinstance(loss, float)
    assert loss == float(cc.functional.cross_entropy(z, t, **options))
    np.testing.assert_array_equal(CPU.cross_entropy_grad(saved, None),
                                  cc.functional.cross_entropy_backward(1.0, z, t, **options))
    none, saved = CPU.cross_entropy(z, t, None, ignore_index=-100, reduction="none",
                                    label_smoothing=0.0)
    assert none.shape == (4,)
    with pytest.raises((TypeError, ValueError)):
        CPU.cross_entropy_grad(saved, None)  # 'none' needs a grad_output


# ------------------------------------------- no GPU checks above the backend layer

# What checking an array's type for the GPU looks like: the helpers of
# convcore._arrays, the type's module, or CuPy itself.
_GPU_CHECKS = {"is_cupy", "is_gpu_array", "array_module", "__module__", "cupy"}


def gpu_checks(source: str):
    """(line, what) for each GPU type check in Python source: a use of one of
    _GPU_CHECKS as a name or attribute, or an import of cupy or of
    convcore._arrays's checks."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and node.id in _GPU_CHECKS:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute) and node.attr in _GPU_CHECKS:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names
                      if a.name.split(".")[0] == "cupy"]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] == "cupy":
                found.append((node.lineno, node.module))
            found += [(node.lineno, a.name) for a in node.names if a.name in _GPU_CHECKS]
    return sorted(found)


def test_the_check_finder_finds_checks():
    source = ("import cupy\n"
              "from cupy.cuda import nccl\n"
              "from .._arrays import is_cupy, array_module\n"
              "if type(x).__module__ == 'cupy':\n"
              "    pass\n"
              "y = _arrays.is_gpu_array(x)\n"
              "xp = array_module(x)\n")
    found = gpu_checks(source)
    assert [line for line, _ in found] == [1, 2, 3, 3, 4, 6, 7]
    assert gpu_checks("backend = backend_of(x)\nxp = backend.xp  # numpy or cupy\n") == []


def _modules_above_the_backend_layer():
    names = [os.path.join("nn", f) for f in sorted(os.listdir(os.path.join(PACKAGE, "nn")))
             if f.endswith(".py")]
    return names + ["optim.py", "compiled.py", "train.py"]


@pytest.mark.parametrize("path", _modules_above_the_backend_layer())
def test_modules_above_the_backend_layer_ask_the_backend(path):
    with open(os.path.join(PACKAGE, path)) as f:
        found = gpu_checks(f.read())
    assert found == [], f"{path} checks array types itself (ask convcore._backends.backend_of)"
