"""Softmax cross-entropy."""
from __future__ import annotations

from .. import functional as F
from .._args import cross_entropy_options
from .._arrays import is_cupy
from .._backends import gpu_functional


class CrossEntropyLoss:
    """PyTorch's CrossEntropyLoss over convcore.functional.cross_entropy:
    logits (C,), (N, C) or (N, C, d1, ...) against class indices or class
    probabilities, with a weight per class, ignore_index, label smoothing
    (the target distribution is (1 - s) target + s / classes) and reduction
    'mean', 'sum' or 'none'. `loss(input, target)` returns the loss (a float,
    or an array of each position's loss for 'none'); `backward()` its
    gradient with respect to the logits (`backward(grad_output)` for 'none')."""

    def __init__(self, weight=None, *, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        self.ignore_index, self.reduction, self.label_smoothing = cross_entropy_options(
            ignore_index, reduction, label_smoothing)
        self.weight = weight  # checked against the logits' classes at each call
        self._saved = None

    def _options(self):
        return dict(ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing)

    def __call__(self, input, target):
        return self.forward(input, target)

    def forward(self, input, target):
        if is_cupy(input):
            # On the GPU (loss.cu): the loss comes back as a 0-d cupy array,
            # so a training step needs no device-to-host sync; float() it to print.
            gpu = gpu_functional("CrossEntropyLoss", lambda: "input")
            loss, grad = gpu.cross_entropy(input, target, self.label_smoothing, self.reduction,
                                           weight=self.weight, ignore_index=self.ignore_index)
            self._saved = ("gpu", grad)
            return loss
        loss = F.cross_entropy(input, target, self.weight, **self._options())
        self._saved = (input, target)
        return loss if self.reduction == "none" else float(loss)

    def backward(self, grad_output=None):
        """The gradient of the loss with respect to the logits, times
        grad_output (default 1; required, of the loss's shape, for 'none')."""
        if self._saved is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss")
        if isinstance(self._saved[0], str):  # ("gpu", grad): computed with the loss
            grad = self._saved[1]
            return grad if grad_output is None else grad * grad_output
        if grad_output is None and self.reduction != "none":
            grad_output = 1.0
        input, target = self._saved
        return F.cross_entropy_backward(grad_output, input, target, self.weight,
                                        **self._options())
