"""Module, Parameter and the containers of the layer API.

A Module computes `forward(x)` and, from the gradient of its output,
`backward(grad_output)`: it returns the gradient of its input and adds the
gradients of its parameters to their `.grad`. Each layer keeps what its
backward needs from the last forward, so forward and backward alternate, as
in a training step. Names of parameters and buffers follow PyTorch
(`features.0.weight`, `bn1.running_mean`), so state dicts carry over.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np

from .._backends import backend_of, to_host
from .lowering import LAYER_OPS, cannot_lower, join, to_graph


# -- what a forward keeps for the backward --------------------------------------------
# Under no_grad() the layers keep nothing, so an inference holds only the
# values still to be read (a forward in eval mode alone keeps every layer's
# input, as training needs). Per thread, as PyTorch's grad mode; the modes
# that no_grad blocks restore are a per-thread stack too, so one instance
# (a decorator's) may be entered by several threads at once.
class _GradMode(threading.local):
    def __init__(self):
        self.enabled = True
        self.previous: List[bool] = []


_grad_mode = _GradMode()


def is_grad_enabled() -> bool:
    """False inside no_grad(): forward passes keep nothing for a backward."""
    return _grad_mode.enabled


class no_grad(contextlib.ContextDecorator):
    """Forward passes inside `with convcore.no_grad():` (or a function decorated
    with it) keep nothing for a backward, as PyTorch's torch.no_grad: an
    inference then holds only the values still to be read. A backward after
    such a forward raises RuntimeError. Nests; per thread."""

    def __enter__(self):
        _grad_mode.previous.append(_grad_mode.enabled)
        _grad_mode.enabled = False
        return self

    def __exit__(self, *exc) -> bool:
        _grad_mode.enabled = _grad_mode.previous.pop()
        return False


def kept(value):
    """value when a backward may follow (see no_grad), else None: what a
    layer's forward stores for its backward."""
    return value if _grad_mode.enabled else None


def saved(value, module: "Module", what: str = "forward"):
    """value, stored by module's last forward for its backward; RuntimeError
    naming the module when there is none."""
    if value is None:
        raise RuntimeError(f"{type(module).__name__}.backward called before forward, or after "
                           f"a {what} under convcore.no_grad() (which keeps nothing for a "
                           f"backward)")
    return value


# -- what the layers above nn carry out ------------------------------------------------
# Module.save, Module.summary and Module.to("cuda" / "cpu") are carried out by
# convcore.io, convcore.summary and convcore.cuda.module, which import nn; nn
# imports none of them. Each registers its function here when it is imported
# (convcore/__init__.py imports all three, so importing any part of convcore
# registers them).
_PROVIDED: Dict[str, Callable] = {}
_PROVIDERS = {"save": "convcore.io", "summary": "convcore.summary", "to": "convcore.cuda.module"}


def provide(method: str, function: Callable) -> None:
    """Registers `function(module, ...)` as what Module.<method> calls; method
    is "save", "summary" or "to" (the devices)."""
    if method not in _PROVIDERS:
        raise ValueError(f"method must be one of {sorted(_PROVIDERS)}, got {method!r}")
    _PROVIDED[method] = function


def _provided(method: str) -> Callable:
    function = _PROVIDED.get(method)
    if function is None:
        raise RuntimeError(f"Module.{method} is carried out by {_PROVIDERS[method]}, which "
                           f"has not registered it: import convcore")
    return function


class Parameter:
    """A trainable array and the gradient accumulated for it. The gradient is
    allocated on first use, so a model that only runs inference (or is only
    summarised) holds its weights once, not twice. zero_grad marks it zero
    without writing it: the next backward's gradient then takes its place
    (no sweep to zero it, none to add to zeros), and reading `grad` first
    gives zeros, as before."""

    __slots__ = ("data", "_grad", "_grad_is_zero")

    def __init__(self, data: np.ndarray):
        self.data = backend_of(data).xp.ascontiguousarray(data)
        self._grad = None
        self._grad_is_zero = False

    def _grad_fits(self) -> bool:
        return (self._grad is not None and self._grad.shape == self.data.shape and
                self._grad.dtype == self.data.dtype)

    @property
    def grad(self) -> np.ndarray:
        if not self._grad_fits():
            self._grad = backend_of(self.data).xp.zeros_like(self.data)
        elif self._grad_is_zero:
            self._grad[...] = 0
        self._grad_is_zero = False
        return self._grad

    @grad.setter
    def grad(self, value) -> None:
        xp = backend_of(self.data).xp
        value = xp.asarray(value)
        if value.shape != self.data.shape:
            raise ValueError(f"grad must have shape {self.data.shape}, got {value.shape}")
        self._grad = xp.ascontiguousarray(value, dtype=self.data.dtype)
        self._grad_is_zero = False

    def zero_grad(self) -> None:
        """The gradient becomes zero (lazily: see the class docstring)."""
        if self._grad is not None:
            self._grad_is_zero = True

    def accumulate_grad(self, g) -> None:
        """grad += g. g must be a new array the caller does not keep (a
        backward's result): after zero_grad it becomes the gradient itself."""
        if self._grad_is_zero or not self._grad_fits():
            self.grad = g  # checked and converted as by the setter
        else:
            self._grad += g

    @property
    def shape(self):
        return self.data.shape

    @property
    def size(self) -> int:
        return self.data.size

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


Shape = Tuple[int, ...]


_REGISTRY: Dict[str, type] = {}


class Module:
    """Base class of every layer and network."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration -----------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError("call Module.__init__() before assigning attributes")
        for table in (self._parameters, self._modules, self._buffers):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for table in (self._parameters, self._modules, self._buffers):
            table.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, value: np.ndarray) -> None:
        """State that is saved and loaded but not trained (running statistics)."""
        object.__setattr__(self, name, value)
        self._buffers[name] = value

    def _set_buffer(self, name: str, value: np.ndarray) -> None:
        object.__setattr__(self, name, value)
        self._buffers[name] = value

    # -- computation --------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    # Whether backward computes the gradient with respect to the input (see
    # set_input_grad); layers that can skip it read this flag.
    input_grad = True

    def fuses(self, following: "Module") -> bool:
        """Whether this module and the one after it in a Sequential run as one
        (forward_fused, backward_fused): a BatchNorm2d and a ReLU make one
        pass over memory each way instead of two."""
        return False

    def forward_fused(self, x):
        """forward of this module and the following one that fuses() accepted."""
        raise NotImplementedError(f"{type(self).__name__} fuses with no module")

    def backward_fused(self, grad_output):
        """backward of forward_fused: grad_output is the following module's."""
        raise NotImplementedError(f"{type(self).__name__} fuses with no module")

    def input_layers(self) -> List["Module"]:
        """The children that read this module's input (and nothing else reads
        it): where set_input_grad passes its flag. None by default."""
        return []

    def set_input_grad(self, flag: bool) -> "Module":
        """Whether backward computes the gradient with respect to the input.

        Off, the layers that read the input (a network's first convolution
        or linear layer, found through input_layers) compute only their
        parameters' gradients and backward returns None, as PyTorch skips an
        input that does not require grad: a first convolution's input
        gradient costs as much as its forward. On by default; train.fit
        turns it off while it runs, as its loop discards that gradient."""
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"flag must be a bool, got {type(flag).__name__} {flag!r}")
        object.__setattr__(self, "input_grad", bool(flag))
        for m in self.input_layers():
            m.set_input_grad(flag)
        return self

    def __call__(self, x):
        return self.forward(x)

    def output_shape(self, input_shape: Shape) -> Shape:
        """Shape of one sample's output for one sample's input shape (no batch
        dimension), with the same checks forward would make."""
        raise NotImplementedError(f"{type(self).__name__} does not implement output_shape")

    def macs(self, input_shape: Shape) -> int:
        """Multiply-adds of one sample's forward pass through this layer alone."""
        return 0

    # -- traversal ------------------------------------------------------------------
    def children(self) -> Iterator["Module"]:
        return iter(self._modules.values())

    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        return iter(self._modules.items())

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> List[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[Tuple[str, np.ndarray]]:
        for mod_name, mod in self.named_modules(prefix):
            for name, b in mod._buffers.items():
                yield (f"{mod_name}.{name}" if mod_name else name), b

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # -- state -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters and buffers by PyTorch's key names (copies)."""
        state = OrderedDict()
        for mod_name, mod in self.named_modules():
            for name, p in mod._parameters.items():
                state[f"{mod_name}.{name}" if mod_name else name] = np.array(to_host(p.data))
            for name, b in mod._buffers.items():
                state[f"{mod_name}.{name}" if mod_name else name] = np.array(to_host(b), copy=True)
        return state

    def load_state_dict(self, state: Dict[str, np.ndarray], strict: bool = True) -> None:
        """Copies arrays into the parameters and buffers of the same names. With
        strict, the keys must match exactly; shapes must always match."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict does not match the model: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        for mod_name, mod in self.named_modules():
            for name, p in mod._parameters.items():
                key = f"{mod_name}.{name}" if mod_name else name
                if key in state:
                    value = np.asarray(state[key])
                    if value.shape != p.data.shape:
                        raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, the "
                                         f"model expects {p.data.shape}")
                    p.data = backend_of(p.data).xp.array(value, dtype=p.data.dtype, order="C",
                                                         copy=True)
                    p._grad = None
            for name, b in list(mod._buffers.items()):
                key = f"{mod_name}.{name}" if mod_name else name
                if key in state:
                    value = np.asarray(state[key])
                    if value.shape != np.shape(to_host(b)):
                        raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, the "
                                         f"model expects {np.shape(to_host(b))}")
                    dtype = np.asarray(to_host(b)).dtype
                    mod._set_buffer(name, backend_of(b).xp.array(value, dtype=dtype, copy=True))

    def to(self, target) -> "Module":
        """Converts parameters and float buffers to a dtype (np.float32 or
        np.float64), or moves them to "cuda" (cupy arrays, float32) / "cpu"."""
        if isinstance(target, str) and target in ("cuda", "gpu", "cpu"):
            return _provided("to")(self, target)
        dtype = np.dtype(target)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"to() takes float32 or float64, got {dtype}")
        for mod in self.modules():
            for p in mod._parameters.values():
                p.data = p.data.astype(dtype)
                p._grad = None if p._grad is None else p._grad.astype(dtype)
            for name, b in list(mod._buffers.items()):
                b = backend_of(b).xp.asarray(b)
                if b.dtype.kind == "f":
                    mod._set_buffer(name, b.astype(dtype))
        return self

    @property
    def dtype(self):
        for p in self.parameters():
            return p.data.dtype
        return np.dtype(np.float32)

    # -- architecture (what save() stores beside the tensors) -------------------------
    def config(self) -> dict:
        """The constructor arguments that rebuild this module (JSON-serialisable)."""
        return {}

    def architecture(self) -> dict:
        """The module tree: type, constructor config and children, as JSON data."""
        node = {"type": type(self).__name__, "config": self.config()}
        if self._modules:
            node["children"] = {name: child.architecture() for name, child in self._modules.items()}
        return node

    # -- the network graph (docs/format.md; what the C++ runtime runs) -----------------
    def lower(self, g, x: str, prefix: str) -> str:
        """Writes this module's computation into the GraphWriter `g`, taking
        the value `x`, and returns the value of its output; `prefix` is the
        module's path ("" for the root). A layer the format knows is one
        node; a container overrides this next to its forward."""
        if self._modules or type(self).__name__ not in LAYER_OPS:
            raise cannot_lower(self, prefix, f"it is not one of the graph format's layers "
                                             f"({', '.join(sorted(LAYER_OPS))}), so it needs a "
                                             f"`lower(g, x, prefix)` method that writes what its "
                                             f"forward computes (see convcore.nn.lowering)")
        return g.node(type(self).__name__, [x], name=prefix, attrs=self.config())

    def lower_outputs(self, g, x: str, prefix: str) -> List[str]:
        """The values of all this module's outputs (a Graph with auxiliary
        heads has several; the first is the inference output)."""
        return [self.lower(g, x, prefix)]

    def to_graph(self) -> dict:
        """The network graph that save() stores (see convcore.nn.lowering.to_graph)."""
        return to_graph(self)

    # -- display -----------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        if self._modules:
            lines[0] = lines[0]
            for name, child in self._modules.items():
                child_repr = repr(child).replace("\n", "\n  ")
                lines.append(f"  ({name}): {child_repr}")
            lines.append(")")
            return "\n".join(lines)
        return lines[0] + ")"

    def save(self, path, metadata=None) -> None:
        """Writes the parameters, buffers and architecture to a safetensors file
        (read back with convcore.load)."""
        _provided("save")(self, path, metadata=metadata)

    def summary(self, input_shape: Shape, print_fn=print):
        """Prints the per-layer table (output volume, parameters, multiply-adds,
        activation memory) for one sample of input_shape (C, H, W); returns its rows."""
        return _provided("summary")(self, input_shape, print_fn=print_fn)


def _replaced(module: Module) -> bool:
    """Whether forward or backward was replaced on this instance."""
    return "forward" in module.__dict__ or "backward" in module.__dict__


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ... (or by the
    keys of an OrderedDict)."""

    _runner = None  # see set_runner

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, m in modules[0].items():
                setattr(self, name, m)
        else:
            for i, m in enumerate(modules):
                if not isinstance(m, Module):
                    raise TypeError(f"Sequential takes Modules, got {type(m).__name__} at {i}")
                setattr(self, str(i), m)

    def set_runner(self, runner) -> None:
        """How forward runs the chain from now on: runner(modules, x), which
        must compute what the modules in turn compute, or None (each module
        in turn). Module.to's device pass sets it: on the GPU,
        convcore.cuda.fusion's runner fuses Conv2d / Linear + ReLU into one
        kernel; to("cpu") sets None again."""
        object.__setattr__(self, "_runner", runner)

    def append(self, module: Module) -> "Sequential":
        setattr(self, str(len(self._modules)), module)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index):
        mods = list(self._modules.values())
        if isinstance(index, slice):
            part = Sequential(*mods[index])
            part.set_runner(self._runner)  # the same modules, on the same device
            return part
        return mods[index]

    def __iter__(self):
        return iter(self._modules.values())

    _fused = ()  # the modules forward ran with the next one (Module.fuses)

    def forward(self, x):
        modules = list(self._modules.values())
        if self._runner is not None:
            object.__setattr__(self, "_fused", ())
            return self._runner(modules, x)
        fused, i = [], 0
        while i < len(modules):
            # (not when a method was replaced on the instance: viz's capture,
            # the distributed reducer's backward wrapper)
            if i + 1 < len(modules) and modules[i].fuses(modules[i + 1]) and \
                    not _replaced(modules[i]) and not _replaced(modules[i + 1]):
                x = modules[i].forward_fused(x)
                fused.append(i)
                i += 2
            else:
                x = modules[i](x)
                i += 1
        object.__setattr__(self, "_fused", tuple(fused))
        return x

    def lower(self, g, x, prefix):
        # The chain forward computes (a runner computes the same).
        if type(self).forward is not Sequential.forward:
            raise cannot_lower(self, prefix, "it overrides Sequential's forward, so it needs its "
                                             "own `lower` method")
        for name, m in self._modules.items():
            x = m.lower(g, x, join(prefix, name))
        return x

    def backward(self, grad_output):
        modules = list(self._modules.values())
        i = len(modules) - 1
        while i >= 0:
            if i - 1 in self._fused:
                grad_output = modules[i - 1].backward_fused(grad_output)
                i -= 2
            else:
                grad_output = modules[i].backward(grad_output)
                i -= 1
        return grad_output

    def input_layers(self):
        return list(self._modules.values())[:1]

    def output_shape(self, input_shape):
        for m in self._modules.values():
            input_shape = m.output_shape(input_shape)
        return input_shape


class Identity(Module):
    """Passes its input through (a placeholder, e.g. an absent shortcut)."""

    def forward(self, x):
        return x

    def backward(self, grad_output):
        return grad_output

    def output_shape(self, input_shape):
        return tuple(input_shape)


def from_architecture(node: dict) -> Module:
    """Rebuilds a module from Module.architecture() data (fresh parameters;
    load a state dict to restore trained ones). Sequential children are
    rebuilt from the tree; every other module rebuilds its own children from
    its config."""
    if not isinstance(node, dict) or "type" not in node:
        raise ValueError(f"an architecture node must be a dict with a 'type', got {node!r}")
    cls = _REGISTRY.get(node["type"])
    if cls is None:
        raise ValueError(f"unknown module type {node['type']!r} in the architecture "
                         f"(known: {', '.join(sorted(_REGISTRY))})")
    config = node.get("config", {})
    if cls is Sequential:
        children = node.get("children", {})
        return Sequential(OrderedDict((name, from_architecture(child))
                                      for name, child in children.items()))
    if getattr(cls, "children_from_tree", False):  # Graph: children from the tree too
        children = OrderedDict((name, from_architecture(child))
                               for name, child in node.get("children", {}).items())
        try:
            return cls(children, **config)
        except TypeError as e:
            raise ValueError(f"bad config for {node['type']}: {e}") from None
    try:
        module = cls(**config)
    except TypeError as e:
        raise ValueError(f"bad config for {node['type']}: {e}") from None
    children = node.get("children")
    if children is not None and list(children) != list(module._modules):
        raise ValueError(f"{node['type']}: the architecture lists children {list(children)} but "
                         f"the config builds {list(module._modules)}")
    return module
