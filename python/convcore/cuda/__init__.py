"""convcore's GPU backend: CUDA C kernels (the .cu files next to this one),
compiled by NVRTC and launched through CuPy's RawModule.

CuPy is imported lazily, only when a GPU array reaches convcore, so the CPU
package never needs it. Install with `pip install ".[cuda]"`.

Pieces:
- `source(name)`: a .cu file's text with common.cuh inlined (NVRTC has no
  include path of ours to search, and no system headers at all).
- `CupyBackend`: compiles each .cu file once per device (the RawModule cache)
  and launches kernels; `compile_seconds` records each first compile.
- `convcore.cuda.functional`: the ops, written against a backend, so the
  same launch code also runs on the CPU-execution shim in tests/cuda_shim.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Tuple

import numpy as np

from .._arrays import is_gpu_array  # noqa: F401  (the backend's public name for it)

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
# One file per op family; each is one RawModule.
SOURCES = ("conv.cu", "pool.cu", "linear.cu", "elementwise.cu", "norm.cu", "loss.cu",
           "optim.cu")
_INCLUDE = '#include "common.cuh"'


def source(name: str) -> str:
    """The text of kernel file `name`, with its `#include "common.cuh"` line
    replaced by that header's text (the only include the kernels may use)."""
    if name not in SOURCES:
        raise ValueError(f"name must be one of {SOURCES}, got {name!r}")
    with open(os.path.join(KERNEL_DIR, name)) as f:
        text = f.read()
    with open(os.path.join(KERNEL_DIR, "common.cuh")) as f:
        common = f.read().replace("#pragma once", "")
    return text.replace(_INCLUDE, common, 1)


def availability() -> Tuple[bool, str]:
    """(True, "") when CuPy imports and sees a CUDA device, else (False, why)."""
    try:
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        return False, (f"CuPy is not importable ({type(e).__name__}: {e}); install "
                       f"convcore's GPU extra: pip install \".[cuda]\"")
    try:
        if not cupy.cuda.is_available():
            return False, "CuPy is installed but no CUDA GPU is available"
    except Exception as e:
        return False, f"CuPy is installed but CUDA is not usable ({type(e).__name__}: {e})"
    return True, ""


def is_available() -> bool:
    return availability()[0]


def require(what: str = "input") -> None:
    """Raises RuntimeError naming `what` when there is no usable GPU."""
    ok, why = availability()
    if not ok:
        raise RuntimeError(f"{what} is a GPU array but convcore's GPU backend cannot run: {why}")


class CupyBackend:
    """Launches the kernels with CuPy. Modules compile once per device (NVRTC
    through RawModule) and are cached; CuPy also keeps compiled cubins on
    disk (~/.cupy/kernel_cache), so a new process skips most of the compile."""

    options = ("--std=c++17",)

    def __init__(self):
        import cupy
        self.xp = cupy
        self._modules: Dict[Tuple[int, str], object] = {}
        self._functions: Dict[Tuple[int, str, str], object] = {}
        # (device id, file) -> seconds the first get_function took (compile + load)
        self.compile_seconds: Dict[Tuple[int, str], float] = {}
        self._sms: Dict[int, int] = {}

    def function(self, file: str, kernel: str):
        dev = self.xp.cuda.Device().id
        key = (dev, file, kernel)
        fn = self._functions.get(key)
        if fn is None:
            mod = self._modules.get((dev, file))
            first = mod is None
            start = time.perf_counter()
            if first:
                mod = self.xp.RawModule(code=source(file), options=self.options)
                self._modules[(dev, file)] = mod
            fn = mod.get_function(kernel)  # compiles the module on first use
            if first:
                self.compile_seconds[(dev, file)] = time.perf_counter() - start
            self._functions[key] = fn
        return fn

    def multiprocessors(self) -> int:
        """SM count of the current device (queried once per device)."""
        dev = self.xp.cuda.Device()
        count = self._sms.get(dev.id)
        if count is None:
            count = self._sms[dev.id] = int(dev.attributes["MultiProcessorCount"])
        return count

    def launch(self, file: str, kernel: str, grid, block, args, shared_mem: int = 0) -> None:
        if min(grid) == 0:  # an empty array: nothing to compute (CUDA rejects 0 blocks)
            return
        # None is a null pointer: a 64-bit zero in the pointer's slot.
        args = tuple(np.uint64(0) if a is None else a for a in args)
        self.function(file, kernel)(tuple(grid), tuple(block), args, shared_mem=shared_mem)

    def asarray(self, value, name: str):
        """A cupy view of a GPU array, zero-copy: cupy arrays as they are,
        others through DLPack or __cuda_array_interface__."""
        cp = self.xp
        if isinstance(value, cp.ndarray):
            return value
        if isinstance(value, (np.ndarray, np.generic)):
            raise TypeError(f"{name} is a numpy array (host memory) but the other arrays of "
                            f"this call are on the GPU: move it with cupy.asarray({name})")
        if hasattr(value, "__dlpack__"):
            try:
                return cp.from_dlpack(value)
            except Exception:
                pass  # fall back to the array interface
        if hasattr(value, "__cuda_array_interface__"):
            return cp.asarray(value)
        raise TypeError(f"{name} must be a GPU array (cupy, or one with __dlpack__ / "
                        f"__cuda_array_interface__), got {type(value).__name__}")


_backend: Optional[object] = None


def backend():
    """The process-wide CuPy backend (created on first GPU call)."""
    global _backend
    if _backend is None:
        require()
        _backend = CupyBackend()
    return _backend


def compile_seconds() -> Dict[Tuple[int, str], float]:
    """First-call compile (+ load) time of each kernel file, per device."""
    return dict(backend().compile_seconds) if _backend is not None else {}


def to_dlpack(array):
    """A DLPack capsule of a convcore GPU result (a cupy array), for
    torch.from_dlpack and friends. Zero-copy."""
    # __dlpack__ first: CuPy deprecates toDlpack (older CuPy has only that)
    return array.__dlpack__() if hasattr(array, "__dlpack__") else array.toDlpack()
