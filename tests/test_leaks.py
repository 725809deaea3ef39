"""No leaks: thousands of forward + backward calls of every op (and of the
error paths), and hundreds of model loads, leave the process's resident
memory flat.

Resident set size is read from /proc/self/statm after a warm-up (allocator
pools, OpenMP threads, numpy caches settle there), then again after N more
iterations; the growth must stay under 2 MiB: any leak of 420 bytes or more
per iteration fails (each workload's outputs are several KiB; one leaked
output per iteration would add tens of MiB).
CONVCORE_LEAK_STATS=<file> appends the measurements (docs/reliability.md).
"""
import gc
import json
import os

import numpy as np
import pytest

import convcore

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux")]

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
ITERATIONS = int(os.environ.get("CONVCORE_LEAK_ITERATIONS", "5000"))
BOUND = 2 << 20  # 2 MiB


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _record(name, iterations, before, after):
    path = os.environ.get("CONVCORE_LEAK_STATS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(dict(name=name, iterations=iterations, before=before,
                                    after=after)) + "\n")


def measure(name, step, iterations=ITERATIONS, warmup=300):
    for _ in range(warmup):
        step()
    before = rss()
    for _ in range(iterations):
        step()
    after = rss()
    _record(name, iterations, before, after)
    assert after - before < BOUND, (
        f"{name}: resident memory grew by {(after - before) / 2 ** 20:.2f} MiB over "
        f"{iterations} iterations ({before / 2 ** 20:.1f} -> {after / 2 ** 20:.1f} MiB)")


RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4, 12, 12)).astype(np.float32)
XS = np.ascontiguousarray(RNG.standard_normal((2, 4, 12, 24)).astype(np.float32))[..., ::2]


def _conv(algo, w, **kw):
    def step():
        y = convcore.conv2d(XS if algo == "gemm" else X, w, None, algorithm=algo, **kw)
        convcore.conv2d_backward(y, X, w, algorithm=algo, **kw)
    return step


def _pool():
    y, idx = convcore.max_pool2d(X, 2, return_indices=True)
    convcore.max_pool2d_backward(y, X, 2)
    convcore.max_pool2d_backward(y, X, 2, indices=idx)
    a = convcore.avg_pool2d(XS, 3, 2, 1)
    convcore.avg_pool2d_backward(a, XS, 3, 2, 1)
    g = convcore.adaptive_avg_pool2d(X, 5)
    convcore.adaptive_avg_pool2d_backward(g, X)


def _dense():
    w = X.reshape(8, -1)[:, :40]
    y = convcore.linear(XS.reshape(2, -1)[:, :40], w)
    convcore.linear_backward(y, XS.reshape(2, -1)[:, :40], w)
    convcore.relu_backward(convcore.relu(XS), XS)
    convcore.local_response_norm_backward(X, X, 3)
    y, m, v = convcore.batch_norm(X, training=True, return_stats=True)
    convcore.batch_norm_backward(y, X, m, v)


def _errors():
    """The exception paths (C++ exception -> Python) must not leak either."""
    for call in (lambda: convcore.conv2d(X, np.ones((3, 5, 3, 3), np.float32)),
                 lambda: convcore.max_pool2d(X, 20),
                 lambda: convcore.linear(X, np.ones((2, 3), np.float64)),
                 lambda: convcore.avg_pool2d(X, 2, padding=2)):
        try:
            call()
        except (ValueError, TypeError):
            pass


WORKLOADS = {
    "conv2d gemm (strided input)": _conv("gemm", RNG.standard_normal((6, 4, 3, 3)).astype(
        np.float32), padding=1),
    "conv2d winograd": _conv("winograd", RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)),
    "conv2d pointwise": _conv("pointwise", RNG.standard_normal((6, 4, 1, 1)).astype(np.float32)),
    "conv2d depthwise": _conv("depthwise", RNG.standard_normal((4, 1, 3, 3)).astype(np.float32),
                              groups=4),
    "pooling (max, avg, adaptive)": _pool,
    "linear, relu, lrn, batch_norm": _dense,
    "error paths": _errors,
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_repeated_forward_and_backward_do_not_leak(name):
    measure(name, WORKLOADS[name])


def test_training_steps_do_not_leak():
    convcore.manual_seed(0)
    model = convcore.models.lenet5()
    loss = convcore.nn.CrossEntropyLoss()
    opt = convcore.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = RNG.standard_normal((4, 1, 32, 32)).astype(np.float32)
    t = np.arange(4) % 10

    def step():
        opt.zero_grad()
        loss(model(x), t)
        model.backward(loss.backward())
        opt.step()

    measure("lenet5 training step", step, iterations=ITERATIONS // 10, warmup=30)


def test_repeated_model_load_does_not_leak(tmp_path):
    convcore.manual_seed(0)
    path = str(tmp_path / "m.safetensors")
    convcore.save(convcore.build("CONV3-8-BN-RELU-POOL2-FC-10", (3, 16, 16)), path)
    bad = str(tmp_path / "bad.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[:-5])

    def step():
        convcore.load(path)
        try:
            convcore.load(bad)
        except ValueError:
            pass

    measure("model load (+ a truncated file)", step, iterations=ITERATIONS // 10, warmup=50)
