"""convcore modules to ONNX files: `export(model, path, input_shape)`.

The exporter writes the network graph of docs/format.md (what `model.save`
stores and the C++ runtime runs), node by node, so any module tree that
saves exports: each graph op has one ONNX rule below, and the tensors are
the model's state dict under its PyTorch names. The batch dimension is
dynamic ("N"); the sample shape is fixed by input_shape.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..functional import conv2d_output_shape, pool2d_output_shape
from ..nn.graph import join_shape
from ..nn.lowering import fresh_name, to_graph

__all__ = ["export"]

_OPSETS = (11, 21)


def _pair(v):
    return [int(v), int(v)] if isinstance(v, (int, np.integer)) else [int(i) for i in v]


class _Exporter:
    def __init__(self, model, input_shape, opset: int):
        from onnx import helper

        self.helper = helper
        self.opset = opset
        self.state = {k: np.asarray(v) for k, v in model.state_dict().items()}
        self.graph = to_graph(model)
        self.nodes = []
        self.initializers: Dict[str, np.ndarray] = {}
        self.shapes = {"x": tuple(int(d) for d in input_shape)}
        self.names = set(self.state) | {"x"}
        self.name = self.graph.get("name") or type(model).__name__

    def fresh(self, base: str) -> str:
        return fresh_name(base, self.names)

    def tensor(self, key: str, node: dict, required: bool = True) -> Optional[str]:
        """The state-dict tensor `<node name>.<key>` as an initializer."""
        name = f"{node['name']}.{key}" if node.get("name") else key
        if name not in self.state:
            if required:
                raise ValueError(f"the model has no tensor {name!r}")
            return None
        self.initializers[name] = self.state[name].astype(np.float32)
        return name

    def constant(self, base: str, value) -> str:
        name = self.fresh(base)
        self.initializers[name] = np.asarray(value)
        return name

    def emit(self, op: str, inputs: List[str], output: str, name: str, **attrs):
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=self.fresh(name),
                                                **attrs))
        return output

    # -- the walk ------------------------------------------------------------------------
    def run(self):
        from onnx import TensorProto, helper, numpy_helper

        for node in self.graph["nodes"]:
            op = node["op"]
            rule = getattr(self, "op_" + op, None)
            if rule is None:
                raise NotImplementedError(f"node {node.get('name')!r}: graph op {op!r} has no "
                                          f"ONNX rule")
            ins = node["inputs"]
            out = node["outputs"][0]
            self.names.add(out)
            try:
                rule(node, node.get("attrs", {}) or {}, ins, out)
            except ValueError as e:
                raise ValueError(f"node {node.get('name') or out!r} ({op}): {e}") from None
        outputs = self.graph["outputs"]
        inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"] + list(self.shapes["x"]))
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N"] + list(self.shapes[o]))
                for o in outputs]
        inits = [numpy_helper.from_array(a, name) for name, a in self.initializers.items()]
        graph = helper.make_graph(self.nodes, self.name, [inp], outs, inits)
        model = helper.make_model(graph, producer_name="convcore",
                                  opset_imports=[helper.make_opsetid("", self.opset)])
        # the oldest IR version of the opset, so that older runtimes read the file
        model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
        if self.shapes["x"]:
            model.metadata_props.add(key="convcore_input_shape",
                                     value=" ".join(str(d) for d in self.shapes["x"]))
        return model

    # -- rules: one per graph op ------------------------------------------------------------
    def op_Conv2d(self, node, a, ins, out):
        x = ins[0]
        c, h, w = self.shapes[x]
        kernel, stride = _pair(a["kernel_size"]), _pair(a.get("stride", 1))
        dilation, groups = _pair(a.get("dilation", 1)), int(a.get("groups", 1))
        padding = a.get("padding", 0)
        if padding == "valid":
            pads = [0, 0, 0, 0]
        elif padding == "same":  # the extra pixel of an even kernel at the end, as PyTorch
            th, tw = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = [th // 2, tw // 2, th - th // 2, tw - tw // 2]
        else:
            ph, pw = _pair(padding)
            pads = [ph, pw, ph, pw]
        mode = a.get("padding_mode", "zeros")
        if mode != "zeros" and any(pads):  # a Pad in that mode, then the Conv unpadded
            onnx_mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode]
            if onnx_mode == "wrap" and self.opset < 19:
                raise NotImplementedError(f"padding_mode='circular' needs opset 19 or later "
                                          f"(Pad mode 'wrap'), got opset {self.opset}")
            top, left, bottom, right = pads
            p = self.constant(f"{out}_pads", np.array([0, 0, top, left, 0, 0, bottom, right],
                                                      np.int64))
            x = self.emit("Pad", [x, p], self.fresh(f"{out}_padded"), f"{out}_pad",
                          mode=onnx_mode)
            h, w = h + top + bottom, w + left + right
            pads, padding = [0, 0, 0, 0], 0
        weight = self.tensor("weight", node)
        inputs = [x, weight]
        if a.get("bias", True):
            inputs.append(self.tensor("bias", node))
        self.emit("Conv", inputs, out, node.get("name") or out, kernel_shape=kernel,
                  strides=stride, pads=pads, dilations=dilation, group=groups)
        shape = conv2d_output_shape((1, c, h, w), self.state[weight].shape, stride, padding,
                                    dilation, groups)
        self.shapes[out] = tuple(shape[1:])

    def op_Linear(self, node, a, ins, out):
        x = ins[0]
        weight = self.tensor("weight", node)
        if not self.shapes[x] or self.shapes[x][-1] != self.state[weight].shape[1]:
            raise ValueError(f"Linear takes {self.state[weight].shape[1]} features, but the "
                             f"input shape gives a value of shape {('N',) + self.shapes[x]}")
        bias = self.tensor("bias", node) if a.get("bias", True) else None
        name = node.get("name") or out
        if len(self.shapes[x]) == 1:
            self.emit("Gemm", [x, weight] + ([bias] if bias else []), out, name, transB=1)
        else:  # any leading dimensions: x @ W^T (+ b)
            wt = self.constant(f"{weight}_T", self.state[weight].astype(np.float32).T.copy())
            mm = self.emit("MatMul", [x, wt], self.fresh(f"{out}_matmul") if bias else out, name)
            if bias:
                self.emit("Add", [mm, bias], out, f"{name}_bias")
        self.shapes[out] = self.shapes[x][:-1] + (int(self.state[weight].shape[0]),)

    def op_BatchNorm2d(self, node, a, ins, out):
        x = ins[0]
        c = self.shapes[x][0]
        if not a.get("track_running_stats", True):
            raise NotImplementedError("BatchNorm2d without running statistics normalises with "
                                      "the batch's statistics, which ONNX inference does not")
        scale = self.tensor("weight", node, required=False) or \
            self.constant(f"{out}_scale", np.ones(c, np.float32))
        bias = self.tensor("bias", node, required=False) or \
            self.constant(f"{out}_bias", np.zeros(c, np.float32))
        mean, var = self.tensor("running_mean", node), self.tensor("running_var", node)
        self.emit("BatchNormalization", [x, scale, bias, mean, var], out,
                  node.get("name") or out, epsilon=float(a.get("eps", 1e-5)))
        self.shapes[out] = self.shapes[x]

    def _pool(self, node, a, ins, out, kind):
        x = ins[0]
        c, h, w = self.shapes[x]
        kernel = _pair(a["kernel_size"])
        stride = kernel if a.get("stride") is None else _pair(a["stride"])
        ph, pw = _pair(a.get("padding", 0))
        ceil_mode = bool(a.get("ceil_mode", False))
        attrs = dict(kernel_shape=kernel, strides=stride, pads=[ph, pw, ph, pw],
                     ceil_mode=int(ceil_mode))
        if kind == "max":
            dilation = _pair(a.get("dilation", 1))
            attrs["dilations"] = dilation
            self.emit("MaxPool", [x], out, node.get("name") or out, **attrs)
        else:
            dilation = [1, 1]
            if a.get("divisor_override") is not None:
                raise NotImplementedError("AvgPool2d's divisor_override has no ONNX form")
            self.emit("AveragePool", [x], out, node.get("name") or out,
                      count_include_pad=int(a.get("count_include_pad", True)), **attrs)
        shape = pool2d_output_shape((1, c, h, w), kernel, stride, (ph, pw), dilation,
                                    ceil_mode, kind)
        self.shapes[out] = tuple(shape[1:])

    def op_MaxPool2d(self, node, a, ins, out):
        self._pool(node, a, ins, out, "max")

    def op_AvgPool2d(self, node, a, ins, out):
        self._pool(node, a, ins, out, "avg")

    def op_AdaptiveAvgPool2d(self, node, a, ins, out):
        x = ins[0]
        c, h, w = self.shapes[x]
        size = a["output_size"]
        if not isinstance(size, (list, tuple)):
            size = [size, size]
        # None keeps that dimension's size
        oh, ow = (d if v is None else int(v) for v, d in zip(size, (h, w)))
        name = node.get("name") or out
        if (oh, ow) == (1, 1):
            self.emit("GlobalAveragePool", [x], out, name)
        elif (oh, ow) == (h, w):
            self.emit("Identity", [x], out, name)
        elif h % oh == 0 and w % ow == 0:  # equal windows: a plain average pooling
            k = [h // oh, w // ow]
            self.emit("AveragePool", [x], out, name, kernel_shape=k, strides=k)
        else:
            raise NotImplementedError(f"adaptive average pooling of {h}x{w} to {oh}x{ow} has "
                                      f"unequal windows, which no ONNX op computes")
        self.shapes[out] = (c, oh, ow)

    def _unary(self, op, ins, out, node, **attrs):
        self.emit(op, [ins[0]], out, node.get("name") or out, **attrs)
        self.shapes[out] = self.shapes[ins[0]]

    def op_ReLU(self, node, a, ins, out):
        self._unary("Relu", ins, out, node)

    def op_Sigmoid(self, node, a, ins, out):
        self._unary("Sigmoid", ins, out, node)

    def op_ReLU6(self, node, a, ins, out):
        lo = self.constant(f"{out}_min", np.array(0.0, np.float32))
        hi = self.constant(f"{out}_max", np.array(6.0, np.float32))
        self.emit("Clip", [ins[0], lo, hi], out, node.get("name") or out)
        self.shapes[out] = self.shapes[ins[0]]

    def op_SiLU(self, node, a, ins, out):
        s = self.emit("Sigmoid", [ins[0]], self.fresh(f"{out}_sigmoid"), f"{out}_sigmoid")
        self.emit("Mul", [ins[0], s], out, node.get("name") or out)
        self.shapes[out] = self.shapes[ins[0]]

    def op_Hardsigmoid(self, node, a, ins, out):
        self._unary("HardSigmoid", ins, out, node, alpha=1.0 / 6, beta=0.5)

    def op_Hardswish(self, node, a, ins, out):
        if self.opset >= 14:
            return self._unary("HardSwish", ins, out, node)
        s = self.emit("HardSigmoid", [ins[0]], self.fresh(f"{out}_hardsigmoid"),
                      f"{out}_hardsigmoid", alpha=1.0 / 6, beta=0.5)
        self.emit("Mul", [ins[0], s], out, node.get("name") or out)
        self.shapes[out] = self.shapes[ins[0]]

    def op_LocalResponseNorm(self, node, a, ins, out):
        self._unary("LRN", ins, out, node, size=int(a["size"]), alpha=float(a.get("alpha", 1e-4)),
                    beta=float(a.get("beta", 0.75)), bias=float(a.get("k", 1.0)))

    def op_Flatten(self, node, a, ins, out):
        x = ins[0]
        rank = len(self.shapes[x]) + 1
        start, end = int(a.get("start_dim", 1)) % rank, int(a.get("end_dim", -1)) % rank
        shape = ("N",) + self.shapes[x]
        new = shape[:start] + (int(np.prod(shape[start:end + 1])) if start > 0 else -1,) + \
            shape[end + 1:]
        if start == 0:
            raise NotImplementedError("Flatten over the batch dimension (start_dim=0)")
        if end == rank - 1:
            self.emit("Flatten", [x], out, node.get("name") or out, axis=start)
        else:
            target = self.constant(f"{out}_shape", np.array([0] + list(new[1:]), np.int64))
            self.emit("Reshape", [x, target], out, node.get("name") or out)
        self.shapes[out] = tuple(new[1:])

    def op_Softmax(self, node, a, ins, out):
        x = ins[0]
        shape = ("N",) + self.shapes[x]
        rank, dim = len(shape), int(a["dim"])
        if not -rank <= dim < rank:
            raise ValueError(f"Softmax: dim={dim} is out of range for a {rank}-D input")
        dim %= rank
        if dim == 0:
            raise NotImplementedError("Softmax over the batch dimension (dim=0)")
        # before opset 13, ONNX's Softmax normalises over all dims from axis on together
        if self.opset < 13 and any(d != 1 for d in shape[dim + 1:]):
            raise NotImplementedError(f"Softmax over dim {dim} of an input of shape {shape} at "
                                      f"opset {self.opset} (before 13, ONNX's Softmax "
                                      f"normalises over every dimension from axis on); export "
                                      f"with opset >= 13")
        self._unary("Softmax", ins, out, node, axis=dim)

    def _identity(self, node, a, ins, out):
        self._unary("Identity", ins, out, node)

    op_Dropout = op_StochasticDepth = op_Identity = _identity

    def _join(self, op, ins, out, node, kind):
        self.shapes[out] = join_shape(out, kind, [self.shapes[v] for v in ins])
        self.emit(op, list(ins), out, node.get("name") or out, **(
            {"axis": 1} if op == "Concat" else {}))

    def op_add(self, node, a, ins, out):
        self._join("Add" if len(ins) == 2 else "Sum", ins, out, node, "add")

    def op_mul(self, node, a, ins, out):
        self._join("Mul", ins, out, node, "mul")

    def op_concat(self, node, a, ins, out):
        self._join("Concat", ins, out, node, "concat")


def export(model, path, input_shape: Optional[Sequence[int]] = None, opset: int = 17):
    """Writes `model` (any convcore module tree that `model.save` can write)
    as an ONNX file at `path` for inputs of one sample's shape input_shape
    ((C, H, W) or (features,); default: the model's own input_shape), with
    a dynamic batch dimension. Returns the onnx.ModelProto. The model runs
    as in eval mode (batch norm with its running statistics, no dropout)."""
    import onnx

    if not isinstance(opset, (int, np.integer)) or not _OPSETS[0] <= opset <= _OPSETS[1]:
        raise ValueError(f"opset must be an int in {_OPSETS[0]}..{_OPSETS[1]}, got {opset!r}")
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError("input_shape is required: the model declares none (pass one "
                             "sample's shape, e.g. (3, 224, 224))")
    input_shape = tuple(input_shape)
    if not input_shape or any(not isinstance(d, (int, np.integer)) or d < 1
                              for d in input_shape):
        raise ValueError(f"input_shape must be positive ints, e.g. (3, 224, 224), got "
                         f"{input_shape!r}")
    proto = _Exporter(model, input_shape, int(opset)).run()
    onnx.checker.check_model(proto)
    if path is not None:
        data = proto.SerializeToString()
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.fspath(path))
    return proto
