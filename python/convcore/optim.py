"""Optimisers and learning-rate schedules with PyTorch's update rules.

An optimiser holds one list of Parameters (one parameter group: every
parameter shares the hyperparameters) and updates their `.data` in place
from their `.grad`:

    opt = SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt.zero_grad(); model.backward(loss.backward()); opt.step()

Schedulers change `optimizer.lr` once per epoch, as torch.optim.lr_scheduler.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from ._backends import backend_of
from .nn.module import Parameter

__all__ = ["Optimizer", "SGD", "Adam", "StepLR", "ReduceLROnPlateau"]


def _number(value, name: str, low: float = 0.0, high: float = math.inf,
            high_open: bool = False) -> float:
    """A real number in [low, high] (or [low, high) with high_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or value < low or too_high:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return value


def _param_list(params) -> List[Parameter]:
    if isinstance(params, Parameter) or isinstance(params, np.ndarray):
        raise TypeError("params must be an iterable of Parameters (e.g. model.parameters()), "
                        f"got a single {type(params).__name__}")
    try:
        params = list(params)
    except TypeError:
        raise TypeError("params must be an iterable of Parameters, got "
                        f"{type(params).__name__}") from None
    if not params:
        raise ValueError("params is empty: the optimiser has nothing to update")
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"params[{i}] must be a Parameter, got {type(p).__name__}")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params contains the same Parameter more than once")
    return params


class Optimizer:
    """Base class: a list of Parameters, a learning rate `lr` and per-parameter
    state (`self.state[i]` is a dict of arrays for `self.params[i]`)."""

    #: names of the constructor's hyperparameters (saved by state_dict)
    hyperparameters = ("lr",)

    def __init__(self, params, lr: float):
        self.params = _param_list(params)
        self.lr = lr
        self.state: List[Dict[str, np.ndarray]] = [{} for _ in self.params]

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        self._lr = _number(value, "lr")

    def zero_grad(self) -> None:
        """Sets every parameter's gradient to zero (gradients accumulate)."""
        for p in self.params:
            p.zero_grad()

    def step(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement step")

    def state_dict(self) -> dict:
        """Hyperparameters and copies of the per-parameter state."""
        return {
            "type": type(self).__name__,
            "hyperparameters": {name: getattr(self, name) for name in self.hyperparameters},
            "state": [{k: np.array(backend_of(v).to_host(v), copy=True) for k, v in s.items()}
                      for s in self.state],
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores hyperparameters (lr included) and state saved by
        state_dict() from an optimiser of the same type over parameters of
        the same shapes."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state was saved from {state.get('type')!r}, "
                             f"not {type(self).__name__!r}")
        per_param = state.get("state", [])
        if len(per_param) != len(self.params):
            raise ValueError(f"state holds {len(per_param)} parameters, the optimiser has "
                             f"{len(self.params)}")
        new_state = []
        for i, (p, s) in enumerate(zip(self.params, per_param)):
            backend, entry = backend_of(p.data), {}
            for key, value in s.items():
                value = np.asarray(value)
                if value.shape != p.data.shape:
                    raise ValueError(f"state[{i}][{key!r}] has shape {value.shape}, the "
                                     f"parameter has shape {p.data.shape}")
                # on the parameter's device (a copy there, from the host)
                entry[key] = backend.from_host(
                    np.array(value, dtype=p.data.dtype.newbyteorder("="), copy=True))
            new_state.append(entry)
        for name, value in state.get("hyperparameters", {}).items():
            if name not in self.hyperparameters:
                raise ValueError(f"unknown hyperparameter {name!r} for {type(self).__name__}")
            setattr(self, name, value)
        self._load_extra_state(state)
        self.state = new_state

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)}" for n in self.hyperparameters)
        return f"{type(self).__name__}({len(self.params)} parameters, {args})"


class SGD(Optimizer):
    """Stochastic gradient descent, torch.optim.SGD's rule:

        g = grad + weight_decay * w
        buf = g (first step), else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf   (when momentum > 0)
        w = w - lr * g
    """

    hyperparameters = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr)
        self.momentum = _number(momentum, "momentum")
        self.dampening = _number(dampening, "dampening", 0.0, 1.0)
        self.weight_decay = _number(weight_decay, "weight_decay")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0, got "
                             f"momentum={self.momentum}, dampening={self.dampening}")

    def step(self) -> None:
        for p, state in zip(self.params, self.state):
            backend = backend_of(p.data)  # its array module and its update kernel
            first = self.momentum != 0 and "momentum_buffer" not in state
            if first:  # the update fills it
                state["momentum_buffer"] = backend.xp.empty(
                    p.data.shape, p.data.dtype.newbyteorder("="))
            data = backend.updatable(p.data)  # a copy to write back, for an odd array
            backend.functional.sgd_step(data, p.grad, state.get("momentum_buffer"), self.lr,
                                        self.momentum, self.dampening, self.weight_decay,
                                        self.nesterov, first)
            if data is not p.data:
                p.data[...] = data


class Adam(Optimizer):
    """Adam, torch.optim.Adam's rule (L2 weight decay added to the gradient;
    bias-corrected moments; eps added after the square root):

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        w = w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.betas = betas
        self.eps = _number(eps, "eps")
        self.weight_decay = _number(weight_decay, "weight_decay")
        self.steps = 0

    @property
    def betas(self):
        return self._betas

    @betas.setter
    def betas(self, value) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"betas must be a pair of numbers, got {value!r}")
        self._betas = (_number(value[0], "betas[0]", 0.0, 1.0, high_open=True),
                       _number(value[1], "betas[1]", 0.0, 1.0, high_open=True))

    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1.0 - beta1 ** self.steps)
        root_correction2 = math.sqrt(1.0 - beta2 ** self.steps)
        for p, state in zip(self.params, self.state):
            backend = backend_of(p.data)  # its array module and its update kernel
            if "exp_avg" not in state:
                xp = backend.xp
                state["exp_avg"] = xp.zeros(p.data.shape, p.data.dtype.newbyteorder("="))
                state["exp_avg_sq"] = xp.zeros(p.data.shape, p.data.dtype.newbyteorder("="))
            data = backend.updatable(p.data)  # a copy to write back, for an odd array
            backend.functional.adam_step(data, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                         step_size, beta1, beta2, root_correction2, self.eps,
                                         self.weight_decay)
            if data is not p.data:
                p.data[...] = data

    def _extra_state(self) -> dict:
        return {"steps": self.steps}

    def _load_extra_state(self, state: dict) -> None:
        steps = state.get("steps", 0)
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"state['steps'] must be a non-negative int, got {steps!r}")
        self.steps = int(steps)


# ------------------------------------------------------------------ schedules

class _Scheduler:
    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a convcore.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.last_epoch = 0

    def get_last_lr(self) -> float:
        """The learning rate after the last step (one group, so one float)."""
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"unknown keys for {type(self).__name__}: {sorted(unknown)}")
        self.__dict__.update(state)


class StepLR(_Scheduler):
    """Multiplies the learning rate by gamma every step_size epochs: call
    step() once at the end of each epoch."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        super().__init__(optimizer)
        if isinstance(step_size, bool) or not isinstance(step_size, (int, np.integer)) \
                or step_size <= 0:
            raise ValueError(f"step_size must be a positive int, got {step_size!r}")
        self.step_size = int(step_size)
        self.gamma = _number(gamma, "gamma")

    def step(self) -> None:
        self.last_epoch += 1
        if self.last_epoch % self.step_size == 0:
            self.optimizer.lr = self.optimizer.lr * self.gamma


class ReduceLROnPlateau(_Scheduler):
    """Multiplies the learning rate by factor once a metric has not improved
    for more than `patience` epochs: call step(metric) once per epoch.
    mode='max' for accuracy, 'min' for a loss (PyTorch's default). Improving
    means beating the best by threshold (relative, or absolute with
    threshold_mode='abs'). After a reduction, `cooldown` epochs pass before
    bad epochs count again; the rate never drops below min_lr, and changes
    smaller than eps are skipped."""

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float = 0.0, eps: float = 1e-8):
        super().__init__(optimizer)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        for name, value in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.mode, self.threshold_mode = mode, threshold_mode
        self.factor = _number(factor, "factor", 0.0, 1.0, high_open=True)
        self.patience, self.cooldown = int(patience), int(cooldown)
        self.threshold = _number(threshold, "threshold")
        self.min_lr = _number(min_lr, "min_lr")
        self.eps = _number(eps, "eps")
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def is_better(self, value: float, best: Optional[float] = None) -> bool:
        best = self.best if best is None else best
        if self.mode == "min":
            return value < (best * (1.0 - self.threshold) if self.threshold_mode == "rel"
                            else best - self.threshold)
        return value > (best * (1.0 + self.threshold) if self.threshold_mode == "rel"
                        else best + self.threshold)

    def step(self, metric) -> None:
        value = float(metric)
        self.last_epoch += 1
        if self.is_better(value):
            self.best = value
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            old = self.optimizer.lr
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                self.optimizer.lr = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
