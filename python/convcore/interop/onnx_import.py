"""ONNX files to convcore modules: `load(path_or_bytes)` returns a Graph of
convcore layers whose parameters are the file's initializers.

The importer walks the ONNX graph once, in order:

* values that do not depend on the input (initializers, Constant nodes, and
  the Shape -> Gather -> Unsqueeze -> Concat chains that torch.onnx writes
  for `x.view(x.size(0), -1)`) are evaluated with numpy; Shape gives the
  batch size as a marker, so that a Reshape can tell "keep the batch" from a
  number;
* every other node becomes a convcore layer (a child module of the Graph) or
  a join (add, mul, concat), and the importer tracks each value's shape for
  one sample, so that channel counts and flattening are checked as it goes.

Anything it cannot map raises ValueError (a bad file) or NotImplementedError
(a valid op or attribute convcore does not compute) naming the node, its op
type and the file; no partial model is returned.
"""
from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..nn.activation import Hardsigmoid, Hardswish, ReLU6, Sigmoid, SiLU, Softmax
from ..nn.graph import JOINS, Graph, join_shape
from ..nn.layers import (AdaptiveAvgPool2d, AvgPool2d, Conv2d, Dropout, Flatten, Linear,
                         MaxPool2d, ReLU)
from ..nn.lowering import fresh_name
from ..nn.module import Identity, Module, Parameter
from ..nn.norm import BatchNorm2d, LocalResponseNorm
from .layers import Pad2d
from .onnx_fold import FOLDABLE as _FOLDABLE
from .onnx_fold import evaluate as _evaluate

__all__ = ["load", "OPSET_RANGE", "SUPPORTED_OPS"]

OPSET_RANGE = (11, 21)

# The batch dimension in constant-folded shapes (what Shape gives for it).
_BATCH = -(2 ** 62)

# Values of one sample of a tensor: a bound that a CNN never reaches and a
# corrupt file would.
_MAX_SAMPLE = 2 ** 28

SUPPORTED_OPS = ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm", "MatMul", "Add",
                 "Sub", "Mul", "Div", "Sum", "Flatten", "Reshape", "Squeeze", "Relu", "Clip",
                 "Sigmoid", "HardSigmoid", "HardSwish", "Concat", "BatchNormalization", "LRN",
                 "Dropout", "Identity", "Softmax", "Pad", "ReduceMean")


class _Node:
    """An ONNX node with its attributes as Python values."""

    def __init__(self, proto, index: int):
        from onnx import helper

        self.proto = proto
        self.op = proto.op_type
        self.name = proto.name or f"{proto.op_type}_{index}"
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
        self.domain = proto.domain


def _identifier(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "v"
    return s if not s[0].isdigit() else "v_" + s


def _text(value) -> str:
    """A string attribute (onnx gives bytes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _ints(value) -> List[int]:
    return [int(v) for v in value]


class _Importer:
    def __init__(self, model, source: str, input_shape=None):
        self.source = source
        self.model = model
        self.graph = model.graph
        self.opset = self._opset()
        self.consts: Dict[str, np.ndarray] = {}
        # ONNX value name -> (convcore value name, one sample's shape)
        self.values: Dict[str, Tuple[str, tuple]] = {}
        self.modules: "OrderedDict[str, Module]" = OrderedDict()
        self.lines: List[str] = []
        self.taken = set(JOINS) | {"x"}
        self.producer: Dict[str, str] = {}  # convcore value -> module name that computed it
        self.taken_from: Dict[str, Tuple[str, tuple]] = {}  # convcore value -> that module's input
        self.input_shape = input_shape

    # -- errors -----------------------------------------------------------------------
    def fail(self, node: _Node, what: str, kind=ValueError):
        return kind(f"{self.source}: node {node.name!r} ({node.op}): {what}")

    def unsupported(self, node: _Node, what: str):
        return self.fail(node, what, NotImplementedError)

    # -- set-up -----------------------------------------------------------------------
    def _opset(self) -> int:
        versions = [o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        if not versions:
            raise ValueError(f"{self.source}: the model imports no version of the default ONNX "
                             f"opset (opset_import has no domain '')")
        v = int(versions[0])
        lo, hi = OPSET_RANGE
        if not lo <= v <= hi:
            raise NotImplementedError(f"{self.source}: opset {v} is not supported; convcore "
                                      f"reads opsets {lo} to {hi}")
        return v

    def _initializers(self):
        from onnx import numpy_helper

        for t in self.graph.initializer:
            try:
                a = numpy_helper.to_array(t)
            except Exception as e:  # onnx raises several types for a bad tensor
                raise ValueError(f"{self.source}: initializer {t.name!r} cannot be read: "
                                 f"{e}") from None
            expected = int(np.prod(list(t.dims), dtype=np.int64)) if len(t.dims) else 1
            if a.size != expected:
                raise ValueError(f"{self.source}: initializer {t.name!r} has {a.size} values "
                                 f"for dims {list(t.dims)}")
            self.consts[t.name] = a

    def _input(self):
        inits = {t.name for t in self.graph.initializer}
        inputs = [i for i in self.graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise NotImplementedError(f"{self.source}: the graph has {len(inputs)} inputs "
                                      f"{[i.name for i in inputs]}; convcore models take one")
        inp = inputs[0]
        ttype = inp.type.tensor_type
        if ttype.elem_type != 1:  # FLOAT
            raise NotImplementedError(f"{self.source}: input {inp.name!r} has element type "
                                      f"{ttype.elem_type}; convcore imports float32 (1) models")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        if self.input_shape is not None:
            shape = tuple(int(d) for d in self.input_shape)
            if len(shape) != len(dims) - 1 or any(
                    d is not None and d != s for d, s in zip(dims[1:], shape)):
                raise ValueError(f"{self.source}: input_shape {shape} does not match the "
                                 f"file's input {inp.name!r} of shape {dims} (batch first)")
        else:
            meta = {p.key: p.value for p in self.model.metadata_props}
            if any(d is None for d in dims[1:]) and "convcore_input_shape" in meta:
                # the sample shape convcore.onnx.export recorded
                try:
                    saved = [int(d) for d in meta["convcore_input_shape"].split()]
                except ValueError:
                    saved = []
                if len(saved) == len(dims) - 1:
                    dims = dims[:1] + saved
            if len(dims) not in (2, 4) or any(d is None or d <= 0 for d in dims[1:]):
                raise ValueError(f"{self.source}: input {inp.name!r} has shape {dims}; convcore "
                                 f"needs (N, C, H, W) or (N, features) with every dimension but "
                                 f"the batch fixed (pass input_shape=(C, H, W) to fix them)")
            shape = tuple(int(d) for d in dims[1:])
        self.values[inp.name] = ("x", shape)
        return inp.name, shape

    # -- values -------------------------------------------------------------------------
    def const(self, node: _Node, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            if name in self.values:
                raise self.unsupported(node, f"{what} ({name!r}) must be a constant "
                                             f"(an initializer), but it is computed from the input")
            raise self.fail(node, f"{what} ({name!r}) is neither an initializer nor the output "
                                  f"of an earlier node")
        return self.consts[name]

    def optional_const(self, node: _Node, i: int, what: str):
        if len(node.inputs) <= i or node.inputs[i] == "":
            return None
        return self.const(node, node.inputs[i], what)

    def dynamic(self, node: _Node, i: int = 0) -> Tuple[str, tuple]:
        if len(node.inputs) <= i or node.inputs[i] == "":
            raise self.fail(node, f"input {i} is missing")
        name = node.inputs[i]
        if name not in self.values:
            if name in self.consts:
                raise self.unsupported(node, f"input {i} ({name!r}) is a constant; convcore "
                                             f"computes this op on the model's input only")
            raise self.fail(node, f"input {i} ({name!r}) is neither the graph's input, an "
                                  f"initializer nor the output of an earlier node")
        return self.values[name]

    def fresh(self, base: str) -> str:
        base = _identifier(base)[-200:]
        if hasattr(Graph, base) or base in ("nodes", "outputs", "name", "input_shape"):
            base += "_"
        return fresh_name(base, self.taken)

    def add(self, node: _Node, module: Module, value: Tuple[str, tuple], key: str = None):
        """Appends `module` as a child applied to `value`; the node's output
        gets the result and its shape."""
        key = self.fresh(key or _node_key(node))
        try:
            shape = tuple(module.output_shape(value[1]))
        except ValueError as e:
            raise self.fail(node, f"cannot apply it to a tensor of shape {('N',) + value[1]}: "
                                  f"{e}") from None
        if int(np.prod(shape, dtype=np.float64)) > _MAX_SAMPLE:
            raise self.fail(node, f"its output for one sample, {shape}, has more than "
                                  f"{_MAX_SAMPLE} values")
        self.modules[key] = module
        out = self.fresh(node.outputs[0])
        self.lines.append(f"{out} = {key}({value[0]})")
        self.producer[out] = key
        self.taken_from[out] = value
        self.values[node.outputs[0]] = (out, shape)

    def join(self, node: _Node, op: str, values: List[Tuple[str, tuple]]):
        out = self.fresh(node.outputs[0])
        try:
            shape = join_shape(out, op, [v[1] for v in values])
        except ValueError as e:
            raise self.fail(node, str(e)) from None
        self.lines.append(f"{out} = {op}({', '.join(v[0] for v in values)})")
        self.values[node.outputs[0]] = (out, shape)

    def alias(self, node: _Node, value: Tuple[str, tuple]):
        self.values[node.outputs[0]] = value

    def check_outputs(self, node: _Node, count: int = 1):
        """Outputs past the first `count` (a Dropout mask, MaxPool indices,
        BatchNormalization's training statistics) must be unused."""
        for o in node.outputs[count:]:
            if o and o in self.used:
                raise self.unsupported(node, f"output {o!r} is used; convcore computes only "
                                             f"the first {count} output(s) of {node.op}")

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> Graph:
        self._initializers()
        _, shape = self._input()
        outputs = [o.name for o in self.graph.output]
        if not outputs:
            raise ValueError(f"{self.source}: the graph has no outputs")
        nodes = [_Node(n, i) for i, n in enumerate(self.graph.node)]
        nodes = self._needed(nodes, outputs)
        self.used = {v for n in nodes for v in n.inputs if v} | set(outputs)
        self.consumers: Dict[str, int] = {}
        for n in nodes:
            for v in n.inputs:
                self.consumers[v] = self.consumers.get(v, 0) + 1
        for o in outputs:
            self.consumers[o] = self.consumers.get(o, 0) + 1
        self.graph_outputs = set(outputs)
        self.fused = self._fusions(nodes)
        for node in nodes:
            if node.domain not in ("", "ai.onnx"):
                raise self.unsupported(node, f"op domain {node.domain!r} is not the default "
                                             f"ONNX domain")
            if id(node) in self.fused["skip"]:
                continue
            if self._fold(node):
                continue
            handler = getattr(self, "op_" + node.op, None)
            if handler is None:
                raise self.unsupported(node, f"op {node.op} is not supported (convcore imports "
                                             f"{', '.join(SUPPORTED_OPS)})")
            handler(node)
        result = []
        for o in outputs:
            if o not in self.values:
                raise ValueError(f"{self.source}: output {o!r} does not depend on the input "
                                 f"(a constant output), or no node computes it")
            result.append(self.values[o][0])
        if not self.lines:  # the model computes nothing: an Identity layer
            key, out = self.fresh("identity"), self.fresh("out")
            self.modules[key] = Identity()
            self.lines.append(f"{out} = {key}(x)")
            result = [out for _ in result]
        if "x" in result:
            raise NotImplementedError(f"{self.source}: an output is the model's input itself, "
                                      f"beside computed ones")
        name = self.graph.name or os.path.splitext(os.path.basename(self.source))[0] or None
        try:
            return Graph(self.modules, self.lines, outputs=result, name=name,
                         input_shape=shape)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.source}: cannot build the graph: {e}") from None

    def _needed(self, nodes: List[_Node], outputs: Sequence[str]) -> List[_Node]:
        """The nodes the outputs depend on (dead branches are not imported)."""
        want = set(outputs)
        keep = []
        for n in reversed(nodes):
            if any(o in want for o in n.outputs):
                keep.append(n)
                want.update(v for v in n.inputs if v)
        return keep[::-1]

    def _fusions(self, nodes: List[_Node]) -> dict:
        """x * Sigmoid(x) -> SiLU and x * HardSigmoid(x) -> Hardswish (how
        torch.onnx writes SiLU, and Hardswish before opset 14), when the
        sigmoid's output has no other use."""
        producer = {o: n for n in nodes for o in n.outputs}
        skip, mul = set(), {}
        for n in nodes:
            if n.op != "Mul" or len(n.inputs) != 2:
                continue
            for a, b in ((0, 1), (1, 0)):
                p = producer.get(n.inputs[b])
                if p is None or not p.inputs or p.inputs[0] != n.inputs[a] or \
                        self.consumers.get(n.inputs[b], 0) != 1:
                    continue
                if p.op == "Sigmoid":
                    kind = SiLU
                elif p.op == "HardSigmoid" and self._is_hardsigmoid(p):
                    kind = Hardswish
                else:
                    continue
                skip.add(id(p))
                mul[id(n)] = (kind, a)
                break
        return {"skip": skip, "mul": mul}

    @staticmethod
    def _is_hardsigmoid(node: _Node) -> bool:
        alpha = float(node.attrs.get("alpha", 0.2))
        beta = float(node.attrs.get("beta", 0.5))
        return abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6

    # -- constant folding ------------------------------------------------------------------
    def _fold(self, node: _Node) -> bool:
        """Evaluates a node with numpy when all its inputs are known."""
        if node.op not in _FOLDABLE:
            return False
        if node.op == "Shape":
            if node.inputs and node.inputs[0] in self.values:
                shape = np.array((_BATCH,) + self.values[node.inputs[0]][1], np.int64)
            elif node.inputs and node.inputs[0] in self.consts:
                shape = np.array(self.consts[node.inputs[0]].shape, np.int64)
            else:
                return False
            start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
            self.consts[node.outputs[0]] = shape[start:None if end is None else int(end)]
            return True
        if any(v and v not in self.consts for v in node.inputs):
            return False
        args = [self.consts[v] if v else None for v in node.inputs]
        try:
            result = _evaluate(node, args, self.opset)
        except (ValueError, IndexError, TypeError, KeyError) as e:
            raise self.fail(node, f"cannot evaluate it on its constant inputs: {e}") from None
        self.consts[node.outputs[0]] = result
        return True

    # -- layers -----------------------------------------------------------------------------
    def _spatial(self, node: _Node, value, what="input"):
        if len(value[1]) != 3:
            raise self.unsupported(node, f"{what} has shape {('N',) + value[1]}; convcore "
                                         f"computes {node.op} over (N, C, H, W) tensors")
        return value[1]

    def _pads(self, node: _Node, shape, kernel, strides, dilations) -> List[int]:
        """[top, left, bottom, right] from pads or auto_pad."""
        auto = _text(node.attrs.get("auto_pad", "NOTSET"))
        if auto in ("NOTSET", ""):
            pads = _ints(node.attrs.get("pads", [0, 0, 0, 0]))
            if len(pads) != 4 or min(pads) < 0:
                raise self.fail(node, f"pads must be 4 non-negative ints (2-D), got {pads}")
            return pads
        if auto == "VALID":
            return [0, 0, 0, 0]
        if auto not in ("SAME_UPPER", "SAME_LOWER"):
            raise self.fail(node, f"auto_pad must be NOTSET, VALID, SAME_UPPER or SAME_LOWER, "
                                  f"got {auto!r}")
        begin, end = [], []
        for size, k, s, d in zip(shape[1:], kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            # SAME_UPPER puts the odd extra pixel at the end, SAME_LOWER at the beginning
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin + end

    def _window(self, node: _Node, shape, kernel_default=None):
        kernel = _ints(node.attrs.get("kernel_shape", kernel_default or []))
        if len(kernel) != 2:
            raise self.unsupported(node, f"kernel_shape {kernel}: convcore computes 2-D windows")
        strides = _ints(node.attrs.get("strides", [1, 1]))
        dilations = _ints(node.attrs.get("dilations", [1, 1]))
        if len(strides) != 2 or len(dilations) != 2 or min(strides + dilations + kernel) < 1:
            raise self.fail(node, f"strides {strides} and dilations {dilations} must be 2 "
                                  f"positive ints each")
        pads = self._pads(node, shape, kernel, strides, dilations)
        return kernel, strides, dilations, pads

    def _pre_pad(self, node: _Node, value, pads, mode="constant", limit=None):
        """Pads explicitly what the layer's symmetric padding (at most
        `limit` (h, w), PyTorch's half kernel for pooling) cannot hold;
        returns the value and the (h, w) padding left for the layer."""
        top, left, bottom, right = pads
        ph, pw = min(top, bottom), min(left, right)
        if limit is not None:
            ph, pw = min(ph, limit[0]), min(pw, limit[1])
        extra = [left - pw, right - pw, top - ph, bottom - ph]
        if max(extra[2:]) > value[1][1] or max(extra[:2]) > value[1][2]:
            raise self.unsupported(node, f"pads {pads} whose asymmetric part is wider than the "
                                         f"input {value[1][1:]}")
        if any(extra):
            self.add(node, Pad2d(value[1][0], extra, mode), value, key=_node_key(node) + "_pad")
            value = self.values[node.outputs[0]]
        return value, (ph, pw)

    def _absorb_pad(self, x, pads):
        """A zero Pad whose only use is this convolution joins its padding
        (Keras' ZeroPadding2D before a convolution): the value before the
        Pad and the padding of both."""
        key = self.producer.get(x[0])
        layer = self.modules.get(key)
        if type(layer) is not Pad2d or layer.mode != "constant" or self._uses(x[0]) != 1:
            return x, pads
        self.lines.remove(f"{x[0]} = {key}({self.taken_from[x[0]][0]})")
        del self.modules[key]
        left, right, top, bottom = layer.padding
        return self.taken_from[x[0]], [pads[0] + top, pads[1] + left, pads[2] + bottom,
                                       pads[3] + right]

    def op_Conv(self, node: _Node):
        x = self.dynamic(node)
        shape = self._spatial(node, x)
        w = self.const(node, node.inputs[1], "weight")
        b = self.optional_const(node, 2, "bias")
        if w.ndim != 4:
            raise self.unsupported(node, f"weight of shape {w.shape}: convcore computes 2-D "
                                         f"convolutions (a 4-D weight)")
        group = int(node.attrs.get("group", 1))
        kernel, strides, dilations, pads = self._window(node, shape, list(w.shape[2:]))
        if list(w.shape[2:]) != kernel:
            raise self.fail(node, f"kernel_shape {kernel} does not match the weight's "
                                  f"{list(w.shape[2:])}")
        if group < 1 or shape[0] != w.shape[1] * group:
            raise self.fail(node, f"the input has {shape[0]} channels; the weight "
                                  f"{list(w.shape)} with group={group} needs {w.shape[1] * group}")
        if b is not None and b.shape != (w.shape[0],):
            raise self.fail(node, f"bias of shape {b.shape}, expected ({w.shape[0]},)")
        if _text(node.attrs.get("auto_pad", "NOTSET")) in ("NOTSET", "", "VALID"):
            x, pads = self._absorb_pad(x, pads)
        x, padding = self._pre_pad(node, x, pads)
        conv = Conv2d(shape[0], int(w.shape[0]), kernel, strides, padding, dilations, group,
                      bias=b is not None)
        self._set(conv, w, b)
        self.add(node, conv, x, key=_layer_key(node, node.inputs[1]))

    def _set(self, layer, weight, bias=None):
        # copies: onnx's arrays are read-only views of the file's bytes
        layer.weight = Parameter(np.array(weight, np.float32))
        if bias is not None:
            layer.bias = Parameter(np.array(bias, np.float32))

    def _pool(self, node: _Node, kind: str):
        x = self.dynamic(node)
        shape = self._spatial(node, x)
        kernel, strides, dilations, pads = self._window(node, shape)
        ceil_mode = bool(node.attrs.get("ceil_mode", 0))
        include = kind == "avg" and bool(node.attrs.get("count_include_pad", 0))
        if kind == "max":
            self.check_outputs(node)
            if int(node.attrs.get("storage_order", 0)) != 0:
                raise self.unsupported(node, "storage_order=1 (indices only)")
        elif dilations != [1, 1]:
            raise self.unsupported(node, f"dilations {dilations} in average pooling")
        want = [_pool_size(*a, ceil_mode) for a in zip(shape[1:], kernel, strides, dilations,
                                                       pads[:2], pads[2:])]
        top, left, bottom, right = pads
        half = [k // 2 for k in kernel]  # PyTorch's bound on a pooling's padding
        one_sided = _one_sided_pool_pad(shape, kernel, strides, dilations, pads, want)
        if top == bottom and left == right and top <= half[0] and left <= half[1]:
            padding = (top, left)
        elif one_sided is not None and not include:
            padding, ceil_mode = one_sided
        elif include or kind == "max" and dilations == [1, 1]:
            # The rest padded explicitly: zeros, counted in a mean; for a max
            # the edge repeated, never a new maximum (every window holds an
            # input pixel, as ONNX Runtime requires pads < kernel, so one that
            # reaches into the padding holds the edge itself).
            x, padding = self._pre_pad(node, x, pads, "constant" if include else "replicate",
                                       limit=half)
        else:
            why = f"dilations {dilations}" if kind == "max" else "count_include_pad=0"
            raise self.unsupported(node, f"pads {pads} with {why}: convcore pools over at most "
                                         f"half the kernel of padding, the same on both sides")
        # Windows start at the same place with either ceil_mode; over explicit
        # padding, the one that gives ONNX Runtime's count gives its windows.
        for ceil in (ceil_mode, not ceil_mode):
            if kind == "max":
                layer = MaxPool2d(kernel, strides, padding, dilations, ceil_mode=ceil)
            else:
                layer = AvgPool2d(kernel, strides, padding, ceil_mode=ceil,
                                  count_include_pad=include)
            try:
                got = list(layer.output_shape(x[1])[1:])
            except ValueError:
                got = None
            if got == want:
                return self.add(node, layer, x)
        raise self.unsupported(node, f"this window gives {want[0]}x{want[1]} outputs in ONNX "
                                     f"Runtime and {got[0]}x{got[1]} in convcore's pooling"
                               if got else f"pads {pads} beyond what convcore's pooling takes")

    def op_MaxPool(self, node):
        self._pool(node, "max")

    def op_AveragePool(self, node):
        self._pool(node, "avg")

    def op_GlobalAveragePool(self, node):
        x = self.dynamic(node)
        self._spatial(node, x)
        self.add(node, AdaptiveAvgPool2d(1), x)

    def op_ReduceMean(self, node):
        x = self.dynamic(node)
        self._spatial(node, x)
        if self.opset >= 18:
            axes = self.optional_const(node, 1, "axes")
            axes = None if axes is None else _ints(axes.reshape(-1))
        else:
            axes = node.attrs.get("axes")
            axes = None if axes is None else _ints(axes)
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            raise self.unsupported(node, f"axes {axes}: convcore computes the mean over H and W "
                                         f"(axes [2, 3])")
        if int(node.attrs.get("keepdims", 1)):
            self.add(node, AdaptiveAvgPool2d(1), x)
        else:
            key = _node_key(node)
            self.add(node, AdaptiveAvgPool2d(1), x, key=key + "_pool")
            self.add(node, Flatten(), self.values[node.outputs[0]], key=key + "_flatten")

    def _linear(self, node, x, weight, bias):
        """A Linear layer of weight (out, in) over a (N, in) value."""
        if len(x[1]) != 1:
            raise self.unsupported(node, f"input of shape {('N',) + x[1]}: convcore computes "
                                         f"{node.op} on (N, features) tensors")
        if weight.ndim != 2 or weight.shape[1] != x[1][0]:
            raise self.fail(node, f"weight of shape {weight.shape} for an input of "
                                  f"{x[1][0]} features")
        layer = Linear(int(weight.shape[1]), int(weight.shape[0]), bias=bias is not None)
        self._set(layer, weight, bias)
        return layer

    def op_Gemm(self, node):
        x = self.dynamic(node)
        b = self.const(node, node.inputs[1], "B")
        c = self.optional_const(node, 2, "C")
        if int(node.attrs.get("transA", 0)):
            raise self.unsupported(node, "transA=1 (the input transposed)")
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        if b.ndim != 2:
            raise self.fail(node, f"B has shape {b.shape}, expected 2-D")
        w = b if int(node.attrs.get("transB", 0)) else b.T
        bias = None
        if c is not None:
            try:
                bias = np.broadcast_to(c, (1, w.shape[0])).reshape(-1) * beta
            except ValueError:
                raise self.unsupported(node, f"C of shape {c.shape}: convcore adds a bias of "
                                             f"shape ({w.shape[0]},)") from None
        self.add(node, self._linear(node, x, w * alpha, bias), x,
                 key=_layer_key(node, node.inputs[1]))

    def op_MatMul(self, node):
        x = self.dynamic(node)
        b = self.const(node, node.inputs[1], "B")
        if b.ndim != 2:
            raise self.unsupported(node, f"B of shape {b.shape}: convcore computes x @ W with a "
                                         f"2-D W")
        self.add(node, self._linear(node, x, b.T, None), x,
                 key=_layer_key(node, node.inputs[1]))

    def op_Flatten(self, node):
        x = self.dynamic(node)
        axis = int(node.attrs.get("axis", 1))
        if axis % (len(x[1]) + 1) != 1:
            raise self.unsupported(node, f"axis={axis}: convcore flattens everything after the "
                                         f"batch (axis=1)")
        self._flatten(node, x)

    def _flatten(self, node, x):
        if len(x[1]) == 1:
            self.alias(node, x)
        else:
            self.add(node, Flatten(), x)

    def op_Reshape(self, node):
        x = self.dynamic(node)
        target = [int(d) for d in self.const(node, node.inputs[1], "shape").reshape(-1)]
        allowzero = int(node.attrs.get("allowzero", 0))
        full = ("N",) + x[1]
        dims = []
        for i, d in enumerate(target):
            if d == _BATCH:
                dims.append("N")
            elif d == 0 and not allowzero and i < len(full):
                dims.append(full[i])
            else:
                dims.append(d)
        numel = int(np.prod(x[1], dtype=np.int64))
        rest = dims[1:]
        if dims and dims[0] in ("N", -1) and "N" not in rest:
            known = int(np.prod([d for d in rest if d != -1], dtype=np.int64))
            if rest.count(-1) == (0 if dims[0] == -1 else 1) and known > 0:
                if rest.count(-1):
                    rest = [numel // known if d == -1 else d for d in rest]
                if tuple(rest) == x[1]:
                    return self.alias(node, x)
                if rest == [numel]:
                    return self._flatten(node, x)
        raise self.unsupported(node, f"reshape of {full} to {target}: convcore reshapes only to "
                                     f"flatten (N, -1)")

    def op_Squeeze(self, node):
        x = self.dynamic(node)
        if self.opset >= 13:
            axes = self.optional_const(node, 1, "axes")
            axes = None if axes is None else _ints(axes.reshape(-1))
        else:
            axes = node.attrs.get("axes")
        if len(x[1]) == 3 and x[1][1:] == (1, 1) and (
                axes is None or sorted(a % 4 for a in axes) == [2, 3]):
            return self.add(node, Flatten(), x)
        raise self.unsupported(node, f"squeeze of {('N',) + x[1]} (axes {axes}): convcore "
                                     f"squeezes only (N, C, 1, 1) to (N, C)")

    def _activation(self, node, layer):
        self.add(node, layer, self.dynamic(node))

    def op_Relu(self, node):
        self._activation(node, ReLU())

    def op_Sigmoid(self, node):
        self._activation(node, Sigmoid())

    def op_HardSwish(self, node):
        self._activation(node, Hardswish())

    def op_HardSigmoid(self, node):
        if not self._is_hardsigmoid(node):
            raise self.unsupported(node, f"alpha={node.attrs.get('alpha', 0.2)}, "
                                         f"beta={node.attrs.get('beta', 0.5)}: convcore computes "
                                         f"PyTorch's Hardsigmoid (alpha=1/6, beta=0.5)")
        self._activation(node, Hardsigmoid())

    def op_Clip(self, node):
        lo = self.optional_const(node, 1, "min")
        hi = self.optional_const(node, 2, "max")
        lo = None if lo is None else float(lo.reshape(-1)[0]) if lo.size == 1 else lo
        hi = None if hi is None else float(hi.reshape(-1)[0]) if hi.size == 1 else hi
        if lo == 0.0 and hi == 6.0:
            return self._activation(node, ReLU6())
        if lo == 0.0 and (hi is None or hi == float("inf")):
            return self._activation(node, ReLU())
        raise self.unsupported(node, f"min={lo}, max={hi}: convcore computes Clip as ReLU "
                                     f"(min 0) or ReLU6 (min 0, max 6)")

    def op_BatchNormalization(self, node):
        x = self.dynamic(node)
        self._spatial(node, x)
        self.check_outputs(node)
        if int(node.attrs.get("training_mode", 0)):
            raise self.unsupported(node, "training_mode=1 (batch statistics)")
        scale, bias, mean, var = (self.const(node, node.inputs[i], n) for i, n in
                                  enumerate(("scale", "B", "input_mean", "input_var"), 1))
        c = x[1][0]
        for a, n in ((scale, "scale"), (bias, "B"), (mean, "input_mean"), (var, "input_var")):
            if a.shape != (c,):
                raise self.fail(node, f"{n} has shape {a.shape}, expected ({c},) for an input "
                                      f"of {c} channels")
        bn = BatchNorm2d(c, eps=float(node.attrs.get("epsilon", 1e-5)),
                         momentum=1.0 - float(node.attrs.get("momentum", 0.9)))
        self._set(bn, scale, bias)
        bn._set_buffer("running_mean", np.array(mean, np.float32))
        bn._set_buffer("running_var", np.array(var, np.float32))
        self.add(node, bn, x, key=_layer_key(node, node.inputs[1]))

    def op_LRN(self, node):
        x = self.dynamic(node)
        self._spatial(node, x)
        self.add(node, LocalResponseNorm(int(node.attrs["size"]),
                                         float(node.attrs.get("alpha", 1e-4)),
                                         float(node.attrs.get("beta", 0.75)),
                                         float(node.attrs.get("bias", 1.0))), x)

    def op_Dropout(self, node):
        self.check_outputs(node)
        if self.opset >= 12 and len(node.inputs) > 2 and node.inputs[2]:
            mode = self.const(node, node.inputs[2], "training_mode")
            if bool(mode.reshape(-1)[0]):
                raise self.unsupported(node, "training_mode=True")
        ratio = self.optional_const(node, 1, "ratio")
        p = float(node.attrs.get("ratio", 0.5)) if ratio is None else float(ratio.reshape(-1)[0])
        # a Dropout module (not an alias) so that a fine-tuned model drops as the original
        self.add(node, Dropout(p), self.dynamic(node))

    def op_Identity(self, node):
        self.alias(node, self.dynamic(node))

    def op_Softmax(self, node):
        """A softmax over one dimension other than the batch. From opset 13
        `axis` (default -1) is that dimension; before, the input is coerced
        to 2-D at `axis` (default 1) and normalised over all dimensions from
        axis on together, which is one dimension when those after it are 1s
        (always for the last axis, as in (N, classes) logits)."""
        x = self.dynamic(node)
        shape = ("N",) + tuple(x[1])
        rank = len(shape)
        axis = int(node.attrs.get("axis", -1 if self.opset >= 13 else 1))
        if not -rank <= axis < rank:
            raise self.fail(node, f"axis={axis} is out of range for a {rank}-D input")
        axis %= rank
        if axis == 0:
            raise self.unsupported(node, "axis=0: convcore's runtime computes each sample on its "
                                         "own, so a softmax over the batch is not supported")
        if self.opset < 13 and any(d != 1 for d in shape[axis + 1:]):
            raise self.unsupported(node, f"axis={axis} on an input of shape {shape} at opset "
                                         f"{self.opset}: it normalises over dimensions "
                                         f"{axis}..{rank - 1} together; convcore's softmax "
                                         f"takes one dimension")
        self.add(node, Softmax(axis), x)

    def op_Concat(self, node):
        axis = int(node.attrs["axis"]) if "axis" in node.attrs else None
        values = [self.dynamic(node, i) for i in range(len(node.inputs))]
        rank = len(values[0][1]) + 1
        if axis is None or axis % rank != 1:
            raise self.unsupported(node, f"axis={axis}: convcore concatenates along the "
                                         f"channels (axis=1)")
        self.join(node, "concat", values)

    def op_Sum(self, node):
        values = [self.dynamic(node, i) for i in range(len(node.inputs))]
        if len(values) == 1:
            return self.alias(node, values[0])
        self.join(node, "add", values)

    def op_Add(self, node):
        self._binary(node, "add")

    def op_Sub(self, node):
        self._binary(node, "sub")

    def op_Mul(self, node):
        if id(node) in self.fused["mul"]:
            kind, i = self.fused["mul"][id(node)]
            return self.add(node, kind(), self.dynamic(node, i))
        self._binary(node, "mul")

    def op_Div(self, node):
        self._binary(node, "div")

    def _binary(self, node, op):
        if len(node.inputs) != 2:
            raise self.fail(node, f"takes 2 inputs, got {len(node.inputs)}")
        a, b = node.inputs
        if a in self.values and b in self.values:
            if op not in ("add", "mul"):
                raise self.unsupported(node, f"{node.op} of two computed tensors (convcore "
                                             f"joins them by add and mul)")
            return self.join(node, op, [self.values[a], self.values[b]])
        if a in self.values:
            x, c, first = self.values[a], self.const(node, b, "input 1"), False
        else:
            x, c, first = self.dynamic(node, 1), self.const(node, a, "input 0"), True
        c = np.asarray(c, np.float64)
        # x op c as x * scale + shift
        if op == "add":
            scale, shift = 1.0, c
        elif op == "mul":
            scale, shift = c, 0.0
        elif op == "sub":
            scale, shift = (-1.0, c) if first else (1.0, -c)
        elif not first:  # div by a constant
            scale, shift = 1.0 / c, 0.0
        else:
            raise self.unsupported(node, "a constant divided by a computed tensor")
        self._affine(node, x, scale, shift)

    def _affine(self, node, x, scale, shift):
        """x * scale + shift with per-channel (or scalar) constants: folded
        into the bias of the layer before when that is only an addition to a
        Conv or Linear whose output has no other use; else a depthwise 1x1
        Conv2d whose weight and bias are the constants."""
        rank = len(x[1]) + 1
        c = x[1][0]
        channel = (c,) + (1,) * (rank - 2)
        try:
            scale = np.broadcast_to(np.asarray(scale, np.float64), (1,) + channel) \
                if np.ndim(scale) <= rank else None
            shift = np.broadcast_to(np.asarray(shift, np.float64), (1,) + channel) \
                if np.ndim(shift) <= rank else None
        except ValueError:
            scale = shift = None
        if scale is None or shift is None:
            raise self.unsupported(node, f"a constant that is not per channel, for an input of "
                                         f"shape {('N',) + x[1]}")
        scale, shift = scale.reshape(-1), shift.reshape(-1)
        key = self.producer.get(x[0])
        layer = self.modules.get(key)
        if (scale == 1.0).all() and isinstance(layer, (Conv2d, Linear)) and \
                self._uses(x[0]) == 1:
            out = layer.weight.shape[0]
            old = np.zeros(out) if layer.bias is None else layer.bias.data.astype(np.float64)
            layer.bias = Parameter((old + shift).astype(np.float32))
            return self.alias(node, x)
        if rank != 4:
            raise self.unsupported(node, f"{node.op} by a constant on {('N',) + x[1]} after "
                                         f"something other than a Linear layer")
        conv = Conv2d(c, c, 1, groups=c, bias=True)
        self._set(conv, scale.reshape(c, 1, 1, 1), shift)
        self.add(node, conv, x)

    def _uses(self, value: str) -> int:
        """How many nodes (and graph outputs) take a convcore value, under
        any of the ONNX names that alias it."""
        return sum(self.consumers.get(k, 0) for k, v in self.values.items() if v[0] == value)

    def op_Pad(self, node):
        x = self.dynamic(node)
        self._spatial(node, x)
        mode = _text(node.attrs.get("mode", "constant"))
        pads = _ints(self.const(node, node.inputs[1], "pads").reshape(-1))
        value = self.optional_const(node, 2, "constant_value")
        axes = self.optional_const(node, 3, "axes") if self.opset >= 18 else None
        if axes is not None:
            full = [0] * 8
            axes = [int(a) % 4 for a in axes.reshape(-1)]
            if len(pads) != 2 * len(axes):
                raise self.fail(node, f"pads {pads} must hold 2 values per axis {axes}")
            for i, a in enumerate(axes):
                full[a], full[4 + a] = pads[i], pads[len(axes) + i]
            pads = full
        if len(pads) != 8:
            raise self.fail(node, f"pads {pads} must hold 8 values for a 4-D input")
        if any(pads[i] for i in (0, 1, 4, 5)):
            raise self.unsupported(node, f"pads {pads}: convcore pads H and W only")
        if min(pads) < 0:
            raise self.unsupported(node, f"negative pads {pads} (cropping)")
        if mode not in ("constant", "reflect", "edge"):
            raise self.unsupported(node, f"mode {mode!r} (convcore pads constant, reflect, edge)")
        if mode == "constant" and value is not None and value.size and \
                float(value.reshape(-1)[0]) != 0.0:
            raise self.unsupported(node, f"constant_value {float(value.reshape(-1)[0])} "
                                         f"(convcore pads with zeros)")
        top, left, bottom, right = pads[2], pads[3], pads[6], pads[7]
        h, w = x[1][1:]
        if max(top, bottom) > h or max(left, right) > w:
            raise self.unsupported(node, f"pads {pads} wider than the input {x[1][1:]} "
                                         f"(convcore pads at most the input's size per side)")
        self.add(node, Pad2d(x[1][0], [left, right, top, bottom],
                             "replicate" if mode == "edge" else mode), x)


def _node_key(node: _Node) -> str:
    """A module name from the node's: torch.onnx names nodes by module scope,
    each scope the child's name within the one before, refined step by step
    ('/features/features.1/block/block.0/Conv'); PyTorch's module path
    ('features.1.block.0') joins the last refinement of each child."""
    if not node.name.startswith("/"):
        return node.name
    parts = node.name.strip("/").split("/")
    path: List[str] = []
    for scope in parts[:-1]:
        if path and scope.startswith(path[-1] + "."):
            path[-1] = scope
        else:
            path.append(scope)
    return ".".join(path) or parts[-1]


def _pool_size(size, k, s, d, head, tail, ceil_mode) -> int:
    """Windows of a pooling along one axis, as ONNX Runtime counts them: with
    ceil_mode, a last window that would start past the input and the head
    padding is dropped (PyTorch's rule)."""
    span = size + head + tail - (d * (k - 1) + 1)
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + head:
        out -= 1
    return out


def _one_sided_pool_pad(shape, kernel, strides, dilations, pads, want):
    """Pooling that ignores its padding (max, or average without the pad in
    the count) with more padding at the end than at the start (as
    TensorFlow's 'SAME'): windows start at -top either way, so the symmetric
    padding (top, left) with or without ceil_mode gives the same windows when
    it gives as many. ((top, left), ceil_mode), or None where neither does."""
    top, left, bottom, right = pads
    if top > bottom or left > right:
        return None
    for ceil in (False, True):
        try:
            got = MaxPool2d(kernel, strides, (top, left), dilations,
                            ceil_mode=ceil).output_shape(shape)[1:]
        except ValueError:  # padding over half the kernel
            return None
        if list(got) == want:
            return (top, left), ceil
    return None


def _layer_key(node: _Node, weight_name: str) -> str:
    """The module name: PyTorch's module path when the weight's initializer
    is named after it ('features.0.weight' -> 'features_0'), else the node's."""
    if weight_name.endswith(".weight") and len(weight_name) > 7:
        return weight_name[:-7]
    return _node_key(node)


def _parse(path_or_bytes):
    """The ModelProto and a name for messages."""
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, source = bytes(path_or_bytes), "<bytes>"
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        source = os.fspath(path_or_bytes)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"cannot read ONNX file {source!r}: {e.strerror or e}") from None
    else:
        raise TypeError(f"path_or_bytes must be a path or bytes, got "
                        f"{type(path_or_bytes).__name__}")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: not an ONNX model ({type(e).__name__}: {e})") from None
    if not model.HasField("graph"):
        raise ValueError(f"{source}: not an ONNX model (no graph)")
    for t in model.graph.initializer:
        if t.data_location == 1:  # EXTERNAL
            raise NotImplementedError(f"{source}: initializer {t.name!r} is stored in an "
                                      f"external data file; convcore reads self-contained files")
    return model, source


def load(path_or_bytes, input_shape: Optional[Sequence[int]] = None) -> Graph:
    """The convcore Graph computing an ONNX model (a path or the file's
    bytes): its initializers become the layers' parameters and buffers.

    input_shape: one sample's (C, H, W) when the file leaves H and W
    dynamic. Raises ValueError for a malformed file and
    NotImplementedError for an op or attribute convcore does not compute,
    naming the node, its op type and the file."""
    model, source = _parse(path_or_bytes)
    importer = _Importer(model, source, input_shape)
    try:
        return importer.run()
    except (ValueError, NotImplementedError):
        raise
    except (KeyError, IndexError, TypeError, AttributeError, OverflowError) as e:
        # a malformed node the checks above did not anticipate
        raise ValueError(f"{source}: malformed model ({type(e).__name__}: {e})") from None
