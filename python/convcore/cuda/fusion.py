"""Layer fusion on the GPU: in a Sequential moved to the GPU (Module.to("cuda")
makes sequential_forward its runner), a Conv2d or Linear directly followed
by a ReLU runs as one kernel, with bias and ReLU in the GEMM's epilogue (conv2d_relu / linear_relu), saving a full pass over the
activation. The layers' saved state is what their own forwards would have
kept, so backward is unchanged: the ReLU keeps the fused output as its input,
which gives the same gradient mask (relu(v) > 0 exactly when v > 0)."""
from __future__ import annotations

from ..nn.layers import Conv2d, Linear, ReLU
from ..nn.module import kept


def _fused(m, x):
    """relu(m(x)) in one kernel, or None where m cannot fuse."""
    # imported here, on the GPU, so that importing convcore imports no GPU ops
    from . import functional as G
    bias = None if m.bias is None else m.bias.data
    if isinstance(m, Conv2d) and m.padding_mode == "zeros":
        m._x = kept(x)
        return G.conv2d_relu(x, m.weight.data, bias, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, Linear):
        m._x = kept(x)
        return G.linear_relu(x, m.weight.data, bias)
    return None


def sequential_forward(modules, x):
    i = 0
    while i < len(modules):
        m = modules[i]
        if i + 1 < len(modules) and type(modules[i + 1]) is ReLU:
            y = _fused(m, x)
            if y is not None:
                modules[i + 1]._x = kept(y)
                x, i = y, i + 2
                continue
        x, i = m(x), i + 1
    return x
