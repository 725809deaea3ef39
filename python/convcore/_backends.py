"""The backends that run convcore's ops, and which one an array belongs to:
the CPU one (convcore.functional over the C++ core) for host arrays, the
GPU one (convcore.cuda.functional, CUDA kernels through CuPy) for GPU
arrays. Callers above functional (the layers, the loss, the optimisers,
training) ask `backend_of(*arrays)` for the backend and use what it offers
(its array module, its ops, host copies, dropout masks) instead of checking
array types themselves.

The dependency runs one way: functional and nn ask this module, this module
imports cuda, and cuda imports neither of them. The GPU modules are imported
on the first call that needs them, which holds a GPU array, so importing
convcore imports neither CuPy nor convcore.cuda.functional. convcore.functional
sits above this module, so it hands itself over as the CPU backend's ops
when it is imported (`provide_cpu_functional`)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ._arrays import host_array, is_gpu_array

_cpu_functional = None  # convcore.functional, once it is imported


def provide_cpu_functional(module) -> None:
    """Called by convcore.functional on import: the CPU backend's ops."""
    global _cpu_functional
    _cpu_functional = module


def gpu_functional(op: str, gpu_argument: Callable[[], str]):
    """convcore.cuda.functional, for a call of `op` with a GPU array. Where
    the GPU backend cannot run, RuntimeError naming op, the argument
    (gpu_argument() gives its name; called only for the error) and why."""
    from . import cuda
    if not cuda.is_available():
        cuda.require(f"{op}: {gpu_argument()}")
    from .cuda import functional
    return functional


class CpuBackend:
    """Host arrays: numpy, and the ops of convcore.functional."""

    name = "cpu"
    is_gpu = False
    xp = np

    @property
    def functional(self):
        """convcore.functional."""
        if _cpu_functional is None:  # importing any part of convcore imports it first
            raise RuntimeError("convcore.functional is not imported")
        return _cpu_functional

    def asarray(self, value, name: str):
        """value checked as a numpy array (TypeError naming `name` otherwise)."""
        return host_array(value, name)

    def to_host(self, array):
        """The array itself: it is on the host."""
        return array

    def from_host(self, array: np.ndarray):
        """A host array as this backend's: the array itself."""
        return array

    def updatable(self, data):
        """data, or a native C-contiguous copy of an odd array (read-only, strided,
        byte-swapped): the optimisers' steps update in place, and the caller
        writes a copy back."""
        if data.flags.c_contiguous and data.flags.writeable and data.dtype.isnative:
            return data
        return np.array(data, dtype=data.dtype.newbyteorder("="))

    def dropout_mask(self, shape, dtype, p: float, generator: np.random.Generator,
                     device_random=None):
        """(mask, device_random): each element 1 / (1 - p) with probability
        1 - p, else 0, drawn from convcore's generator. device_random (the
        GPU backend's generator of a layer) is handed back untouched."""
        keep = generator.random(shape) >= p
        return keep.astype(dtype) / dtype.type(1.0 - p), device_random

    def cross_entropy(self, input, target, weight, *, ignore_index: int, reduction: str,
                      label_smoothing: float):
        """(loss, saved): the loss as CrossEntropyLoss returns it (a float, or
        each position's loss for 'none') and what cross_entropy_grad needs."""
        options = dict(ignore_index=ignore_index, reduction=reduction,
                       label_smoothing=label_smoothing)
        loss = self.functional.cross_entropy(input, target, weight, **options)
        return (loss if reduction == "none" else float(loss)), (input, target, weight, options)

    def cross_entropy_grad(self, saved, grad_output):
        """The gradient of the loss with respect to the logits, times
        grad_output (default 1; required, of the loss's shape, for 'none')."""
        input, target, weight, options = saved
        if grad_output is None and options["reduction"] != "none":
            grad_output = 1.0
        return self.functional.cross_entropy_backward(grad_output, input, target, weight,
                                                      **options)


class GpuBackend:
    """GPU arrays (CuPy's, or any other exposing __cuda_array_interface__,
    such as a torch CUDA tensor): CuPy, and the ops of
    convcore.cuda.functional. Nothing is imported before a method needs it;
    where the GPU backend cannot run, that method raises RuntimeError."""

    name = "cuda"
    is_gpu = True

    @staticmethod
    def _device():
        from . import cuda
        return cuda.backend()  # the process-wide CupyBackend: raises where it cannot run

    @property
    def xp(self):
        """The cupy module."""
        return self._device().xp

    @property
    def functional(self):
        """convcore.cuda.functional."""
        return gpu_functional("convcore.cuda.functional", lambda: "an argument")

    def asarray(self, value, name: str):
        """A cupy view of a GPU array, zero-copy (TypeError naming `name` for a
        host array)."""
        return self._device().asarray(value, name)

    def to_host(self, array):
        """A numpy copy of the array (a device-to-host copy, so a sync)."""
        return self.asarray(array, "array").get()

    def from_host(self, array: np.ndarray):
        """A device copy of a host array."""
        return self.xp.asarray(array)

    def updatable(self, data):
        """data: the GPU steps update any cupy array in place."""
        return data

    def dropout_mask(self, shape, dtype, p: float, generator: np.random.Generator,
                     device_random=None):
        """(mask, device_random): as the CPU's, but drawn on the GPU by
        device_random, a CuPy generator seeded from convcore's on the layer's
        first mask (so manual_seed repeats a run; a mask drawn on the host would
        be copied over, a host sync in every training step). Where CuPy has no
        generators, the mask is drawn on the host and copied."""
        cupy = self.xp
        if device_random is None and hasattr(getattr(cupy, "random", None), "RandomState"):
            device_random = cupy.random.RandomState(int(generator.integers(0, 2**63 - 1)))
        if device_random is None:
            mask, _ = CPU.dropout_mask(shape, dtype, p, generator)
            return cupy.asarray(mask), None
        keep = device_random.random_sample(shape, dtype=dtype) >= p
        return keep.astype(dtype) / dtype.type(1.0 - p), device_random

    def cross_entropy(self, input, target, weight, *, ignore_index: int, reduction: str,
                      label_smoothing: float):
        """(loss, saved): the loss as a 0-d device array (a training step needs
        no sync; float() it to print) and its gradient, which loss.cu computes
        with it."""
        ops = gpu_functional("CrossEntropyLoss", lambda: "input")
        return ops.cross_entropy(input, target, label_smoothing, reduction, weight=weight,
                                 ignore_index=ignore_index)

    def cross_entropy_grad(self, saved, grad_output):
        """The gradient computed with the loss, times grad_output (default 1)."""
        return saved if grad_output is None else saved * grad_output


CPU = CpuBackend()
GPU = GpuBackend()


def backend_of(*arrays):
    """The backend of these arrays: GPU when any of them is a GPU array, else
    CPU. Imports nothing."""
    for a in arrays:
        if type(a) is not np.ndarray and is_gpu_array(a):
            return GPU
    return CPU


def to_host(array):
    """The array on the host: a numpy copy of a GPU array, anything else as it is."""
    return backend_of(array).to_host(array)
