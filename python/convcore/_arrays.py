"""Where an array lives, told without importing CuPy: the one place the
package checks for GPU arrays. convcore's GPU arrays are CuPy's (what
Module.to("cuda") makes and the GPU ops return); the functional ops also
take any other array on a GPU (a torch CUDA tensor, anything with
__cuda_array_interface__). CuPy itself is imported only where such an
array already exists."""
from __future__ import annotations

import numpy as np


def is_cupy(value) -> bool:
    """A CuPy array (or scalar): what the layers and optimisers run on after
    Module.to("cuda")."""
    return type(value).__module__.split(".")[0] == "cupy"


def is_gpu_array(value) -> bool:
    """A cupy array, a torch CUDA tensor, or anything else exposing
    __cuda_array_interface__."""
    if value is None:
        return False
    if is_cupy(value):
        return True
    if isinstance(value, (np.ndarray, np.generic)):
        return False
    try:
        return hasattr(value, "__cuda_array_interface__")
    except Exception:  # a property that raises something other than AttributeError
        return False


def array_module(value):
    """The array module of `value`: cupy for a CuPy array, else numpy."""
    if is_cupy(value):
        import cupy
        return cupy
    return np


def host_array(value, name: str) -> np.ndarray:
    """value checked as a numpy array argument named `name` (a numpy scalar
    as a 0-d array); TypeError otherwise, which says how to copy a GPU
    (cupy, torch) array to the host."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, np.generic):  # a numpy scalar: a 0-d array
        return np.asarray(value)
    if value is None:
        raise TypeError(f"{name} must be a numpy.ndarray, got None")
    module = type(value).__module__.split(".")[0]
    if module in ("cupy", "torch"):
        raise TypeError(f"{name} is a {module} array; convcore's CPU functions take "
                        f"numpy.ndarray (use .get() / .numpy() to copy it to the host)")
    raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")


def to_host(value):
    """A numpy copy of a CuPy array; anything else as it is."""
    return value.get() if is_cupy(value) else value
