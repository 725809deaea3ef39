"""Build a network from the lecture's notation or from a list of layer dicts.

    build("[(CONV3-64-RELU)*2-POOL2]*3-(FC-512-RELU)*2-FC-10", (3, 32, 32))

Grammar (case-insensitive; README.md documents it for users):

    spec   := item ('-' item)*
    item   := ( '(' spec ')' | '[' spec ']' | layer ) ['*' N]
    layer  := CONV<k>[x<k2>]-<filters>{opt} | POOL<k>{opt} | MAXPOOL<k>{opt}
            | AVGPOOL<k>{opt} | FC-<units> | RELU | NORM | LRN | BN
            | DROPOUT[<p>] | GAP | FLATTEN | SOFTMAX
    opt    := /s<stride> | /p<pad> | /d<dilation> | /g<groups> | /same | /valid | /ceil

CONV pads (k - 1) // 2 unless told otherwise (the lecture's "zero-padding
with (F - 1) / 2"); POOL's stride defaults to its size; SOFTMAX is accepted
at the end and adds nothing (the loss applies the softmax).

Every string compiles to the list-of-dicts form (`parse(spec)`), which is
also what a saved model stores. Shapes are inferred at build time with the
core's own rules; a window that does not tile its input exactly (the
lecture's 7x7 input with a 3x3 filter at stride 3, "doesn't fit!") gives a
warning naming the layer and the sizes, or an error with strict=True; an
empty output is always an error.
"""
from __future__ import annotations

import copy
import re
import warnings
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .nn.graph import JOINS, Graph, join_shape, parse_node
from .nn.layers import (AdaptiveAvgPool2d, AvgPool2d, Conv2d, Dropout, Flatten, Linear,
                        MaxPool2d, ReLU)
from .nn.lowering import cannot_lower, join
from .nn.module import Module, Sequential
from .nn.norm import BatchNorm2d, LocalResponseNorm

__all__ = ["build", "build_graph", "parse", "Network", "BuildError", "MisfitWarning"]


class BuildError(ValueError):
    """A spec that cannot be parsed or a network whose shapes do not work."""


class MisfitWarning(UserWarning):
    """A conv or pool window that does not tile its input exactly (the output floors)."""


# --------------------------------------------------------------------------- parser

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+)|(?P<word>[A-Za-z][A-Za-z0-9.]*)|(?P<opt>/[A-Za-z]+\d*)"
                    r"|(?P<sym>[-()\[\]*]))")

# Defaults of the NORM layer: AlexNet's (Krizhevsky et al. 2012: n=5, k=2).
LRN_DEFAULTS = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)


def _tokenize(spec: str) -> List[Tuple[str, str, int]]:
    tokens, pos = [], 0
    spec = spec.rstrip()
    while pos < len(spec):
        m = _TOKEN.match(spec, pos)
        if not m or m.end() == pos:
            raise BuildError(f"cannot read the spec at position {pos}: {spec[pos:pos + 12]!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, spec: str):
        self.spec = spec
        self.tokens = _tokenize(spec)
        self.i = 0

    def peek(self, offset=0):
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else (None, None, len(self.spec))

    def take(self, kind=None, value=None):
        tok = self.peek()
        if tok[0] is None or (kind and tok[0] != kind) or (value and tok[1] != value):
            want = value or kind or "more"
            raise BuildError(f"expected {want!r} at position {tok[2]} of {self.spec!r}, got "
                             f"{tok[1]!r}" if tok[0] else f"expected {want!r} at the end of "
                             f"{self.spec!r}")
        self.i += 1
        return tok

    def parse(self) -> List[dict]:
        layers = self.seq()
        if self.peek()[0] is not None:
            tok = self.peek()
            raise BuildError(f"unexpected {tok[1]!r} at position {tok[2]} of {self.spec!r}")
        return layers

    def seq(self) -> List[dict]:
        layers = self.item()
        while self.peek()[1] == "-":
            self.take()
            layers += self.item()
        return layers

    def item(self) -> List[dict]:
        tok = self.peek()
        if tok[1] in ("(", "["):
            close = ")" if tok[1] == "(" else "]"
            self.take()
            body = self.seq()
            self.take("sym", close)
        elif tok[0] == "word":
            body = [self.layer()]
        else:
            raise BuildError(f"expected a layer or a group at position {tok[2]} of {self.spec!r}"
                             f", got {tok[1]!r}" if tok[0] else
                             f"the spec {self.spec!r} ends where a layer was expected")
        if self.peek()[1] == "*":
            self.take()
            _, count_text, count_pos = self.take("num")
            count = int(count_text)
            if count < 1:
                raise BuildError(f"a repeat count must be at least 1, got {count} at position "
                                 f"{count_pos} of {self.spec!r}")
            body = [copy.deepcopy(layer) for _ in range(count) for layer in body]
        return body

    def count_after_dash(self, what: str, pos: int) -> int:
        if self.peek()[1] != "-" or self.peek(1)[0] != "num":
            raise BuildError(f"{what} at position {pos} needs a count, e.g. "
                             f"{'CONV3-64' if what.startswith('CONV') else 'FC-512'}")
        self.take()
        return int(self.take("num")[1])

    def layer(self) -> dict:
        _, word, pos = self.take("word")
        w = word.upper()
        m = re.fullmatch(r"CONV(\d+)(?:X(\d+))?", w)
        if m:
            kh = int(m.group(1))
            kw = int(m.group(2) or kh)
            layer = {"type": "conv", "out_channels": self.count_after_dash(word, pos),
                     "kernel_size": [kh, kw], "padding": [(kh - 1) // 2, (kw - 1) // 2]}
        elif w == "CONV":
            raise BuildError(f"CONV at position {pos} needs a kernel size, e.g. CONV3-64")
        elif re.fullmatch(r"(MAX|AVG)?POOL(\d*)", w):
            m = re.fullmatch(r"(MAX|AVG)?POOL(\d*)", w)
            layer = {"type": "avgpool" if m.group(1) == "AVG" else "maxpool",
                     "kernel_size": int(m.group(2) or 2)}
        elif w == "FC":
            layer = {"type": "fc", "out_features": self.count_after_dash("FC", pos)}
        elif w == "RELU":
            layer = {"type": "relu"}
        elif w in ("NORM", "LRN"):
            layer = {"type": "lrn"}
        elif w in ("BN", "BATCHNORM"):
            layer = {"type": "bn"}
        elif re.fullmatch(r"DROP(OUT)?([0-9.]*)", w):
            p = re.fullmatch(r"DROP(OUT)?([0-9.]*)", w).group(2)
            try:
                layer = {"type": "dropout", "p": float(p) if p else 0.5}
            except ValueError:
                raise BuildError(f"bad dropout probability in {word!r} at position {pos}") from None
        elif w in ("GAP", "GLOBALAVGPOOL"):
            layer = {"type": "gap"}
        elif w == "FLATTEN":
            layer = {"type": "flatten"}
        elif w == "SOFTMAX":
            layer = {"type": "softmax"}
        else:
            raise BuildError(f"unknown layer {word!r} at position {pos} of {self.spec!r}")
        while self.peek()[0] == "opt":
            _, opt, opt_pos = self.take()
            self.option(layer, opt.lower(), opt_pos)
        return layer

    def option(self, layer: dict, opt: str, pos: int) -> None:
        m = re.fullmatch(r"/([a-z]+)(\d*)", opt)
        key, num = m.group(1), m.group(2)
        allowed = {"conv": {"s", "p", "d", "g", "same", "valid"},
                   "maxpool": {"s", "p", "d", "ceil"},
                   "avgpool": {"s", "p", "ceil"}}.get(layer["type"], set())
        if key not in allowed or (key in ("s", "p", "d", "g") and not num) or \
                (key in ("same", "valid", "ceil") and num):
            raise BuildError(f"option {opt!r} at position {pos} does not apply to a "
                             f"{layer['type']} layer (allowed: {sorted(allowed) or 'none'})")
        names = {"s": "stride", "p": "padding", "d": "dilation", "g": "groups"}
        if key in names:
            layer[names[key]] = int(num)
        elif key in ("same", "valid"):
            layer["padding"] = key
        else:
            layer["ceil_mode"] = True


def parse(spec: str) -> List[dict]:
    """The list-of-dicts form of a spec string."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string or a list of layer dicts, got {type(spec).__name__}")
    if not spec.strip():
        raise BuildError("spec is empty")
    return _Parser(spec).parse()


# --------------------------------------------------------------------------- building

def _describe(layer: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in layer.items() if k != "type")


def _check_fit(index: int, layer: dict, size: Tuple[int, int], kernel, stride, pads, dilation,
               on_misfit: str, ceil_mode: bool = False) -> None:
    """Warns (or raises) where (N - F + 2P) / S + 1 is not an integer."""
    if on_misfit == "ignore":
        return
    misfits = []
    for axis, name in ((0, "height"), (1, "width")):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        padded = size[axis] + pads[axis]
        if (padded - span) % stride[axis]:
            exact = (padded - span) / stride[axis] + 1
            misfits.append(f"{name} {size[axis]} + padding {pads[axis]}, window {span}, stride "
                           f"{stride[axis]}: (N - F + 2P) / S + 1 = {exact:.4g}")
    if misfits:
        message = (f"layer {index} ({layer['type']}: {_describe(layer)}) doesn't fit its input: "
                   f"{'; '.join(misfits)}, not an integer, so the output "
                   f"{'rounds up (ceil_mode)' if ceil_mode else 'floors'}")
        if on_misfit == "error":
            raise BuildError(message)
        warnings.warn(message, MisfitWarning, stacklevel=5)


def _make_layer(index: int, layer: dict, shape: tuple, on_misfit: str) -> Optional[Module]:
    """The module for one layer dict, given one sample's input shape."""
    if not isinstance(layer, dict) or "type" not in layer:
        raise BuildError(f"layer {index} must be a dict with a 'type', got {layer!r}")
    kind = str(layer["type"]).lower()
    args = {k: v for k, v in layer.items() if k not in ("type", "name")}
    try:
        if kind in ("conv", "maxpool", "avgpool", "lrn", "bn", "gap", "adaptiveavgpool"):
            if len(shape) != 3:
                raise BuildError(f"layer {index} ({kind}) needs an image input (C, H, W), "
                                 f"got shape {shape}")
        if kind == "conv":
            args.setdefault("padding", 0)
            module = Conv2d(shape[0], **args)
            module.output_shape(shape)  # the core's checks first (sizes, channels)
            pads = module._pads()
            _check_fit(index, layer, shape[1:], module.kernel_size, module.stride,
                       (pads[0] + pads[1], pads[2] + pads[3]), module.dilation, on_misfit)
            return module
        if kind in ("maxpool", "avgpool"):
            module = MaxPool2d(**args) if kind == "maxpool" else AvgPool2d(**args)
            module.output_shape(shape)
            dilation = module.dilation if kind == "maxpool" else (1, 1)
            _check_fit(index, layer, shape[1:], module.kernel_size, module.stride,
                       (2 * module.padding[0], 2 * module.padding[1]), dilation, on_misfit,
                       module.ceil_mode)
            return module
        if kind == "fc":
            return Linear(int(np.prod(shape)), **args)
        if kind == "relu":
            return ReLU()
        if kind == "lrn":
            return LocalResponseNorm(**{**LRN_DEFAULTS, **args})
        if kind == "bn":
            return BatchNorm2d(shape[0], **args)
        if kind == "dropout":
            return Dropout(**args)
        if kind == "gap":
            return AdaptiveAvgPool2d(1)
        if kind == "adaptiveavgpool":
            return AdaptiveAvgPool2d(**args)
        if kind == "flatten":
            return Flatten()
        if kind == "softmax":
            return None
    except BuildError:
        raise
    except (TypeError, ValueError) as e:
        raise BuildError(f"layer {index} ({kind}: {_describe(layer)}): {e}") from None
    raise BuildError(f"layer {index}: unknown type {layer['type']!r} (known: conv, maxpool, "
                     f"avgpool, fc, relu, lrn, bn, dropout, gap, adaptiveavgpool, flatten, "
                     f"softmax)")


class Network(Module):
    """A chain built by `build`: `features` (the layers before the first FC)
    and `classifier` (from the first FC on), with the flatten between them
    implicit, so parameter names read like torchvision's
    (`features.0.weight`, `classifier.1.bias`)."""

    def __init__(self, layers: Sequence[dict], input_shape: Sequence[int],
                 on_misfit: str = "warn", name: Optional[str] = None):
        super().__init__()
        self.name = name
        if on_misfit not in ("warn", "error", "ignore"):
            raise ValueError(f"on_misfit must be 'warn', 'error' or 'ignore', got {on_misfit!r}")
        self.layers = [dict(layer) for layer in layers]
        self.input_shape = tuple(int(d) for d in input_shape)
        if not self.layers:
            raise BuildError("a network needs at least one layer")
        if len(self.input_shape) not in (1, 3) or min(self.input_shape) < 1:
            raise BuildError(f"input_shape must be (C, H, W) or (features,) with positive sizes, "
                             f"got {input_shape}")
        kinds = [str(layer.get("type", "")).lower() if isinstance(layer, dict) else None
                 for layer in self.layers]
        for index, kind in enumerate(kinds[:-1]):
            if kind == "softmax":
                raise BuildError(f"layer {index}: SOFTMAX may only end the network (the loss "
                                 f"applies it to the class scores)")
        # The classifier starts at the first FC layer, taking the dropouts just
        # before it (torchvision's AlexNet/VGG heads begin with Dropout).
        split = kinds.index("fc") if "fc" in kinds else len(kinds)
        while split > 0 and kinds[split - 1] == "dropout":
            split -= 1
        features, classifier = [], []
        shape = self.input_shape
        for index, (layer, kind) in enumerate(zip(self.layers, kinds)):
            if kind == "fc" and len(shape) > 1:
                shape = (int(np.prod(shape)),)  # the implicit flatten
            module = _make_layer(index, layer, shape, on_misfit)
            if module is None:
                continue
            (classifier if index >= split else features).append(module)
            try:
                shape = module.output_shape(shape)
            except ValueError as e:
                raise BuildError(f"layer {index} ({kind}: {_describe(layer)}) on input "
                                 f"{_volume(shape)}: {e}") from None
            if min(shape, default=1) < 1:
                raise BuildError(f"layer {index} ({kind}) gives an empty output {shape}")
        self.features = Sequential(*features)
        self.classifier = Sequential(*classifier)
        self._flat_shape = None

    def forward(self, x):
        x = self.features(x)
        if len(self.classifier):
            self._flat_shape = x.shape
            x = self.classifier(x.reshape(x.shape[0], -1))
        return x

    def lower(self, g, x, prefix):
        # forward's reshape to (N, -1) before a classifier is a Flatten node
        if type(self).forward is not Network.forward:
            raise cannot_lower(self, prefix, "it overrides Network's forward, so it needs its "
                                             "own `lower` method")
        x = self.features.lower(g, x, join(prefix, "features"))
        if len(self.classifier):
            x = g.node("Flatten", [x], attrs=dict(start_dim=1, end_dim=-1),
                       value=join(prefix, "flatten"))
            x = self.classifier.lower(g, x, join(prefix, "classifier"))
        return x

    def backward(self, grad_output):
        if len(self.classifier):
            grad_output = self.classifier.backward(grad_output)
            if grad_output is None:  # no features, and set_input_grad(False)
                return None
            grad_output = grad_output.reshape(self._flat_shape)
        return self.features.backward(grad_output)

    def input_layers(self):
        return [self.features if len(self.features) else self.classifier]

    def output_shape(self, input_shape):
        shape = self.features.output_shape(tuple(input_shape))
        if len(self.classifier):
            shape = self.classifier.output_shape((int(np.prod(shape)),))
        return shape

    def config(self):
        return dict(layers=self.layers, input_shape=list(self.input_shape), on_misfit="ignore",
                    name=self.name)


def _volume(shape) -> str:
    if len(shape) == 3:
        return f"{shape[1]}x{shape[2]}x{shape[0]}"
    return "x".join(str(d) for d in shape)


def build(spec: Union[str, Sequence[dict]], input_shape: Sequence[int], strict: bool = False,
          on_misfit: Optional[str] = None, name: Optional[str] = None) -> Network:
    """A Network from a spec string or a list of layer dicts, for inputs of one
    sample's shape (C, H, W). strict=True turns "doesn't fit" warnings into
    errors; on_misfit='ignore' silences them (for nets that floor on purpose)."""
    layers = parse(spec) if isinstance(spec, str) else list(spec)
    if not isinstance(spec, str) and not all(isinstance(layer, dict) for layer in layers):
        raise TypeError("spec must be a string or a list of layer dicts")
    mode = on_misfit or ("error" if strict else "warn")
    return Network(layers, input_shape, on_misfit=mode, name=name)


def build_graph(modules, nodes: Sequence[str], input_shape: Sequence[int],
                outputs: Optional[Sequence[str]] = None, name: Optional[str] = None) -> Graph:
    """A Graph whose branches may be written in the lecture's chain notation:
    each value of `modules` is a Module or a spec string for
    `convcore.build`, built for the shape that reaches it (so channel counts
    are inferred). Inception's module, for example::

        build_graph({"b1": "CONV1-64-RELU",
                     "b2": "CONV1-96-RELU-CONV3-128-RELU",
                     "b3": "CONV1-16-RELU-CONV5-32-RELU",
                     "b4": "MAXPOOL3/s1/p1-CONV1-32-RELU"},
                    ["y1 = b1(x)", "y2 = b2(x)", "y3 = b3(x)", "y4 = b4(x)",
                     "out = concat(y1, y2, y3, y4)"], input_shape=(192, 28, 28))

    gives 28x28x256."""
    if not isinstance(modules, dict):
        raise TypeError(f"modules must be a dict of name -> Module or spec string, got "
                        f"{type(modules).__name__}")
    shapes = {"x": tuple(int(d) for d in input_shape)}
    built = OrderedDict((k, m) for k, m in modules.items() if isinstance(m, Module))
    parsed = [parse_node(line) for line in nodes]
    for out, op, inputs in parsed:
        args = []
        for v in inputs:
            if v not in shapes:
                raise ValueError(f"graph node {out!r} takes {v!r}, which no earlier node defines")
            args.append(shapes[v])
        spec = modules.get(op)
        if isinstance(spec, str):
            if op in built:
                raise ValueError(f"module {op!r} is called twice (give each call its own module)")
            built[op] = build(spec, args[0], name=op)
        elif spec is not None and not isinstance(spec, Module):
            raise TypeError(f"modules[{op!r}] must be a Module or a spec string, got "
                            f"{type(spec).__name__}")
        if op in built:
            shapes[out] = tuple(built[op].output_shape(args[0]))
        else:
            shapes[out] = join_shape(out, op, args) if op in JOINS else args[0]
    # the children in the order the caller listed them (their state-dict order)
    ordered = OrderedDict((k, built[k]) for k in modules if k in built)
    return Graph(ordered, nodes, outputs=outputs, name=name, input_shape=input_shape)
