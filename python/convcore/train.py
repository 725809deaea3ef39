"""Training loop: fit() a model with a loss, an optimiser and data loaders,
evaluate() it and predict() with it.

    history = fit(model, CrossEntropyLoss(), SGD(model.parameters(), 0.01, momentum=0.9),
                  train_loader, val_loader, epochs=20,
                  scheduler=ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=2),
                  early_stopping=5)

Loaders are any iterables of (x_batch, y_batch) (convcore.data.DataLoader).
Accuracy is the fraction of samples whose largest logit is the target.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ._arrays import array_module, to_host
from .nn.module import Module
from .optim import Optimizer, ReduceLROnPlateau

__all__ = ["History", "fit", "evaluate", "predict"]


class History:
    """Per-epoch records of a fit() run. Each field is a list with one entry
    per epoch (val_* hold nan without a validation loader). epoch_time is
    the wall time of the epoch (training and validation); images_per_sec
    counts training images over the training pass alone."""

    fields = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time",
              "images_per_sec")

    def __init__(self):
        for name in self.fields:
            setattr(self, name, [])
        self.best_epoch: Optional[int] = None    # set when early stopping is on
        self.stopped_early = False

    def append(self, **record) -> None:
        for name in self.fields:
            getattr(self, name).append(record[name])

    def __len__(self) -> int:
        return len(self.epoch)

    def as_dict(self) -> Dict[str, list]:
        """The per-epoch lists by field name (copies)."""
        return {name: list(getattr(self, name)) for name in self.fields}

    def plot(self, path: Optional[str] = None):
        """Loss, accuracy and learning rate against epoch, as a matplotlib
        Figure; saved to path if given (the format follows its extension)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError('History.plot needs matplotlib: pip install "convcore[viz]"') \
                from None
        fig = Figure(figsize=(12, 3.6), layout="constrained")
        ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
        has_val = any(not math.isnan(v) for v in self.val_loss)
        for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
            ax.plot(self.epoch, getattr(self, f"train_{key}"), "o-", label="train")
            if has_val:
                ax.plot(self.epoch, getattr(self, f"val_{key}"), "o-", label="validation")
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.legend()
        if self.best_epoch is not None:
            ax_acc.axvline(self.best_epoch, color="grey", linestyle=":", label="best epoch")
            ax_acc.legend()
        ax_lr.plot(self.epoch, self.lr, "o-")
        ax_lr.set_yscale("log")
        ax_lr.set_title("learning rate")
        ax_lr.set_xlabel("epoch")
        if path is not None:
            fig.savefig(path)
        return fig

    def __repr__(self) -> str:
        return f"History({len(self)} epochs)"


def _check_model(model) -> None:
    if not isinstance(model, Module):
        raise TypeError(f"model must be a convcore.nn.Module, got {type(model).__name__}")


def _count_correct(logits, targets) -> int:
    predicted = to_host(logits.argmax(axis=1))   # N class indices, from the GPU if there
    return int(np.count_nonzero(predicted == np.asarray(targets)))


def _batch_loss_sum(loss_fn, loss, n: int) -> float:
    """The summed loss of a batch, whatever the loss's reduction (a float,
    also when the loss is a 0-d GPU array)."""
    loss = float(loss)
    return loss if getattr(loss_fn, "reduction", "mean") == "sum" else loss * n


def _on_model_device(model: Module):
    """A function that moves a numpy batch to where the model's parameters
    are: cupy after model.to("cuda"), else the batch as it is."""
    params = model.parameters()
    xp = array_module(params[0].data) if params else np
    return (lambda batch: batch) if xp is np else xp.asarray


def evaluate(model: Module, loader, loss_fn=None, distributed=None) -> Tuple[float, float]:
    """(mean loss, accuracy) over a loader's batches, in eval mode (dropout
    off, batch norm on running statistics); the model's mode is restored
    afterwards. loss_fn defaults to CrossEntropyLoss(). With distributed (a
    convcore.distributed.ProcessGroup), each rank evaluates its shard of
    the loader and every rank returns the figures over all of them."""
    _check_model(model)
    if loss_fn is None:
        from .nn.loss import CrossEntropyLoss
        loss_fn = CrossEntropyLoss()
    if distributed is not None:
        _check_group(distributed)
        loader = distributed.shard(loader)
    to_device = _on_model_device(model)
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        for xb, yb in loader:
            if len(yb) == 0:
                continue
            logits = model(to_device(xb))
            total_loss += _batch_loss_sum(loss_fn, loss_fn(logits, yb), len(yb))
            correct += _count_correct(logits, yb)
            seen += len(yb)
    finally:
        model.train(was_training)
    if distributed is not None:
        sums = distributed.allreduce_(np.array([total_loss, correct, seen], dtype=np.float64),
                                      "the all-reduce of the evaluation")
        total_loss, correct, seen = float(sums[0]), int(sums[1]), int(sums[2])
    if seen == 0:
        raise ValueError("loader yielded no samples")
    return total_loss / seen, correct / seen


def _check_group(group) -> None:
    from .distributed import ProcessGroup
    if not isinstance(group, ProcessGroup):
        raise TypeError(f"distributed must be a convcore.distributed.ProcessGroup (from "
                        f"convcore.distributed.init()), got {type(group).__name__}")


def predict(model: Module, x, batch_size: int = 256) -> np.ndarray:
    """The model's outputs (logits) for every sample of x, computed in eval
    mode in batches; predict(...).argmax(1) gives the classes."""
    _check_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    x = np.asarray(x)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"x must hold at least one sample, got shape {x.shape}")
    was_training = model.training
    model.eval()
    to_device = _on_model_device(model)
    try:
        outputs = [to_host(model(to_device(np.ascontiguousarray(x[i:i + batch_size]))))
                   for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(outputs)


class _Progress:
    """One summary line per epoch through print_fn and, when the stream
    (stderr) is a terminal and tqdm is installed, a tqdm bar of the epoch's
    batches that is cleared before the summary line."""

    def __init__(self, enabled: bool, print_fn: Callable, stream=None):
        self.enabled = enabled
        self.print_fn = print_fn
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tqdm = None
        if enabled and callable(isatty) and isatty():
            try:
                from tqdm import tqdm
                self.tqdm = tqdm
            except ImportError:  # tqdm comes with the demo and data extras; lines suffice
                pass
        self._bar = None

    def batch(self, label: str, done: int, total: Optional[int], loss: float,
              acc: float) -> None:
        if self.tqdm is None:
            return
        if self._bar is None:
            self._bar = self.tqdm(total=total, desc=label, unit="batch", file=self.stream,
                                  leave=False, dynamic_ncols=True)
        self._bar.set_postfix_str(f"loss {loss:.4f} acc {100 * acc:5.1f}%", refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def epoch(self, line: str) -> None:
        self.close()
        if self.enabled:
            self.print_fn(line)


def _positive_int(value, name: str, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


def fit(model: Module, loss_fn, optimizer: Optimizer, train_loader, val_loader=None,
        epochs: int = 10, scheduler=None, early_stopping: Optional[int] = None,
        progress: bool = True, print_fn: Callable = print, distributed=None,
        checkpoint=None, resume: bool = False) -> History:
    """Trains model for `epochs` passes over train_loader and returns the History.

    Each batch: zero the gradients, forward, loss, backward, optimizer.step().
    The model is in train() mode for training and eval() mode for validation.
    scheduler.step() runs after every epoch; a ReduceLROnPlateau gets the
    validation accuracy (mode='max') or loss (mode='min'), or the training
    ones without a val_loader. early_stopping=k stops after k epochs without
    a better validation accuracy (equal accuracy with a lower loss counts as
    better) and loads the best epoch's weights back into the model.
    progress prints one line per epoch through print_fn, and shows a tqdm
    bar of the batches on stderr when it is a terminal and tqdm is installed.

    distributed: a convcore.distributed.ProcessGroup for data-parallel
    training. The loaders (DataLoaders) are split across the ranks, their
    batch_size counting per rank; rank 0's initial weights go to every rank;
    gradients are averaged over the global batch; only rank 0 prints and
    writes the checkpoint; every rank ends with bit-identical parameters.

    checkpoint: a file written (atomically) after every epoch with the model,
    the optimiser, the scheduler, the loader's random state and the history.
    resume=True continues from that file when it exists (and starts afresh
    when it does not), so rerunning the same command resumes a stopped job."""
    _check_model(model)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a convcore.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if not callable(loss_fn) or not hasattr(loss_fn, "backward"):
        raise TypeError("loss_fn must be callable as loss_fn(logits, targets) and have "
                        f"backward(), got {type(loss_fn).__name__}")
    epochs = _positive_int(epochs, "epochs")
    patience = _positive_int(early_stopping, "early_stopping", allow_none=True)
    if patience is not None and val_loader is None:
        raise ValueError("early_stopping needs a val_loader")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    if checkpoint is not None:
        from .io import _fspath
        checkpoint = _fspath(checkpoint, "checkpoint")

    group, reducer = distributed, None
    if group is not None:
        _check_group(group)
        from .distributed import GradientReducer
        train_loader = group.shard(train_loader)
        group.check_same_model(model)
        group.broadcast_model(model)
        reducer = GradientReducer(model, group)
    is_root = group is None or group.is_root
    to_device = _on_model_device(model)   # batches follow the model to the GPU
    mean_loss = getattr(loss_fn, "reduction", "mean") != "sum"

    bar = _Progress(bool(progress) and is_root, print_fn)
    history = History()
    best_key, best_state, bad_epochs, first_epoch = None, None, 0, 1
    if resume:
        saved = _read_checkpoint(checkpoint, group)
        if saved is not None:
            first_epoch, best_key, best_state, bad_epochs = _restore(
                saved, model, optimizer, scheduler, train_loader, history)
            if progress and is_root:
                print_fn(f"resumed from {checkpoint} after epoch {first_epoch - 1}")
    try:
        total_batches = len(train_loader)
    except TypeError:
        total_batches = None
    width = len(str(epochs))

    input_grad = model.input_grad
    model.set_input_grad(False)  # the loop never reads the input's gradient
    try:
        for epoch in range(first_epoch, epochs + 1):
            lr = optimizer.lr
            start = time.perf_counter()
            model.train()
            total_loss, correct, seen = 0.0, 0, 0
            for b, (xb, yb) in enumerate(train_loader, 1):
                optimizer.zero_grad()
                n = len(yb)
                loss_sum, right = 0.0, 0
                if n:
                    logits = model(to_device(xb))
                    loss = loss_fn(logits, yb)
                    loss_sum, right = _batch_loss_sum(loss_fn, loss, n), _count_correct(logits, yb)
                if reducer is None:
                    if not math.isfinite(loss_sum):
                        _diverged(loss_sum, epoch, b)
                    model.backward(loss_fn.backward())
                else:
                    # this rank's gradient, weighted by its samples, summed over the ranks
                    if n:
                        reducer.backward(loss_fn.backward(), n if mean_loss else 1)
                    else:
                        reducer.skip_backward()
                    sums = group.allreduce_(np.array([loss_sum, right, n], dtype=np.float64),
                                            "the all-reduce of the batch statistics")
                    reducer.finish(sums[2] if mean_loss else 1.0)
                    loss_sum, right, n = float(sums[0]), int(sums[1]), int(sums[2])
                    if not math.isfinite(loss_sum):
                        _diverged(loss_sum / max(n, 1), epoch, b)
                optimizer.step()
                total_loss += loss_sum
                correct += right
                seen += n
                bar.batch(f"epoch {epoch:>{width}}/{epochs}", b, total_batches,
                          total_loss / max(seen, 1), correct / max(seen, 1))
            if seen == 0:
                raise ValueError("train_loader yielded no samples")
            train_time = time.perf_counter() - start
            if group is not None:
                # batch norm's running statistics come from rank 0's slices
                group.broadcast_model_buffers(model)
                group.check_identical(model)
            train_loss, train_acc = total_loss / seen, correct / seen
            val_loss, val_acc = (evaluate(model, val_loader, loss_fn, distributed=group)
                                 if val_loader is not None else (math.nan, math.nan))
            epoch_time = time.perf_counter() - start
            history.append(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                           val_loss=val_loss, val_acc=val_acc, lr=lr, epoch_time=epoch_time,
                           images_per_sec=seen / train_time if train_time > 0 else math.inf)

            line = (f"epoch {epoch:>{width}}/{epochs}  train loss {train_loss:.4f} "
                    f"acc {100 * train_acc:5.1f}%")
            if val_loader is not None:
                line += f"  val loss {val_loss:.4f} acc {100 * val_acc:5.1f}%"
            line += f"  lr {lr:.3g}  {epoch_time:.2f} s  {seen / train_time:,.0f} img/s"

            if scheduler is not None:
                if isinstance(scheduler, ReduceLROnPlateau):
                    has_val = val_loader is not None
                    if scheduler.mode == "max":
                        scheduler.step(val_acc if has_val else train_acc)
                    else:
                        scheduler.step(val_loss if has_val else train_loss)
                else:
                    scheduler.step()

            stop = False
            if patience is not None:
                key = (val_acc, -val_loss)
                if best_key is None or key > best_key:
                    best_key, best_state, bad_epochs = key, model.state_dict(), 0
                    history.best_epoch = epoch
                    line += "  *"
                else:
                    bad_epochs += 1
                    stop = bad_epochs >= patience
            bar.epoch(line)
            if checkpoint is not None and is_root:
                _write_checkpoint(checkpoint, epoch, model, optimizer, scheduler, train_loader,
                                  history, best_key, best_state, bad_epochs)
            if stop:
                history.stopped_early = True
                if progress and is_root:
                    print_fn(f"early stopping: no better validation accuracy for {patience} "
                             f"epochs")
                break
    finally:
        model.set_input_grad(input_grad)
        bar.close()
        if reducer is not None:
            reducer.close()

    if best_state is not None:
        model.load_state_dict(best_state)
        if progress and is_root and history.best_epoch != history.epoch[-1]:
            print_fn(f"restored the weights of epoch {history.best_epoch} (validation "
                     f"accuracy {100 * history.val_acc[history.best_epoch - 1]:.1f}%)")
    return history


def _diverged(loss: float, epoch: int, batch: int):
    raise FloatingPointError(f"the loss is {loss} at epoch {epoch}, batch {batch}: "
                             f"training diverged (try a lower learning rate)")


# ----------------------------------------------------------------------- checkpoints

_CHECKPOINT_KEY = "convcore_checkpoint"


def _write_checkpoint(path, epoch, model, optimizer, scheduler, loader, history, best_key,
                      best_state, bad_epochs) -> None:
    """One safetensors file: the arrays of the model ("model/..."), of the
    optimiser's state ("optimizer/i/name") and of the best epoch's weights
    ("best/..."), and everything else as JSON in the metadata."""
    import json
    from .io import save_state_dict_file

    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for i, entry in enumerate(opt.pop("state")):
        for name, value in entry.items():
            tensors[f"optimizer/{i}/{name}"] = value
    if best_state is not None:
        tensors.update({f"best/{k}": v for k, v in best_state.items()})
    rng = getattr(loader, "rng", None)
    info = {
        "epoch": epoch,
        "optimizer": opt,
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": None if rng is None else rng.bit_generator.state,
        "history": history.as_dict(),
        "best_epoch": history.best_epoch,
        "best_key": None if best_key is None else list(best_key),
        "bad_epochs": bad_epochs,
    }
    save_state_dict_file(tensors, path, {_CHECKPOINT_KEY: json.dumps(info)})


def _read_checkpoint(path, group):
    """The checkpoint's (tensors, info), or None when the file does not exist;
    with a process group, rank 0 reads it and sends it to the others."""
    import json
    import os
    from .io import load_state_dict_file

    saved = None
    if group is None or group.is_root:
        if os.path.exists(path):
            tensors, meta = load_state_dict_file(path)
            if _CHECKPOINT_KEY not in meta:
                raise ValueError(f"checkpoint: {path} is not a checkpoint written by fit()")
            saved = (tensors, json.loads(meta[_CHECKPOINT_KEY]))
    if group is not None:
        saved = group.broadcast_object(saved, what="the checkpoint")
    return saved


def _restore(saved, model, optimizer, scheduler, loader, history):
    tensors, info = saved
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    opt = dict(info["optimizer"])
    state = [{} for _ in optimizer.params]
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, i, name = key.split("/", 2)
            state[int(i)][name] = value
    opt["state"] = state
    optimizer.load_state_dict(opt)
    if scheduler is not None and info["scheduler"] is not None:
        scheduler.load_state_dict(info["scheduler"])
    rng = getattr(loader, "rng", None)
    if rng is not None and info["rng"] is not None:
        rng.bit_generator.state = info["rng"]
    for record in zip(*(info["history"][f] for f in History.fields)):
        history.append(**dict(zip(History.fields, record)))
    history.best_epoch = info["best_epoch"]
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
    best_key = None if info["best_key"] is None else tuple(info["best_key"])
    return info["epoch"] + 1, best_key, (best or None), info["bad_epochs"]
