"""The backends a test can run convcore's ops on, as one fixture (conftest.py
imports it), after tinygrad's test_ops.py (one file, every device) and
ncnn's test_layer (each implementation of a layer on the same parameters):

- "cpu": numpy arrays, the C++ core (always);
- "shim": the GPU code path on the host: a stand-in cupy module
  (cuda_shim/fake_cupy.py) whose kernels run on the CUDA-execution shim
  (the .cu files compiled as C++; skipped where g++ is missing);
- "gpu": real CuPy on a GPU (marker `gpu`; skipped, with the reason, where
  there is none).

A test makes its host arrays in `device.dtype`, puts them on the backend
(`put`), calls the public convcore functions, which dispatch by array
type, and checks the results on the host (`check`, `host`). `device` runs a test on all three,
`gpu_device` on the two GPU paths."""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import pytest

from _helpers import assert_close

# (convcore.cuda and the shim are imported when a test asks for a GPU
# backend: conftest.py imports this module for every test)

# relative tolerances (assert_close's scaled error) per backend and dtype;
# the references compute in float64
RTOL = {("cpu", np.float32): 1e-4, ("cpu", np.float64): 1e-10,
        ("shim", np.float32): 1e-4, ("gpu", np.float32): 1e-4}

# The GPU backend's variants of an op: module settings of
# convcore.cuda.functional that pick another kernel for the same call.
# Each op test runs every variant (the CPU has one, its default).
_GPU_VARIANTS = {
    "conv2d": [dict(TILE="small"), dict(TILE="big")],
    "conv2d_backward": [dict(TILE=t, GRAD_INPUT_DIRECT_MAX_CG=cg)
                        for t in ("small", "big") for cg in (0, 8)],  # grad_input: GEMM, direct
    "linear": [dict(TILE="small"), dict(TILE="big")],
}


def shim_files():
    """Every kernel file of the package, plus the shim's self-test kernels:
    the files of the session's one shim library."""
    import convcore.cuda as cc_cuda
    from cuda_shim import shim
    return tuple(cc_cuda.SOURCES) + (os.path.join(shim.HERE, "selftest.cu"),)


def shim_backend(tmp_path_factory):
    """The session's ShimBackend (built once, shared with test_cuda_shim.py)."""
    from cuda_shim import shim
    return shim.session_backend(shim_files(), str(tmp_path_factory.getbasetemp() / "ccshim"))


class Backend:
    """Where a test's arrays live and how its results come back."""

    def __init__(self, name: str, xp, dtype=np.float32, shim_backend=None):
        self.name = name
        self.xp = xp
        self.dtype = dtype  # what a test computes in (the GPU backend: float32 only)
        self.shim = shim_backend  # the ShimBackend (launch counts) on "shim"
        self.is_gpu = name != "cpu"

    @property
    def real(self) -> bool:
        """A real GPU (not the shim)."""
        return self.name == "gpu"

    def __repr__(self):
        return f"<backend {self.name} {np.dtype(self.dtype).name}>"

    def put(self, a):
        """A host array (or None, or anything not an array) on this backend."""
        if not isinstance(a, np.ndarray) or not self.is_gpu:
            return a
        return self.xp.asarray(np.ascontiguousarray(a))

    def host(self, a):
        """A result of this backend as a numpy array."""
        if self.is_gpu and type(a).__module__.split(".")[0] == "cupy":
            return a.get()
        return np.asarray(a)

    def rtol(self, dtype) -> float:
        return RTOL[(self.name, np.dtype(dtype).type)]

    def check(self, actual, expected, rtol=None, what=""):
        """actual is a new C-contiguous array of this backend with expected's
        dtype and shape, within rtol (this backend's tolerance for the dtype
        when None) of expected, a host array."""
        expected = np.asarray(expected)
        kind = "cupy" if self.is_gpu else "numpy"
        assert type(actual).__module__.split(".")[0] == kind, (
            f"{what}: {type(actual).__name__} is not a {self.name} array")
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.flags.c_contiguous, f"{what}: not C-contiguous"
        rtol = self.rtol(expected.dtype) if rtol is None else rtol
        assert_close(self.host(actual), expected, rtol=rtol, what=f"{self.name} {what}")

    def variants(self, op: str):
        """Context managers, one for each implementation of `op` this backend
        has (its kernel choices); a test runs its checks inside each."""
        settings = _GPU_VARIANTS.get(op, [{}]) if self.is_gpu else [{}]
        return [_patched(s) for s in settings]

    def has(self, op: str) -> bool:
        """Whether this backend implements the public op `op`."""
        if not self.is_gpu:
            import convcore.functional as F
            return hasattr(F, op)
        import convcore.cuda.functional as G
        return hasattr(G, op)


@contextlib.contextmanager
def _patched(settings):
    import convcore.cuda.functional as G
    with pytest.MonkeyPatch.context() as mp:
        for key, value in settings.items():
            mp.setattr(G, key, value)
        yield settings


def _open(kind, request, monkeypatch, tmp_path_factory) -> Backend:
    import convcore.cuda as cc_cuda
    from cuda_shim import fake_cupy, shim
    if kind.startswith("cpu"):
        return Backend("cpu", np, np.dtype(kind.split("-")[1]).type)
    if kind == "gpu":
        ok, why = cc_cuda.availability()
        if not ok:
            pytest.skip(f"no GPU: {why}")
        import cupy
        return Backend("gpu", cupy)
    if shim.find_compiler() is None:
        pytest.skip("g++ not found: the CUDA-execution shim needs it")
    be = shim_backend(tmp_path_factory)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy.make_module())
    monkeypatch.setattr(cc_cuda, "_backend", None)
    monkeypatch.setattr(fake_cupy._Function, "backend", be)
    be.current_test = request.node.nodeid
    request.addfinalizer(lambda: setattr(be, "current_test", None))
    return Backend("shim", sys.modules["cupy"], shim_backend=be)


_GPU = pytest.param("gpu", marks=pytest.mark.gpu)


@pytest.fixture(params=["cpu-float32", "cpu-float64", "shim", _GPU])
def device(request, monkeypatch, tmp_path_factory) -> Backend:
    """Every backend, in each dtype it computes in: the CPU in float32 and
    float64, the shim and the GPU in float32 (`device.dtype`)."""
    return _open(request.param, request, monkeypatch, tmp_path_factory)


@pytest.fixture(params=["shim", _GPU])
def gpu_device(request, monkeypatch, tmp_path_factory) -> Backend:
    """The GPU code path: on the shim, and on a GPU."""
    return _open(request.param, request, monkeypatch, tmp_path_factory)
