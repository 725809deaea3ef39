"""Per-kernel GPU times of convcore's conv/linear forward and backward on the
benchmark's layers: every launch timed alone with CUDA events (median of
`repeat`), so a slow layer shows which of its kernels costs. Run on a GPU:
    PYTHONPATH=python python3 scripts/gpu_kernel_times.py [--repeat 10] [--json out.json]
"""
import argparse
import collections
import json

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default="", help="layer name prefix")
    parser.add_argument("--tile", default=None, choices=["small", "big"],
                        help="force the GEMM kernels' tile shape")
    args = parser.parse_args()
    import cupy
    import convcore as cc
    import convcore.cuda as cc_cuda
    from convcore import bench as cpu_bench

    import convcore.cuda.functional as G
    G.TILE = args.tile
    be = cc_cuda.backend()
    times = collections.defaultdict(list)
    original = type(be).launch

    def timed_launch(self, file, kernel, grid, block, launch_args, shared_mem=0):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        original(self, file, kernel, grid, block, launch_args, shared_mem)
        stop.record()
        stop.synchronize()
        times[(kernel, tuple(grid))].append(cupy.cuda.get_elapsed_time(start, stop))

    type(be).launch = timed_launch
    rng = np.random.default_rng(0)
    result = []
    for c in cpu_bench.suite(False):
        if not c.name.startswith(args.only) or not isinstance(c, (cpu_bench.Conv, cpu_bench.Fc)):
            continue
        if isinstance(c, cpu_bench.Conv):
            x = cupy.asarray(rng.standard_normal((c.n, c.cin, c.h, c.h), dtype=np.float32))
            w = cupy.asarray(rng.standard_normal((c.cout, c.cin // c.groups, c.k, c.k),
                                                 dtype=np.float32))
            kw = dict(stride=c.stride, padding=c.pad, dilation=c.dilation, groups=c.groups)
            y = cc.conv2d(x, w, None, **kw)
            gy = cupy.asarray(rng.standard_normal(y.shape, dtype=np.float32))
            passes = {"fwd": lambda: cc.conv2d(x, w, None, **kw),
                      "bwd": lambda: cc.conv2d_backward(gy, x, w, **kw)}
        else:
            x = cupy.asarray(rng.standard_normal((c.n, c.cin), dtype=np.float32))
            w = cupy.asarray(rng.standard_normal((c.cout, c.cin), dtype=np.float32))
            gy = cupy.asarray(rng.standard_normal((c.n, c.cout), dtype=np.float32))
            passes = {"fwd": lambda: cc.linear(x, w, None),
                      "bwd": lambda: cc.linear_backward(gy, x, w)}
        for name, fn in passes.items():
            fn()
            times.clear()
            for _ in range(args.repeat):
                fn()
            rows = [(k, g, float(np.median(v))) for (k, g), v in times.items()]
            total = sum(r[2] for r in rows)
            print(f"{c.name:<22} {name} total {total:8.3f} ms: " +
                  ", ".join(f"{k}{list(g)} {t:.3f}" for k, g, t in rows))
            result.append(dict(layer=c.name, direction=name, total_ms=total,
                               kernels=[dict(kernel=k, grid=list(g), ms=t) for k, g, t in rows]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
