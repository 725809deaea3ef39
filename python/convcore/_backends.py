"""Which backend runs an op: the CPU one (convcore.functional over the C++
core) for host arrays, the GPU one (convcore.cuda.functional, CUDA kernels
through CuPy) for GPU arrays. The GPU module is imported here, on the first
call that holds a GPU array, so the dependency runs one way: functional and
nn ask this module, this module imports cuda, and cuda imports neither of
them. Importing convcore.cuda.functional imports no CuPy (its backend does,
on the first launch)."""
from __future__ import annotations

from typing import Callable


def gpu_functional(op: str, gpu_argument: Callable[[], str]):
    """convcore.cuda.functional, for a call of `op` with a GPU array. Where
    the GPU backend cannot run, RuntimeError naming op, the argument
    (gpu_argument() gives its name; called only for the error) and why."""
    from . import cuda
    if not cuda.is_available():
        cuda.require(f"{op}: {gpu_argument()}")
    from .cuda import functional
    return functional
