"""The CPU benchmark (`python -m convcore bench`): its rows, geometric means,
JSON and chart, on tiny layers so that it runs in seconds. Speed itself is
never asserted here: the figures are the benchmark's to report."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from convcore import bench
from _helpers import convcore_env


def tiny_cases():
    return [bench.Conv("tiny.conv", 2, 3, 9, 4, 3, 1, 1),
            bench.Conv("tiny.strided", 2, 4, 11, 6, 3, 2, 1),
            bench.Conv("tiny.depthwise", 2, 6, 8, 6, 3, 1, 1, 1, 6),
            bench.Conv("tiny.dilated", 2, 3, 10, 5, 3, 1, 2, 2),
            bench.Pool("tiny.pool", 2, 3, 9, 3, 2),
            bench.Fc("tiny.fc", 2, 20, 7)]


def test_tiny_run_rows_and_summary():
    lines = []
    result = bench.run(threads=1, repeat=1, with_torch=True, with_numpy=True,
                       out=lines.append, cases=tiny_cases(), gemm_n=64)
    rows = result["rows"]
    # every conv: forward, backward, forward at batch 1; pool and fc: forward, backward
    assert [(r["layer"], r["pass_"], r["batch"]) for r in rows] == [
        (name, p, b) for name, passes in [
            ("tiny.conv", [("fwd", 2), ("bwd", 2), ("fwd", 1)]),
            ("tiny.strided", [("fwd", 2), ("bwd", 2), ("fwd", 1)]),
            ("tiny.depthwise", [("fwd", 2), ("bwd", 2), ("fwd", 1)]),
            ("tiny.dilated", [("fwd", 2), ("bwd", 2), ("fwd", 1)]),
            ("tiny.pool", [("fwd", 2), ("bwd", 2)]),
            ("tiny.fc", [("fwd", 2), ("bwd", 2)])]
        for p, b in passes]
    for row in rows:
        assert row["kind"] in ("conv", "pool", "fc")
        assert all(t > 0 for t in row["times"].values()), row
        assert isinstance(row["workspace_bytes"], int) and row["workspace_bytes"] >= 0
    conv = rows[1]  # tiny.conv backward: twice the forward's flops
    assert conv["gflops"] == pytest.approx(2 * 2 * 2 * 4 * 9 * 9 * 3 * 9 / 1e9)
    assert rows[2]["gflops"] == pytest.approx(2 * 1 * 4 * 9 * 9 * 3 * 9 / 1e9)
    # numpy's im2col runs where it applies: not for depthwise or dilated layers
    assert "numpy" in rows[0]["times"] and "numpy" not in rows[6]["times"]
    assert "numpy" not in rows[9]["times"]
    sgemm = result["sgemm"]
    assert sgemm["convcore_gflops"] > 0 and sgemm["numpy_gflops"] > 0
    assert sgemm["ratio"] == pytest.approx(sgemm["convcore_gflops"] / sgemm["numpy_gflops"])
    gauge = result["info"]["memory_gauge_gbps"]
    assert gauge["start"] > 0 and gauge["end"] > 0
    assert any(line.startswith("SGEMM 64x64x64") for line in lines)
    assert sum("memory gauge" in line for line in lines) == 2
    assert json.loads(json.dumps(result)) == result  # --json writes it as it is
    if result["info"]["torch"] is None:
        assert result["geomean_vs_torch"] == {}
        return
    assert all("torch" in r["times"] for r in rows)
    expected = bench._geomeans(rows, "torch")
    assert result["geomean_vs_torch"] == expected
    assert all(math.isfinite(v) and v > 0 for v in expected.values())


def _row(kind, pass_, batch, convcore, torch=None):
    times = {"convcore": convcore}
    if torch is not None:
        times["torch"] = torch
    return dict(layer="x", kind=kind, pass_=pass_, batch=batch, times=times, gflops=None,
                workspace_bytes=0)


def test_geomeans_group_the_rows_by_target():
    rows = [_row("conv", "fwd", 16, 1.0, 2.0), _row("conv", "fwd", 16, 1.0, 8.0),
            _row("conv", "bwd", 16, 2.0, 1.0), _row("conv", "fwd", 1, 1.0, 3.0),
            _row("conv", "bwd", 1, 1.0, 100.0),   # (no such row in the suite): backward only
            _row("pool", "fwd", 16, 1.0, 9.0), _row("pool", "bwd", 16, 1.0, 1.0),
            _row("fc", "fwd", 16, 1.0, 50.0),      # linear forward is no target's row
            _row("fc", "bwd", 16, 1.0, 2.0), _row("fc", "bwd", 16, 4.0, None)]
    means = bench._geomeans(rows, "torch")
    assert means["conv forward (suite batch)"] == pytest.approx(4.0)
    assert means["conv backward"] == pytest.approx(math.sqrt(0.5 * 100.0))
    assert means["conv forward batch 1"] == pytest.approx(3.0)
    assert means["pooling"] == pytest.approx(3.0)
    assert means["linear backward"] == pytest.approx(2.0)  # the row without torch is left out
    assert math.isnan(bench._geomeans([_row("pool", "fwd", 16, 1.0)], "torch")["pooling"])


def test_main_writes_json_and_chart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    lines = []
    tiny = bench.run(threads=1, repeat=1, with_torch=True, with_numpy=False, out=lines.append,
                     cases=tiny_cases()[:1] + tiny_cases()[4:], gemm_n=32)
    if tiny["info"]["torch"] is None:  # the chart plots ratios against PyTorch
        pytest.skip("PyTorch is not importable")
    calls = []

    def fake_run(*args, **kwargs):
        calls.append(args)
        return tiny

    monkeypatch.setattr(bench.layers, "run", fake_run)  # what the suite's command line runs
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    bench.main(["--threads", "1", "--repeat", "3", "--no-numpy", "--json", str(out_json),
                "--plot", str(out_png)])
    assert calls == [(1, 3, False, True, False)]
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(tiny))
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_gauge_is_a_rate():
    assert 0 < bench.memory_gauge(megabytes=1, repeat=3) < 1e4  # GB/s


def test_suite_is_the_issues_layers():
    """The suite is the issue's: AlexNet conv1-5, POOL1, fc6-8 at batch 16;
    VGG16's 3x3 layers (batch 4 at 224); ResNet's conv1 (batch 8), 3x3, 3x3/2
    and 1x1 layers; the depthwise and dilated layers. --quick only lowers
    the batch."""
    cases = bench.suite()
    names = [c.name for c in cases]
    assert names[:9] == ["alexnet.conv1", "alexnet.conv2", "alexnet.conv3", "alexnet.conv4",
                         "alexnet.conv5", "alexnet.pool1", "alexnet.fc6", "alexnet.fc7",
                         "alexnet.fc8"]
    assert len(names) == 22 and len(set(names)) == 22
    by_name = {c.name: c for c in cases}
    assert (by_name["alexnet.conv1"].h, by_name["alexnet.conv1"].k,
            by_name["alexnet.conv1"].stride) == (227, 11, 4)
    assert by_name["alexnet.conv1"].out_hw == 55
    assert by_name["vgg16.conv1_2@224"].n == 4 and by_name["resnet.conv1"].n == 8
    assert by_name["dilated3x3 d2@56"].out_hw == 56
    assert sorted({c.n for c in cases}) == [4, 8, 16]
    assert {c.n for c in bench.suite(quick=True)} == {2}
    fc6 = by_name["alexnet.fc6"]
    assert (fc6.cin, fc6.cout) == (9216, 4096)
    np.testing.assert_allclose(fc6.flops(), 2 * 16 * 9216 * 4096)


def test_the_package_keeps_the_old_module_names():
    """convcore.bench is a package now (timing, layers, e2e, zoo); its
    namespace keeps what the flat module held, and convcore.bench_e2e,
    convcore.bench_zoo and convcore.cuda.bench (the GPU benchmark, now
    convcore.bench.gpu) re-export the same objects for old code."""
    import convcore.bench_e2e
    import convcore.bench_zoo
    import convcore.cuda.bench
    from convcore.bench import e2e, gpu, layers, timing, zoo
    from convcore.interop import torch as mirror

    for name in ("Conv", "Pool", "Fc", "suite", "run", "plot", "_geomeans"):
        assert getattr(bench, name) is getattr(layers, name)
    for name in ("interleaved_medians", "cpu_name", "memory_gauge", "write_results"):
        assert getattr(bench, name) is getattr(timing, name)
    for name in convcore.bench_e2e.__all__:
        assert getattr(convcore.bench_e2e, name) is getattr(
            mirror if name == "to_torch" else e2e, name)
    for name in convcore.bench_zoo.__all__:
        assert getattr(convcore.bench_zoo, name) is getattr(
            timing if name == "measure_peak" else zoo, name)
    for name in convcore.cuda.bench.__all__:
        assert getattr(convcore.cuda.bench, name) is getattr(gpu, name)


def test_importing_the_package_never_imports_torch():
    """torch is optional: only making a mirror (or running a benchmark)
    imports it, not importing any of these modules."""
    code = ("import sys\n"
            "import convcore, convcore.interop, convcore.interop.torch, convcore.bench, "
            "convcore.bench.e2e, convcore.bench.zoo, convcore.bench_e2e, convcore.bench_zoo, "
            "convcore.models_extra, convcore.nasnet, convcore.bench.gpu, convcore.cuda.bench\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=convcore_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_interleaved_medians_take_one_sample_per_block_in_alternating_rounds(monkeypatch):
    """Each round gives every library one block (a warm-up of at least
    `warmup` seconds, then one timed sample), in the reverse order of the
    round before; max_repeat caps a slow peer's samples; each result is the
    median of its library's samples. Timed on a fake clock that each call
    advances by its library's cost (c's second sample is slow: one spoiled
    sample, which the median of three leaves out)."""
    import types

    from convcore.bench import timing
    clock = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    order = []

    def make(name, cost):
        def fn():
            order.append(name)
            slow = name == "c" and order.count("c") == 4  # c's sample in round 2
            clock[0] += 0.5 if slow else cost
        return fn

    fns = {"a": make("a", 0.2), "b": make("b", 0.3), "c": make("c", 0.25)}
    medians = timing.interleaved_medians(fns, 3, max_repeat={"b": 1}, warmup=0.1)
    # blocks of two calls (the warm-up, then the sample): a b c, c a (b has
    # its one sample), a c
    assert "".join(order) == "aabbcc" + "ccaa" + "aacc"
    assert medians == pytest.approx({"a": 0.2, "b": 0.3, "c": 0.25})
