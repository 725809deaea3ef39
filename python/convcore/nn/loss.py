"""Softmax cross-entropy."""
from __future__ import annotations

import numpy as np


class CrossEntropyLoss:
    """Mean softmax cross-entropy of logits (N, classes) against integer
    targets (N,), with optional label smoothing (as PyTorch: the target
    distribution is (1 - s) one-hot + s / classes). `loss(logits, targets)`
    returns the loss; `backward()` the gradient with respect to the logits."""

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean"):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self._saved = None

    def __call__(self, logits, targets) -> float:
        return self.forward(logits, targets)

    def forward(self, logits, targets) -> float:
        if type(logits).__module__.split(".")[0] == "cupy":
            # On the GPU (loss.cu): the loss comes back as a 0-d cupy array,
            # so a training step needs no device-to-host sync; float() it to print.
            from ..cuda.functional import cross_entropy
            loss, grad = cross_entropy(logits, targets, self.label_smoothing, self.reduction)
            self._saved = ("gpu", grad)
            return loss
        if not isinstance(logits, np.ndarray) or logits.ndim != 2:
            raise ValueError(f"logits must be a 2-D array (N, classes), got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        targets = np.asarray(targets)
        n, classes = logits.shape
        if targets.shape != (n,) or targets.dtype.kind not in "iu":
            raise ValueError(f"targets must be {n} integer class indices, got "
                             f"{targets.dtype} {targets.shape}")
        if n and (targets.min() < 0 or targets.max() >= classes):
            raise ValueError(f"targets must be in [0, {classes}), got values in "
                             f"[{targets.min()}, {targets.max()}]")
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        target_dist = np.full_like(log_probs, self.label_smoothing / classes)
        target_dist[np.arange(n), targets] += 1.0 - self.label_smoothing
        losses = -(target_dist * log_probs).sum(axis=1)
        scale = 1.0 / n if (self.reduction == "mean" and n) else 1.0
        self._saved = (log_probs, target_dist, scale)
        return float(losses.sum() * scale)

    def backward(self) -> np.ndarray:
        if self._saved is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss")
        if isinstance(self._saved[0], str):  # ("gpu", grad)
            return self._saved[1]
        log_probs, target_dist, scale = self._saved
        # d/dlogits of -sum(t * log softmax) = softmax * sum(t) - t, and sum(t) = 1
        return ((np.exp(log_probs) - target_dist) * scale).astype(log_probs.dtype)
