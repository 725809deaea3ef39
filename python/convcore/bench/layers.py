"""`python -m convcore bench`: convcore against PyTorch's CPU build (when it
is importable) and numpy's im2col approach, on the layers of the classic
CNNs, forward and backward, float32.

Each timing is the median of `--repeat` runs; the libraries take turns in
blocks, each after a warm-up of at least 0.1 s (see interleaved_medians in
bench/timing.py for why not run by run). Ratios are peer time / convcore
time (above 1: convcore is faster).

    python -m convcore bench [--threads 2] [--repeat 7] [--quick] [--json out.json]
                             [--plot out.png] [--no-torch] [--no-numpy]
    python -m convcore bench --e2e ...   whole models (bench/e2e.py)
    python -m convcore bench --zoo ...   every distinct zoo layer (bench/zoo.py)
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .. import _core
from .. import _im2col_numpy as im2col
from .. import functional as F
from .timing import (cpu_name, gemm_row, geomean, import_torch, interleaved_medians,
                     memory_gauge, write_results)


# ------------------------------------------------------------------------ the suite

@dataclass
class Conv:
    name: str
    n: int
    cin: int
    h: int
    cout: int
    k: int
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    groups: int = 1

    @property
    def out_hw(self) -> int:
        return (self.h + 2 * self.pad - self.dilation * (self.k - 1) - 1) // self.stride + 1

    def flops(self, n: Optional[int] = None) -> float:
        """2 x multiply-adds, padding included."""
        n = self.n if n is None else n
        return 2.0 * n * self.cout * self.out_hw ** 2 * (self.cin // self.groups) * self.k ** 2


@dataclass
class Pool:
    name: str
    n: int
    c: int
    h: int
    k: int
    stride: int


@dataclass
class Fc:
    name: str
    n: int
    cin: int
    cout: int

    def flops(self) -> float:
        return 2.0 * self.n * self.cin * self.cout


def suite(quick: bool = False) -> List[object]:
    """The layers of the issue's benchmark (batch 16 unless stated)."""
    cases = [
        Conv("alexnet.conv1", 16, 3, 227, 96, 11, 4, 0),
        Conv("alexnet.conv2", 16, 96, 27, 256, 5, 1, 2),
        Conv("alexnet.conv3", 16, 256, 13, 384, 3, 1, 1),
        Conv("alexnet.conv4", 16, 384, 13, 384, 3, 1, 1),
        Conv("alexnet.conv5", 16, 384, 13, 256, 3, 1, 1),
        Pool("alexnet.pool1", 16, 96, 55, 3, 2),
        Fc("alexnet.fc6", 16, 9216, 4096),
        Fc("alexnet.fc7", 16, 4096, 4096),
        Fc("alexnet.fc8", 16, 4096, 1000),
        Conv("vgg16.conv1_2@224", 4, 64, 224, 64, 3, 1, 1),
        Conv("vgg16.conv2_2@112", 16, 128, 112, 128, 3, 1, 1),
        Conv("vgg16.conv3_2@56", 16, 256, 56, 256, 3, 1, 1),
        Conv("vgg16.conv4_2@28", 16, 512, 28, 512, 3, 1, 1),
        Conv("vgg16.conv5_2@14", 16, 512, 14, 512, 3, 1, 1),
        Conv("resnet.conv1", 8, 3, 224, 64, 7, 2, 3),
        Conv("resnet.3x3@56", 16, 64, 56, 64, 3, 1, 1),
        Conv("resnet.3x3s2", 16, 128, 56, 128, 3, 2, 1),
        Conv("resnet.1x1 256->64", 16, 256, 56, 64, 1),
        Conv("resnet.1x1 64->256", 16, 64, 56, 256, 1),
        Conv("depthwise3x3 32@112", 16, 32, 112, 32, 3, 1, 1, 1, 32),
        Conv("depthwise3x3 512@14", 16, 512, 14, 512, 3, 1, 1, 1, 512),
        Conv("dilated3x3 d2@56", 16, 64, 56, 64, 3, 1, 2, 2),
    ]
    if quick:  # a smoke run: small batches
        for c in cases:
            c.n = min(c.n, 2)
    return cases


# -------------------------------------------------------------- per-kind benchmarks

def _conv_fns(c: Conv, n: int, torch, with_numpy: bool, backward: bool, rng):
    x = rng.standard_normal((n, c.cin, c.h, c.h), dtype=np.float32)
    w = rng.standard_normal((c.cout, c.cin // c.groups, c.k, c.k), dtype=np.float32) * 0.05
    b = rng.standard_normal(c.cout, dtype=np.float32)
    kw = dict(stride=c.stride, padding=c.pad, dilation=c.dilation, groups=c.groups)
    y = F.conv2d(x, w, b, **kw)
    gy = rng.standard_normal(y.shape, dtype=np.float32)
    fns = {}
    if backward:
        fns["convcore"] = lambda: F.conv2d_backward(gy, x, w, **kw)
    else:
        fns["convcore"] = lambda: F.conv2d(x, w, b, **kw)
    if torch is not None:
        tx, tw, tb, tgy = (torch.from_numpy(a) for a in (x, w, b, gy))
        if backward:
            fns["torch"] = lambda: torch.ops.aten.convolution_backward(
                tgy, tx, tw, [c.cout], [c.stride] * 2, [c.pad] * 2, [c.dilation] * 2, False,
                [0, 0], c.groups, [True, True, True])
        else:
            fns["torch"] = lambda: torch.nn.functional.conv2d(tx, tw, tb, **kw)
    if with_numpy and c.groups == 1 and c.dilation == 1:
        if backward:
            fns["numpy"] = lambda: im2col.conv2d_backward(gy, x, w, c.stride, c.pad)
        else:
            fns["numpy"] = lambda: im2col.conv2d(x, w, b, c.stride, c.pad)
    return fns


def _pool_fns(p: Pool, torch, backward: bool, rng):
    x = rng.standard_normal((p.n, p.c, p.h, p.h), dtype=np.float32)
    y, indices = F.max_pool2d(x, p.k, p.stride, return_indices=True)
    gy = rng.standard_normal(y.shape, dtype=np.float32)
    # Both libraries' backward from the forward's indices (what a training
    # step does: convcore's MaxPool2d keeps them, as PyTorch's autograd).
    fns = {"convcore": (lambda: F.max_pool2d_backward(gy, x, p.k, p.stride, indices=indices))
           if backward else (lambda: F.max_pool2d(x, p.k, p.stride))}
    if torch is not None:
        tx, tgy = torch.from_numpy(x), torch.from_numpy(gy)
        _, idx = torch.nn.functional.max_pool2d(tx, p.k, p.stride, return_indices=True)
        if backward:
            fns["torch"] = lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                tgy, tx, [p.k] * 2, [p.stride] * 2, [0, 0], [1, 1], False, idx)
        else:
            fns["torch"] = lambda: torch.nn.functional.max_pool2d(tx, p.k, p.stride)
    return fns


def _fc_fns(f: Fc, torch, with_numpy: bool, backward: bool, rng):
    x = rng.standard_normal((f.n, f.cin), dtype=np.float32)
    w = rng.standard_normal((f.cout, f.cin), dtype=np.float32) * 0.01
    b = rng.standard_normal(f.cout, dtype=np.float32)
    gy = rng.standard_normal((f.n, f.cout), dtype=np.float32)
    fns = {"convcore": (lambda: F.linear_backward(gy, x, w)) if backward
           else (lambda: F.linear(x, w, b))}
    if torch is not None:
        tx, tw, tb, tgy = (torch.from_numpy(a) for a in (x, w, b, gy))
        if backward:  # what autograd runs for linear
            fns["torch"] = lambda: (tgy @ tw, tgy.t() @ tx, tgy.sum(0))
        else:
            fns["torch"] = lambda: torch.nn.functional.linear(tx, tw, tb)
    if with_numpy:
        fns["numpy"] = (lambda: (gy @ w, gy.T @ x, gy.sum(0))) if backward else \
            (lambda: x @ w.T + b)
    return fns


# ---------------------------------------------------------------------------- runner

def run(threads: Optional[int] = None, repeat: int = 7, quick: bool = False,
        with_torch: bool = True, with_numpy: bool = True, out=print,
        cases: Optional[List[object]] = None, gemm_n: int = 2048) -> dict:
    """Times every case (the suite by default) and the SGEMM row; returns the
    rows, the SGEMM figures, the geometric means against PyTorch and the
    machine's details, printing a table line by line through `out`."""
    threads = threads or F.get_num_threads()
    F.set_num_threads(threads)
    torch = import_torch(threads) if with_torch else None
    rng = np.random.default_rng(0)
    info = dict(machine=cpu_name(), threads=threads, gemm_isa=_core.gemm_isa(),
                numpy=np.__version__, torch=getattr(torch, "__version__", None),
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    out(f"convcore bench: {info['machine']}, {threads} threads, float32, GEMM kernel "
        f"{info['gemm_isa']}, numpy {info['numpy']}, torch {info['torch'] or '-'}")
    gauge_start = memory_gauge()
    out(f"memory gauge at the start: numpy copies 16 MB at {gauge_start:.1f} GB/s")
    if os.environ.get("OPENBLAS_CORETYPE"):
        out(f"note: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set; numpy's "
            f"BLAS may run a slower kernel than this CPU allows")
    rows = []
    header = (f"{'layer':24} {'pass':5} {'batch':>5} {'convcore':>10} {'GFLOP/s':>8} "
              f"{'torch':>10} {'ratio':>6} {'numpy':>10} {'ratio':>6} {'workspace':>10}")
    out(header)
    out("-" * len(header))
    for case in suite(quick) if cases is None else cases:
        passes = [("fwd", False, None), ("bwd", True, None)]
        if isinstance(case, Conv):
            passes.append(("fwd", False, 1))
        for label, backward, batch in passes:
            n = batch or case.n
            if isinstance(case, Conv):
                fns = _conv_fns(case, n, torch, with_numpy, backward, rng)
                flops = case.flops(n) * (2 if backward else 1)
            elif isinstance(case, Pool):
                fns = _pool_fns(case, torch, backward, rng)
                flops = None
            else:
                fns = _fc_fns(case, torch, with_numpy, backward, rng)
                flops = case.flops() * (2 if backward else 1)
            _core.reset_workspace_peak()
            fns["convcore"]()
            workspace = _core.workspace_peak()
            times = interleaved_medians(fns, repeat, {"numpy": 3})
            row = dict(layer=case.name, kind=type(case).__name__.lower(), pass_=label,
                       batch=n, times=times, gflops=flops / 1e9 if flops else None,
                       workspace_bytes=workspace)
            rows.append(row)
            out(_format_row(row))
    gemm = gemm_row(rng, repeat, gemm_n)
    out(f"SGEMM {gemm_n}x{gemm_n}x{gemm_n}: convcore {gemm['convcore_gflops']:.0f} GFLOP/s, numpy "
        f"{gemm['numpy_gflops']:.0f} GFLOP/s: {gemm['ratio']:.2f} of numpy")
    summary = _geomeans(rows, "torch") if torch is not None else {}
    for key, value in summary.items():
        out(f"geometric mean torch/convcore {key}: {value:.2f}")
    gauge_end = memory_gauge()
    out(f"memory gauge at the end: numpy copies 16 MB at {gauge_end:.1f} GB/s")
    info["memory_gauge_gbps"] = dict(start=gauge_start, end=gauge_end)
    return dict(info=info, rows=rows, sgemm=gemm, geomean_vs_torch=summary)


def _format_row(row: dict) -> str:
    t = row["times"]
    cc = t["convcore"]
    gf = f"{row['gflops'] / cc:8.1f}" if row["gflops"] else f"{'':8}"

    def peer(name):
        if name not in t:
            return f"{'-':>10} {'':6}"
        return f"{t[name] * 1e3:8.2f}ms {t[name] / cc:6.2f}"

    ws = row["workspace_bytes"]
    return (f"{row['layer']:24} {row['pass_']:5} {row['batch']:5d} {cc * 1e3:8.2f}ms {gf} "
            f"{peer('torch')} {peer('numpy')} {ws / 2**20:8.2f}MB")


def _geomeans(rows: List[dict], peer: str) -> Dict[str, float]:
    def gm(selected):
        return geomean(r["times"][peer] / r["times"]["convcore"] for r in selected
                       if peer in r["times"])

    convs = [r for r in rows if r["kind"] == "conv"]
    return {
        "conv forward (suite batch)": gm([r for r in convs if r["pass_"] == "fwd"
                                          and r["batch"] != 1]),
        "conv backward": gm([r for r in convs if r["pass_"] == "bwd"]),
        "conv forward batch 1": gm([r for r in convs if r["pass_"] == "fwd"
                                    and r["batch"] == 1]),
        "pooling": gm([r for r in rows if r["kind"] == "pool"]),
        "linear backward": gm([r for r in rows if r["kind"] == "fc" and r["pass_"] == "bwd"]),
    }


def plot(result: dict, path: str) -> None:
    """A bar chart of torch/convcore ratios per layer and pass."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "torch" in r["times"]]
    labels = [f"{r['layer']} {r['pass_']}{' b1' if r['batch'] == 1 else ''}" for r in rows]
    ratios = [r["times"]["torch"] / r["times"]["convcore"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in ratios]
    ax.barh(range(len(rows)), ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("PyTorch time / convcore time (log scale; > 1: convcore faster)")
    info = result["info"]
    ax.set_title(f"convcore vs PyTorch {info['torch']}, {info['threads']} threads, "
                 f"{info['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    """The layer suite's command line (python -m convcore bench without --e2e,
    --zoo or --gpu)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m convcore bench",
                                     description="convcore CPU benchmark")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for convcore and torch (default: OMP_NUM_THREADS or all)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per library")
    parser.add_argument("--quick", action="store_true", help="batch 2: a smoke run")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--no-numpy", action="store_true", help="skip numpy's im2col")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--plot", help="write a PNG chart of the ratios to this file")
    args = parser.parse_args(argv)
    result = run(args.threads, args.repeat, args.quick, not args.no_torch, not args.no_numpy)
    write_results(result, args.json)
    if args.plot:
        plot(result, args.plot)
