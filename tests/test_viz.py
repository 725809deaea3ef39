"""convcore.viz: filter grids, activation maps and training curves as PNGs."""

import sys

import numpy as np
import pytest

import convcore.nn as nn
from convcore import viz
from convcore.nn import init

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mpl_image():
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (convcore[viz])")
    import matplotlib.image
    return matplotlib.image


def read_png(mpl_image, path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = mpl_image.imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img


def small_cnn():
    init.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


# ----------------------------------------------------------------------- filters

def test_rgb_filters_grid(tmp_path, mpl_image):
    w = np.random.default_rng(0).standard_normal((64, 3, 11, 11)).astype(np.float32)
    path = tmp_path / "filters.png"
    assert viz.filters_grid(w, path) == str(path)
    img = read_png(mpl_image, path)
    h, wd = img.shape[:2]
    # an 8 x 8 grid of 11 x 11 tiles (97 pixels square) at 8 screen pixels each, plus a title
    assert 700 < wd < 850 and wd < h < wd + 100
    # colour tiles: the image is not grey
    rgb = img[..., :3]
    assert np.abs(rgb[..., 0] - rgb[..., 1]).max() > 0.2


def test_filters_grid_accepts_layers_parameters_and_other_channel_counts(tmp_path, mpl_image):
    conv = nn.Conv2d(3, 10, 5)
    for i, weight in enumerate([conv, conv.weight, conv.weight.data]):
        read_png(mpl_image, viz.filters_grid(weight, tmp_path / f"w{i}.png", ncols=5))
    grey = read_png(mpl_image, viz.filters_grid(np.random.rand(8, 1, 5, 5),
                                                tmp_path / "grey.png"))
    assert np.allclose(grey[..., 0], grey[..., 1])
    # more input channels than shown: one row of tiles per filter
    read_png(mpl_image, viz.filters_grid(np.random.rand(4, 40, 3, 3), tmp_path / "many.png",
                                         max_channels=8, title="conv2"))
    # constant filters and NaNs do not break the normalisation
    w = np.zeros((2, 3, 3, 3))
    w[1, 0, 0, 0] = np.nan
    read_png(mpl_image, viz.filters_grid(w, tmp_path / "flat.png"))
    # max_filters limits the grid
    small = read_png(mpl_image, viz.filters_grid(np.random.rand(100, 3, 3, 3),
                                                 tmp_path / "few.png", max_filters=4))
    assert small.shape[1] < 1000


@pytest.mark.parametrize("kwargs,name", [
    (dict(weight=np.zeros((3, 3, 3))), "weight"),
    (dict(weight=np.zeros((0, 3, 3, 3))), "weight"),
    (dict(ncols=0), "ncols"),
    (dict(max_filters=-1), "max_filters"),
    (dict(max_channels=1.5), "max_channels"),
    (dict(padding=-1), "padding"),
    (dict(pixel_scale=0), "pixel_scale"),
    (dict(dpi=0), "dpi"),
])
def test_filters_grid_bad_arguments(tmp_path, kwargs, name):
    args = dict(weight=np.zeros((4, 3, 3, 3)), path=tmp_path / "x.png")
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        viz.filters_grid(args.pop("weight"), args.pop("path"), **args)
    assert not (tmp_path / "x.png").exists()


def test_filters_grid_type_errors(tmp_path):
    with pytest.raises(TypeError, match="weight"):
        viz.filters_grid(np.array([["a"]]), tmp_path / "x.png")
    with pytest.raises(TypeError, match="path"):
        viz.filters_grid(np.zeros((4, 3, 3, 3)), 5)


# ------------------------------------------------------------------ activations

def test_activations_of_a_sequential_layer():
    model = small_cnn()
    x = np.random.default_rng(1).standard_normal((3, 8, 8)).astype(np.float32)
    model.eval()
    expected = model[:3](x[None])[0]  # conv, bn, relu
    model.train()
    before = model.state_dict()
    got = viz.activations(model, x, "2")
    np.testing.assert_array_equal(got, expected)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    for k, v in model.state_dict().items():  # eval mode: running statistics untouched
        np.testing.assert_array_equal(v, before[k])
    # a batch gives a batch
    assert viz.activations(model, np.stack([x, x]), "4").shape == (2, 4, 4, 4)
    # and the model works as before afterwards
    assert model(x[None]).shape == (1, 3)


def test_activations_of_a_nested_layer():
    init.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BasicBlock(8, 8),
                          nn.BasicBlock(8, 16, stride=2))
    model.eval()
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    h = model[1](model[0](x))
    expected = model[2].conv1(h)
    np.testing.assert_array_equal(viz.activations(model, x, "2.conv1"), expected)
    np.testing.assert_array_equal(viz.activations(model, x, "2.downsample.0"),
                                  model[2].downsample[0](h))


def test_activations_bad_arguments():
    model = small_cnn()
    x = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="layer_name 'nope'.*'0', '1'"):
        viz.activations(model, x, "nope")
    with pytest.raises(ValueError, match="layer_name"):
        viz.activations(model, x, "")
    with pytest.raises(TypeError, match="layer_name"):
        viz.activations(model, x, 2)
    with pytest.raises(ValueError, match="x must"):
        viz.activations(model, np.zeros((8, 8)), "1")
    with pytest.raises(TypeError, match="model"):
        viz.activations(lambda v: v, x, "1")
    assert "forward" not in model[1].__dict__  # the capture hook is gone even after errors
    with pytest.raises(ValueError):
        viz.activations(model, np.zeros((5, 8, 8), np.float32), "4")  # the conv rejects it
    assert "forward" not in model[4].__dict__


def test_activation_maps(tmp_path, mpl_image):
    model = small_cnn()
    x = np.random.default_rng(3).standard_normal((3, 8, 8)).astype(np.float32)
    act = viz.activations(model, x, "2")
    a = read_png(mpl_image, viz.activation_maps(act, tmp_path / "a.png"))
    b = read_png(mpl_image, viz.activation_maps(act[None], tmp_path / "b.png"))
    assert a.shape == b.shape
    c = read_png(mpl_image, viz.activation_maps(model, tmp_path / "c.png", x=x, layer="2",
                                                cmap="gray", ncols=6))
    assert c.shape[1] > c.shape[0]  # one row of six maps
    read_png(mpl_image, viz.activation_maps(np.random.rand(200, 5, 5), tmp_path / "d.png",
                                            max_maps=10))


@pytest.mark.parametrize("first,kwargs,name", [
    (np.zeros((2, 4, 5, 5)), {}, "model_or_output"),
    (np.zeros((4, 25)), {}, "model_or_output"),
    (np.zeros((0, 5, 5)), {}, "model_or_output"),
    (np.zeros((4, 5, 5)), dict(max_maps=0), "max_maps"),
    (np.zeros((4, 5, 5)), dict(ncols=-2), "ncols"),
    (np.zeros((4, 5, 5)), dict(cmap="no-such-map"), "cmap"),
    (np.zeros((4, 5, 5)), dict(layer="1"), "x= and layer="),
    ("model", dict(layer="1"), "x="),
])
def test_activation_maps_bad_arguments(tmp_path, mpl_image, first, kwargs, name):
    if isinstance(first, str):
        first = small_cnn()
    with pytest.raises(ValueError, match=name):
        viz.activation_maps(first, tmp_path / "x.png", **kwargs)


# ------------------------------------------------------------------------ curves

def history(epochs=10):
    t = np.arange(epochs)
    return {"train_loss": list(np.exp(-t / 3) + 0.1), "val_loss": list(np.exp(-t / 4) + 0.2),
            "train_acc": list(1 - 0.9 * np.exp(-t / 3)),
            "val_acc": list(1 - 0.9 * np.exp(-t / 4)), "lr": [0.1] * epochs}


def test_training_curves(tmp_path, mpl_image):
    img = read_png(mpl_image, viz.training_curves(history(), tmp_path / "c.png", title="run"))
    assert img.shape[1] > 1.8 * img.shape[0]  # two panels side by side
    # only losses: one panel
    one = read_png(mpl_image, viz.training_curves(
        {"train_loss": [3, 2, 1]}, tmp_path / "one.png"))
    assert one.shape[1] < img.shape[1]
    # gaps, explicit epochs, other split names
    h = {"epoch": [0, 5, 10], "train_loss": [1.0, None, 0.5], "test_accuracy": [0.1, 0.5, 0.9],
         "valid_acc": [float("nan"), 0.4, 0.8]}
    read_png(mpl_image, viz.training_curves(h, tmp_path / "gaps.png"))

    class KerasLike:
        def __init__(self):
            self.history = history(3)

    read_png(mpl_image, viz.training_curves(KerasLike(), tmp_path / "keras.png"))

    class HistoryLike:  # convcore.train.History's interface; no validation set
        def as_dict(self):
            return {"epoch": [1, 2, 3], "train_loss": [2.0, 1.0, 0.5],
                    "train_acc": [0.3, 0.6, 0.8], "val_loss": [float("nan")] * 3,
                    "val_acc": [float("nan")] * 3, "lr": [0.1] * 3}

    read_png(mpl_image, viz.training_curves(HistoryLike(), tmp_path / "history.png"))


@pytest.mark.parametrize("hist,exc,name", [
    ([1, 2, 3], TypeError, "history"),
    ({}, ValueError, "history"),
    ({"lr": [0.1]}, ValueError, "history has no curves"),
    ({"train_loss": []}, ValueError, r"history\['train_loss'\]"),
    ({"train_loss": ["a", "b"]}, ValueError, r"history\['train_loss'\]"),
    ({"train_loss": [[1, 2], [3, 4]]}, ValueError, r"history\['train_loss'\]"),
    ({"train_loss": 3.0}, ValueError, r"history\['train_loss'\]"),
    ({"train_loss": [1, 2, 3], "epoch": [1, 2]}, ValueError, r"history\['epoch'\]"),
    ({"train_loss": [None, float("nan")]}, ValueError, "history has no values"),
])
def test_training_curves_bad_arguments(tmp_path, mpl_image, hist, exc, name):
    with pytest.raises(exc, match=name):
        viz.training_curves(hist, tmp_path / "x.png")


# ------------------------------------------------------------- without matplotlib

def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends",
                "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r'pip install "convcore\[viz\]"'):
        viz.filters_grid(np.zeros((4, 3, 3, 3)), tmp_path / "x.png")
    with pytest.raises(ImportError, match="matplotlib"):
        viz.training_curves({"train_loss": [1.0]}, tmp_path / "x.png")
    with pytest.raises(ImportError, match="matplotlib"):
        viz.activation_maps(np.zeros((2, 3, 3)), tmp_path / "x.png")
    # activations() needs no matplotlib
    assert viz.activations(small_cnn(), np.zeros((3, 8, 8), np.float32), "0").shape == (6, 8, 8)
