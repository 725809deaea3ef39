"""What the CPU benchmarks share (python -m convcore bench, --e2e, --zoo, and
the GPU one's summary): the interleaved timing of several libraries, the
machine's figures (CPU name, a memory-bandwidth gauge, the attained SGEMM
peak), the geometric mean of ratios and the --json / --markdown output.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, Optional

import numpy as np

from .. import functional as F


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeat: int,
                        max_repeat: Optional[Dict[str, int]] = None, warmup: float = 0.1,
                        sample: float = 0.02) -> Dict[str, float]:
    """Median seconds per call of each fn over `repeat` samples (max_repeat
    caps the samples of slow peers, e.g. numpy's im2col).

    The libraries take turns in rounds, one block each per round and the
    order reversed from one round to the next, so slow drift of the machine
    hits all alike: a block is a warm-up, then one timed sample. Alternating
    run by run was unfair: PyTorch, ONNX Runtime and convcore each bring a
    thread pool whose threads keep spinning after a call, and the other
    library's next call shared the cores with them (a 0.15 ms call measured
    7 ms). So a block's warm-up lasts at least `warmup` seconds (the
    previous pool's threads go to sleep meanwhile). A sample of a fast call
    is the mean of as many calls as last `sample` seconds. One sample per
    block (until 2026-12-05, two rounds of several samples each): the
    machines have spells of seconds in which both cores slow down, and one
    spell that fell on a block then spoiled that library's samples of the
    round, half of the median's."""
    samples = {name: [] for name in fns}
    caps = max_repeat or {}
    names = list(fns)
    wanted = {name: max(1, min(repeat, caps.get(name, repeat))) for name in names}
    for turn in range(max(wanted.values(), default=0)):
        for name in names if turn % 2 == 0 else names[::-1]:
            if len(samples[name]) >= wanted[name]:
                continue
            fn = fns[name]
            t0 = time.perf_counter()
            fn()  # warm-up: caches, this library's thread pool
            one = time.perf_counter() - t0
            while time.perf_counter() - t0 < warmup:
                fn()
            calls = max(1, int(math.ceil(sample / max(one, 1e-9)))) if one < sample else 1
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def import_torch(threads: int):
    """torch with its intra-op threads set, or None where it is not installed
    (imported here, at the run, never when convcore is)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def geomean(values: Iterable[float]) -> float:
    """The geometric mean of positive ratios; nan for none."""
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def memory_gauge(megabytes: int = 16, repeat: int = 9) -> float:
    """GB/s of a numpy copy of `megabytes` (read plus write), median of
    `repeat`: a gauge of the memory system at the time of a run. Other
    virtual machines on the host share its caches and memory bandwidth, and
    the memory-bound rows (pooling, linear, the first layers) follow it from
    run to run; the run prints it at its start and its end."""
    n = megabytes * 2**20 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def gemm_row(rng, repeat: int, n: int = 2048) -> dict:
    """GFLOP/s of an n x n x n SGEMM through convcore's GEMM (F.linear) and
    numpy's BLAS, and their ratio (numpy time / convcore time)."""
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    bt = np.ascontiguousarray(b.T)
    times = interleaved_medians({"convcore": lambda: F.linear(a, bt),
                                 "numpy": lambda: a @ b}, max(3, repeat // 2))
    flop = 2.0 * n ** 3
    return dict(convcore_gflops=flop / times["convcore"] / 1e9,
                numpy_gflops=flop / times["numpy"] / 1e9,
                ratio=times["numpy"] / times["convcore"])


def measure_peak(threads: int, repeat: int, n: int, rng) -> dict:
    """GFLOP/s of an n x n x n SGEMM through convcore (F.linear) and numpy,
    numpy's BLAS held to `threads` when threadpoolctl is importable; the peak
    is the faster of the two."""
    try:
        from threadpoolctl import threadpool_limits
        limits, numpy_threads = threadpool_limits(limits=threads, user_api="blas"), threads
    except ImportError:
        import contextlib
        limits, numpy_threads = contextlib.nullcontext(), None  # numpy's BLAS chooses its own
    with limits:
        gemm = gemm_row(rng, repeat, n)
    source = "convcore" if gemm["convcore_gflops"] >= gemm["numpy_gflops"] else "numpy"
    return dict(n=n, convcore_gflops=gemm["convcore_gflops"], numpy_gflops=gemm["numpy_gflops"],
                numpy_threads=numpy_threads, gflops=gemm[source + "_gflops"], source=source)


def write_results(result, json_path: Optional[str] = None,
                  markdown_table: Optional[str] = None) -> None:
    """--json FILE and --markdown, the same for every benchmark."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    if markdown_table is not None:
        print()
        print(markdown_table)
