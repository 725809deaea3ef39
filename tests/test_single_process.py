"""fit() and evaluate() without distributed run in a group of one process
(convcore.distributed.SingleProcessGroup), on the same code path as a
data-parallel job; early stopping is an EarlyStopping object."""
import inspect
import subprocess
import sys

import numpy as np
import pytest

from convcore import distributed, nn
from convcore.data import DataLoader
from convcore.optim import SGD, ReduceLROnPlateau
from convcore.train import EarlyStopping, evaluate, fit
from _helpers import convcore_env


def _problem(seed=0, n=48):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 1, 6, 6)).astype(np.float32)
    y = (x[:, 0, :3].sum(axis=(1, 2)) > 0).astype(np.int64)
    nn.init.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 2))
    return (model, DataLoader(x[:32], y[:32], 8, shuffle=True, seed=seed),
            DataLoader(x[32:], y[32:], 8))


def _state(model):
    return {k: np.array(v) for k, v in model.state_dict().items()}


# ------------------------------------------------------------- the group of one

def test_the_group_of_one_has_every_public_method_of_a_process_group():
    ours = {name for name, _ in inspect.getmembers(distributed.SingleProcessGroup)
            if not name.startswith("_")}
    theirs = {name for name, _ in inspect.getmembers(distributed.ProcessGroup)
              if not name.startswith("_")}
    # the MPI plumbing (waiting with a deadline) has nothing to do in one process
    assert theirs - ours == {"SPIN_SECONDS", "wait", "timed_out"}
    for name in ours - {"rank", "size", "is_root"}:
        assert inspect.signature(getattr(distributed.SingleProcessGroup, name)).parameters.keys() \
            == inspect.signature(getattr(distributed.ProcessGroup, name)).parameters.keys(), name


def test_the_group_of_one_returns_its_inputs():
    group = distributed.SingleProcessGroup()
    assert (group.rank, group.size, group.is_root) == (0, 1, True)
    a = np.array([1.5, 2.0])
    assert group.allreduce_(a, "x") is a and group.broadcast_(a) is a
    np.testing.assert_array_equal(a, [1.5, 2.0])
    assert group.allgather_bytes(b"ab") == [b"ab"]
    obj = {"k": [1]}
    assert group.broadcast_object(obj, what="y") is obj
    batches = [(np.zeros((1, 1, 6, 6), np.float32), np.zeros(1, np.int64))]
    assert group.shard(batches) is batches     # any iterable, not only a DataLoader
    with pytest.raises(SystemExit):
        group.abort(3)


def test_the_group_of_one_leaves_the_model_alone():
    model, _, _ = _problem()
    before = _state(model)
    buffers = {name: b for name, b in model.named_buffers()}
    group = distributed.SingleProcessGroup()
    group.check_same_model(model)
    group.broadcast_model(model)
    group.broadcast_model_buffers(model)
    group.check_identical(model)
    after = dict(model.named_buffers())
    assert all(after[name] is b for name, b in buffers.items())   # not even copied
    for k, v in _state(model).items():
        np.testing.assert_array_equal(v, before[k])


def test_the_gradients_of_a_group_of_one_are_those_of_a_plain_backward():
    model, train, _ = _problem()
    xb, yb = next(iter(train))
    loss_fn = nn.CrossEntropyLoss()
    model.zero_grad()
    loss_fn(model(xb), yb)
    model.backward(loss_fn.backward())
    plain = [p.grad.copy() for p in model.parameters()]
    reducer = distributed.SingleProcessGroup().gradient_reducer(model)
    model.zero_grad()
    loss_fn(model(xb), yb)
    reducer.backward(loss_fn.backward(), weight=len(yb))
    reducer.finish(total_weight=3 * len(yb))   # no scaling: the group holds one process
    for p, g in zip(model.parameters(), plain):
        np.testing.assert_array_equal(p.grad, g)
    model.zero_grad()
    reducer.skip_backward()
    reducer.finish(0.0)
    assert all(not np.any(p.grad) for p in model.parameters())
    reducer.close()


def test_importing_distributed_needs_no_mpi():
    code = ("import sys; sys.modules['mpi4py'] = None\n"   # import mpi4py now fails
            "import numpy as np\n"
            "from convcore import distributed, nn\n"
            "from convcore.data import DataLoader\n"
            "from convcore.optim import SGD\n"
            "from convcore.train import fit\n"
            "m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))\n"
            "h = fit(m, nn.CrossEntropyLoss(), SGD(m.parameters(), 0.1),\n"
            "        DataLoader(np.ones((4, 1, 2, 2), np.float32), np.arange(4) % 2, 2),\n"
            "        epochs=1, progress=False)\n"
            "print(len(h), distributed.SingleProcessGroup())\n"
            "distributed.init()\n")
    proc = subprocess.run([sys.executable, "-c", code], env=convcore_env(),
                          capture_output=True, text=True, timeout=120)
    assert "1 SingleProcessGroup()" in proc.stdout, proc.stderr[-2000:]
    assert "needs mpi4py" in proc.stderr   # only init() asks for MPI


# ------------------------------------------------------------- one code path

class _Recording(distributed.SingleProcessGroup):
    """A group of one that counts the calls fit() and evaluate() make."""

    calls: dict = {}

    def __getattribute__(self, name):
        if not name.startswith("_") and name not in ("rank", "size", "is_root", "calls"):
            type(self).calls[name] = type(self).calls.get(name, 0) + 1
        return super().__getattribute__(name)


def test_fit_without_distributed_takes_the_path_of_a_process_group(monkeypatch):
    monkeypatch.setattr(distributed, "SingleProcessGroup", _Recording)
    _Recording.calls = {}
    model, train, val = _problem()
    fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.1), train, val, epochs=2,
        progress=False)
    batches = 2 * len(train)
    assert _Recording.calls == {
        "shard": 1 + 2,                    # the training loader, then each validation
        "check_same_model": 1, "broadcast_model": 1, "gradient_reducer": 1,
        "allreduce_": batches + 2,         # the batch statistics, then each validation
        "broadcast_model_buffers": 2, "check_identical": 2}
    _Recording.calls = {}
    evaluate(model, val)
    assert _Recording.calls == {"shard": 1, "allreduce_": 1}


def test_an_explicit_group_of_one_trains_as_no_group():
    results = []
    for group in (None, distributed.SingleProcessGroup()):
        model, train, val = _problem()
        history = fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.1, momentum=0.9),
                      train, val, epochs=2, progress=False, distributed=group)
        results.append((history.train_loss, history.val_loss, _state(model)))
    (loss_a, val_a, state_a), (loss_b, val_b, state_b) = results
    assert loss_a == loss_b and val_a == val_b
    for k in state_a:
        np.testing.assert_array_equal(state_a[k], state_b[k])


# ------------------------------------------------------------- early stopping

class _Model:
    def __init__(self):
        self.version = 0

    def state_dict(self):
        self.version += 1
        return {"version": self.version}


def test_early_stopping_tracks_the_best_epoch():
    stopper, model = EarlyStopping(2), _Model()
    assert stopper.update(val_loss=1.0, val_acc=0.5, model=model)
    assert not stopper.update(val_loss=0.9, val_acc=0.4, model=model)    # worse accuracy
    assert stopper.bad_epochs == 1 and not stopper.should_stop
    assert stopper.update(val_loss=0.8, val_acc=0.5, model=model)        # same, lower loss
    assert stopper.best_key == (0.5, -0.8) and stopper.best_state == {"version": 2}
    assert stopper.bad_epochs == 0
    assert not stopper.update(val_loss=0.8, val_acc=0.5, model=model)    # equal is not better
    assert not stopper.update(val_loss=0.1, val_acc=0.3, model=model)
    assert stopper.should_stop and stopper.best_state == {"version": 2}
    stopper.reset()
    assert (stopper.best_key, stopper.best_state, stopper.bad_epochs) == (None, None, 0)
    assert repr(stopper) == "EarlyStopping(patience=2)"
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="patience must be a positive int"):
            EarlyStopping(bad)


def test_fit_takes_an_early_stopping_object_as_it_takes_an_int():
    results = []
    stopper = EarlyStopping(1)
    for early_stopping in (1, stopper, stopper):   # used twice: fit starts it afresh
        model, train, val = _problem()
        history = fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.5), train, val,
                      epochs=6, early_stopping=early_stopping, progress=False)
        results.append((history.val_loss, history.best_epoch, history.stopped_early,
                        _state(model)))
    assert results[0][:3] == results[1][:3] == results[2][:3]
    assert results[0][2], "the run should stop early for this test to compare stopping"
    for k, v in results[0][3].items():
        np.testing.assert_array_equal(v, results[1][3][k])
        np.testing.assert_array_equal(v, stopper.best_state[k])
    with pytest.raises(ValueError, match="early_stopping needs a val_loader"):
        fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.5), train,
            early_stopping=EarlyStopping(2))


class _Plateau(ReduceLROnPlateau):
    """Records the figure that fit() gives it."""

    def step(self, metric):
        self.seen.append(metric)
        super().step(metric)


@pytest.mark.parametrize("mode, with_val, field", [
    ("max", True, "val_acc"), ("min", True, "val_loss"),
    ("max", False, "train_acc"), ("min", False, "train_loss")])
def test_a_plateau_scheduler_gets_the_monitored_figure(mode, with_val, field):
    model, train, val = _problem()
    opt = SGD(model.parameters(), 0.1)
    sched = _Plateau(opt, mode=mode)
    sched.seen = []
    history = fit(model, nn.CrossEntropyLoss(), opt, train, val if with_val else None,
                  epochs=3, scheduler=sched, progress=False)
    assert sched.seen == getattr(history, field)
