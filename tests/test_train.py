"""convcore.train: fit, evaluate, predict, History, early stopping, progress, and the
demo."""
import io
import math
import sys

import numpy as np
import pytest

from convcore import nn
from convcore.data import DataLoader
from convcore.optim import SGD, Adam, Optimizer, ReduceLROnPlateau, StepLR
from convcore.train import History, evaluate, fit, predict


def _bars(n=240, seed=0):
    """Four classes of 8x8 images: a bright horizontal or vertical bar in the
    top/left or bottom/right half, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    for i, c in enumerate(y):
        pos = rng.integers(0, 4) + (4 if c % 2 else 0)
        if c < 2:
            x[i, 0, pos, :] += 1.0
        else:
            x[i, 0, :, pos] += 1.0
    return x, y


def _small_cnn(seed=0):
    nn.init.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 4))


def test_training_lowers_the_loss():
    x, y = _bars()
    model = _small_cnn()
    train = DataLoader(x[:200], y[:200], 20, shuffle=True, seed=0)
    val = DataLoader(x[200:], y[200:], 64)
    lines = []
    history = fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.1, momentum=0.9),
                  train, val, epochs=6, print_fn=lines.append)
    assert len(history) == 6 == len(lines)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.val_acc[-1] > 0.8
    assert all(0 <= a <= 1 for a in history.train_acc + history.val_acc)
    assert all(t > 0 for t in history.epoch_time) and all(r > 0 for r in history.images_per_sec)
    loss, acc = evaluate(model, val, nn.CrossEntropyLoss())
    assert loss == pytest.approx(history.val_loss[-1]) and acc == history.val_acc[-1]


def test_training_on_digits_subset():
    pytest.importorskip("sklearn", reason="load_digits needs scikit-learn")
    from convcore.data import load_digits, train_val_test_split
    x, y = load_digits()
    (xt, yt), (xv, yv), _ = train_val_test_split(x[:600], y[:600], 0.2, 0.0, seed=0)
    nn.init.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(128, 10))
    history = fit(model, nn.CrossEntropyLoss(), Adam(model.parameters(), 0.01),
                  DataLoader(xt, yt, 32, shuffle=True, seed=0), DataLoader(xv, yv, 128),
                  epochs=5, progress=False)
    assert history.train_loss[-1] < 0.3 * history.train_loss[0]
    assert history.val_acc[-1] > 0.85


class _Probe(nn.Module):
    """Identity that records whether each forward ran in training mode."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return x

    def backward(self, grad_output):
        return grad_output


def test_train_and_eval_modes():
    x, y = _bars(64)
    probe = _Probe()
    nn.init.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), probe)
    train = DataLoader(x[:48], y[:48], 16)
    val = DataLoader(x[48:], y[48:], 16)
    model.eval()
    fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.01), train, val, epochs=2,
        progress=False)
    # per epoch: 3 training batches in train mode, then 1 validation batch in eval mode
    assert probe.modes == [True, True, True, False] * 2
    model.train()
    probe.modes.clear()
    evaluate(model, val)
    out = predict(model, x, batch_size=10)
    assert probe.modes == [False] * (1 + 7)
    assert model.training  # evaluate and predict restore the mode
    assert out.shape == (64, 4)
    # predict's last batch of 4 takes linear's small-batch path, whose sums
    # run in another order: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose(out, model(x), rtol=1e-5, atol=1e-6)


class _Scripted(Optimizer):
    """Sets the parameters to the next entry of a script at every step."""

    def __init__(self, params, script):
        super().__init__(params, lr=0.1)
        self.script = list(script)

    def step(self):
        for p, value in zip(self.params, self.script.pop(0)):
            p.data = np.array(value, dtype=p.data.dtype)


def _two_class_problem():
    x = np.array([[1.0, 0.0], [0.0, 1.0]] * 4, np.float32)
    y = np.array([0, 1] * 4)
    nn.init.manual_seed(0)
    return nn.Linear(2, 2, bias=False), DataLoader(x, y, 8), DataLoader(x, y, 8)


GOOD = np.eye(2)           # 100% accuracy
SO_SO = np.eye(2) * 0.5    # also 100%, but a higher loss
BAD = np.eye(2)[::-1]      # 0%


def test_early_stopping_restores_the_best_weights():
    model, train, val = _two_class_problem()
    script = [[BAD], [SO_SO], [GOOD], [BAD], [SO_SO], [BAD], [GOOD]]
    lines = []
    history = fit(model, nn.CrossEntropyLoss(), _Scripted(model.parameters(), script), train,
                  val, epochs=7, early_stopping=3, print_fn=lines.append)
    # epoch 3 is best (equal accuracy to epoch 2 with a lower loss); 4-6 are no better
    assert history.val_acc[:3] == [0.0, 1.0, 1.0]
    assert history.best_epoch == 3 and history.stopped_early and len(history) == 6
    np.testing.assert_array_equal(model.weight.data, GOOD)
    assert any("early stopping" in line for line in lines)
    assert any("restored the weights of epoch 3" in line for line in lines)


def test_early_stopping_keeps_best_when_not_triggered():
    model, train, val = _two_class_problem()
    history = fit(model, nn.CrossEntropyLoss(),
                  _Scripted(model.parameters(), [[BAD], [GOOD], [SO_SO]]), train, val,
                  epochs=3, early_stopping=5, progress=False)
    assert not history.stopped_early and history.best_epoch == 2
    np.testing.assert_array_equal(model.weight.data, GOOD)


def test_schedulers_in_fit_and_recorded_lr():
    model, train, val = _two_class_problem()
    opt = _Scripted(model.parameters(), [[GOOD]] * 5)
    sched = ReduceLROnPlateau(opt, mode="max", patience=1, factor=0.5)
    history = fit(model, nn.CrossEntropyLoss(), opt, train, val, epochs=5, scheduler=sched,
                  progress=False)
    # accuracy stays at 1.0: epochs 2 and 3 are bad, so the rate halves after epoch 3
    assert history.lr == [0.1, 0.1, 0.1, 0.05, 0.05]
    model, train, val = _two_class_problem()
    opt = SGD(model.parameters(), lr=1.0)
    history = fit(model, nn.CrossEntropyLoss(), opt, train, epochs=5,
                  scheduler=StepLR(opt, 2, gamma=0.1), progress=False)
    assert history.lr == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    assert all(math.isnan(v) for v in history.val_loss + history.val_acc)


def test_history_as_dict_and_plot(tmp_path):
    model, train, val = _two_class_problem()
    history = fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.5), train, val,
                  epochs=3, progress=False)
    d = history.as_dict()
    assert set(d) == set(History.fields)
    assert all(len(v) == 3 for v in d.values()) and d["epoch"] == [1, 2, 3]
    d["epoch"].append(99)
    assert history.epoch == [1, 2, 3]  # a copy
    pytest.importorskip("matplotlib", reason="History.plot needs matplotlib")
    path = tmp_path / "history.png"
    fig = history.plot(str(path))
    assert path.stat().st_size > 1000 and len(fig.axes) == 3


def test_progress_output_without_a_tty(capsys):
    model, train, val = _two_class_problem()
    lines = []
    fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.1), train, val, epochs=2,
        print_fn=lines.append)
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # no live bar when stderr is not a terminal
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2")
    assert "val loss" in lines[0] and "img/s" in lines[0]
    fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.1), train, val, epochs=2,
        progress=False, print_fn=lines.append)
    assert len(lines) == 2


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr does in a console."""

    def isatty(self):
        return True


def test_tqdm_bar_on_a_terminal():
    pytest.importorskip("tqdm")
    from convcore.train import _Progress

    stream, lines = _Terminal(), []
    bar = _Progress(True, lines.append, stream)
    try:
        for done in range(1, 6):
            bar.batch("epoch 1/1", done, 5, 0.5, 0.9)
        assert stream.getvalue().startswith("\repoch 1/1:")
        # tqdm redraws at most every 0.1 s: read the bar's latest text from the bar itself
        assert "5/5" in str(bar._bar) and "loss 0.5000 acc  90.0%" in str(bar._bar)
    finally:
        bar.epoch("summary")
    assert lines == ["summary"]
    assert stream.getvalue().endswith("\r")  # leave=False: the bar is wiped before the line


def test_fit_draws_tqdm_bars_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    model, train, val = _two_class_problem()
    stream, lines = _Terminal(), []
    monkeypatch.setattr(sys, "stderr", stream)
    fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.1), train, val, epochs=2,
        print_fn=lines.append)
    drawn = stream.getvalue()
    assert drawn.startswith("\repoch 1/2:") and "\repoch 2/2:" in drawn
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2")  # the lines stay
    stream.seek(0)
    stream.truncate()
    fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.1), train, val, epochs=1,
        progress=False, print_fn=lines.append)
    assert stream.getvalue() == "" and len(lines) == 2


def test_fit_on_a_terminal_without_tqdm(monkeypatch):
    model, train, val = _two_class_problem()
    stream, lines = _Terminal(), []
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.1), train, val, epochs=2,
        print_fn=lines.append)
    assert stream.getvalue() == "" and len(lines) == 2


def test_divergence_raises():
    model, train, _ = _two_class_problem()
    x = np.full((4, 2), np.nan, np.float32)
    with pytest.raises(FloatingPointError, match="epoch 1, batch 1"):
        fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), 0.1),
            DataLoader(x, np.zeros(4, int), 4), epochs=1, progress=False)


def test_fit_bad_arguments():
    model, train, val = _two_class_problem()
    opt = SGD(model.parameters(), 0.1)
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="epochs"):
        fit(model, loss, opt, train, epochs=0)
    with pytest.raises(ValueError, match="early_stopping"):
        fit(model, loss, opt, train, epochs=1, early_stopping=2)
    with pytest.raises(ValueError, match="early_stopping"):
        fit(model, loss, opt, train, val, epochs=1, early_stopping=0)
    with pytest.raises(TypeError, match="optimizer"):
        fit(model, loss, "sgd", train)
    with pytest.raises(TypeError, match="model"):
        fit(lambda x: x, loss, opt, train)
    with pytest.raises(TypeError, match="loss_fn"):
        fit(model, lambda a, b: 0.0, opt, train)
    with pytest.raises(TypeError, match="scheduler"):
        fit(model, loss, opt, train, scheduler=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, np.zeros((2, 2), np.float32), batch_size=0)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, [])


# ------------------------------------------------------------------------ demo

def test_demo_fails_loudly_below_97_percent(capsys):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    from convcore import demo
    with pytest.raises(SystemExit, match="below 97%"):
        demo.main(["--epochs", "1"])
    out = capsys.readouterr().out
    assert "Test accuracy:" in out and "images/s" in out


@pytest.mark.slow
def test_demo_reaches_97_percent(capsys):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    from convcore import demo
    demo.main([])
    out = capsys.readouterr().out
    assert "Test accuracy:" in out and "MISMATCH" not in out
