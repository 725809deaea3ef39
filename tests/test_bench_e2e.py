"""The end-to-end benchmark (`python -m convcore bench --e2e`): its torch
mirror of a convcore model computes the same outputs, and a tiny run gives
well-formed rows. Timings are reported, never asserted."""
import json

import numpy as np
import pytest

import convcore
from convcore import models

torch = pytest.importorskip("torch", reason="PyTorch not installed: the e2e mirror skipped")
from convcore.bench.e2e import main, run  # noqa: E402
from convcore.interop.torch import to_torch  # noqa: E402


@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {}), ("mobilenet_v2", {}), ("efficientnet_b0", {}), ("densenet121", {}),
    ("googlenet", dict(aux_logits=True)), ("alexnet", dict(input_size=67)),
    ("zfnet", dict(input_size=67)),     # ceil-mode pools and the stride-2 CONV2
    ("nasnet_a_mobile", {}),            # its fixed resamplings and drop paths
    ("googlenet", dict(transform_input=True)),  # the Normalize child
])
def test_torch_mirror_computes_the_same(name, kwargs):
    convcore.manual_seed(0)
    kwargs = dict(dict(num_classes=10, input_size=32), **kwargs)
    model = models.get(name, **kwargs).eval()
    mirror = to_torch(model).eval()
    assert list(mirror.state_dict()) == list(model.state_dict())
    shape = (2,) + tuple(model.input_shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        expected = mirror(torch.from_numpy(x)).numpy()
    got = model(x)
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_torch_mirror_of_a_batch_norm_without_bias():
    convcore.manual_seed(0)
    model = convcore.nn.Sequential(convcore.nn.Conv2d(3, 4, 3),
                                   convcore.nn.BatchNorm2d(4, bias=False)).eval()
    model[1].weight.data[:] = [0.5, -1.0, 2.0, 3.0]
    mirror = to_torch(model).eval()
    assert list(mirror.state_dict()) == list(model.state_dict())
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        expected = mirror(torch.from_numpy(x)).numpy()
    assert np.abs(model(x) - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_tiny_run_gives_rows(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    main(["--models", "mobilenet_v2", "--batches", "2", "--size", "32", "--repeat", "1",
          "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["model"], r["batch"], r["mode"]) for r in rows] == [
        ("mobilenet_v2", 2, "inference"), ("mobilenet_v2", 2, "train step")]
    for r in rows:
        assert r["convcore_ips"] > 0 and r["torch_ips"] > 0
        assert r["ratio"] == pytest.approx(r["convcore_ips"] / r["torch_ips"])
        assert r["max_rel_diff"] < 1e-4
    assert "mobilenet_v2" in capsys.readouterr().out


def test_run_without_torch_times_convcore_alone():
    # batch 1 needs 64x64: training-mode BN needs more than one value per channel
    result = run(["mobilenet_v1"], [1], threads=1, repeat=1, size=64, with_torch=False,
                 print_fn=None)
    assert all(r["torch_ips"] is None and r["ratio"] is None for r in result["rows"])


# ------------------------------------------------- compiled engine, ONNX Runtime, memory

from convcore.bench import e2e as bench_e2e  # noqa: E402

try:
    import onnxruntime  # noqa: F401
    HAVE_ORT = True
except ImportError:
    HAVE_ORT = False
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")


def _fake_compile(calls):
    """A stand-in for convcore.compile: the eager model behind the engine's API."""
    def compile(model, threads=None):
        calls.append(threads)
        return lambda x: model.eval()(np.asarray(x))
    return compile


def test_the_default_is_the_whole_zoo():
    assert list(bench_e2e.DEFAULT_MODELS) == list(models._ZOO)


def test_without_compile_the_compiled_column_is_empty(monkeypatch, capsys):
    monkeypatch.delattr(convcore, "compile", raising=False)
    result = run(["lenet5"], [2], threads=1, repeat=1, size=32)
    assert result["compiled"] is False
    inference, train = result["rows"]
    assert inference["compiled_ips"] is None
    assert inference["compiled_vs_ort"] is None and inference["compiled_vs_torch"] is None
    assert "compiled" not in inference["diffs"]
    assert train["mode"] == "train step" and train["compiled_ips"] is None
    out = capsys.readouterr().out
    assert "convcore.compile is not in this build" in out
    line = next(s for s in out.splitlines() if s.startswith("lenet5") and "inference" in s)
    assert line.split()[5] == "-"  # model batch mode input eager COMPILED


@needs_ort
def test_the_ort_column_is_filled():
    result = run(["lenet5"], [2], threads=1, repeat=1, size=32, print_fn=None)
    inference, train = result["rows"]
    assert result["onnxruntime"]
    assert inference["ort_ips"] > 0 and inference["torch_ips"] > 0
    assert inference["diffs"]["ort"] < 1e-4 and inference["diffs"]["torch"] < 1e-4
    assert inference["max_rel_diff"] == max(inference["diffs"].values())
    assert train["ort_ips"] is None  # training: convcore eager and PyTorch only
    assert inference["errors"] == {} and train["errors"] == {}


def test_without_onnxruntime_the_ort_column_is_empty(monkeypatch, capsys):
    monkeypatch.setattr(bench_e2e, "_import_ort", lambda: None)
    result = run(["lenet5"], [2], threads=1, repeat=1, size=32, train=False)
    (row,) = result["rows"]
    assert row["ort_ips"] is None and row["compiled_vs_ort"] is None and row["torch_ips"] > 0
    assert "onnxruntime is not installed" in capsys.readouterr().out


def test_a_compile_is_used_once_per_model_for_every_batch(monkeypatch):
    calls = []
    monkeypatch.setattr(convcore, "compile", _fake_compile(calls), raising=False)
    # lenet5 at its own input, 1x32x32
    result = run(["lenet5"], [1, 2], threads=1, repeat=1, print_fn=None)
    assert calls == [1]
    rows = result["rows"]
    assert [(r["batch"], r["mode"]) for r in rows] == [
        (1, "inference"), (2, "inference"), (1, "train step"), (2, "train step")]
    for r in rows[:2]:
        assert r["input_shape"] == [1, 32, 32]
        assert r["compiled_ips"] > 0 and r["diffs"]["compiled"] == 0.0
        assert r["compiled_vs_torch"] == pytest.approx(r["compiled_ips"] / r["torch_ips"])
        if HAVE_ORT:
            assert r["compiled_vs_ort"] == pytest.approx(r["compiled_ips"] / r["ort_ips"])
    assert all(r["compiled_ips"] is None for r in rows[2:])


def test_a_failing_library_drops_out_of_its_row(monkeypatch, capsys):
    def refuses(model, threads=None):
        raise NotImplementedError("no kernel for this layer")

    monkeypatch.setattr(convcore, "compile", refuses, raising=False)
    result = run(["lenet5"], [2], threads=1, repeat=1, size=32, with_ort=False)
    row = result["rows"][0]
    assert row["compiled_ips"] is None and row["convcore_ips"] > 0 and row["torch_ips"] > 0
    assert "no kernel for this layer" in row["errors"]["compiled"]
    assert "no kernel for this layer" in capsys.readouterr().out


def test_step_bytes_sees_what_a_step_allocates():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("this kernel refuses to reset the peak resident size")

    def step():
        a = np.ones(50 * 2**20 // 8)  # 50 MB, touched
        return a.sum()

    used = bench_e2e._step_bytes(step)
    assert 45 * 2**20 < used < 200 * 2**20


def test_a_training_step_too_big_for_memory_is_skipped(monkeypatch, capsys):
    # each step measured at 1 GiB at batch 1; 3 GiB available: batch 2
    # (2 GiB per library, two libraries) must not start, batch 1 runs
    monkeypatch.setattr(bench_e2e, "_step_bytes", lambda fn: (fn(), 2**30)[1])
    real = bench_e2e._proc_kb
    monkeypatch.setattr(bench_e2e, "_proc_kb", lambda path, key: 3 * 2**20
                        if key == "MemAvailable" else real(path, key))
    result = run(["lenet5"], [1, 2], threads=1, repeat=1, size=32, with_ort=False,
                 with_compiled=False)
    steps = {r["batch"]: r for r in result["rows"] if r["mode"] == "train step"}
    assert steps[1]["convcore_ips"] > 0 and steps[1]["torch_ips"] > 0
    assert steps[2]["convcore_ips"] is None and steps[2]["torch_ips"] is None
    assert set(steps[2]["errors"]) == {"convcore", "torch"}
    assert "about 4.0 GiB" in steps[2]["errors"]["convcore"]
    assert "training step skipped" in capsys.readouterr().out


def test_a_model_too_small_for_size_is_skipped():
    result = run(["alexnet", "lenet5"], [2], threads=1, repeat=1, size=32, with_torch=False,
                 with_ort=False, train=False, print_fn=None)
    assert list(result["skipped"]) == ["alexnet"]
    assert [r["model"] for r in result["rows"]] == ["lenet5"]


def test_markdown_table(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(convcore, "compile", _fake_compile([]), raising=False)
    out = tmp_path / "e2e.json"
    main(["--models", "lenet5", "--batches", "2", "--size", "32", "--repeat", "1",
          "--threads", "1", "--json", str(out), "--markdown"])
    text = capsys.readouterr().out
    assert ("| model | batch | convcore eager | compiled | PyTorch | ORT | compiled/ORT "
            "| compiled/PyTorch | max rel diff |") in text
    row = next(s for s in text.splitlines() if s.startswith("| lenet5 (1x32x32) | 2 |"))
    assert len(row.strip("|").split("|")) == 9
    assert f"ISA {bench_e2e.isa_name()}, 1 threads" in text
    assert "| model | batch | convcore eager | PyTorch | convcore/PyTorch |" in text
    result = json.loads(out.read_text())
    assert {"cpu", "isa", "threads", "onnxruntime", "compiled"} <= set(result)
    main(["--load", str(out)])  # the same tables from the file
    assert capsys.readouterr().out.strip() == bench_e2e.markdown(result).strip()


def test_memory_child_measures_one_inference():
    m = bench_e2e.memory_child("convcore", "lenet5", 2, (1, 32, 32), threads=1)
    assert 0 < m["imports_mb"] <= m["setup_mb"] <= m["peak_mb"]
    assert m["infer_extra_mb"] >= 0
    assert m["imported"] == ["convcore"]  # no torch, no onnxruntime


@needs_ort
def test_memory_run_measures_ort_without_torch_in_its_child(capsys):
    result = bench_e2e.measure_memory(["lenet5"], [2], threads=1, size=32, with_torch=False)
    (row,) = result["memory_rows"]
    assert row["errors"] == {}
    assert row["memory"]["ort"]["imported"] == ["onnxruntime"]
    assert row["memory"]["ort"]["peak_mb"] > 0 and row["memory"]["convcore"]["peak_mb"] > 0
    assert row["memory"]["compiled"]["imported"] == ["convcore"]  # from the saved file
    assert "torch" not in row["memory"]
    print(bench_e2e.markdown(result))
    assert "| lenet5 (1x32x32) | 2 |" in capsys.readouterr().out
