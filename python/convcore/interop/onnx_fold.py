"""Constant folding for the ONNX importer (onnx_import.py): the nodes whose
inputs are all known (initializers, Constant nodes, the Shape -> Gather ->
Unsqueeze -> Concat chains torch.onnx writes for a flatten) evaluated with
numpy."""
from __future__ import annotations

from typing import List, Optional

import numpy as np

__all__ = ["FOLDABLE", "MAX_CONSTANT", "evaluate"]

# ops evaluated with numpy when all their inputs are known
FOLDABLE = {"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast",
            "Reshape", "Identity", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal",
            "ConstantOfShape", "Transpose", "Range", "Floor", "Ceil"}

# Values of a folded constant: a bound that a CNN never reaches and a
# corrupt file would.
MAX_CONSTANT = 2 ** 24


def evaluate(node, args: List[Optional[np.ndarray]], opset: int) -> np.ndarray:
    """One constant node (the importer's node: .op, .attrs) with numpy."""
    from onnx import helper, numpy_helper

    op, a = node.op, node.attrs
    if op == "Constant":
        if "value" in a:
            return numpy_helper.to_array(a["value"])
        for key in ("value_float", "value_int"):
            if key in a:
                return np.array(a[key], np.float32 if key == "value_float" else np.int64)
        for key in ("value_floats", "value_ints"):
            if key in a:
                return np.array(a[key], np.float32 if key == "value_floats" else np.int64)
        raise ValueError(f"attributes {sorted(a)} hold no supported value")
    x = args[0]
    if op == "Identity":
        return x
    if op == "Gather":
        return np.take(x, args[1].astype(np.int64), axis=int(a.get("axis", 0)))
    if op in ("Unsqueeze", "Squeeze"):
        axes = a.get("axes") if opset < 13 else (None if len(args) < 2 or args[1] is None
                                                 else args[1].reshape(-1))
        if op == "Squeeze":
            return np.squeeze(x, axis=None if axes is None else tuple(int(i) for i in axes))
        out = x
        rank = x.ndim + len(axes)
        for i in sorted(int(i) % rank for i in axes):
            out = np.expand_dims(out, i)
        return out
    if op == "Concat":
        return np.concatenate([np.atleast_1d(v) for v in args], axis=int(a["axis"]))
    if op == "Slice":
        starts, ends = args[1].reshape(-1), args[2].reshape(-1)
        axes = range(len(starts)) if len(args) < 4 or args[3] is None else args[3].reshape(-1)
        steps = [1] * len(starts) if len(args) < 5 or args[4] is None else args[4].reshape(-1)
        index = [slice(None)] * x.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            index[int(ax)] = slice(int(s), int(e), int(st))
        return x[tuple(index)]
    if op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(int(a["to"])))
    if op == "Reshape":
        shape = [int(d) if not (d == 0 and not a.get("allowzero", 0)) else x.shape[i]
                 for i, d in enumerate(args[1].reshape(-1))]
        return x.reshape(shape)
    if op == "Transpose":
        return np.transpose(x, a.get("perm"))
    if op == "ConstantOfShape":
        if np.prod(x.reshape(-1).astype(np.float64)) > MAX_CONSTANT or (x < 0).any():
            raise ValueError(f"shape {x.reshape(-1).tolist()} is negative or too large")
        value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        return np.full([int(d) for d in x.reshape(-1)], value.reshape(-1)[0], value.dtype)
    if op == "Range":
        start, limit, delta = (float(a.reshape(-1)[0]) for a in args[:3])
        if delta == 0 or (limit - start) / delta > MAX_CONSTANT:
            raise ValueError(f"range({start}, {limit}, {delta}) is empty-stepped or too long")
        return np.arange(x.reshape(-1)[0], args[1].reshape(-1)[0], args[2].reshape(-1)[0])
    unary = {"Neg": np.negative, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal,
             "Floor": np.floor, "Ceil": np.ceil}
    if op in unary:
        return unary[op](x)
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
    if op in binary:
        return binary[op](x, args[1]).astype(np.result_type(x, args[1]))
    if op == "Div":
        if x.dtype.kind in "iu":
            return (x // args[1]).astype(x.dtype)
        return np.divide(x, args[1])
    raise ValueError(f"no numpy rule for {op}")
