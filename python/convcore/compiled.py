"""Compiled inference: a model run by the C++ engine that convcore::Net
runs in native apps (csrc/runtime/engine.h), not layer by layer in Python.

    compiled = convcore.compile(model)        # once
    logits = compiled(x)                      # numpy in, numpy out, any batch size
    print(compiled.summary())                 # the plan: folded, fused, layouts, arena

Compiling lowers the module tree to its network graph (the one a saved file
holds, docs/format.md) and copies the weights: batch norms are folded into
the convolutions before them, activations and residual adds are fused into
the steps that compute their inputs, channels stay in blocks of the vector
width between the layers that have blocked kernels, weights are packed once,
and each input shape gets one memory arena, planned by liveness, that later
calls reuse. The result is the eager model's in evaluation mode (Dropout off,
BatchNorm with its running statistics), to float32 rounding; the compiled
model does not follow later changes to the eager one (compile again).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import List, Optional

import numpy as np

from . import _core
from ._backends import backend_of
from .nn.lowering import to_graph

__all__ = ["compile", "CompiledModel"]


class CompiledModel:
    """A model compiled for inference (see the module docstring). Calls take a
    numpy batch (N, ...) of the model's dtype; when the model declares an input
    shape (the zoo and the builder do), the sample shape must be it."""

    def __init__(self, net: "_core.CompiledNet", input_shape: Optional[tuple]):
        self._net = net
        self.input_shape = input_shape
        self.dtype = np.dtype(net.dtype)
        self.name = net.name
        self._last_sample = None  # the sample shape of the last call

    def _check(self, x) -> np.ndarray:
        if backend_of(x).is_gpu:
            raise TypeError("input: a compiled model runs on the CPU; pass a numpy array "
                            "(x.get()), or run the eager model on the GPU")
        if not isinstance(x, np.ndarray):
            raise TypeError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"input has dtype {x.dtype} but the compiled model is {self.dtype} "
                            f"(convert the input, or compile a model.to(np.{x.dtype}))")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            expected = ", ".join(str(d) for d in self.input_shape)
            raise ValueError(f"input must be a batch of shape (N, {expected}), got "
                             f"{tuple(x.shape)}")
        if x.ndim < 2:
            raise ValueError(f"input must be a batch (N, ...), got shape {tuple(x.shape)}")
        self._last_sample = tuple(x.shape[1:])
        return x

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The model's output for the batch x (evaluation mode)."""
        return self._net.forward(self._check(x))

    forward = __call__

    @property
    def threads(self) -> int:
        """Threads of this model's kernels (0, the default, follows
        convcore.set_num_threads). Results do not depend on it, except in
        steps that run the core's own ops (float64 models, padding modes
        other than zeros): with several threads each runs a share of the
        batch, and an op's algorithm may depend on the batch it sees."""
        return self._net.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self._net.threads = int(n)

    def _sample(self, input_shape) -> List[int]:
        shape = input_shape if input_shape is not None else self.input_shape or self._last_sample
        if shape is None:
            raise ValueError("this model declares no input shape and has not been called yet; "
                             "pass input_shape=(C, H, W)")
        return [int(d) for d in shape]

    def plan(self, batch: int = 1, input_shape=None) -> str:
        """The plan for a batch of that size: each step (what it folds and
        fuses, its kernel and layout, its output) and the arena's bytes. The
        sample shape is input_shape, else the model's, else the last call's."""
        return self._net.plan(int(batch), self._sample(input_shape))

    def summary(self, batch: int = 1, input_shape=None, print_fn=print) -> str:
        """Prints (and returns) the plan for a batch of that size."""
        text = self.plan(batch, input_shape)
        if print_fn:
            print_fn(text.rstrip("\n"))
        return text

    def arena_bytes(self, batch: int = 1, input_shape=None) -> int:
        """Bytes of the memory arena that one call with a batch of that size
        uses (activations and scratch; the weights are apart)."""
        return self._net.arena_bytes(int(batch), self._sample(input_shape))

    def profile(self, x: np.ndarray, runs: int = 10) -> List[dict]:
        """Times every step over `runs` calls on x (after one that warms up):
        a dict per step with its label, kind, layout, output shape and
        seconds per call."""
        if int(runs) < 1:
            raise ValueError(f"runs must be a positive int, got {runs!r}")
        rows = self._net.profile(self._check(x), int(runs))
        return [dict(step=label, kind=kind, layout=layout, shape=tuple(shape),
                     seconds=seconds / int(runs))
                for label, kind, layout, shape, seconds in rows]

    def __repr__(self) -> str:
        return f"CompiledModel({self.name!r}, dtype={self.dtype}, input_shape={self.input_shape})"


def compile(model, threads: Optional[int] = None) -> CompiledModel:  # noqa: A001 (torch.compile's name)
    """Compiles a model for inference (see the module docstring): a module,
    or the path of a file saved by `save` (read by the C++ reader straight
    into the engine, with no eager model in between: what a deployment
    needs). `threads` fixes this model's thread count (default:
    convcore.set_num_threads's)."""
    from .nn.module import Module

    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        with open(path, "rb"):  # a missing file is an OSError, as for convcore.load
            pass
        net = _core.CompiledNet(path, threads=threads or 0)
        shape = tuple(net.input_shape)
        return CompiledModel(net, shape or None)
    if not isinstance(model, Module):
        raise TypeError(f"model must be a convcore.nn.Module or the path of a saved model, got "
                        f"{type(model).__name__}")
    if model.training:
        warnings.warn("convcore.compile runs the model in evaluation mode (BatchNorm with its "
                      "running statistics, Dropout off); it was in training mode. Call "
                      "model.eval() first to silence this.", UserWarning, stacklevel=2)
    graph = to_graph(model)
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    net = _core.CompiledNet(json.dumps(graph, allow_nan=False), state, threads=threads or 0)
    shape = graph.get("input_shape")
    return CompiledModel(net, tuple(shape) if shape else None)
