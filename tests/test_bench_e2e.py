"""The end-to-end benchmark (`python -m convcore bench --e2e`): its torch
mirror of a convcore model computes the same outputs, and a tiny run gives
well-formed rows. Timings are reported, never asserted."""
import json

import numpy as np
import pytest

import convcore
from convcore import models

torch = pytest.importorskip("torch", reason="PyTorch not installed: the e2e mirror skipped")
from convcore.bench_e2e import main, run, to_torch  # noqa: E402


@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {}), ("mobilenet_v2", {}), ("efficientnet_b0", {}), ("densenet121", {}),
    ("googlenet", dict(aux_logits=True)), ("alexnet", dict(input_size=67)),
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
