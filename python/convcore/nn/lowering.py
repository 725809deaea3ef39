"""Lowering a module tree to the network graph of docs/format.md (version 2).

Every module writes its own part of the graph with `Module.lower(g, x,
prefix)`: a layer becomes one node, a container (Sequential, Graph, the
residual blocks, the builder's Network, ResNet) writes the nodes of its
children and the joins between them, mirroring its forward. The C++
runtime reads the result and knows only the layers and joins listed here,
never a Python container, so a new container needs a `lower` method and no
C++ change.

    graph = to_graph(model)     # a JSON-serialisable dict
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

__all__ = ["LAYER_OPS", "JOIN_OPS", "GRAPH_VERSION", "GraphWriter", "LoweringError",
           "cannot_lower", "to_graph"]

GRAPH_VERSION = 2

# The layers the graph format knows: a leaf module of one of these types is
# written as one node whose attrs are its config().
LAYER_OPS = frozenset({
    "Conv2d", "Linear", "BatchNorm2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "ReLU",
    "ReLU6", "Sigmoid", "SiLU", "Hardswish", "Hardsigmoid", "LocalResponseNorm", "Flatten",
    "Softmax", "Dropout", "StochasticDepth", "Identity"})

JOIN_OPS = ("add", "mul", "concat")

# The format's bound on a value's length (the C++ reader applies it to node
# names too); longer derived value names are cut, keeping the end, the most
# specific part of a module path.
_MAX_VALUE_CHARS = 256



def fresh_name(base: str, taken: set) -> str:
    """base, or base_1, base_2, ... when taken (torch.fx's convention); the
    name returned is added to taken."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name

class LoweringError(TypeError):
    """A module that cannot be written as a graph (a user's own Module
    subclass with a custom forward and no `lower` method)."""


def _where(prefix: str) -> str:
    return f"module {prefix!r}" if prefix else "the model"


def cannot_lower(module, prefix: str, why: str) -> LoweringError:
    """The error for a module that cannot be lowered, naming its path and type."""
    return LoweringError(f"cannot write {_where(prefix)} ({type(module).__name__}) as a network "
                         f"graph: {why}")


def join(prefix: str, name: str) -> str:
    """A child's module path, as state-dict keys spell it."""
    return f"{prefix}.{name}" if prefix else name


class GraphWriter:
    """Collects the nodes of a graph in the order they run and hands out
    unique, readable value names."""

    def __init__(self, input_value: str = "x"):
        self.input = input_value
        self.nodes: List[dict] = []
        self._values = {input_value}
        self._names = set()

    def _fresh(self, base: str) -> str:
        return fresh_name(base[-(_MAX_VALUE_CHARS - 8):] or "v", self._values)

    def node(self, op: str, inputs: Sequence[str], name: Optional[str] = None,
             attrs: Optional[dict] = None, value: Optional[str] = None) -> str:
        """Appends a node and returns the name of the value it defines.

        name: the layer's module path (required for layers holding tensors,
        which are "<name>.<tensor>"); value: the preferred value name
        (default: the name, else the op in lower case), made unique."""
        inputs = list(inputs)
        for v in inputs:
            if v not in self._values:
                raise ValueError(f"node {op!r} ({name or 'unnamed'}) takes {v!r}, which no "
                                 f"earlier node defines")
        if name is not None:
            # (a name cannot be cut as a value can: the file's tensors carry it)
            if len(name) > _MAX_VALUE_CHARS:
                raise LoweringError(f"module path {name[:40]!r}... has {len(name)} characters; "
                                    f"the graph format allows {_MAX_VALUE_CHARS}")
            if name in self._names:
                raise ValueError(f"two nodes are named {name!r}; a node's name is its module "
                                 f"path and must be unique")
            self._names.add(name)
        out = self._fresh(value or name or op.lower())
        entry: Dict[str, object] = {"op": op}
        if name is not None:
            entry["name"] = name
        entry["inputs"] = inputs
        entry["outputs"] = [out]
        if attrs is not None:
            entry["attrs"] = dict(attrs)
        self.nodes.append(entry)
        return out


def to_graph(model) -> dict:
    """The graph JSON object of docs/format.md (format version 2) for a
    module tree. Raises LoweringError (a TypeError) naming the module that
    cannot be lowered."""
    g = GraphWriter("x")
    outputs = list(model.lower_outputs(g, g.input, ""))
    if not g.nodes:  # a model that computes nothing (an empty Sequential)
        outputs = [g.node("Identity", outputs[:1], attrs={})]
    name = getattr(model, "name", None)
    shape = getattr(model, "input_shape", None)
    return {
        "version": GRAPH_VERSION,
        # (a model without a name of its own is called by its type: "ResNet")
        "name": name if isinstance(name, str) else type(model).__name__,
        "input_shape": [int(d) for d in shape] if isinstance(shape, (tuple, list)) else None,
        "inputs": [g.input],
        "outputs": outputs,
        "nodes": g.nodes,
    }
