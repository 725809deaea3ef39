"""Parameter initialisation, as torch.nn.init, from one seedable generator.

`convcore.manual_seed(s)` (or `convcore.nn.init.manual_seed`) makes every
layer created afterwards reproducible.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

_generator = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Reseed the generator that layers draw their initial weights from."""
    global _generator
    _generator = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    return _generator


def fan_in_of(shape) -> int:
    """Inputs feeding one output: in_features, or in_channels/groups * kH * kW."""
    # math.prod on Python ints: np.prod wraps around in int64 (a kernel of
    # 2^62 x 2^62 gave fan_in 0 and a ZeroDivisionError)
    return math.prod(int(d) for d in shape[1:]) if len(shape) > 1 else int(shape[0])


def uniform(shape, bound: float, dtype=np.float32,
            rng: Optional[np.random.Generator] = None) -> np.ndarray:
    rng = rng or _generator
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def kaiming_uniform(shape, a: float = math.sqrt(5), dtype=np.float32,
                    rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """PyTorch's default for Conv2d and Linear weights: with a = sqrt(5) the
    bound is 1 / sqrt(fan_in)."""
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in_of(shape))
    return uniform(shape, bound, dtype, rng)


def kaiming_normal(shape, mode: str = "fan_out", dtype=np.float32,
                   rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """He initialisation for ReLU networks (torchvision's ResNet uses fan_out)."""
    rng = rng or _generator
    fan = fan_in_of(shape) if mode == "fan_in" else int(shape[0]) * int(np.prod(shape[2:]))
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan)).astype(dtype)
