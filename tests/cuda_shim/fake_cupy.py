"""A stand-in for the `cupy` module, for machines without a GPU: its arrays
are numpy arrays tagged as device arrays, and its RawModule runs kernels on
the CUDA-execution shim. Installed in sys.modules["cupy"] by the GPU tests'
"shim" device, it lets the whole GPU path (dispatch, CupyBackend's compile
cache and launches, Module.to("cuda"), the optimisers and the loss on device
arrays) run on the CPU. Like cupy, it refuses to mix host numpy arrays into
arithmetic on device arrays."""
from __future__ import annotations

import types

import numpy as np


class ndarray(np.ndarray):
    """A 'device' array: numpy memory, module name 'cupy'."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out", ())
        for a in inputs + tuple(out):
            if isinstance(a, np.ndarray) and not isinstance(a, ndarray) and a.ndim > 0:
                raise TypeError("fake cupy: a numpy (host) array in an operation on device arrays")
        inputs = tuple(a.view(np.ndarray) if isinstance(a, ndarray) else a for a in inputs)
        if out:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, ndarray) else o for o in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def get(self):
        return np.array(self.view(np.ndarray))

    @property
    def device(self):
        return _Device()


ndarray.__module__ = "cupy"


def _wrap(a):
    if isinstance(a, np.ndarray):
        return a.view(ndarray)
    if isinstance(a, tuple):
        return tuple(_wrap(v) for v in a)
    return a


class _Device:
    id = 0
    attributes = {"MultiProcessorCount": 132}

    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


class _Event:
    """Timing on the shim means nothing: every interval is 1 ms."""

    def record(self):
        pass

    def synchronize(self):
        pass


class RawModule:
    """Records compiles; get_function returns a shim launcher."""
    compiles = []

    def __init__(self, code, options=()):
        self.code = code
        self.options = options
        self._compiled = False

    def get_function(self, name):
        if not self._compiled:
            RawModule.compiles.append(self.code)
            self._compiled = True
        assert f" {name}(" in self.code or f"\n{name}(" in self.code, name
        return _Function(name)


class _Function:
    backend = None  # the ShimBackend, set by the test fixture

    def __init__(self, name):
        self.name = name

    def __call__(self, grid, block, args, shared_mem=0):
        host = []
        for a in args:
            if isinstance(a, ndarray):
                host.append(a.view(np.ndarray))
            elif isinstance(a, np.ndarray):
                raise TypeError(f"fake cupy: kernel {self.name} got a host numpy array")
            elif type(a) is np.uint64 and a == 0:
                host.append(None)  # the null pointer the backend passes for None
            else:
                host.append(a)
        _Function.backend.launch("?", self.name, grid, block, tuple(host), shared_mem)


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and dtype is None:
        return a
    return np.array(a.view(np.ndarray) if isinstance(a, ndarray) else a, dtype=dtype).view(ndarray)


def ascontiguousarray(a, dtype=None):
    base = a.view(np.ndarray) if isinstance(a, ndarray) else a
    return np.ascontiguousarray(base, dtype=dtype).view(ndarray)


def empty(shape, dtype=np.float32):
    # through the shim's allocator when a test installed it: guard bytes
    # around the array, which the shim checks after every launch
    be = _Function.backend
    raw = be.xp.empty(shape, dtype) if be is not None else np.empty(shape, dtype)
    return raw.view(ndarray)


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype).view(ndarray)


def empty_like(a):
    return np.empty_like(a.view(np.ndarray)).view(ndarray)


def zeros_like(a):
    return np.zeros_like(a.view(np.ndarray)).view(ndarray)


def array(a, dtype=None, order="C", copy=True):
    return asarray(np.array(a.view(np.ndarray) if isinstance(a, ndarray) else a,
                            dtype=dtype, order=order, copy=copy))


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def from_dlpack(obj):
    raise TypeError("fake cupy: no DLPack")


def make_module():
    mod = types.ModuleType("cupy")
    for name in ("ndarray", "RawModule", "asarray", "ascontiguousarray", "empty", "zeros",
                 "empty_like", "zeros_like", "array", "asnumpy", "from_dlpack"):
        setattr(mod, name, globals()[name])
    mod.cuda = types.SimpleNamespace(
        is_available=lambda: True, Device=_Device, Event=_Event,
        get_elapsed_time=lambda start, stop: 1.0,
        runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"CUDA shim"}))
    mod.__fake__ = True
    return mod
