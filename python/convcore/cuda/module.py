"""Module.to("cuda") / Module.to("cpu"): moves a network's parameters,
gradients and floating-point buffers between numpy and cupy arrays, then
runs the device's pass over the network: on the GPU every Sequential runs
its chain with convcore.cuda.fusion's runner (Conv2d / Linear + ReLU in one
kernel); on the CPU each module in turn again.

On the GPU every layer's forward and backward calls the functional API with
cupy arrays, which dispatches to the CUDA kernels; optimisers update cupy
parameters with the kernels of optim.cu (convcore.optim). The GPU kernels
are float32: a float64 network is refused with a clear error.

nn does not import this module: it registers `move` as what Module.to does
with a device (convcore/__init__.py imports it)."""
from __future__ import annotations

import numpy as np

from .._arrays import to_host
from ..nn.module import Sequential, provide
from . import availability
from .fusion import sequential_forward


def move(module, device: str):
    if device in ("cuda", "gpu"):
        ok, why = availability()
        if not ok:
            raise RuntimeError(f"to({device!r}): convcore's GPU backend cannot run: {why}")
        import cupy
        for p in module.parameters():
            if p.data.dtype != np.float32:
                raise TypeError(f"to('cuda') needs a float32 model (the GPU kernels are "
                                f"float32), got a {p.data.dtype} parameter: call "
                                f".to(np.float32) first")
        convert, runner = cupy.asarray, sequential_forward
    else:
        convert, runner = to_host, None
    for mod in module.modules():
        for p in mod._parameters.values():
            p.data = convert(p.data)
            if p._grad is not None:
                p._grad = convert(p._grad)
        for name, b in list(mod._buffers.items()):
            # float buffers (running statistics) follow the parameters; integer
            # counters (num_batches_tracked) stay host scalars
            kind = b.dtype.kind if hasattr(b, "dtype") else "O"
            if kind == "f":
                mod._set_buffer(name, convert(b))
        if isinstance(mod, Sequential):
            mod.set_runner(runner)
    return module


provide("to", move)
