"""`python -m convcore bench --zoo`: every distinct convolution and linear
layer of the zoo's models, at each model's own input (model.input_shape:
3x224x224, AlexNet 3x227x227), timed forward and backward at batch 1 and 16
against PyTorch's CPU build, with the fraction of the machine's peak.

    python -m convcore bench --zoo [--threads 2] [--repeat 5] [--models resnet18 ...]
                                   [--batches 1 16] [--quick] [--no-torch]
                                   [--json out.json] [--markdown]
                                   [--random N [--seed S]]

--random N replaces the zoo's layers by N convolutions drawn at random (the
seed makes them reproducible), shapes a user might try that no zoo model
has: odd image sizes, rectangular and dilated kernels, strides 1-3, few or
many channels, groups (random_layers). Tune against the zoo, check against
these.

Layers: the Conv2d and Linear modules of each model with the input shape
that `summary` computes for them (nothing runs to find them). Two layers are
the same when (in_channels, out_channels, kernel, stride, padding, dilation,
groups, bias, input H, W) agree; each distinct layer is timed once and
records which models use it and how many times.

Passes, as the nn layers run them:
  fwd  convcore: functional.conv2d / linear; PyTorch: torch.nn.functional
  bwd  convcore: functional.conv2d_backward / linear_backward, what
       Conv2d.backward and Linear.backward call (grad_input, grad_weight,
       and grad_bias when the layer has a bias; until 2026-12-06 grad_bias
       always); PyTorch: aten.convolution_backward with the same gradients,
       and for linear what autograd runs (gy @ W, gy^T @ x, gy.sum(0))
Timings are medians of `repeat` runs, the libraries taking turns in blocks
(bench/timing.py's interleaved_medians). ratio = PyTorch time / convcore time (above 1:
convcore is faster). GFLOP/s counts 2 x multiply-adds, the backward twice
the forward's. peak = convcore's GFLOP/s over the peak measured in the same
run: the faster of a square SGEMM through convcore's GEMM and through numpy
(its BLAS held to the same threads), an attained peak, below the FMA units'
theoretical one.

Summary: convcore binds no query for the algorithm its conv picks per shape
(choose_algorithm in csrc/cpu/conv_plan.cpp is internal), so the rows are grouped
by shape class: first layer (cin <= 4), depthwise, grouped, pointwise 1x1,
large kernel (> 3), 3x3 stride 1, strided, other (dilated, rectangular), and
linear; per class, pass and batch: minimum, quartiles and geometric mean of
the ratio and of the peak fraction.
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import _core
from .. import functional as F
from .. import models
from ..nn.layers import Conv2d, Linear
from ..summary import summary
from .timing import (cpu_name, import_torch, interleaved_medians, measure_peak, memory_gauge,
                     write_results)

DEFAULT_BATCHES = (1, 16)
QUICK_MODEL = "lenet5"  # --quick: the smallest model, a smoke run
CLASSES = ("first layer", "depthwise", "grouped", "pointwise 1x1", "large kernel",
           "3x3 stride 1", "strided", "other", "linear")


# ------------------------------------------------------------------ the layers

@dataclass(frozen=True)
class Layer:
    """One distinct layer; for linear layers kernel, stride, padding and
    dilation are 1x1/1/0/1, groups 1, and h the rows per sample (the input's
    leading dimensions; 1 for a vector), w 1."""
    kind: str                             # "conv" or "linear"
    cin: int
    cout: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int, int, int]    # top, bottom, left, right
    dilation: Tuple[int, int]
    groups: int
    bias: bool
    h: int
    w: int

    @property
    def out_hw(self) -> Tuple[int, int]:
        if self.kind == "linear":
            return self.h, self.w
        t, b, left, right = self.padding
        ho = (self.h + t + b - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (self.w + left + right - self.dilation[1] * (self.kernel[1] - 1) - 1) \
            // self.stride[1] + 1
        return ho, wo

    def flops(self, n: int) -> float:
        """Forward: 2 x multiply-adds of a batch of n, padding included."""
        ho, wo = self.out_hw
        return 2.0 * n * self.cout * ho * wo * (self.cin // self.groups) * \
            self.kernel[0] * self.kernel[1]

    def name(self) -> str:
        if self.kind == "linear":
            rows = f" x{self.h}" if self.h != 1 else ""
            return f"fc {self.cin}->{self.cout}{rows}"
        kh, kw = self.kernel
        s = f"{self.cin}->{self.cout} {kh}x{kw}"
        if self.stride != (1, 1):
            s += f"/{self.stride[0]}" if self.stride[0] == self.stride[1] else f"/{self.stride}"
        if self.padding != (0, 0, 0, 0):
            t, b, left, right = self.padding
            s += f" p{t}" if len({t, b, left, right}) == 1 else f" p{list(self.padding)}"
        if self.dilation != (1, 1):
            s += f" d{self.dilation[0]}"
        if self.groups > 1:
            s += f" g{self.groups}"
        return s + f" @{self.h}x{self.w}" + ("" if self.bias else " nb")


def shape_class(layer: Layer) -> str:
    """The summary's group of a layer (see the module's docstring); the first
    rule that matches wins."""
    if layer.kind == "linear":
        return "linear"
    if layer.cin <= 4 and layer.groups == 1:
        return "first layer"
    if layer.groups > 1 and layer.groups == layer.cin:
        return "depthwise"
    if layer.groups > 1:
        return "grouped"
    if layer.kernel == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0, 0, 0):
        return "pointwise 1x1"  # the shape convcore's pointwise path takes
    if max(layer.kernel) > 3:
        return "large kernel"
    if layer.kernel == (3, 3) and layer.stride == (1, 1) and layer.dilation == (1, 1):
        return "3x3 stride 1"
    if layer.stride != (1, 1):
        return "strided"
    return "other"


def _layer_of(m, shape: tuple) -> Layer:
    if isinstance(m, Linear):
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return Layer("linear", m.in_features, m.out_features, (1, 1), (1, 1), (0, 0, 0, 0),
                     (1, 1), 1, m.bias is not None, rows, 1)
    c, h, w = shape
    pads = tuple(int(p) for p in m._pads())
    if m.padding_mode != "zeros":  # the layer pads explicitly, then convolves unpadded
        h, w = h + pads[0] + pads[1], w + pads[2] + pads[3]
        pads = (0, 0, 0, 0)
    return Layer("conv", m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                 pads, tuple(m.dilation), m.groups, m.bias is not None, int(h), int(w))


def model_layers(model, input_shape) -> List[Tuple[str, Layer]]:
    """(summary's layer name, Layer) of every Conv2d and Linear call of one
    sample, in order, from the shapes `summary` computes: each leaf's macs()
    gets its input shape once per call, so macs is wrapped on those modules
    for the walk."""
    seen: List[Tuple[object, tuple]] = []
    targets = [m for m in model.modules() if isinstance(m, (Conv2d, Linear))]

    def recorder(m):
        def macs(shape):
            seen.append((m, tuple(int(d) for d in shape)))
            return type(m).macs(m, shape)
        return macs

    for m in targets:
        object.__setattr__(m, "macs", recorder(m))
    try:
        rows = summary(model, input_shape, print_fn=None, compact=False)
    finally:
        for m in targets:
            object.__delattr__(m, "macs")
    names = [r["layer"] for r in rows if r["name"].startswith(("CONV", "FC"))]
    if len(names) != len(seen):  # the labels and the calls must pair up one to one
        raise RuntimeError(f"summary named {len(names)} conv/linear rows but walked {len(seen)}")
    return [(name, _layer_of(m, shape)) for name, (m, shape) in zip(names, seen)]


def distinct_layers(model_names: Sequence[str]) -> List[dict]:
    """The distinct layers of these models, in order of first use: dicts with
    the Layer, its class, and uses {model: {"count", "first"}} (first: the
    first layer name in that model)."""
    found: Dict[Layer, dict] = {}
    for name in model_names:
        model = models.get(name)
        for layer_name, layer in model_layers(model, model.input_shape):
            entry = found.setdefault(layer, dict(layer=layer, cls=shape_class(layer), uses={}))
            use = entry["uses"].setdefault(name, dict(count=0, first=layer_name))
            use["count"] += 1
    return list(found.values())


# Kernels, strides, dilations, channel counts and groups random_layers draws
# from, with their weights (repeats make a value likelier).
_RANDOM_KERNELS = ((1, 1), (3, 3), (3, 3), (5, 5), (7, 7), (1, 7), (7, 1), (1, 3), (3, 1),
                   (2, 2))
_RANDOM_STRIDES = (1, 1, 1, 2, 2, 3)
_RANDOM_DILATIONS = (1, 1, 1, 1, 2, 3)
_RANDOM_CIN = (3, 8, 16, 24, 32, 48, 64, 96, 128, 160, 256, 384, 512, 768, 1024)
_RANDOM_COUT = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
_RANDOM_GROUPS = (2, 4, 8, 32)


def random_layers(count: int, seed: int = 0, batches: Sequence[int] = DEFAULT_BATCHES,
                  most_flops: float = 4e9, least_flops: float = 2e6) -> List[dict]:
    """`count` convolution layers drawn at random with this seed, as
    distinct_layers' entries (uses {"random": {"count": 1, "first": "#i"}}):
    one in five grouped, one in ten of the rest depthwise where its channels
    allow, images of 5 to 99 (three in ten not square), padding up to the
    kernel's reach, each with a forward of least_flops at the smallest batch
    and at most most_flops at the largest (so that a sweep's time stays
    bounded)."""
    rng = np.random.default_rng(seed)
    out: List[dict] = []
    while len(out) < count:
        kh, kw = _RANDOM_KERNELS[rng.integers(len(_RANDOM_KERNELS))]
        s = int(rng.choice(_RANDOM_STRIDES))
        d = int(rng.choice(_RANDOM_DILATIONS))
        cin, cout = int(rng.choice(_RANDOM_CIN)), int(rng.choice(_RANDOM_COUT))
        g = 1
        if rng.random() < 0.2:
            g = int(rng.choice(_RANDOM_GROUPS))
            if cin % g or cout % g:
                continue
        elif rng.random() < 0.1 and cin >= 16:
            cout, g = cin, cin
        h = int(rng.integers(5, 100))
        w = h if rng.random() < 0.7 else int(rng.integers(5, 100))
        ph, pw = int(rng.integers(0, kh // 2 * d + 1)), int(rng.integers(0, kw // 2 * d + 1))
        layer = Layer("conv", cin, cout, (kh, kw), (s, s), (ph, ph, pw, pw), (d, d), g, False,
                      h, w)
        ho, wo = layer.out_hw
        if ho < 1 or wo < 1 or layer.flops(min(batches)) < least_flops or \
                layer.flops(max(batches)) > most_flops:
            continue
        out.append(dict(layer=layer, cls=shape_class(layer),
                        uses={"random": dict(count=1, first=f"#{len(out)}")}))
    return out


# ---------------------------------------------------------------------- timing

def _layer_fns(layer: Layer, n: int, torch, backward: bool, rng) -> Dict[str, Callable]:
    """convcore's and PyTorch's call of one pass at batch n, on the same data."""
    if layer.kind == "linear":
        return _linear_fns(layer, n, torch, backward, rng)
    kh, kw = layer.kernel
    x = rng.standard_normal((n, layer.cin, layer.h, layer.w), dtype=np.float32)
    wt = rng.standard_normal((layer.cout, layer.cin // layer.groups, kh, kw),
                             dtype=np.float32) * 0.05
    b = rng.standard_normal(layer.cout, dtype=np.float32) if layer.bias else None
    t, bottom, left, right = layer.padding
    symmetric = t == bottom and left == right
    # F.conv2d takes a symmetric pair; an asymmetric layer ('same' with an even
    # kernel) goes through _core with its four pads, as F does for 'same'.
    pads = [t, bottom, left, right]
    kw_ = dict(stride=layer.stride, dilation=layer.dilation, groups=layer.groups)
    if symmetric:
        y = F.conv2d(x, wt, b, padding=(t, left), **kw_)
    else:
        y = _core.conv2d(x, wt, b, list(layer.stride), pads, list(layer.dilation),
                         layer.groups, "auto", None)
    gy = rng.standard_normal(y.shape, dtype=np.float32)
    fns = {}
    # the gradients PyTorch's call computes: grad_bias only for a layer with a bias
    mask = (True, True, layer.bias)
    if backward and symmetric:
        fns["convcore"] = lambda: F.conv2d_backward(gy, x, wt, padding=(t, left),
                                                    output_mask=mask, **kw_)
    elif backward:
        fns["convcore"] = lambda: _core.conv2d_backward(
            gy, x, wt, list(layer.stride), pads, list(layer.dilation), layer.groups, *mask,
            "auto")
    elif symmetric:
        fns["convcore"] = lambda: F.conv2d(x, wt, b, padding=(t, left), **kw_)
    else:
        fns["convcore"] = lambda: _core.conv2d(x, wt, b, list(layer.stride), pads,
                                               list(layer.dilation), layer.groups, "auto", None)
    if torch is not None:
        tx = torch.from_numpy(x)
        if not symmetric:  # PyTorch pads symmetrically: pad the input once, outside the timing
            tx = torch.nn.functional.pad(tx, (left, right, t, bottom))
        tp = [t, left] if symmetric else [0, 0]
        tw, tgy = torch.from_numpy(wt), torch.from_numpy(gy)
        tb = torch.from_numpy(b) if b is not None else None
        if backward:
            fns["torch"] = lambda: torch.ops.aten.convolution_backward(
                tgy, tx, tw, [layer.cout] if layer.bias else None, list(layer.stride), tp,
                list(layer.dilation), False, [0, 0], layer.groups, [True, True, layer.bias])
        else:
            fns["torch"] = lambda: torch.nn.functional.conv2d(
                tx, tw, tb, layer.stride, tp, layer.dilation, layer.groups)
    return fns


def _linear_fns(layer: Layer, n: int, torch, backward: bool, rng) -> Dict[str, Callable]:
    rows = n * layer.h
    x = rng.standard_normal((rows, layer.cin), dtype=np.float32)
    wt = rng.standard_normal((layer.cout, layer.cin), dtype=np.float32) * 0.01
    b = rng.standard_normal(layer.cout, dtype=np.float32) if layer.bias else None
    gy = rng.standard_normal((rows, layer.cout), dtype=np.float32)
    mask = (True, True, layer.bias)  # as conv's: grad_bias only with a bias
    fns = {"convcore": (lambda: F.linear_backward(gy, x, wt, output_mask=mask)) if backward
           else (lambda: F.linear(x, wt, b))}
    if torch is not None:
        tx, tw, tgy = torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(gy)
        tb = torch.from_numpy(b) if b is not None else None
        if backward:  # what autograd runs for linear
            fns["torch"] = (lambda: (tgy @ tw, tgy.t() @ tx, tgy.sum(0))) if layer.bias \
                else (lambda: (tgy @ tw, tgy.t() @ tx))
        else:
            fns["torch"] = lambda: torch.nn.functional.linear(tx, tw, tb)
    return fns


# ------------------------------------------------------------------- the sweep

def run(model_names: Optional[Sequence[str]] = None, batches: Sequence[int] = DEFAULT_BATCHES,
        threads: int = 2, repeat: int = 5, with_torch: bool = True, gemm_n: int = 2048,
        out: Callable[[str], None] = print, random: Optional[Tuple[int, int]] = None) -> dict:
    """Times every distinct layer of the models at each batch, forward and
    backward (or, with random=(count, seed), random_layers' layers); returns
    the machine, the peak, the layers, the rows and the summary, printing the
    rows line by line through `out`."""
    model_names = [] if random else list(model_names or models._ZOO)
    F.set_num_threads(threads)
    torch = import_torch(threads) if with_torch else None
    rng = np.random.default_rng(0)
    info = dict(machine=cpu_name(), threads=threads, gemm_isa=_core.gemm_isa(),
                isa_env=os.environ.get("CONVCORE_ISA"), numpy=np.__version__,
                torch=getattr(torch, "__version__", None), python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"), models=model_names, batches=list(batches),
                repeat=repeat, random=dict(count=random[0], seed=random[1]) if random else None)
    out(f"convcore bench --zoo: {info['machine']}, {threads} threads, float32, GEMM kernel "
        f"{info['gemm_isa']}, numpy {info['numpy']}, torch {info['torch'] or '-'}")
    notes = []
    if torch is None:
        why = "--no-torch was given" if not with_torch else "PyTorch is not importable"
        notes.append(f"the ratio column is empty: {why}")
    for note in notes:
        out(f"note: {note}")
    gauge_start = memory_gauge()
    out(f"memory gauge at the start: numpy copies 16 MB at {gauge_start:.1f} GB/s")
    peak = measure_peak(threads, max(3, repeat), gemm_n, rng)
    numpy_threads = peak["numpy_threads"] or "its own"
    out(f"peak: {peak['gflops']:.1f} GFLOP/s, the faster of a {gemm_n}^3 SGEMM through convcore "
        f"({peak['convcore_gflops']:.1f}) and numpy ({peak['numpy_gflops']:.1f}, "
        f"{numpy_threads} threads): {peak['source']}")
    if random:
        layers = random_layers(random[0], random[1], batches)
        out(f"{len(layers)} random conv layers (seed {random[1]})")
    else:
        layers = distinct_layers(model_names)
        calls = sum(u["count"] for e in layers for u in e["uses"].values())
        out(f"{len(layers)} distinct conv/linear layers ({calls} calls) in {len(model_names)} "
            f"models: {', '.join(model_names)}")
    out(_line(ROW_HEADER, ROW_WIDTHS))
    out("-" * (sum(ROW_WIDTHS) + len(ROW_WIDTHS) - 1))
    rows = []
    for index, entry in enumerate(layers):
        layer = entry["layer"]
        for n in batches:
            for label, backward in (("fwd", False), ("bwd", True)):
                times = interleaved_medians(_layer_fns(layer, n, torch, backward, rng), repeat)
                gflops = layer.flops(n) * (2 if backward else 1) / times["convcore"] / 1e9
                row = dict(index=index, layer=layer.name(), cls=entry["cls"], pass_=label,
                           batch=n, times=times, gflops=gflops,
                           peak_fraction=gflops / peak["gflops"],
                           ratio=times["torch"] / times["convcore"] if "torch" in times else None)
                rows.append(row)
                out(_line(_row_cells(row, entry), ROW_WIDTHS))
    groups = summarise(rows)
    out("")
    for line in summary_lines(groups):
        out(line)
    gauge_end = memory_gauge()
    out(f"memory gauge at the end: numpy copies 16 MB at {gauge_end:.1f} GB/s")
    info["memory_gauge_gbps"] = dict(start=gauge_start, end=gauge_end)
    return dict(info=info, notes=notes, peak=peak,
                layers=[dict(index=i, name=e["layer"].name(), cls=e["cls"], uses=e["uses"],
                             **_layer_json(e["layer"])) for i, e in enumerate(layers)],
                rows=rows, summary=groups)


def _layer_json(layer: Layer) -> dict:
    d = asdict(layer)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ----------------------------------------------------------------- the summary

def stats(values: Sequence[float]) -> dict:
    """n, minimum, quartiles (numpy's linear interpolation) and geometric mean."""
    v = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return dict(n=int(v.size), min=float(v.min()), q1=float(q1), median=float(median),
                q3=float(q3), geomean=float(math.exp(np.log(v).mean())))


def summarise(rows: List[dict]) -> List[dict]:
    """One group per (class, pass, batch), then "all" per (pass, batch): the
    ratio's stats (None without PyTorch) and the peak fraction's."""
    groups = []
    keys = sorted({(r["pass_"], r["batch"]) for r in rows}, key=lambda k: (k[0] != "fwd", k[1]))
    for cls in CLASSES + ("all",):
        for pass_, batch in keys:
            sel = [r for r in rows if r["pass_"] == pass_ and r["batch"] == batch
                   and cls in (r["cls"], "all")]
            if not sel:
                continue
            ratios = [r["ratio"] for r in sel if r["ratio"] is not None]
            groups.append(dict(cls=cls, pass_=pass_, batch=batch, layers=len(sel),
                               ratio=stats(ratios) if ratios else None,
                               peak_fraction=stats([r["peak_fraction"] for r in sel])))
    return groups


SUMMARY_HEADER = ("class", "pass", "batch", "layers", "ratio min", "q1", "median", "q3",
                  "geomean", "peak min", "median", "geomean")
SUMMARY_WIDTHS = (14, 4, 5, 6, 9, 5, 6, 5, 7, 8, 6, 7)


def _summary_cells(g: dict) -> List[str]:
    r, p = g["ratio"], g["peak_fraction"]
    ratio = [f"{r[k]:.2f}" for k in ("min", "q1", "median", "q3", "geomean")] if r else ["-"] * 5
    return [g["cls"], g["pass_"], str(g["batch"]), str(g["layers"]), *ratio,
            *(_percent(p[k]) for k in ("min", "median", "geomean"))]


def summary_lines(groups: List[dict], markdown: bool = False) -> List[str]:
    lines = ["summary by shape class: ratio = PyTorch time / convcore time; peak = convcore's "
             "share of the measured peak", ""] if not markdown else []
    lines.append(_line(SUMMARY_HEADER, SUMMARY_WIDTHS, markdown))
    lines.append(_rule(SUMMARY_WIDTHS, markdown))
    lines += [_line(_summary_cells(g), SUMMARY_WIDTHS, markdown) for g in groups]
    return lines


# ------------------------------------------------------------------ formatting

ROW_HEADER = ("#", "layer", "class", "used by", "pass", "batch", "convcore", "GFLOP/s", "peak",
              "torch", "ratio")
ROW_WIDTHS = (3, 30, 13, 28, 4, 5, 10, 7, 5, 10, 5)


def _uses_text(uses: dict) -> str:
    """'resnet18 x4, resnet34 x6'"""
    return ", ".join(f"{m} x{u['count']}" for m, u in uses.items())


def _row_cells(row: dict, entry: dict) -> List[str]:
    t = row["times"]
    return [str(row["index"]), row["layer"], row["cls"], _uses_text(entry["uses"]), row["pass_"],
            str(row["batch"]), f"{t['convcore'] * 1e3:.3f}ms", f"{row['gflops']:.1f}",
            _percent(row["peak_fraction"]),
            f"{t['torch'] * 1e3:.3f}ms" if "torch" in t else "-",
            f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"]


def _percent(fraction: float) -> str:
    """A share of the peak; small layers' shares keep one decimal."""
    return f"{100 * fraction:.1f}%" if fraction < 0.1 else f"{100 * fraction:.0f}%"


def _line(cells: Sequence[str], widths: Sequence[int], markdown: bool = False) -> str:
    if markdown:
        return "| " + " | ".join(cells) + " |"
    # the first two columns (index, name) left-aligned, numbers right-aligned
    return " ".join(c.ljust(w) if i < 2 or not _numeric(c) else c.rjust(w)
                    for i, (c, w) in enumerate(zip(cells, widths)))


def _numeric(cell: str) -> bool:
    return cell[:1].isdigit() or cell == "-"


def _rule(widths: Sequence[int], markdown: bool) -> str:
    return "|" + "---|" * len(widths) if markdown else "-" * (sum(widths) + len(widths) - 1)


def markdown(result: dict) -> str:
    """The layer rows and the summary as Markdown tables."""
    uses = {e["index"]: e for e in result["layers"]}
    lines = [_line(ROW_HEADER, ROW_WIDTHS, True), _rule(ROW_WIDTHS, True)]
    lines += [_line(_row_cells(r, uses[r["index"]]), ROW_WIDTHS, True) for r in result["rows"]]
    lines.append("")
    lines += summary_lines(result["summary"], markdown=True)
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m convcore bench --zoo",
                                description="every distinct conv and linear layer of the zoo, "
                                            "forward and backward, vs PyTorch and the peak")
    p.add_argument("--threads", type=int, default=2, help="threads for convcore and torch")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per library")
    p.add_argument("--models", nargs="+", default=None, choices=list(models._ZOO),
                   metavar="MODEL", help="zoo models (default: all)")
    p.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: batch 1, one model (the first of --models, else "
                        f"{QUICK_MODEL}), 3 repeats, a 1024^3 SGEMM for the peak")
    p.add_argument("--no-torch", action="store_true", help="no PyTorch column")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--markdown", action="store_true",
                   help="also print the tables as Markdown at the end")
    p.add_argument("--random", type=int, default=None, metavar="N",
                   help="N random conv layers instead of the zoo's (random_layers)")
    p.add_argument("--seed", type=int, default=0, help="the seed of --random's layers")
    args = p.parse_args(argv)
    if args.random is not None and args.random < 1:
        p.error(f"--random must be a positive number of layers, got {args.random}")
    model_names, batches, repeat, gemm_n = args.models, args.batches, args.repeat, 2048
    if args.quick:
        model_names = [(args.models or [QUICK_MODEL])[0]]
        batches, repeat, gemm_n = [1], min(repeat, 3), 1024
    result = run(model_names, batches, args.threads, repeat, not args.no_torch, gemm_n,
                 random=(args.random, args.seed) if args.random else None)
    write_results(result, args.json, markdown(result) if args.markdown else None)
