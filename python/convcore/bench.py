"""Timing tables: convcore's AlexNet conv layers next to numpy's im2col
approach (and PyTorch's CPU build, when it is installed).

    python -m convcore bench [--batch 16] [--threads 2] [--repeat 3]
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, List, Optional

import numpy as np

from . import functional as F
from . import _core
from . import _im2col_numpy as im2col

# The lecture's AlexNet (227x227x3 input): name, C_in, H_in, C_out, kernel, stride, pad.
ALEXNET_CONVS = [
    ("conv1", 3, 227, 96, 11, 4, 0),
    ("conv2", 96, 27, 256, 5, 1, 2),
    ("conv3", 256, 13, 384, 3, 1, 1),
    ("conv4", 384, 13, 384, 3, 1, 1),
    ("conv5", 384, 13, 256, 3, 1, 1),
]


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Minimum wall time of `repeat` runs after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _torch(threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def alexnet_table(batch: int = 16, threads: Optional[int] = None, repeat: int = 3,
                  with_torch: bool = True, out=print) -> List[dict]:
    """Forward and backward (grad input + weight + bias) times of AlexNet's
    conv layers, float32, for convcore, numpy im2col and (if present) PyTorch."""
    threads = threads or F.get_num_threads()
    F.set_num_threads(threads)
    # numpy's BLAS thread count is fixed at import; report what it uses.
    torch = _torch(threads) if with_torch else None
    rng = np.random.default_rng(0)
    out(f"AlexNet conv layers, batch {batch}, float32, {threads} threads, {cpu_name()}, "
        f"GEMM kernel {_core.gemm_isa()}")
    header = (f"{'layer':6} {'output':>12} {'GFLOP':>6} | {'convcore fwd':>12} {'im2col fwd':>10} "
              f"{'ratio':>5} | {'convcore bwd':>12} {'im2col bwd':>10} {'ratio':>5}")
    if torch is not None:
        header += f" | {'torch fwd':>9} {'torch bwd':>9}"
    out(header)
    rows = []
    for name, cin, h, cout, k, s, p in ALEXNET_CONVS:
        x = rng.standard_normal((batch, cin, h, h), dtype=np.float32)
        w = (rng.standard_normal((cout, cin, k, k), dtype=np.float32) * 0.01)
        b = rng.standard_normal(cout, dtype=np.float32)
        y = F.conv2d(x, w, b, stride=s, padding=p)
        gy = rng.standard_normal(y.shape, dtype=np.float32)
        gflop = 2.0 * y.size * cin * k * k / 1e9
        row = dict(layer=name, output=f"{y.shape[2]}x{y.shape[3]}x{y.shape[1]}", gflop=gflop)
        row["cc_fwd"] = best_time(lambda: F.conv2d(x, w, b, stride=s, padding=p), repeat)
        row["np_fwd"] = best_time(lambda: im2col.conv2d(x, w, b, s, p), repeat)
        row["cc_bwd"] = best_time(lambda: F.conv2d_backward(gy, x, w, stride=s, padding=p), repeat)
        row["np_bwd"] = best_time(lambda: im2col.conv2d_backward(gy, x, w, s, p), repeat)
        line = (f"{name:6} {row['output']:>12} {gflop:6.2f} | {row['cc_fwd'] * 1e3:9.1f} ms "
                f"{row['np_fwd'] * 1e3:7.1f} ms {row['np_fwd'] / row['cc_fwd']:5.2f} | "
                f"{row['cc_bwd'] * 1e3:9.1f} ms {row['np_bwd'] * 1e3:7.1f} ms "
                f"{row['np_bwd'] / row['cc_bwd']:5.2f}")
        if torch is not None:
            tx = torch.from_numpy(x).requires_grad_(True)
            tw = torch.from_numpy(w).requires_grad_(True)
            tb = torch.from_numpy(b).requires_grad_(True)
            tgy = torch.from_numpy(gy)
            fwd = lambda: torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p)

            def bwd():
                torch.autograd.grad(fwd(), (tx, tw, tb), tgy)
            with torch.no_grad():
                row["torch_fwd"] = best_time(fwd, repeat)
            # torch's backward timed as forward+backward minus forward.
            row["torch_bwd"] = max(best_time(bwd, repeat) - row["torch_fwd"], 1e-9)
            line += f" | {row['torch_fwd'] * 1e3:6.1f} ms {row['torch_bwd'] * 1e3:6.1f} ms"
        out(line)
        rows.append(row)
    geo = lambda key_a, key_b: float(np.exp(np.mean([np.log(r[key_a] / r[key_b]) for r in rows])))
    out(f"geometric mean speed-up over numpy im2col: forward {geo('np_fwd', 'cc_fwd'):.2f}x, "
        f"backward {geo('np_bwd', 'cc_bwd'):.2f}x")
    if torch is not None:
        out(f"geometric mean speed-up over PyTorch {torch.__version__}: forward "
            f"{geo('torch_fwd', 'cc_fwd'):.2f}x, backward {geo('torch_bwd', 'cc_bwd'):.2f}x")
    return rows


def gemm_line(n: int = 1024, repeat: int = 3, out=print) -> None:
    """convcore's GEMM (through linear) next to numpy's BLAS on n x n x n."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    t_cc = best_time(lambda: F.linear(a, b), repeat)
    t_np = best_time(lambda: a @ b.T, repeat)
    flop = 2.0 * n ** 3
    out(f"SGEMM {n}x{n}x{n}: convcore {flop / t_cc / 1e9:.0f} GFLOP/s, numpy "
        f"{flop / t_np / 1e9:.0f} GFLOP/s (ratio {t_np / t_cc:.2f})")


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m convcore bench",
                                     description="convcore CPU benchmark")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="core threads (default: OMP_NUM_THREADS or all cores)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    args = parser.parse_args(argv)
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(f"note: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set; numpy's BLAS "
              f"may run a slower kernel than this CPU allows")
    alexnet_table(args.batch, args.threads, args.repeat, with_torch=not args.no_torch)
    gemm_line(repeat=args.repeat)
