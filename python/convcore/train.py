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
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from ._backends import backend_of, to_host
from .nn.module import Module, no_grad
from .optim import Optimizer, ReduceLROnPlateau

__all__ = ["EarlyStopping", "History", "fit", "evaluate", "predict"]


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
    return backend_of(params[0].data).from_host if params else (lambda batch: batch)


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
    group = _process_group(distributed)
    loader = group.shard(loader)
    to_device = _on_model_device(model)
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        with no_grad():  # nothing kept for a backward
            for xb, yb in loader:
                if len(yb) == 0:
                    continue
                logits = model(to_device(xb))
                total_loss += _batch_loss_sum(loss_fn, loss_fn(logits, yb), len(yb))
                correct += _count_correct(logits, yb)
                seen += len(yb)
    finally:
        model.train(was_training)
    sums = group.allreduce_(np.array([total_loss, correct, seen], dtype=np.float64),
                            "the all-reduce of the evaluation")
    total_loss, correct, seen = float(sums[0]), int(sums[1]), int(sums[2])
    if seen == 0:
        raise ValueError("loader yielded no samples")
    return total_loss / seen, correct / seen


def _process_group(distributed):
    """The group that fit() and evaluate() run in: `distributed`, or a group
    of this one process when it is None, so that both take one code path."""
    from .distributed import ProcessGroup, SingleProcessGroup
    if distributed is None:
        return SingleProcessGroup()
    if not isinstance(distributed, (ProcessGroup, SingleProcessGroup)):
        raise TypeError(f"distributed must be a convcore.distributed.ProcessGroup (from "
                        f"convcore.distributed.init()), got {type(distributed).__name__}")
    return distributed


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
        with no_grad():
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
        self.message(line)

    def message(self, line: str) -> None:
        if self.enabled:
            self.print_fn(line)


def _positive_int(value, name: str, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


class EarlyStopping:
    """Stops training after `patience` epochs without a better validation
    accuracy (equal accuracy with a lower loss counts as better) and keeps
    the best epoch's weights. fit(early_stopping=k) makes one; fit() starts
    the one it is given afresh, and writes its state into the checkpoint."""

    def __init__(self, patience: int):
        self.patience = _positive_int(patience, "patience")
        self.reset()

    def reset(self) -> None:
        self.best_key: Optional[Tuple[float, float]] = None   # the best (val_acc, -val_loss)
        self.best_state: Optional[dict] = None   # the model's state_dict() at that epoch
        self.bad_epochs = 0                      # epochs since then

    def update(self, val_loss: float, val_acc: float, model: Module) -> bool:
        """Records an epoch's validation figures: True when the epoch is the
        best so far (and keeps the model's weights)."""
        key = (val_acc, -val_loss)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_state, self.bad_epochs = key, model.state_dict(), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def __repr__(self) -> str:
        return f"EarlyStopping(patience={self.patience})"


class _NoEarlyStopping(EarlyStopping):
    """fit()'s early stopping when it is off: records nothing and never stops.
    It still carries what a resumed checkpoint held, as fit() always has:
    written on into the next checkpoints, those weights loaded at the end."""

    def __init__(self):
        self.patience = None
        self.reset()

    def update(self, val_loss: float, val_acc: float, model: Module) -> bool:
        return False

    @property
    def should_stop(self) -> bool:
        return False


def _step_scheduler(scheduler, record: dict, has_val: bool) -> None:
    """Steps the scheduler after an epoch: a ReduceLROnPlateau gets the
    validation accuracy (mode='max') or loss (mode='min'), or the training
    ones without a validation loader; any other scheduler just step()s."""
    if scheduler is None:
        return
    if isinstance(scheduler, ReduceLROnPlateau):
        split = "val" if has_val else "train"
        scheduler.step(record[f"{split}_acc"] if scheduler.mode == "max" else
                       record[f"{split}_loss"])
    else:
        scheduler.step()


def fit(model: Module, loss_fn, optimizer: Optimizer, train_loader, val_loader=None,
        epochs: int = 10, scheduler=None, early_stopping: Union[int, EarlyStopping, None] = None,
        progress: bool = True, print_fn: Callable = print, distributed=None,
        checkpoint=None, resume: bool = False) -> History:
    """Trains model for `epochs` passes over train_loader and returns the History.

    Each batch: zero the gradients, forward, loss, backward, optimizer.step().
    The model is in train() mode for training and eval() mode for validation.
    scheduler.step() runs after every epoch; a ReduceLROnPlateau gets the
    validation accuracy (mode='max') or loss (mode='min'), or the training
    ones without a val_loader. early_stopping=k stops after k epochs without
    a better validation accuracy (equal accuracy with a lower loss counts as
    better) and loads the best epoch's weights back into the model; it may
    also be an EarlyStopping(k).
    progress prints one line per epoch through print_fn, and shows a tqdm
    bar of the batches on stderr when it is a terminal and tqdm is installed.

    distributed: a convcore.distributed.ProcessGroup for data-parallel
    training. The loaders (DataLoaders) are split across the ranks, their
    batch_size counting per rank; rank 0's initial weights go to every rank;
    gradients are averaged over the global batch; only rank 0 prints and
    writes the checkpoint; every rank ends with bit-identical parameters.
    Without it, fit() runs the same steps in a group of this one process.

    checkpoint: a file written (atomically) after every epoch with the model,
    the optimiser, the scheduler, the loader's random state and the history.
    resume=True continues from that file when it exists (and starts afresh
    when it does not), so rerunning the same command resumes a stopped job."""
    epochs, stopper, checkpoint = _checked_fit_arguments(
        model, loss_fn, optimizer, val_loader, epochs, scheduler, early_stopping, checkpoint,
        resume)
    group = _process_group(distributed)
    train_loader = group.shard(train_loader)
    group.check_same_model(model)
    group.broadcast_model(model)
    reducer = group.gradient_reducer(model)
    bar = _Progress(bool(progress) and group.is_root, print_fn)
    history = History()
    input_grad = model.input_grad
    model.set_input_grad(False)  # the loop never reads the input's gradient
    try:
        first_epoch = 1
        saved = _read_checkpoint(checkpoint, group) if resume else None
        if saved is not None:
            first_epoch = _restore(saved, model, optimizer, scheduler, train_loader, history,
                                   stopper)
            bar.message(f"resumed from {checkpoint} after epoch {first_epoch - 1}")
        for epoch in range(first_epoch, epochs + 1):
            label = f"epoch {epoch:>{len(str(epochs))}}/{epochs}"
            record = _run_epoch(model, loss_fn, optimizer, train_loader, val_loader, group,
                                reducer, bar, epoch, label)
            history.append(**record)
            line = _epoch_line(label, record, val_loader is not None)
            _step_scheduler(scheduler, record, val_loader is not None)
            if stopper.update(record["val_loss"], record["val_acc"], model):
                history.best_epoch = epoch
                line += "  *"
            bar.epoch(line)
            if checkpoint is not None and group.is_root:
                _write_checkpoint(checkpoint, epoch, model, optimizer, scheduler, train_loader,
                                  history, stopper)
            if stopper.should_stop:
                history.stopped_early = True
                bar.message(f"early stopping: no better validation accuracy for "
                            f"{stopper.patience} epochs")
                break
    finally:
        model.set_input_grad(input_grad)
        bar.close()
        reducer.close()

    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
        if history.best_epoch != history.epoch[-1]:
            bar.message(f"restored the weights of epoch {history.best_epoch} (validation "
                        f"accuracy {100 * history.val_acc[history.best_epoch - 1]:.1f}%)")
    return history


def _checked_fit_arguments(model, loss_fn, optimizer, val_loader, epochs, scheduler,
                           early_stopping, checkpoint, resume):
    """fit()'s arguments checked: (epochs, the EarlyStopping, the checkpoint path)."""
    _check_model(model)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a convcore.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if not callable(loss_fn) or not hasattr(loss_fn, "backward"):
        raise TypeError("loss_fn must be callable as loss_fn(logits, targets) and have "
                        f"backward(), got {type(loss_fn).__name__}")
    epochs = _positive_int(epochs, "epochs")
    stopper = early_stopping
    if not isinstance(stopper, EarlyStopping):
        patience = _positive_int(early_stopping, "early_stopping", allow_none=True)
        stopper = _NoEarlyStopping() if patience is None else EarlyStopping(patience)
    if stopper.patience is not None and val_loader is None:
        raise ValueError("early_stopping needs a val_loader")
    stopper.reset()
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    if checkpoint is not None:
        from .io import _fspath
        checkpoint = _fspath(checkpoint, "checkpoint")
    return epochs, stopper, checkpoint


def _run_epoch(model, loss_fn, optimizer, train_loader, val_loader, group, reducer, bar,
               epoch: int, label: str) -> dict:
    """One epoch, the training pass then the validation: its History record."""
    lr = optimizer.lr
    start = time.perf_counter()
    model.train()
    to_device = _on_model_device(model)   # batches follow the model to the GPU
    try:
        total_batches = len(train_loader)
    except TypeError:
        total_batches = None
    total_loss, correct, seen = 0.0, 0, 0
    for b, (xb, yb) in enumerate(train_loader, 1):
        optimizer.zero_grad()
        loss_sum, right, n = _train_step(model, loss_fn, to_device, group, reducer, xb, yb)
        if not math.isfinite(loss_sum):
            _diverged(loss_sum / max(n, 1), epoch, b)
        optimizer.step()
        total_loss += loss_sum
        correct += right
        seen += n
        bar.batch(label, b, total_batches, total_loss / max(seen, 1), correct / max(seen, 1))
    if seen == 0:
        raise ValueError("train_loader yielded no samples")
    train_time = time.perf_counter() - start
    # batch norm's running statistics come from rank 0's slices
    group.broadcast_model_buffers(model)
    group.check_identical(model)
    val_loss, val_acc = (evaluate(model, val_loader, loss_fn, distributed=group)
                         if val_loader is not None else (math.nan, math.nan))
    return dict(epoch=epoch, train_loss=total_loss / seen, train_acc=correct / seen,
                val_loss=val_loss, val_acc=val_acc, lr=lr,
                epoch_time=time.perf_counter() - start,
                images_per_sec=seen / train_time if train_time > 0 else math.inf)


def _train_step(model, loss_fn, to_device, group, reducer, xb, yb) -> Tuple[float, int, int]:
    """Forward and backward of this rank's slice of a batch, the gradients
    summed over the ranks: the batch's summed loss, correct predictions and
    samples over all ranks."""
    n = len(yb)
    mean_loss = getattr(loss_fn, "reduction", "mean") != "sum"
    loss_sum, right = 0.0, 0
    if n:
        logits = model(to_device(xb))
        loss = loss_fn(logits, yb)
        loss_sum, right = _batch_loss_sum(loss_fn, loss, n), _count_correct(logits, yb)
        # this rank's gradient, weighted by its samples, summed over the ranks
        reducer.backward(loss_fn.backward(), n if mean_loss else 1)
    else:
        reducer.skip_backward()
    sums = group.allreduce_(np.array([loss_sum, right, n], dtype=np.float64),
                            "the all-reduce of the batch statistics")
    reducer.finish(sums[2] if mean_loss else 1.0)
    return float(sums[0]), int(sums[1]), int(sums[2])


def _epoch_line(label: str, record: dict, has_val: bool) -> str:
    """The summary line of an epoch's History record."""
    line = f"{label}  train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:5.1f}%"
    if has_val:
        line += f"  val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:5.1f}%"
    return line + (f"  lr {record['lr']:.3g}  {record['epoch_time']:.2f} s  "
                   f"{record['images_per_sec']:,.0f} img/s")


def _diverged(loss: float, epoch: int, batch: int):
    raise FloatingPointError(f"the loss is {loss} at epoch {epoch}, batch {batch}: "
                             f"training diverged (try a lower learning rate)")


# ----------------------------------------------------------------------- checkpoints

_CHECKPOINT_KEY = "convcore_checkpoint"


def _write_checkpoint(path, epoch, model, optimizer, scheduler, loader, history,
                      stopper: EarlyStopping) -> None:
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
    if stopper.best_state is not None:
        tensors.update({f"best/{k}": v for k, v in stopper.best_state.items()})
    rng = getattr(loader, "rng", None)
    info = {
        "epoch": epoch,
        "optimizer": opt,
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": None if rng is None else rng.bit_generator.state,
        "history": history.as_dict(),
        "best_epoch": history.best_epoch,
        "best_key": None if stopper.best_key is None else list(stopper.best_key),
        "bad_epochs": stopper.bad_epochs,
    }
    save_state_dict_file(tensors, path, {_CHECKPOINT_KEY: json.dumps(info)})


def _read_checkpoint(path, group):
    """The checkpoint's (tensors, info), or None when the file does not exist;
    rank 0 of the process group reads it and sends it to the others."""
    import json
    import os
    from .io import load_state_dict_file

    saved = None
    if group.is_root and os.path.exists(path):
        tensors, meta = load_state_dict_file(path)
        if _CHECKPOINT_KEY not in meta:
            raise ValueError(f"checkpoint: {path} is not a checkpoint written by fit()")
        saved = (tensors, json.loads(meta[_CHECKPOINT_KEY]))
    return group.broadcast_object(saved, what="the checkpoint")


def _restore(saved, model, optimizer, scheduler, loader, history,
             stopper: EarlyStopping) -> int:
    """Loads a checkpoint's state into fit()'s objects: the epoch to go on from."""
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
    stopper.best_key = None if info["best_key"] is None else tuple(info["best_key"])
    stopper.best_state = best or None
    stopper.bad_epochs = info["bad_epochs"]
    return info["epoch"] + 1
