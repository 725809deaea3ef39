"""Graph: a block whose layers do not form a plain chain.

A Graph holds named child modules (their names give the state-dict keys, as
torchvision's attributes do) and a list of nodes, one line each, in the
order they run::

    Graph({"branch1": ..., "branch2": ..., "branch3": ..., "branch4": ...}, [
        "b1 = branch1(x)",
        "b2 = branch2(x)",
        "b3 = branch3(x)",
        "b4 = branch4(x)",
        "out = concat(b1, b2, b3, b4)",      # Inception: join along channels
    ])

`x` is the graph's input; each node names its value, the operation and the
values it takes. An operation is a child module (called once: each module
keeps what its backward needs) or one of the joins

    concat(a, b, ...)   along channels (dim 1)           Inception, DenseNet
    add(a, b, ...)      element-wise sum                 residual connections
    mul(a, b)           product with broadcasting,       squeeze-and-excitation
                        (N, C, H, W) * (N, C, 1, 1)
    relu(a)             ReLU as a function (torchvision's blocks call F.relu
                        and reuse one ReLU module; a function needs no name)

The last node is the output, unless `outputs` lists several (GoogLeNet's
auxiliary classifiers): then forward returns a tuple of them while training
and only the first in eval mode, computing only the nodes that one needs.
The same lines are stored in the saved architecture, so `convcore.load` and
the C++ runner rebuild the graph from the file.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import functional as F
from .._backends import backend_of
from .lowering import cannot_lower, join
from .module import Module, is_grad_enabled, kept, saved

JOINS = ("concat", "add", "mul", "relu")


def _sum(a, b):
    """a + b into a new array: F.add's (a block of the core's cache when
    large) where the shapes and dtypes agree, else numpy's broadcasting sum."""
    if a.shape == b.shape and a.dtype == b.dtype:
        return F.add(a, b)
    return a + b


_NODE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(\s*"
                   r"([A-Za-z_][A-Za-z0-9_]*(?:\s*,\s*[A-Za-z_][A-Za-z0-9_]*)*)\s*\)\s*$")


def parse_node(line: str) -> Tuple[str, str, List[str]]:
    """'out = concat(b1, b2)' -> ('out', 'concat', ['b1', 'b2'])."""
    if not isinstance(line, str):
        raise TypeError(f"a graph node must be a string 'name = op(inputs)', got {line!r}")
    m = _NODE.match(line)
    if not m:
        raise ValueError(f"bad graph node {line!r}: expected 'name = op(input, ...)', e.g. "
                         f"'out = concat(b1, b2)'")
    return m.group(1), m.group(2), [s.strip() for s in m.group(3).split(",")]


def join_shape(out: str, op: str, shapes: List[tuple]) -> tuple:
    """One sample's shape after a join (relu, concat, add, mul) of `shapes`."""
    if op == "relu":
        return shapes[0]
    if op == "concat":
        rest = {s[1:] for s in shapes}
        if len(rest) != 1 or any(len(s) < 1 for s in shapes):
            raise ValueError(f"graph node {out!r}: concat needs inputs that differ only in "
                             f"channels, got {shapes}")
        return (sum(s[0] for s in shapes),) + shapes[0][1:]
    if len({len(s) for s in shapes}) != 1:
        raise ValueError(f"graph node {out!r}: {op} needs inputs of one rank, got {shapes}")
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(f"graph node {out!r}: {op} needs inputs of broadcastable shapes, "
                         f"got {shapes}") from None


class Graph(Module):
    """Named child modules and the nodes that wire them (see the module
    docstring). name and input_shape are optional labels kept in the saved
    architecture (the zoo sets them)."""

    # convcore.load rebuilds the children from the saved tree (like Sequential)
    # and passes them to the constructor with the config.
    children_from_tree = True

    def __init__(self, modules=None, nodes: Sequence[str] = (), outputs: Optional[Sequence[str]]
                 = None, name: Optional[str] = None, input_shape: Optional[Sequence[int]] = None):
        super().__init__()
        modules = OrderedDict() if modules is None else modules
        if not isinstance(modules, dict):
            raise TypeError(f"modules must be a dict of name -> Module, got "
                            f"{type(modules).__name__}")
        for key, m in modules.items():
            if not isinstance(m, Module):
                raise TypeError(f"modules[{key!r}] must be a Module, got {type(m).__name__}")
            if key in JOINS or key == "x" or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"bad module name {key!r} (an identifier, not x or a join: "
                                 f"{', '.join(JOINS)})")
            # a child named like an attribute or method would be overwritten by it
            if key in ("nodes", "outputs", "name", "input_shape") or hasattr(Graph, key):
                raise ValueError(f"bad module name {key!r}: Graph has an attribute of that name")
            setattr(self, key, m)
        self.name = name
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.nodes = [parse_node(line) for line in nodes]
        if not self.nodes:
            raise ValueError("a graph needs at least one node")
        defined, used = {"x"}, set()
        for out, op, inputs in self.nodes:
            for v in inputs:
                if v not in defined:
                    raise ValueError(f"graph node {out!r} takes {v!r}, which no earlier node "
                                     f"defines")
            if out in defined:
                raise ValueError(f"graph value {out!r} is defined twice")
            if op in self._modules:
                if op in used:
                    raise ValueError(f"module {op!r} is called twice (give each call its own "
                                     f"module)")
                if len(inputs) != 1:
                    raise ValueError(f"graph node {out!r}: module {op!r} takes one input, got "
                                     f"{len(inputs)}")
                used.add(op)
            elif op not in JOINS:
                raise ValueError(f"graph node {out!r}: {op!r} is neither a child module "
                                 f"({', '.join(self._modules) or 'none'}) nor a join "
                                 f"({', '.join(JOINS)})")
            elif op == "relu" and len(inputs) != 1 or op == "mul" and len(inputs) != 2:
                raise ValueError(f"graph node {out!r}: {op} takes "
                                 f"{'one input' if op == 'relu' else 'two inputs'}, got "
                                 f"{len(inputs)}")
            defined.add(out)
        unused = [k for k in self._modules if k not in used]
        if unused:
            raise ValueError(f"modules {unused} are not called by any graph node")
        self.outputs = [self.nodes[-1][0]] if outputs is None else [str(o) for o in outputs]
        for o in self.outputs:
            if o not in defined:
                raise ValueError(f"graph output {o!r} is not a node")
        self._cache = None

    @classmethod
    def chain(cls, modules, name: Optional[str] = None, input_shape=None) -> "Graph":
        """A graph of modules applied in order (a named top level)."""
        nodes, prev = [], "x"
        for key in modules:
            nodes.append(f"{key}_out = {key}({prev})")
            prev = f"{key}_out"
        return cls(modules, nodes, name=name, input_shape=input_shape)

    # -- computation -------------------------------------------------------------
    def _needed(self, outputs) -> List[bool]:
        """Which nodes the given outputs depend on."""
        want = set(outputs)
        needed = [False] * len(self.nodes)
        for i in range(len(self.nodes) - 1, -1, -1):
            out, _, inputs = self.nodes[i]
            if out in want:
                needed[i] = True
                want.update(inputs)
        return needed

    def _outputs_now(self) -> List[str]:
        return self.outputs if self.training else self.outputs[:1]

    def _last_reads(self, needed, outputs) -> Dict[str, int]:
        """The index of the last needed node that reads each value (outputs:
        past the end)."""
        last = {}
        for i, ((_, _, inputs), need) in enumerate(zip(self.nodes, needed)):
            if need:
                last.update((v, i) for v in inputs)
        last.update((o, len(self.nodes)) for o in outputs)
        return last

    def forward(self, x):
        values: Dict[str, np.ndarray] = {"x": x}
        outputs = self._outputs_now()
        needed = self._needed(outputs)
        # Under no_grad a value goes as soon as its last reader has run.
        last_reads = None if is_grad_enabled() else self._last_reads(needed, outputs)
        for i, ((out, op, inputs), need) in enumerate(zip(self.nodes, needed)):
            if not need:
                continue
            args = [values[v] for v in inputs]
            if last_reads is not None:
                for v in inputs:
                    if last_reads[v] == i:
                        values.pop(v, None)
            if op in self._modules:
                values[out] = self._modules[op](args[0])
            elif op == "concat":
                values[out] = F.cat(args, 1)
            elif op == "add":
                y = _sum(args[0], args[1])
                for a in args[2:]:
                    y += a
                values[out] = y
            elif op == "mul":
                values[out] = F.mul(args[0], args[1])
            else:  # relu
                values[out] = F.relu(args[0])
        # Backward needs the joins' inputs (mul, relu) and the concat sizes.
        self._cache = kept((values, needed, outputs))
        if len(outputs) > 1:
            return tuple(values[o] for o in outputs)
        return values[outputs[0]]

    def lower_outputs(self, g, x, prefix):
        """Every node in order (as training runs them; nodes that only the
        auxiliary outputs need hold tensors too), and the values of all the
        outputs, the inference one first."""
        if type(self).lower is not Graph.lower:  # a subclass's own lowering wins
            return [self.lower(g, x, prefix)]
        return self._lower_nodes(g, x, prefix)

    def lower(self, g, x, prefix):
        # nested, a graph gives its inference output (eval mode's forward)
        return self._lower_nodes(g, x, prefix)[0]

    def _lower_nodes(self, g, x, prefix):
        if type(self).forward is not Graph.forward:
            raise cannot_lower(self, prefix, "it overrides Graph's forward, so it needs its own "
                                             "`lower` method")
        values = {"x": x}
        for out, op, inputs in self.nodes:
            args = [values[v] for v in inputs]
            if op in self._modules:
                values[out] = self._modules[op].lower(g, args[0], join(prefix, op))
            elif op == "relu":  # F.relu: the ReLU layer without a module
                values[out] = g.node("ReLU", args, value=join(prefix, "relu"))
            else:  # concat, add, mul: the format's joins of the same names
                values[out] = g.node(op, args, value=join(prefix, op))
        return [values[o] for o in self.outputs]

    def backward(self, grad_output):
        values, needed, outputs = saved(self._cache, self)
        if len(outputs) > 1:
            if not isinstance(grad_output, (tuple, list)) or len(grad_output) != len(outputs):
                raise ValueError(f"this graph has {len(outputs)} outputs {outputs}; backward "
                                 f"takes a tuple of as many gradients (None for an unused one)")
            grads = {o: g for o, g in zip(outputs, grad_output) if g is not None}
        else:
            grads = {outputs[0]: grad_output}

        def accumulate(name, g):
            if g is None:  # a module that skips its input's gradient (set_input_grad)
                return
            grads[name] = g if name not in grads else _sum(grads[name], g)

        for (out, op, inputs), need in zip(reversed(self.nodes), reversed(needed)):
            g = grads.pop(out, None)
            if not need or g is None:
                continue
            if op in self._modules:
                accumulate(inputs[0], self._modules[op].backward(g))
            elif op == "concat":
                start = 0
                for v in inputs:
                    c = values[v].shape[1]
                    accumulate(v, g[:, start:start + c])
                    start += c
            elif op == "add":
                for v in inputs:
                    accumulate(v, F.sum_to_size(g, values[v].shape))
            elif op == "mul":
                grad_a, grad_b = F.mul_backward(g, values[inputs[0]], values[inputs[1]])
                accumulate(inputs[0], grad_a)
                accumulate(inputs[1], grad_b)
            else:  # relu
                xp = backend_of(g).xp  # numpy, or cupy on the GPU
                accumulate(inputs[0], F.relu_backward(xp.ascontiguousarray(g), values[inputs[0]]))
        g = grads.get("x")
        if g is None and self.input_grad:
            return backend_of(values["x"]).xp.zeros_like(values["x"])
        return g

    def input_layers(self):
        readers = [op for _, op, inputs in self.nodes if "x" in inputs]
        if len(readers) == 1 and readers[0] in self._modules:
            return [self._modules[readers[0]]]
        return []

    # -- shapes ---------------------------------------------------------------------
    def _join_shape(self, out: str, op: str, shapes: List[tuple]) -> tuple:
        return join_shape(out, op, shapes)

    def node_shapes(self, input_shape) -> Dict[str, tuple]:
        """Every value's shape for one sample (no batch dimension)."""
        shapes = {"x": tuple(int(d) for d in input_shape)}
        for out, op, inputs in self.nodes:
            args = [shapes[v] for v in inputs]
            if op in self._modules:
                try:
                    shapes[out] = tuple(self._modules[op].output_shape(args[0]))
                except ValueError as e:  # name the module: "features: transition3: ..."
                    raise ValueError(f"{op}: {e}") from None
            else:
                shapes[out] = self._join_shape(out, op, args)
        return shapes

    def output_shape(self, input_shape):
        return self.node_shapes(input_shape)[self.outputs[0]]

    # -- architecture -----------------------------------------------------------------
    def config(self):
        config = dict(nodes=[f"{out} = {op}({', '.join(inputs)})"
                             for out, op, inputs in self.nodes])
        if self.outputs != [self.nodes[-1][0]]:
            config["outputs"] = list(self.outputs)
        if self.name is not None:
            config["name"] = self.name
        if self.input_shape is not None:
            config["input_shape"] = list(self.input_shape)
        return config

    def extra_repr(self):
        return "; ".join(self.config()["nodes"]) if len(self.nodes) <= 6 else \
            f"{len(self.nodes)} nodes"
