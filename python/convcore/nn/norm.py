"""Normalisation layers: LocalResponseNorm (AlexNet's NORM) and BatchNorm2d."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .. import functional as F
from .._args import number
from .layers import ReLU, _dtype, _positive_int
from .module import Module, Parameter, _replaced, kept, saved


def channel_sample_shape(label: str, channels: int, input_shape) -> tuple:
    """The sample shape (C, H, W) of a per-channel layer; ValueError naming
    `label` when the input is not one."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[0] != channels:
        raise ValueError(f"{label} expects one sample of shape ({channels}, H, W), got {shape}")
    return shape


class LocalResponseNorm(Module):
    """PyTorch's LocalResponseNorm: x / (k + alpha / size * sum of x^2 over
    `size` neighbouring channels) ** beta."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size = _positive_int(size, "size")
        self.alpha, self.beta, self.k = float(alpha), float(beta), float(k)
        self._x = None

    def _args(self):
        return dict(size=self.size, alpha=self.alpha, beta=self.beta, k=self.k)

    def forward(self, x):
        self._x = kept(x)
        return F.local_response_norm(x, **self._args())

    def backward(self, grad_output):
        return F.local_response_norm_backward(grad_output, saved(self._x, self), **self._args())

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def config(self):
        return self._args()

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self._args().items())


class BatchNorm2d(Module):
    """Batch normalisation per channel. Training normalises with the batch's
    statistics and updates the running ones (unbiased variance, weight
    `momentum`; momentum None: a cumulative moving average, weight 1 /
    num_batches_tracked, as PyTorch); eval normalises with the running
    statistics. bias=False keeps the weight and drops the bias (PyTorch 2.13)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype=np.float32, *,
                 bias: bool = True):
        super().__init__()
        self.num_features = _positive_int(num_features, "num_features")
        self.eps = number(eps, "eps")
        if momentum is not None:
            momentum = number(momentum, "momentum")
        self.momentum = momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        dt = _dtype(dtype)
        self.weight = Parameter(np.ones(num_features, dtype=dt)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype=dt)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype=dt))
            self.register_buffer("running_var", np.ones(num_features, dtype=dt))
            self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        else:
            self.running_mean = self.running_var = None
        self._saved = None
        self._relu_input = None

    def forward(self, x):
        return self._forward(x, False)

    def fuses(self, following):
        return type(following) is ReLU

    def forward_fused(self, x):
        """relu(batch_norm(x)) in one pass; backward_fused is its backward. A
        forward or backward replaced on this instance (viz's capture, the
        distributed reducer's wrapper, a user's hook) still runs: then this
        is forward, then the ReLU, and backward_fused goes through backward."""
        if _replaced(self):
            y = self.forward(x)
            self._relu_input = kept(y)
            return F.relu(y)
        self._relu_input = None
        return self._forward(x, True)

    def _forward(self, x, relu: bool):
        use_batch = self.training or not self.track_running_stats
        weight = None if self.weight is None else self.weight.data
        bias = None if self.bias is None else self.bias.data
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self._set_buffer("num_batches_tracked", self.num_batches_tracked + 1)
            if self.momentum is None:  # the mean of all batches so far
                factor = 1.0 / float(self.num_batches_tracked)
        out, mean, var = F.batch_norm(
            x, self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None, weight, bias,
            training=use_batch, momentum=factor, eps=self.eps, return_stats=True, relu=relu)
        self._saved = kept((x, mean, var, use_batch, out if relu else None))
        return out

    def backward(self, grad_output):
        if self._saved is not None and self._saved[4] is not None:
            raise RuntimeError("BatchNorm2d.backward after forward_fused: use backward_fused")
        return self._backward(grad_output)

    def backward_fused(self, grad_output):
        if self._relu_input is not None:  # forward_fused ran unfused (replaced methods)
            return self.backward(F.relu_backward(grad_output, self._relu_input))
        if saved(self._saved, self, "forward_fused")[4] is None:
            raise RuntimeError("BatchNorm2d.backward_fused needs forward_fused before it")
        return self._backward(grad_output)

    def _backward(self, grad_output):
        x, mean, var, use_batch, relu_output = saved(self._saved, self)
        weight = None if self.weight is None else self.weight.data
        gx, gw, gb = F.batch_norm_backward(grad_output, x, mean, var, weight,
                                           training=use_batch, eps=self.eps,
                                           relu_output=relu_output)
        if self.weight is not None:
            self.weight.accumulate_grad(gw)
        if self.bias is not None:
            self.bias.accumulate_grad(gb)
        return gx

    def output_shape(self, input_shape):
        return channel_sample_shape(f"BatchNorm2d({self.num_features})", self.num_features,
                                    input_shape)

    def config(self):
        config = dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum,
                      affine=self.affine, track_running_stats=self.track_running_stats)
        if self.affine and self.bias is None:
            # only when False: files before the attribute stay as they were,
            # and readers before it refuse it rather than ignore it
            config["bias"] = False
        return config

    def lower(self, g, x, prefix):
        attrs = self.config()
        if self.momentum is None:  # the format's momentum is a number, unused by inference
            del attrs["momentum"]
        return g.node("BatchNorm2d", [x], name=prefix, attrs=attrs)

    def extra_repr(self):
        s = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
        if self.affine and self.bias is None:
            s += ", bias=False"
        return s
