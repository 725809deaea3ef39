"""model.summary(input_shape): a table of layers with output volume,
parameters, multiply-adds and activation memory, computed from shapes alone
(nothing runs), in the lecture's notation ([55x55x96] CONV1 ...)."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from .nn.layers import (AdaptiveAvgPool2d, AvgPool2d, Conv2d, Dropout, Flatten, Linear,
                        MaxPool2d, ReLU)
from .nn.module import Module, Sequential, provide
from .nn.norm import BatchNorm2d, LocalResponseNorm
from .nn.graph import Graph
from .nn.residual import _Residual

from .nn.activation import _Elementwise, StochasticDepth  # noqa: E402

# Layers that change no shape and hold no weights: folded away in compact tables.
_ELEMENTWISE = (ReLU, Dropout, Flatten, _Elementwise, StochasticDepth)


def volume(shape) -> str:
    """The lecture's notation: H x W x C for images, the size for vectors."""
    shape = tuple(shape)
    if len(shape) == 3:
        return f"{shape[1]}x{shape[2]}x{shape[0]}"
    return "x".join(str(d) for d in shape)


# The numbered layers: (type, label, counter), the first type that matches
# wins; layers that share a counter are numbered together.
_NUMBERED = ((Conv2d, "CONV", "weight"), (Linear, "FC", "weight"),
             (MaxPool2d, "MAX POOL", "pool"), (AvgPool2d, "AVG POOL", "pool"),
             (AdaptiveAvgPool2d, "ADAPTIVE AVG POOL", "pool"),
             (LocalResponseNorm, "NORM", "norm"))


class _Labeler:
    """CONV1, MAX POOL1, NORM1, ..., FC6: weight layers are numbered together,
    as in the lecture (five CONVs, then FC6)."""

    def __init__(self):
        self.counts: Dict[str, int] = {}

    def __call__(self, m: Module) -> str:
        for layer_type, label, counter in _NUMBERED:
            if isinstance(m, layer_type):
                self.counts[counter] = self.counts.get(counter, 0) + 1
                return f"{label}{self.counts[counter]}"
        if isinstance(m, BatchNorm2d):
            return "BN"
        return type(m).__name__.upper()


def _own_params(m: Module) -> int:
    return sum(p.size for p in m._parameters.values())


def _walk(m: Module, name: str, shape: tuple, rows: List[dict], label: _Labeler) -> tuple:
    """Appends the rows of module m for input `shape`; returns its output shape."""
    if isinstance(m, _Residual):
        out = shape
        for child_name, child in m._modules.items():
            if child_name != "downsample":
                out = _walk(child, f"{name}.{child_name}", out, rows, label)
        if m.downsample is not None:
            _walk(m.downsample, f"{name}.downsample", shape, rows, label)
        rows.append(dict(layer=name, name="RESIDUAL ADD+RELU", output=out, params=0, macs=0))
        return out
    if isinstance(m, Graph):
        return _walk_graph(m, name, shape, rows, label)
    if m._modules:
        for child_name, child in m._modules.items():
            if isinstance(child, Linear) and len(shape) > 1:
                shape = (int(np.prod(shape)),)  # containers flatten before FC layers
            shape = _walk(child, f"{name}.{child_name}" if name else child_name, shape, rows,
                          label)
        return shape
    out = tuple(m.output_shape(shape))
    rows.append(dict(layer=name, name=label(m), output=out, params=_own_params(m),
                     macs=int(m.macs(shape)), module=m))
    return out


def _walk_graph(g: Graph, name: str, shape: tuple, rows: List[dict], label: _Labeler) -> tuple:
    """A graph's rows in node order: its modules' rows, and one row per join
    (CONCAT, ADD, MUL) with the joined volume; the first output's shape."""
    shapes = {"x": shape}
    for out, op, inputs in g.nodes:
        args = [shapes[v] for v in inputs]
        if op in g._modules:
            shapes[out] = _walk(g._modules[op], f"{name}.{op}" if name else op, args[0], rows,
                                label)
        else:
            shapes[out] = g._join_shape(out, op, args)
            if op != "relu":  # a function ReLU is folded away like a ReLU module
                rows.append(dict(layer=f"{name}.{out}" if name else out, name=op.upper(),
                                 output=shapes[out], params=0, macs=0))
    return shapes[g.outputs[0]]


def summary(model: Module, input_shape, print_fn: Callable[[str], None] = print,
            compact: bool = True) -> List[dict]:
    """Prints and returns one row per layer for one sample of input_shape
    (C, H, W). compact=True folds ReLU, Dropout and Flatten rows away (they
    have no parameters and keep the volume), as the lecture's tables do."""
    shape = tuple(int(d) for d in input_shape)
    rows: List[dict] = []
    _walk(model, "", shape, rows, _Labeler())
    itemsize = np.dtype(model.dtype).itemsize
    for row in rows:
        row["activation_bytes"] = int(np.prod(row["output"])) * itemsize
    shown = [r for r in rows if not (compact and isinstance(r.get("module"), _ELEMENTWISE))]
    total_params = sum(r["params"] for r in rows)
    total_macs = sum(r["macs"] for r in rows)
    total_act = sum(r["activation_bytes"] for r in rows)
    if print_fn is not None:
        title = getattr(model, "name", None) or type(model).__name__
        print_fn(f"{title} for input [{volume(shape)}], "
                 f"{np.dtype(model.dtype).name}, per sample")
        header = (f"{'layer':28} {'':18} {'output':>14} {'params':>13} {'mult-adds':>15} "
                  f"{'activations':>12}")
        print_fn(header)
        print_fn("-" * len(header))
        print_fn(f"{'':28} {'INPUT':18} {'[' + volume(shape) + ']':>14}")
        for r in shown:
            print_fn(f"{r['layer']:28} {r['name']:18} {'[' + volume(r['output']) + ']':>14} "
                     f"{r['params']:>13,} {r['macs']:>15,} {_bytes(r['activation_bytes']):>12}")
        print_fn("-" * len(header))
        print_fn(f"{'total':47} {'':>14} {total_params:>13,} {total_macs:>15,} "
                 f"{_bytes(total_act):>12}")
    for r in rows:
        r.pop("module", None)
    return [r for r in rows if r in shown] if compact else rows


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


provide("summary", summary)  # Module.summary (nn does not import this module)
