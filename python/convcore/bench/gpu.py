"""`python -m convcore bench --gpu`: convcore's CUDA kernels against PyTorch
CUDA (cuDNN / cuBLAS) on the CPU benchmark's layer shapes, float32, TF32 off.

    python -m convcore bench --gpu [--repeat 20] [--quick] [--json out.json]

Reports, per layer, forward and forward+backward times (CUDA events, median
of `repeat` runs after warm-up), the ratio peer_time / convcore_time (1.0 =
as fast as cuDNN; the goal is 0.7 on the AlexNet/VGG shapes), their
geometric means, and the first call's compile time of each kernel file
(NVRTC through CuPy; CuPy's on-disk cache makes later processes faster).
Needs a CUDA GPU, CuPy (pip install ".[cuda]") and, for the peer columns, a
CUDA build of PyTorch; it stops with a clear message where there is no GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from ..cuda import availability, compile_seconds
from .layers import Conv, Fc, Pool, suite
from .timing import geomean


def _timer(cupy, fn: Callable[[], object], repeat: int) -> float:
    """Median milliseconds of fn on the current stream (CUDA events)."""
    for _ in range(3):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    # Full float32 on both sides: no TF32 tensor cores for the peer.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True  # the peer picks its best algorithm
    return torch


def _cases(c, cupy, torch, rng):
    """{(direction, who): fn} for one layer of the suite."""
    import convcore as cc

    def dev(a):
        return cupy.asarray(a)

    fns = {}
    if isinstance(c, Conv):
        x = dev(rng.standard_normal((c.n, c.cin, c.h, c.h), dtype=np.float32))
        w = dev(rng.standard_normal((c.cout, c.cin // c.groups, c.k, c.k), dtype=np.float32) * 0.05)
        b = dev(np.zeros(c.cout, np.float32))
        args = dict(stride=c.stride, padding=c.pad, dilation=c.dilation, groups=c.groups)
        y = cc.conv2d(x, w, b, **args)
        gy = dev(rng.standard_normal(y.shape, dtype=np.float32))
        fns[("fwd", "convcore")] = lambda: cc.conv2d(x, w, b, **args)
        fns[("bwd", "convcore")] = lambda: cc.conv2d_backward(gy, x, w, **args)
        if torch is not None:
            tx, tw, tb, tgy = (torch.from_dlpack(a) for a in (x, w, b, gy))
            F = torch.nn.functional

            def t_bwd():  # the backward alone (grad input, weight, bias), as convcore's
                return torch.ops.aten.convolution_backward(
                    tgy, tx, tw, [c.cout], [c.stride] * 2, [c.pad] * 2, [c.dilation] * 2,
                    False, [0, 0], c.groups, [True, True, True])

            fns[("fwd", "torch")] = lambda: F.conv2d(tx, tw, tb, **args)
            fns[("bwd", "torch")] = t_bwd
    elif isinstance(c, Pool):
        x = dev(rng.standard_normal((c.n, c.c, c.h, c.h), dtype=np.float32))
        fns[("fwd", "convcore")] = lambda: cc.max_pool2d(x, c.k, c.stride)
        if torch is not None:
            tx = torch.from_dlpack(x)
            fns[("fwd", "torch")] = lambda: torch.nn.functional.max_pool2d(tx, c.k, c.stride)
    elif isinstance(c, Fc):
        x = dev(rng.standard_normal((c.n, c.cin), dtype=np.float32))
        w = dev(rng.standard_normal((c.cout, c.cin), dtype=np.float32) * 0.01)
        b = dev(np.zeros(c.cout, np.float32))
        gy = dev(rng.standard_normal((c.n, c.cout), dtype=np.float32))
        fns[("fwd", "convcore")] = lambda: cc.linear(x, w, b)
        fns[("bwd", "convcore")] = lambda: cc.linear_backward(gy, x, w)
        if torch is not None:
            tx, tw, tb, tgy = (torch.from_dlpack(a) for a in (x, w, b, gy))
            F = torch.nn.functional
            fns[("fwd", "torch")] = lambda: F.linear(tx, tw, tb)
            fns[("bwd", "torch")] = lambda: (tgy @ tw, tgy.t() @ tx, tgy.sum(0))
    return fns


def run(repeat: int = 20, quick: bool = False, out=print, cases=None) -> dict:
    """cases: the layers to time (default: convcore.bench.suite(quick))."""
    ok, why = availability()
    if not ok:
        raise SystemExit(f"python -m convcore bench --gpu needs a CUDA GPU: {why}")
    import cupy

    torch = _torch_cuda()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    out(f"convcore GPU bench: {name}, float32, TF32 off, median of {repeat} (ms); "
        f"peer: {'PyTorch ' + torch.__version__ + ' cuDNN ' + str(torch.backends.cudnn.version()) if torch else 'none (no CUDA PyTorch)'}")
    rng = np.random.default_rng(0)
    rows: List[dict] = []
    first_call = time.perf_counter()
    import convcore as cc
    cc.relu(cupy.zeros(1, np.float32))
    out(f"first call (import + compile of elementwise.cu): {time.perf_counter() - first_call:.2f} s")
    out(f"{'layer':<24} {'dir':<4} {'convcore':>9} {'torch':>9} {'ratio':>6}")
    for c in suite(quick) if cases is None else cases:
        fns = _cases(c, cupy, torch, rng)
        for direction in ("fwd", "bwd"):
            if (direction, "convcore") not in fns:
                continue
            mine = _timer(cupy, fns[(direction, "convcore")], repeat)
            peer = _timer(cupy, fns[(direction, "torch")], repeat) if (direction, "torch") in fns else None
            ratio = peer / mine if peer else None
            rows.append(dict(layer=c.name, direction=direction, convcore_ms=mine, torch_ms=peer,
                             ratio=ratio))
            out(f"{c.name:<24} {direction:<4} {mine:9.3f} "
                f"{'' if peer is None else f'{peer:9.3f}':>9} "
                f"{'' if ratio is None else f'{ratio:6.2f}':>6}")
    compile_times = {f"{k[1]}@device{k[0]}": round(v, 3) for k, v in compile_seconds().items()}
    out("first-call compile (+ load) per kernel file: " +
        ", ".join(f"{k} {v:.2f} s" for k, v in sorted(compile_times.items())))
    summary = {}
    for label, prefixes in (("alexnet+vgg conv", ("alexnet.conv", "vgg16.")), ("all", ("",))):
        for direction in ("fwd", "bwd"):
            r = [row["ratio"] for row in rows if row["ratio"] and row["direction"] == direction
                 and row["layer"].startswith(prefixes)]
            if r:
                summary[f"{label} {direction}"] = geomean(r)
    for k, v in summary.items():
        out(f"geomean ratio (torch / convcore, 1 = cuDNN speed; goal 0.7) {k}: {v:.2f}")
    return dict(device=name, rows=rows, compile_seconds=compile_times, geomeans=summary)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convcore bench --gpu",
                                     description="convcore CUDA kernels vs PyTorch CUDA")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="batch 2: a smoke run")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = run(args.repeat, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
