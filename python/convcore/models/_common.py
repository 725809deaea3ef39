"""What every model builder of the zoo checks and does the same way: the
`num_classes` and `input_size` arguments, the early check that the input
is large enough, and the references' weight initialisations."""
from __future__ import annotations

import math

import numpy as np

from ..nn import init
from ..nn.layers import Conv2d, Linear
from ..nn.module import Module


def num_classes_of(num_classes) -> int:
    """num_classes as an int: a positive int (numpy integers too; bools,
    floats and strings are refused, as a misspelt argument would be)."""
    if isinstance(num_classes, (bool, np.bool_)) or \
            not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def input_shape_of(input_size, channels: int = 3) -> tuple:
    """input_size: an int (square side), (H, W) or (C, H, W); channels is C
    when input_size does not give it."""
    if isinstance(input_size, (int, np.integer)):
        return (channels, int(input_size), int(input_size))
    size = tuple(int(d) for d in input_size)
    if len(size) == 2:
        return (channels,) + size
    if len(size) == 3:
        return size
    raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")


def checked(model):
    """Fails early, naming the layer, when the input is too small for the
    net; returns the model."""
    model.output_shape(model.input_shape)
    return model


def init_like_reference(model: Module, conv: str, linear: str) -> None:
    """The references' initialisations. conv: 'fan_out' / 'fan_in' (He normal)
    or 'trunc_normal' (GoogLeNet's N(0, 0.01) truncated at +-2, weights of FC
    layers too); linear: 'normal' (N(0, 0.01), bias 0), 'uniform' (U(+-1/sqrt(out)),
    bias 0), 'zero_bias' (PyTorch's default weight, bias 0) or 'default'.
    BatchNorm keeps weight 1, bias 0."""
    rng = init.generator()
    for m in model.modules():
        if isinstance(m, Conv2d):
            dt = m.weight.data.dtype
            if conv == "trunc_normal":
                m.weight.data = np.clip(rng.standard_normal(m.weight.shape) * 0.01, -2, 2) \
                    .astype(dt)
            else:
                m.weight.data = init.kaiming_normal(m.weight.shape, mode=conv, dtype=dt)
            if m.bias is not None:
                m.bias.data = np.zeros_like(m.bias.data)
        elif isinstance(m, Linear):
            dt = m.weight.data.dtype
            if linear == "normal":
                m.weight.data = (rng.standard_normal(m.weight.shape) * 0.01).astype(dt)
            elif linear == "uniform":
                bound = 1.0 / math.sqrt(m.out_features)
                m.weight.data = init.uniform(m.weight.shape, bound, dt)
            elif linear == "trunc_normal":
                m.weight.data = np.clip(rng.standard_normal(m.weight.shape) * 0.01, -2, 2) \
                    .astype(dt)
            if linear in ("normal", "uniform", "zero_bias") and m.bias is not None:
                m.bias.data = np.zeros_like(m.bias.data)
