"""Pictures of a network: first-layer filters, activation maps and training
curves, saved as PNG files.

matplotlib is optional (``pip install "convcore[viz]"``) and imported only
when a picture is drawn. Figures are drawn on matplotlib's Agg canvas
directly, so neither pyplot's global state nor the user's backend is touched.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["filters_grid", "activation_maps", "activations", "training_curves"]


# ---------------------------------------------------------------------- helpers

def _matplotlib():
    """(Figure, FigureCanvasAgg), or an ImportError saying how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('convcore.viz needs matplotlib: pip install "convcore[viz]" '
                          f'(or pip install matplotlib) ({e})') from None
    return Figure, FigureCanvasAgg


def _new_figure(figsize):
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str, dpi: int) -> str:
    fig.savefig(path, format="png", dpi=dpi, facecolor="white")
    return path


def _fspath(path, name: str = "path") -> str:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _positive_int(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _grid_options(ncols, padding, pixel_scale, dpi) -> Tuple[Optional[int], int, int]:
    """The layout options that filters_grid and activation_maps share,
    checked: (ncols, padding, dpi)."""
    ncols = _positive_int(ncols, "ncols", allow_none=True)
    padding = _nonneg_int(padding, "padding")
    dpi = _positive_int(dpi, "dpi")
    if not isinstance(pixel_scale, (int, float)) or not 0 < pixel_scale <= 100:
        raise ValueError(f"pixel_scale must be a number in (0, 100], got {pixel_scale!r}")
    return ncols, padding, dpi


def _real_array(value, name: str) -> np.ndarray:
    """A float64 copy of a real, finite-or-not numeric array (Parameters and
    objects with .data accepted)."""
    data = value if isinstance(value, np.ndarray) else getattr(value, "data", value)
    try:
        arr = np.asarray(data)
    except Exception as e:
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__} ({e})") \
            from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _normalise(tile: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant (or all-NaN) tile becomes mid grey. NaNs
    become 0 and infinities are clipped to the finite range."""
    finite = tile[np.isfinite(tile)]
    if finite.size == 0:
        return np.full_like(tile, 0.5)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.full_like(tile, 0.5)
    out = (np.clip(np.nan_to_num(tile, nan=lo), lo, hi) - lo) / (hi - lo)
    return out


def _grid_shape(n: int, ncols: Optional[int]) -> Tuple[int, int]:
    cols = ncols if ncols is not None else max(1, math.ceil(math.sqrt(n)))
    cols = min(cols, n)
    return math.ceil(n / cols), cols


def _mosaic(tiles: Sequence[np.ndarray], ncols: Optional[int], padding: int,
            background: float) -> np.ndarray:
    """Tiles of one shape (h, w) or (h, w, 3) laid out row by row with
    `padding` pixels of `background` between and around them."""
    n = len(tiles)
    rows, cols = _grid_shape(n, ncols)
    h, w = tiles[0].shape[:2]
    extra = tiles[0].shape[2:]
    out = np.full((rows * h + (rows + 1) * padding, cols * w + (cols + 1) * padding) + extra,
                  background, dtype=np.float64)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        out[y:y + h, x:x + w] = tile
    return out


def _show_mosaic(image: np.ndarray, path: str, title: Optional[str], cmap: Optional[str],
                 pixel_scale: float, dpi: int, colorbar: bool = False) -> str:
    """Draws an image at about `pixel_scale` screen pixels per image pixel."""
    h, w = image.shape[:2]
    width_in = max(2.0, w * pixel_scale / dpi)
    title_in = 0.15 + 0.2 * (title.count("\n") + 1) if title else 0.0
    height_in = max(1.5, h * pixel_scale / dpi) + title_in
    fig = _new_figure((width_in + (0.8 if colorbar else 0.0), height_in))
    ax = fig.add_axes([0.02, 0.02, 0.96, 0.96 - title_in / height_in])
    im = ax.imshow(image, cmap=cmap, interpolation="nearest", vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10, y=0.995, va="top")
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------- filters

def filters_grid(weight, path, *, ncols: Optional[int] = None, max_filters: int = 64,
                 max_channels: int = 16, padding: int = 1, pixel_scale: float = 8.0,
                 title: Optional[str] = None, dpi: int = 100) -> str:
    """Draws convolution filters (out_channels, in_channels, kH, kW) as an
    image grid and saves it as a PNG; returns the path.

    With 3 input channels (an RGB first layer, like AlexNet's or VGG's conv1)
    each filter is one colour tile; with 1 input channel, one grey tile; with
    any other count each filter is a row of grey tiles, one per input channel
    (at most `max_channels`). Each filter is normalised to [0, 1] on its own.
    `weight` may be an array, a Parameter or a layer with a `.weight` (Conv2d).
    At most `max_filters` filters are drawn; `ncols` sets the columns of the
    grid (default: about square), `pixel_scale` the screen pixels per weight.
    """
    if hasattr(weight, "weight") and not isinstance(weight, np.ndarray):
        weight = weight.weight
    w = _real_array(weight, "weight")
    path = _fspath(path)
    if w.ndim != 4:
        raise ValueError(f"weight must have shape (out_channels, in_channels, kH, kW), "
                         f"got {w.shape}")
    if min(w.shape) == 0:
        raise ValueError(f"weight is empty (shape {w.shape})")
    ncols, padding, dpi = _grid_options(ncols, padding, pixel_scale, dpi)
    max_filters = _positive_int(max_filters, "max_filters")
    max_channels = _positive_int(max_channels, "max_channels")
    out_c, in_c = w.shape[:2]
    shown = w[:max_filters]
    # small grids (3x3 filters) are drawn larger, up to ~500 screen pixels
    grid_rows, grid_cols = _grid_shape(len(shown), ncols)
    if in_c not in (1, 3):
        grid_rows, grid_cols = len(shown), min(in_c, max_channels)
    longest = max(grid_rows * (w.shape[2] + padding), grid_cols * (w.shape[3] + padding))
    pixel_scale = max(pixel_scale, min(24.0, 500.0 / longest))
    auto_title = title is None
    if auto_title:
        title = f"{out_c} filters of {in_c}x{w.shape[2]}x{w.shape[3]}" + \
            (f" (first {len(shown)})" if len(shown) < out_c else "")

    if in_c == 3:
        tiles = [_normalise(f).transpose(1, 2, 0) for f in shown]  # (kH, kW, RGB)
        image = _mosaic(tiles, ncols, padding, background=1.0)
        return _show_mosaic(image, path, title, None, pixel_scale, dpi)
    if in_c == 1:
        tiles = [_normalise(f[0]) for f in shown]
        image = _mosaic(tiles, ncols, padding, background=1.0)
        return _show_mosaic(image, path, title, "gray", pixel_scale, dpi)
    # one row per filter, one grey tile per input channel
    channels = min(in_c, max_channels)
    tiles = []
    for f in shown:
        f = _normalise(f[:channels])
        tiles.extend(f[c] for c in range(channels))
    image = _mosaic(tiles, channels, padding, background=1.0)
    if auto_title:
        title += "\nrows: filters, columns: input channels" + \
            (f" (the first {channels})" if channels < in_c else "")
    return _show_mosaic(image, path, title, "gray", pixel_scale, dpi)


# ------------------------------------------------------------------ activations

class _Captured(Exception):
    """Stops the forward pass once the wanted layer has run."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def activations(model, x, layer_name: str) -> np.ndarray:
    """The output of the submodule named `layer_name` (a name from
    model.named_modules(), e.g. "3" or "features.3" or "layer1.0.conv1") for
    the input x, in eval mode (the model's train/eval modes are restored).
    The forward pass stops once that layer has run. x may be one sample
    (C, H, W), which gives one sample's output (C', H', W'), or a batch."""
    from .nn.module import Module

    if not isinstance(model, Module):
        raise TypeError(f"model must be a convcore.nn.Module, got {type(model).__name__}")
    if not isinstance(layer_name, str):
        raise TypeError(f"layer_name must be a str, got {type(layer_name).__name__}")
    modules = dict(model.named_modules())
    if layer_name not in modules or layer_name == "":
        names = [n for n in modules if n]
        shown = ", ".join(repr(n) for n in names[:40]) + (", ..." if len(names) > 40 else "")
        raise ValueError(f"layer_name {layer_name!r} is not a submodule of the model "
                         f"(its submodules: {shown or 'none'})")
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"x must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (3, 4):
        raise ValueError(f"x must be one sample (C, H, W) or a batch (N, C, H, W), "
                         f"got shape {arr.shape}")
    single = arr.ndim == 3
    batch = np.ascontiguousarray(arr[None] if single else arr, dtype=model.dtype)

    target = modules[layer_name]
    modes = [(m, m.training) for m in model.modules()]
    patched_before = target.__dict__.get("forward")  # an instance-level forward, if any
    original = target.forward

    def capture(inp):
        raise _Captured(original(inp))

    object.__setattr__(target, "forward", capture)
    model.eval()
    try:
        model(batch)
    except _Captured as c:
        out = c.value
    else:
        raise ValueError(f"layer_name {layer_name!r}: that layer did not run in the model's "
                         f"forward pass")
    finally:
        if patched_before is None:
            object.__delattr__(target, "forward")
        else:
            object.__setattr__(target, "forward", patched_before)
        for m, mode in modes:
            object.__setattr__(m, "training", mode)
    out = np.asarray(out)
    return out[0] if single else out


def activation_maps(model_or_output, path, *, x=None, layer: Optional[str] = None,
                    ncols: Optional[int] = None, max_maps: int = 64, padding: int = 1,
                    cmap: str = "viridis", pixel_scale: float = 2.0,
                    title: Optional[str] = None, dpi: int = 100) -> str:
    """Draws a layer's activation maps for one input as a grid (each map
    normalised to [0, 1] on its own) and saves it as a PNG; returns the path.

    Pass the activations, an array (C, H, W) or (1, C, H, W) such as
    `activations(model, x, "features.3")` returns, or pass the model with
    `x=` one input and `layer=` the layer's name. At most `max_maps` channels
    are drawn.
    """
    from .nn.module import Module

    if isinstance(model_or_output, Module):
        if x is None or layer is None:
            raise ValueError("activation_maps(model, ...) needs x= (one input) and layer= "
                             "(a layer name)")
        act = _real_array(activations(model_or_output, x, layer), "model_or_output")
        if title is None:
            title = f"activations of {layer!r}"
    else:
        if x is not None or layer is not None:
            raise ValueError("x= and layer= are for activation_maps(model, ...); pass either "
                             "a model or the activations")
        act = _real_array(model_or_output, "model_or_output")
    path = _fspath(path)
    if act.ndim == 4:
        if act.shape[0] != 1:
            raise ValueError(f"model_or_output must be the activations of one input, (C, H, W) "
                             f"or (1, C, H, W), got a batch of shape {act.shape}")
        act = act[0]
    if act.ndim != 3:
        raise ValueError(f"model_or_output must have shape (C, H, W) or (1, C, H, W), got "
                         f"{act.shape} (use a convolutional layer's output, not a flat one)")
    if min(act.shape) == 0:
        raise ValueError(f"model_or_output is empty (shape {act.shape})")
    ncols, padding, dpi = _grid_options(ncols, padding, pixel_scale, dpi)
    max_maps = _positive_int(max_maps, "max_maps")
    if not isinstance(cmap, str):
        raise TypeError(f"cmap must be a colormap name, got {type(cmap).__name__}")
    try:
        import matplotlib
        matplotlib.colormaps[cmap]
    except ImportError:
        _matplotlib()
    except KeyError:
        raise ValueError(f"cmap {cmap!r} is not a matplotlib colormap") from None
    c, h, w = act.shape
    shown = act[:max_maps]
    tiles = [_normalise(a) for a in shown]
    image = _mosaic(tiles, ncols, padding, background=1.0)
    heading = title if title is not None else "activation maps"
    heading += f": {c} maps of {h}x{w}" + (f" (first {len(shown)})" if len(shown) < c else "")
    # keep small maps legible: at least ~6 screen pixels per activation
    scale = max(pixel_scale, min(6.0, 600.0 / max(image.shape)))
    # a masked background so the gaps stay white whatever the colormap
    mask = np.ones(image.shape, dtype=bool)
    rows, cols = _grid_shape(len(tiles), ncols)
    for i in range(len(tiles)):
        r, cc = divmod(i, cols)
        y, x0 = padding + r * (h + padding), padding + cc * (w + padding)
        mask[y:y + h, x0:x0 + w] = False
    return _show_mosaic(np.ma.masked_array(image, mask), path, heading, cmap, scale, dpi)


# ---------------------------------------------------------------------- curves

_SPLITS = ("train", "val", "valid", "validation", "test")
_METRICS = {"loss": "loss", "acc": "accuracy", "accuracy": "accuracy", "top1": "accuracy"}


def _series(history: Mapping, key: str) -> np.ndarray:
    values = history[key]
    try:
        arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"history[{key!r}] must be a list of numbers, got "
                         f"{str(values)[:80]}") from None
    if arr.ndim != 1:
        raise ValueError(f"history[{key!r}] must be a flat list of numbers, got shape {arr.shape}")
    return arr


def training_curves(history, path, *, title: Optional[str] = None, dpi: int = 100) -> str:
    """Plots loss and accuracy per epoch, train and validation, and saves the
    figure as a PNG; returns the path.

    `history` maps names like "train_loss", "val_loss", "train_acc",
    "val_acc" (also "valid_"/"test_" and "_accuracy") to per-epoch lists;
    an optional "epoch" list gives the x values (default 1, 2, ...). Missing
    entries (None or NaN) leave gaps, and curves with no values are left
    out. A convcore.train.History (anything with .as_dict()) or an object
    with a `.history` dict (Keras-style) is accepted too. Only the panels
    with data are drawn.
    """
    if not isinstance(history, Mapping):
        if callable(getattr(history, "as_dict", None)):  # convcore.train.History
            history = history.as_dict()
        elif isinstance(getattr(history, "history", None), Mapping):  # Keras-style
            history = history.history
    if not isinstance(history, Mapping):
        raise TypeError(f"history must be a dict of lists (train_loss, val_loss, train_acc, "
                        f"val_acc, ...), got {type(history).__name__}")
    path = _fspath(path)
    dpi = _positive_int(dpi, "dpi")
    panels = {"loss": [], "accuracy": []}
    for key in history:
        if not isinstance(key, str) or "_" not in key:
            continue
        split, _, metric = key.partition("_")
        if split in _SPLITS and metric in _METRICS:
            panels[_METRICS[metric]].append((split, key))
    if not panels["loss"] and not panels["accuracy"]:
        raise ValueError(f"history has no curves to plot: expected keys like train_loss, "
                         f"val_loss, train_acc, val_acc; got {list(history)[:20]}")
    series = {key: _series(history, key) for p in panels.values() for _, key in p}
    for key, arr in series.items():
        if arr.size == 0:
            raise ValueError(f"history[{key!r}] is empty")
    # curves with no values at all (val_* without a validation set) are left out
    for name in panels:
        panels[name] = [(split, key) for split, key in panels[name]
                        if not np.isnan(series[key]).all()]
    if not panels["loss"] and not panels["accuracy"]:
        raise ValueError("history has no values to plot: every curve is None/NaN")
    epochs = None
    if "epoch" in history:
        epochs = _series(history, "epoch")
        longest = max(a.size for a in series.values())
        if epochs.size < longest:
            raise ValueError(f"history['epoch'] has {epochs.size} entries but "
                             f"{longest} epochs are recorded")

    drawn = [name for name in ("loss", "accuracy") if panels[name]]
    fig = _new_figure((5.0 * len(drawn), 3.8))
    axes = fig.subplots(1, len(drawn), squeeze=False)[0]
    styles = {"train": dict(color="tab:blue", marker="o"),
              "val": dict(color="tab:orange", marker="s"),
              "valid": dict(color="tab:orange", marker="s"),
              "validation": dict(color="tab:orange", marker="s"),
              "test": dict(color="tab:green", marker="^")}
    for ax, name in zip(axes, drawn):
        for split, key in panels[name]:
            y = series[key]
            xs = epochs[:y.size] if epochs is not None else np.arange(1, y.size + 1)
            ax.plot(xs, y, label=split if split != "valid" else "val", markersize=3,
                    linewidth=1.5, **styles[split])
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend()
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, dpi)
