"""Softmax cross-entropy."""
from __future__ import annotations

from .._args import cross_entropy_options
from .._backends import backend_of


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
        # The input's backend computes it: on the CPU the loss is a float (an
        # array for 'none'); on the GPU (loss.cu) a 0-d device array, so that
        # a training step needs no device-to-host sync (float() it to print).
        backend = backend_of(input)
        loss, saved = backend.cross_entropy(input, target, self.weight, **self._options())
        self._saved = (backend, saved)
        return loss

    def backward(self, grad_output=None):
        """The gradient of the loss with respect to the logits, times
        grad_output (default 1; required, of the loss's shape, for 'none')."""
        if self._saved is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss")
        backend, saved = self._saved
        return backend.cross_entropy_grad(saved, grad_output)
