"""A naive reader of the network graph (docs/format.md, format version 2),
for the tests: a checker of the format's rules and an interpreter that runs
a graph on a state dict.

The interpreter rebuilds each layer node as the convcore.nn layer of the
same name from its attrs, loads its tensors ("<name>.<tensor>") and runs it
in eval mode, so each layer's semantics has one definition (the nn class)
and what is tested is the graph: its wiring, its attrs and its joins.
"""
import json

import numpy as np

import convcore.nn as nn

LAYERS = {"Conv2d", "Linear", "BatchNorm2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
          "ReLU", "ReLU6", "Sigmoid", "SiLU", "Hardswish", "Hardsigmoid", "LocalResponseNorm",
          "Flatten", "Softmax", "Dropout", "StochasticDepth", "Identity"}
JOINS = {"add", "mul", "concat"}
NODE_KEYS = {"op", "name", "attrs", "inputs", "outputs"}


def tensor_key(name, tensor):
    """The file's key of a node's tensor; a root layer (name "") holds its
    tensors without a prefix, as its state dict does."""
    return f"{name}.{tensor}" if name else tensor


def _pair(v):
    return list(v) if isinstance(v, (list, tuple)) else [v, v]


def layer_tensors(op, attrs):
    """{tensor: shape} that a layer node holds, from the format's table."""
    if op == "Conv2d":
        out, cin, groups = attrs["out_channels"], attrs["in_channels"], attrs.get("groups", 1)
        t = {"weight": (out, cin // groups) + tuple(_pair(attrs["kernel_size"]))}
        if attrs.get("bias", True):
            t["bias"] = (out,)
        return t
    if op == "Linear":
        t = {"weight": (attrs["out_features"], attrs["in_features"])}
        if attrs.get("bias", True):
            t["bias"] = (attrs["out_features"],)
        return t
    if op == "BatchNorm2d":
        n, t = attrs["num_features"], {}
        if attrs.get("affine", True):
            t["weight"] = (n,)
            if attrs.get("bias", True):
                t["bias"] = (n,)
        if attrs.get("track_running_stats", True):
            t.update(running_mean=(n,), running_var=(n,), num_batches_tracked=())
        return t
    return {}


def check_graph(graph, state):
    """Asserts the rules of docs/format.md, and that the tensors the layer
    nodes imply are exactly the state dict's keys, with its shapes."""
    assert json.loads(json.dumps(graph, allow_nan=False)) == graph
    assert set(graph) == {"version", "name", "input_shape", "inputs", "outputs", "nodes"}
    assert graph["version"] == 2
    assert graph["name"] is None or isinstance(graph["name"], str)
    shape = graph["input_shape"]
    assert shape is None or (isinstance(shape, list) and all(type(d) is int for d in shape))
    assert isinstance(graph["inputs"], list) and len(graph["inputs"]) == 1
    defined = set(graph["inputs"])
    names, implied = set(), {}
    assert graph["nodes"], "a graph needs nodes"
    for node in graph["nodes"]:
        assert set(node) <= NODE_KEYS and {"op", "inputs", "outputs"} <= set(node), node
        op = node["op"]
        assert op in LAYERS or op in JOINS, node
        assert all(v in defined for v in node["inputs"]), f"undefined input in {node}"
        assert len(node["outputs"]) == 1, node
        (out,) = node["outputs"]
        assert isinstance(out, str) and 0 < len(out) <= 256, node
        assert out not in defined, f"value {out!r} defined twice"
        defined.add(out)
        if "name" in node:
            assert node["name"] not in names, f"two nodes named {node['name']!r}"
            names.add(node["name"])
        if op in JOINS:
            assert "attrs" not in node or node["attrs"] == {}, node
            least = {"add": 2, "mul": 2, "concat": 1}[op]
            assert len(node["inputs"]) >= least and (op != "mul" or len(node["inputs"]) == 2)
            continue
        assert len(node["inputs"]) == 1, node
        tensors = layer_tensors(op, node.get("attrs", {}))
        if tensors:
            assert "name" in node, f"a layer holding tensors needs a name: {node}"
        for t, shape in tensors.items():
            key = tensor_key(node["name"], t)
            assert key not in implied, f"tensor {key!r} belongs to two nodes"
            implied[key] = tuple(shape)
    assert graph["outputs"] and all(o in defined for o in graph["outputs"])
    assert set(implied) == set(state), (sorted(set(implied) - set(state)),
                                        sorted(set(state) - set(implied)))
    for key, shape in implied.items():
        assert np.shape(state[key]) == shape, (key, shape, np.shape(state[key]))


def run_graph(graph, state, x, all_outputs=False):
    """Runs the graph on a batch x with the tensors of `state`; returns the
    first output (inference's), or the list of all outputs."""
    values = {graph["inputs"][0]: x}
    for node in graph["nodes"]:
        op, args = node["op"], [values[v] for v in node["inputs"]]
        if op == "add":
            y = args[0] + args[1]
            for a in args[2:]:
                y = y + a
        elif op == "mul":
            y = args[0] * args[1]
        elif op == "concat":
            y = np.concatenate(args, axis=1)
        else:
            attrs = dict(node.get("attrs", {}))
            if op in ("Conv2d", "Linear", "BatchNorm2d"):
                attrs["dtype"] = x.dtype
            layer = getattr(nn, op)(**attrs)
            layer.load_state_dict({t: state[tensor_key(node["name"], t)]
                                   for t in layer.state_dict()})
            y = layer.eval()(args[0])
        values[node["outputs"][0]] = y
    outputs = [values[o] for o in graph["outputs"]]
    return outputs if all_outputs else outputs[0]
