"""The zoo sweep (`python -m convcore bench --zoo`): its layer discovery,
distinct-layer counting, rows, summary and JSON, through the --quick path on
LeNet-5 so that it runs in seconds. Speed itself is never asserted here: the
figures are the benchmark's to report."""
import json
import math

import numpy as np
import pytest

from convcore import bench, models
from convcore.bench import zoo as bench_zoo
from convcore.nn.layers import Conv2d, Linear

# LeNet-5 at its own 1x32x32 input: conv 5x5 1->6, conv 5x5 6->16, fc 400-120-84-10
LENET5 = ["1->6 5x5 @32x32", "6->16 5x5 @14x14", "fc 400->120", "fc 120->84", "fc 84->10"]


def test_quick_run_on_lenet5_json(tmp_path, capsys):
    path = tmp_path / "zoo.json"
    bench.main(["--zoo", "--quick", "--threads", "1", "--json", str(path)])
    printed = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert set(result) == {"info", "notes", "peak", "layers", "rows", "summary"}
    info = result["info"]
    assert info["models"] == ["lenet5"] and info["batches"] == [1] and info["threads"] == 1
    assert info["repeat"] == 3
    peak = result["peak"]
    assert peak["n"] == 1024 and peak["gflops"] > 0
    assert peak["gflops"] == max(peak["convcore_gflops"], peak["numpy_gflops"])
    assert f"{peak['gflops']:.1f} GFLOP/s" in printed

    # every distinct layer once, used once by lenet5, in the model's order
    layers = result["layers"]
    assert [e["name"] for e in layers] == LENET5
    assert [e["index"] for e in layers] == list(range(5))
    assert all(e["uses"] == {"lenet5": {"count": 1, "first": e["uses"]["lenet5"]["first"]}}
               for e in layers)
    assert [e["cls"] for e in layers] == ["first layer", "large kernel", "linear", "linear",
                                          "linear"]
    assert (layers[1]["kind"], layers[1]["cin"], layers[1]["cout"], layers[1]["kernel"],
            layers[1]["h"], layers[1]["w"], layers[1]["bias"]) == ("conv", 6, 16, [5, 5], 14, 14,
                                                                     True)

    # one row per layer and pass at batch 1; GFLOP/s and the peak share agree
    rows = result["rows"]
    assert [(r["index"], r["pass_"], r["batch"]) for r in rows] == [
        (i, p, 1) for i in range(5) for p in ("fwd", "bwd")]
    for r in rows:
        layer = bench_zoo.Layer(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in layers[r["index"]].items()
                                   if k not in ("index", "name", "cls", "uses")})
        flops = layer.flops(1) * (2 if r["pass_"] == "bwd" else 1)
        assert r["gflops"] == pytest.approx(flops / r["times"]["convcore"] / 1e9)
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / peak["gflops"])
        if info["torch"] is not None:
            assert r["ratio"] == pytest.approx(r["times"]["torch"] / r["times"]["convcore"])
        else:
            assert r["ratio"] is None and "ratio column is empty" in result["notes"][0]
    assert layers[0]["h"] == 32 and bench_zoo.Layer("conv", 1, 6, (5, 5), (1, 1), (0,) * 4,
                                                    (1, 1), 1, True, 32, 32).flops(1) == \
        2 * 6 * 28 * 28 * 25

    # the summary: every class present, then "all", forward and backward
    groups = {(g["cls"], g["pass_"], g["batch"]): g for g in result["summary"]}
    assert set(groups) == {(c, p, 1) for c in ("first layer", "large kernel", "linear", "all")
                           for p in ("fwd", "bwd")}
    assert groups[("linear", "fwd", 1)]["layers"] == 3 and groups[("all", "bwd", 1)]["layers"] == 5
    fwd_all = groups[("all", "fwd", 1)]["peak_fraction"]
    shares = [r["peak_fraction"] for r in rows if r["pass_"] == "fwd"]
    assert fwd_all["min"] == pytest.approx(min(shares))
    assert fwd_all["geomean"] == pytest.approx(math.exp(np.mean(np.log(shares))))
    assert "summary by shape class" in printed


def test_without_torch_the_ratio_is_empty_and_said_why():
    lines = []
    result = bench_zoo.run(["lenet5"], batches=[1], threads=1, repeat=1, with_torch=False,
                           gemm_n=64, out=lines.append)
    assert result["info"]["torch"] is None
    assert result["notes"] == ["the ratio column is empty: --no-torch was given"]
    assert "note: the ratio column is empty: --no-torch was given" in lines
    assert all(r["ratio"] is None and set(r["times"]) == {"convcore"} for r in result["rows"])
    assert all(g["ratio"] is None and g["peak_fraction"]["n"] == g["layers"]
               for g in result["summary"])
    table = bench_zoo.markdown(result)
    assert table.count("\n| 4 | fc 84->10 |") == 2  # forward and backward rows


def test_distinct_layers_count_uses_across_models():
    """ResNet-18's layer1 runs the same 64->64 3x3 convolution four times at
    56x56; ResNet-34's six times; every Conv2d and Linear call is counted."""
    found = bench_zoo.distinct_layers(["resnet18", "resnet34"])
    by_name = {e["layer"].name(): e for e in found}
    assert len(by_name) == len(found)  # names tell distinct layers apart
    uses = by_name["64->64 3x3 p1 @56x56 nb"]["uses"]
    assert {m: u["count"] for m, u in uses.items()} == {"resnet18": 4, "resnet34": 6}
    assert uses["resnet18"]["first"] == "layer1.0.conv1"
    assert by_name["3->64 7x7/2 p3 @224x224 nb"]["cls"] == "first layer"
    for name in ("resnet18", "resnet34"):
        calls = sum(e["uses"][name]["count"] for e in found if name in e["uses"])
        modules = sum(isinstance(m, (Conv2d, Linear)) for m in models.get(name).modules())
        assert calls == modules
    # the summary's macs() still works after the walk (the wrapper is removed)
    conv = models.get("resnet18").conv1
    assert "macs" not in vars(conv)


def test_alexnet_at_its_own_input():
    layers = [layer for _, layer in bench_zoo.model_layers(models.get("alexnet"),
                                                           models.get("alexnet").input_shape)]
    assert (layers[0].h, layers[0].w, layers[0].kernel, layers[0].stride) == (227, 227, (11, 11),
                                                                                (4, 4))
    assert layers[1].h == 27 and layers[1].out_hw == (27, 27)
    assert layers[5].kind == "linear" and layers[5].cin == 9216


@pytest.mark.parametrize("layer, cls", [
    (("conv", 3, 32, (3, 3), (2, 2), (1,) * 4, (1, 1), 1, False, 224, 224), "first layer"),
    (("conv", 32, 32, (3, 3), (1, 1), (1,) * 4, (1, 1), 32, False, 112, 112), "depthwise"),
    (("conv", 128, 128, (3, 3), (1, 1), (1,) * 4, (1, 1), 32, False, 56, 56), "grouped"),
    (("conv", 64, 256, (1, 1), (1, 1), (0,) * 4, (1, 1), 1, False, 56, 56), "pointwise 1x1"),
    (("conv", 256, 512, (1, 1), (2, 2), (0,) * 4, (1, 1), 1, False, 56, 56), "strided"),
    (("conv", 96, 256, (5, 5), (1, 1), (2,) * 4, (1, 1), 1, True, 27, 27), "large kernel"),
    (("conv", 64, 64, (3, 3), (1, 1), (1,) * 4, (1, 1), 1, False, 56, 56), "3x3 stride 1"),
    (("conv", 64, 64, (3, 3), (1, 1), (2,) * 4, (2, 2), 1, False, 56, 56), "other"),
    (("linear", 4096, 1000, (1, 1), (1, 1), (0,) * 4, (1, 1), 1, True, 1, 1), "linear"),
])
def test_shape_classes(layer, cls):
    assert bench_zoo.shape_class(bench_zoo.Layer(*layer)) == cls


def test_stats_quartiles_and_geomean():
    s = bench_zoo.stats([1.0, 2.0, 4.0, 8.0, 16.0])
    assert (s["n"], s["min"], s["q1"], s["median"], s["q3"]) == (5, 1.0, 2.0, 4.0, 8.0)
    assert s["geomean"] == pytest.approx(4.0)
    one = bench_zoo.stats([0.5])
    assert one["min"] == one["q1"] == one["q3"] == one["geomean"] == pytest.approx(0.5)


def test_random_layers_are_valid_and_reproducible():
    """--random's layers: the same for a seed, another set for another seed,
    every one a valid convolution (channels divisible by its groups, an
    output of at least 1x1) within the FLOP bounds at the batches given."""
    a = bench_zoo.random_layers(40, seed=3)
    assert [e["layer"] for e in a] == [e["layer"] for e in bench_zoo.random_layers(40, seed=3)]
    assert [e["layer"] for e in a] != [e["layer"] for e in bench_zoo.random_layers(40, seed=4)]
    for i, e in enumerate(a):
        layer = e["layer"]
        assert layer.kind == "conv" and not layer.bias
        assert layer.cin % layer.groups == 0 and layer.cout % layer.groups == 0
        assert min(layer.out_hw) >= 1
        assert layer.flops(1) >= 2e6 and layer.flops(16) <= 4e9
        assert e["cls"] == bench_zoo.shape_class(layer)
        assert e["uses"] == {"random": {"count": 1, "first": f"#{i}"}}
    assert len({e["cls"] for e in a}) >= 4  # not one kind of layer


def test_quick_random_run_json(tmp_path):
    path = tmp_path / "random.json"
    bench.main(["--zoo", "--random", "2", "--seed", "1", "--quick", "--no-torch", "--threads",
                "1", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["info"]["random"] == {"count": 2, "seed": 1}
    assert result["info"]["models"] == []
    expect = [e["layer"].name() for e in bench_zoo.random_layers(2, seed=1, batches=[1])]
    assert [e["name"] for e in result["layers"]] == expect
    assert [(r["index"], r["pass_"]) for r in result["rows"]] == [
        (i, p) for i in range(2) for p in ("fwd", "bwd")]
    with pytest.raises(SystemExit):
        bench.main(["--zoo", "--random", "0"])
