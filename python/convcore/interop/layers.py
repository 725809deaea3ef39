"""Fixed layers that ONNX files need and the graph format writes with its own
ops: explicit padding (ONNX's Pad, and the part of an asymmetric Conv pad
that the symmetric Conv2d padding cannot hold)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..nn.layers import Conv2d
from ..nn.module import Module

__all__ = ["Pad2d"]

# ONNX's Pad modes and the Conv2d padding_mode that computes each
_MODES = {"constant": "zeros", "reflect": "reflect", "replicate": "replicate"}


class Pad2d(Module):
    """Pads H and W by padding = (left, right, top, bottom), PyTorch's order
    for F.pad, with zeros ('constant'), the mirror image without the edge
    ('reflect') or the edge repeated ('replicate').

    Saved as a depthwise Conv2d with a one-hot kernel (a buffer, so training
    leaves it alone): a kernel of |top - bottom| + 1 rows, symmetric padding
    max(top, bottom) in the padding mode, and the one at row
    max(top, bottom) - top gives rows top..bottom of the padded input; the
    same for columns. The eager forward and backward run that same Conv2d, so
    Python and the C++ runtime compute one thing."""

    def __init__(self, channels: int, padding: Sequence[int], mode: str = "constant"):
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        padding = [int(p) for p in padding]
        if len(padding) != 4 or min(padding) < 0:
            raise ValueError(f"padding must be 4 non-negative ints (left, right, top, bottom), "
                             f"got {padding!r}")
        self.channels, self.padding, self.mode = int(channels), padding, mode
        left, right, top, bottom = padding
        ph, pw = max(top, bottom), max(left, right)
        kernel = (abs(top - bottom) + 1, abs(left - right) + 1)
        conv = Conv2d(self.channels, self.channels, kernel, padding=(ph, pw),
                      groups=self.channels, bias=False, padding_mode=_MODES[mode])
        w = np.zeros(conv.weight.shape, np.float32)
        w[:, :, ph - top, pw - left] = 1.0
        self.register_buffer("weight", w)
        # not a child: its weight is this layer's buffer, not a parameter
        self.__dict__["_conv"] = conv

    def forward(self, x):
        self._conv.weight.data = self.weight.astype(np.asarray(x).dtype, copy=False)
        return self._conv.forward(x)

    def backward(self, grad_output):
        return self._conv.backward(grad_output)

    def output_shape(self, input_shape):
        return self._conv.output_shape(input_shape)

    def lower(self, g, x, prefix):
        attrs = self._conv.config()
        return g.node("Conv2d", [x], name=prefix, attrs=attrs)

    def config(self):
        return dict(channels=self.channels, padding=list(self.padding), mode=self.mode)

    def extra_repr(self):
        return f"{self.channels}, padding={tuple(self.padding)}, mode={self.mode!r}"
