"""The model zoo: parameter counts, input sizes, the AlexNet summary against
the lecture's table, ZFNet as published, forward/backward of the small
models, and torchvision's state-dict key names."""

import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import convcore
from convcore import models, nn
from convcore.builder import BuildError
from _helpers import convcore_env

# The lecture's AlexNet table: layer, output volume, parameters.
ALEXNET_TABLE = [
    ("CONV1", "55x55x96", 34_944),
    ("MAX POOL1", "27x27x96", 0),
    ("NORM1", "27x27x96", 0),
    ("CONV2", "27x27x256", 614_656),
    ("MAX POOL2", "13x13x256", 0),
    ("NORM2", "13x13x256", 0),
    ("CONV3", "13x13x384", 885_120),
    ("CONV4", "13x13x384", 1_327_488),
    ("CONV5", "13x13x256", 884_992),
    ("MAX POOL3", "6x6x256", 0),
    ("FC6", "4096", 37_752_832),
    ("FC7", "4096", 16_781_312),
    ("FC8", "1000", 4_097_000),
]
ALEXNET_PARAMS = 62_378_344


def _volume(shape):
    return f"{shape[1]}x{shape[2]}x{shape[0]}" if len(shape) == 3 else "x".join(map(str, shape))


def _no_warnings(make, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make(*args, **kwargs)


@pytest.fixture(scope="module")
def alexnet():
    """The full lecture AlexNet (1000 classes, 227x227x3), built once."""
    return _no_warnings(models.alexnet)


# ===========================================================================
# parameter counts
# ===========================================================================

def test_alexnet_table_adds_up():
    assert sum(p for _, _, p in ALEXNET_TABLE) == ALEXNET_PARAMS
    # by hand: (F*F*C_in + 1) * K for convs, (in + 1) * out for FCs
    assert (11 * 11 * 3 + 1) * 96 == 34_944
    assert (5 * 5 * 96 + 1) * 256 == 614_656
    assert (6 * 6 * 256 + 1) * 4096 == 37_752_832


def test_alexnet_parameter_count(alexnet):
    assert alexnet.num_parameters() == ALEXNET_PARAMS
    assert alexnet.input_shape == (3, 227, 227)
    assert alexnet.output_shape((3, 227, 227)) == (1000,)


@pytest.mark.parametrize("make,count", [
    (models.lenet5, 61_706),
    (models.resnet18, 11_689_512),
    (models.resnet34, 21_797_672),
])
def test_parameter_counts(make, count):
    kwargs = {} if make is models.lenet5 else dict(num_classes=1000)
    m = _no_warnings(make, **kwargs)
    assert m.num_parameters() == count
    assert sum(v.size for k, v in m.state_dict().items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == count


def test_lenet5_by_hand():
    m = models.lenet5()
    by_hand = (5 * 5 * 1 + 1) * 6 + (5 * 5 * 6 + 1) * 16 + (400 + 1) * 120 + (120 + 1) * 84 + \
        (84 + 1) * 10
    assert m.num_parameters() == by_hand == 61_706
    assert m.input_shape == (1, 32, 32)
    shapes = []
    shape = (1, 32, 32)
    for layer in m.features:
        shape = layer.output_shape(shape)
        shapes.append(shape)
    # 32 -> 28 -> 14 -> 10 -> 5
    assert [s for s, l in zip(shapes, m.features) if not isinstance(l, nn.ReLU)] == \
        [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5)]


@pytest.mark.slow
def test_vgg16_parameter_count():
    m = _no_warnings(models.vgg16)
    assert m.num_parameters() == 138_357_544
    assert m.classifier[0].weight.shape == (4096, 7 * 7 * 512)


def test_vgg16_parameter_count_small_input():
    """At 32x32 the thirteen convs are the same (14,714,688 parameters) and
    FC6 takes 1x1x512 inputs."""
    m = _no_warnings(models.vgg16, num_classes=10, input_size=32)
    convs = sum(p.size for n, p in m.named_parameters() if n.startswith("features"))
    assert convs == 14_714_688
    assert m.num_parameters() == convs + (512 + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * 10
    # torchvision's names
    conv_idx = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert list(m.state_dict()) == \
        [f"features.{i}.{w}" for i in conv_idx for w in ("weight", "bias")] + \
        [f"classifier.{i}.{w}" for i in (0, 3, 6) for w in ("weight", "bias")]
    assert [type(l) for l in m.classifier] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear,
                                               nn.ReLU, nn.Dropout, nn.Linear]


def test_parameter_counts_change_with_num_classes():
    assert models.lenet5(num_classes=3).num_parameters() == 61_706 - 85 * 7
    assert models.resnet18(num_classes=10).num_parameters() == 11_689_512 - 513 * 990
    assert models.resnet34(num_classes=2, input_size=32).num_parameters() == \
        21_797_672 - 513 * 998
    small = models.alexnet(num_classes=7, input_size=67)
    assert small.classifier[-1].weight.shape == (7, 4096)
    assert small.output_shape((3, 67, 67)) == (7,)


@pytest.mark.parametrize("make", [models.lenet5, models.alexnet, models.zfnet, models.vgg16,
                                  models.resnet18, models.resnet34])
def test_num_classes_must_be_positive(make):
    with pytest.raises(ValueError):
        make(num_classes=0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "10", True, False, None])
@pytest.mark.parametrize("name", list(models._ZOO))
def test_one_num_classes_rule_for_the_whole_zoo(name, bad):
    """Every builder checks num_classes by the same rule (models/_common.py),
    before it builds anything: a positive int, bools refused."""
    with pytest.raises(ValueError, match=r"^num_classes must be a positive int, got "):
        models.get(name, num_classes=bad)


def test_num_classes_takes_numpy_ints():
    assert models.lenet5(num_classes=np.int64(3)).output_shape((1, 32, 32)) == (3,)
    assert models.resnet18(num_classes=np.int32(3), input_size=32).num_classes == 3


def test_the_package_exports_what_the_flat_modules_did():
    """convcore.models is a package now; its names, the zoo's order and the
    old modules (kept for compatibility) are unchanged."""
    import convcore.models_extra
    import convcore.nasnet
    from convcore.models import inception as inception_module, nasnet as nasnet_module

    assert sorted(models.__all__) == sorted([
        "lenet5", "alexnet", "zfnet", "vgg16", "resnet18", "resnet34", "ResNet", "SPECS", "get",
        "googlenet", "mobilenet_v1", "mobilenet_v2", "resnext50_32x4d", "wide_resnet50_2",
        "densenet121", "se_resnet50", "efficientnet_b0", "nasnet_a_mobile", "nasnet_a_large"])
    assert all(hasattr(models, name) for name in models.__all__)
    assert list(models._ZOO) == [
        "lenet5", "alexnet", "zfnet", "vgg16", "resnet18", "resnet34", "googlenet",
        "mobilenet_v1", "mobilenet_v2", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
        "se_resnet50", "efficientnet_b0", "nasnet_a_mobile", "nasnet_a_large"]
    old = convcore.models_extra
    assert sorted(old.__all__) == sorted([
        "googlenet", "mobilenet_v1", "mobilenet_v2", "resnext50_32x4d", "wide_resnet50_2",
        "densenet121", "se_resnet50", "efficientnet_b0", "Normalize", "nasnet_a_mobile",
        "nasnet_a_large"])
    assert all(getattr(old, n) is getattr(models, n, None) or n == "Normalize"
               for n in old.__all__)
    assert old.Normalize is inception_module.Normalize
    assert (old.IMAGENET_MEAN, old.IMAGENET_STD) == (inception_module.IMAGENET_MEAN,
                                                     inception_module.IMAGENET_STD)
    assert sorted(convcore.nasnet.__all__) == sorted(nasnet_module.__all__)
    assert all(getattr(convcore.nasnet, n) is getattr(nasnet_module, n)
               for n in nasnet_module.__all__)


def test_get():
    assert isinstance(models.get("lenet5"), type(models.lenet5()))
    assert models.get("resnet18", num_classes=5, input_size=32).fc.out_features == 5
    with pytest.raises(ValueError, match="resnet50"):
        models.get("resnet50")


# ===========================================================================
# input sizes
# ===========================================================================

def test_resnet18_at_64():
    m = _no_warnings(models.resnet18, num_classes=10, input_size=64)
    assert m.input_shape == (3, 64, 64)
    assert m.output_shape((3, 64, 64)) == (10,)
    assert m.num_parameters() == 11_689_512 - 513 * 990    # size-independent (GAP)
    rows = m.summary((3, 64, 64), print_fn=None)
    # stem 64 -> 32, max pool -> 16, stages 16, 8, 4, 2
    outputs = {r["layer"]: r["output"] for r in rows}
    assert outputs["conv1"] == (64, 32, 32)
    assert outputs["maxpool"] == (64, 16, 16)
    assert outputs["layer2.0.conv1"] == (128, 8, 8)
    assert outputs["layer4.1.conv2"] == (512, 2, 2)
    assert sum(r["params"] for r in rows) == m.num_parameters()


@pytest.mark.parametrize("input_size,shape", [(48, (3, 48, 48)), ((40, 56), (3, 40, 56)),
                                              ((1, 32, 32), (1, 32, 32))])
def test_resnet_input_size_forms(input_size, shape):
    m = models.resnet18(num_classes=4, input_size=input_size)
    assert m.input_shape == shape
    assert m.conv1.weight.shape == (64, shape[0], 7, 7)


def test_alexnet_at_another_size():
    """67x67: CONV1 (67 - 11) / 4 + 1 = 15, POOL1 7, CONV2 7, POOL2 3,
    CONV3-5 3, POOL3 1: every layer fits exactly."""
    m = _no_warnings(models.alexnet, num_classes=10, input_size=67)
    rows = m.summary((3, 67, 67), print_fn=None)
    assert [(r["name"], _volume(r["output"])) for r in rows] == [
        ("CONV1", "15x15x96"), ("MAX POOL1", "7x7x96"), ("NORM1", "7x7x96"),
        ("CONV2", "7x7x256"), ("MAX POOL2", "3x3x256"), ("NORM2", "3x3x256"),
        ("CONV3", "3x3x384"), ("CONV4", "3x3x384"), ("CONV5", "3x3x256"),
        ("MAX POOL3", "1x1x256"), ("FC6", "4096"), ("FC7", "4096"), ("FC8", "10")]
    assert m.classifier[1].in_features == 256


@pytest.mark.parametrize("make,size", [(models.alexnet, 63), (models.alexnet, 11),
                                       (models.lenet5, 8), (models.vgg16, 16),
                                       (models.zfnet, 62)])
def test_too_small_input_raises(make, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convcore.builder.MisfitWarning)
        with pytest.raises(BuildError):
            make(num_classes=10, input_size=size)


def test_bad_input_size_form():
    with pytest.raises(ValueError):
        models.lenet5(input_size=(1, 2, 32, 32))
    with pytest.raises(ValueError):
        models.resnet18(input_size=(1, 2, 32, 32))


# ===========================================================================
# summary
# ===========================================================================

def test_alexnet_summary_rows(alexnet):
    lines = []
    rows = alexnet.summary((3, 227, 227), print_fn=lines.append)
    assert [(r["name"], _volume(r["output"]), r["params"]) for r in rows] == ALEXNET_TABLE
    assert rows[0]["macs"] == 55 * 55 * 96 * (11 * 11 * 3)
    assert rows[3]["macs"] == 27 * 27 * 256 * (5 * 5 * 96)
    assert rows[10]["macs"] == 9216 * 4096
    assert rows[0]["activation_bytes"] == 55 * 55 * 96 * 4
    conv_macs = [55 * 55 * 96 * 11 * 11 * 3, 27 * 27 * 256 * 5 * 5 * 96,
                 13 * 13 * 384 * 3 * 3 * 256, 13 * 13 * 384 * 3 * 3 * 384,
                 13 * 13 * 256 * 3 * 3 * 384]
    assert sum(r["macs"] for r in rows) == sum(conv_macs) + 9216 * 4096 + 4096 * 4096 + \
        4096 * 1000 == 1_135_256_096
    _check_printed_table(lines)


def _check_printed_table(lines):
    text = "\n".join(lines)
    assert "[227x227x3]" in text
    for name, vol, params in ALEXNET_TABLE:
        pattern = rf"(?m)\b{re.escape(name)}\s+\[{vol}\]\s+{params:,}\s"
        assert re.search(pattern, text), f"no row {name} [{vol}] {params:,} in\n{text}"
    # one line per row of the table, in the lecture's order
    order = [next(i for i, line in enumerate(lines)
                  if re.search(rf"\b{re.escape(name)}\s+\[", line))
             for name, _, _ in ALEXNET_TABLE]
    assert order == sorted(order)
    assert not re.search(r"\bRELU\b|\bDROPOUT\b", text)    # folded away, as the lecture's
    total = [line for line in lines if line.startswith("total")]
    assert len(total) == 1 and f"{ALEXNET_PARAMS:,}" in total[0]


def test_alexnet_summary_all_rows(alexnet):
    from convcore.summary import summary
    rows = summary(alexnet, (3, 227, 227), print_fn=None, compact=False)
    names = [r["name"] for r in rows]
    assert names.count("RELU") == 7 and names.count("DROPOUT") == 2
    assert sum(r["params"] for r in rows) == ALEXNET_PARAMS


def test_summary_command_prints_the_alexnet_table():
    proc = subprocess.run([sys.executable, "-m", "convcore", "summary", "alexnet"],
                          capture_output=True, text=True, env=convcore_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_printed_table(proc.stdout.splitlines())


def test_lenet5_summary():
    rows = models.lenet5().summary((1, 32, 32), print_fn=None)
    assert [(r["name"], _volume(r["output"]), r["params"]) for r in rows] == [
        ("CONV1", "28x28x6", 156), ("MAX POOL1", "14x14x6", 0), ("CONV2", "10x10x16", 2_416),
        ("MAX POOL2", "5x5x16", 0), ("FC3", "120", 48_120), ("FC4", "84", 10_164),
        ("FC5", "10", 850)]


# ===========================================================================
# ZFNet
# ===========================================================================

ZFNET_CONVS = [  # (kernel, stride, padding, filters): Zeiler and Fergus (2013), Figure 3
    ((7, 7), (2, 2), (1, 1), 96), ((5, 5), (2, 2), (0, 0), 256), ((3, 3), (1, 1), (1, 1), 512),
    ((3, 3), (1, 1), (1, 1), 1024), ((3, 3), (1, 1), (1, 1), 512)]


def test_zfnet_structure_small_input():
    """CONV1 7x7/2 and CONV2 5x5/2, each followed by a 3x3/2 pool (ceil mode)
    and NORM; CONV3, 4, 5 with the lecture's 512, 1024, 512 filters. At 67x67:
    CONV1 (67 + 2 - 7) // 2 + 1 = 32, POOL1 16, CONV2 6, POOL2 3, POOL3 1."""
    m = _no_warnings(models.zfnet, num_classes=10, input_size=67)
    convs = [l for l in m.features if isinstance(l, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding, c.out_channels) for c in convs] == ZFNET_CONVS
    pools = [l for l in m.features if isinstance(l, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.ceil_mode) for p in pools] == [
        ((3, 3), (2, 2), True), ((3, 3), (2, 2), True), ((3, 3), (2, 2), False)]
    rows = m.summary((3, 67, 67), print_fn=None)
    assert [(r["name"], _volume(r["output"])) for r in rows] == [
        ("CONV1", "32x32x96"), ("MAX POOL1", "16x16x96"), ("NORM1", "16x16x96"),
        ("CONV2", "6x6x256"), ("MAX POOL2", "3x3x256"), ("NORM2", "3x3x256"),
        ("CONV3", "3x3x512"), ("CONV4", "3x3x1024"), ("CONV5", "3x3x512"),
        ("MAX POOL3", "1x1x512"), ("FC6", "4096"), ("FC7", "4096"), ("FC8", "10")]
    assert [r["params"] for r in rows[:9] if r["params"]] == [
        (7 * 7 * 3 + 1) * 96, (5 * 5 * 96 + 1) * 256, (3 * 3 * 256 + 1) * 512,
        (3 * 3 * 512 + 1) * 1024, (3 * 3 * 1024 + 1) * 512]
    # 63x63 is the smallest input: POOL2 must leave 3x3 for POOL3's window
    assert models.zfnet(num_classes=10, input_size=63).output_shape((3, 63, 63)) == (10,)


# The published sizes at 224x224x3, 1000 classes: (layer, volume); CONV3-5's
# filters are the only difference between the two options.
ZFNET_VOLUMES = {
    "lecture": ["110x110x96", "55x55x96", "55x55x96", "26x26x256", "13x13x256", "13x13x256",
                "13x13x512", "13x13x1024", "13x13x512", "6x6x512", "4096", "4096", "1000"],
    "paper": ["110x110x96", "55x55x96", "55x55x96", "26x26x256", "13x13x256", "13x13x256",
              "13x13x384", "13x13x384", "13x13x256", "6x6x256", "4096", "4096", "1000"],
}
ZFNET_PARAMS = {"lecture": 107_627_624, "paper": 62_357_608}
ZFNET_MACS = {"lecture": 2_476_704_896, "paper": 1_168_032_896}


@pytest.mark.parametrize("filters", ["lecture", "paper"])
def test_zfnet_summary_at_224(filters):
    """224 -> 110 -> 55 -> 26 -> 13 -> 13 -> 13 -> 6, as the paper's Figure 3;
    no layer warns (the odd sizes floor and the pools ceil on purpose)."""
    kwargs = {} if filters == "lecture" else dict(filters="paper")
    m = _no_warnings(models.zfnet, **kwargs)
    assert m.input_shape == (3, 224, 224)
    lines = []
    rows = m.summary((3, 224, 224), print_fn=lines.append)
    assert [r["name"] for r in rows] == [name for name, _, _ in ALEXNET_TABLE]
    assert [_volume(r["output"]) for r in rows] == ZFNET_VOLUMES[filters]
    c3, c4, c5 = (512, 1024, 512) if filters == "lecture" else (384, 384, 256)
    assert [r["params"] for r in rows if r["params"]] == [
        (7 * 7 * 3 + 1) * 96, (5 * 5 * 96 + 1) * 256, (3 * 3 * 256 + 1) * c3,
        (3 * 3 * c3 + 1) * c4, (3 * 3 * c4 + 1) * c5, (6 * 6 * c5 + 1) * 4096,
        (4096 + 1) * 4096, (4096 + 1) * 1000]
    assert m.num_parameters() == sum(r["params"] for r in rows) == ZFNET_PARAMS[filters]
    assert [r["macs"] for r in rows if r["macs"]] == [
        110 * 110 * 96 * 7 * 7 * 3, 26 * 26 * 256 * 5 * 5 * 96, 13 * 13 * c3 * 3 * 3 * 256,
        13 * 13 * c4 * 3 * 3 * c3, 13 * 13 * c5 * 3 * 3 * c4, 6 * 6 * c5 * 4096, 4096 * 4096,
        4096 * 1000]
    assert sum(r["macs"] for r in rows) == ZFNET_MACS[filters]
    total = [line for line in lines if line.startswith("total")]
    assert len(total) == 1 and f"{ZFNET_PARAMS[filters]:,}" in total[0]
    assert f"{ZFNET_MACS[filters]:,}" in total[0]


def test_zfnet_filters_option():
    with pytest.raises(ValueError, match="filters must be 'lecture' .* or 'paper'"):
        models.zfnet(filters="alexnet")
    with pytest.raises(ValueError, match="filters must be"):
        models.zfnet(filters=None)
    m = models.zfnet(num_classes=10, input_size=67, filters="paper")
    assert [l.out_channels for l in m.features if isinstance(l, nn.Conv2d)] == \
        [96, 256, 384, 384, 256]
    assert models.get("zfnet", num_classes=10, input_size=67, filters="paper").name == \
        "zfnet_paper"


# ZFNet as convcore built it before it followed the paper: CONV2 at stride 1.
OLD_ZFNET_SPEC = ("CONV7-96/s2/p0-RELU-POOL3/s2-NORM-CONV5-256/p2-RELU-POOL3/s2-NORM-"
                  "CONV3-512/p1-RELU-CONV3-1024/p1-RELU-CONV3-512/p1-RELU-POOL3/s2-"
                  "DROPOUT-FC-4096-RELU-DROPOUT-FC-4096-RELU-FC-10")


def test_zfnet_saved_before_the_change_loads_as_saved(tmp_path):
    """A file keeps its own architecture (its layer list and graph), so a
    zfnet saved with the stride-1 CONV2 still loads and runs as it was."""
    convcore.manual_seed(0)
    old = convcore.build(OLD_ZFNET_SPEC, (3, 35, 35), name="zfnet").eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 35, 35)).astype(np.float32)
    path = str(tmp_path / "zfnet_old.safetensors")
    old.save(path)
    loaded = convcore.load(path).eval()
    assert loaded.layers == old.layers
    assert loaded.features[4].stride == (1, 1)              # CONV2 as it was saved
    np.testing.assert_array_equal(loaded(x), old(x))
    engine = convcore.compile(path)
    np.testing.assert_allclose(engine(x), old(x), rtol=1e-5, atol=1e-5 * np.abs(old(x)).max())


# ===========================================================================
# forward / backward
# ===========================================================================

def test_lenet5_forward_backward():
    convcore.manual_seed(0)
    m = models.lenet5()
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    y = m(x)
    assert y.shape == (3, 10) and y.dtype == np.float32
    loss = nn.CrossEntropyLoss()
    value = loss(y, np.array([1, 2, 3]))
    assert np.isfinite(value)
    gx = m.backward(loss.backward())
    assert gx.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad.shape == p.shape and p.grad.any(), name


def test_resnet18_forward_backward_small_input():
    convcore.manual_seed(1)
    m = models.resnet18(num_classes=10, input_size=32)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    y = m(x)
    assert y.shape == (2, 10) and y.dtype == np.float32
    gx = m.backward(np.ones_like(y) / y.size)
    assert gx.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad.shape == p.shape and np.isfinite(p.grad).all(), name
    assert all(int(b) == 1 for k, b in m.state_dict().items()
               if k.endswith("num_batches_tracked"))
    m.eval()
    y_eval = m(x)
    assert y_eval.shape == (2, 10)
    assert all(int(b) == 1 for k, b in m.state_dict().items()
               if k.endswith("num_batches_tracked"))


def test_resnet_init_as_torchvision():
    """He-normal (fan_out) convolutions; BN weight 1, bias 0."""
    convcore.manual_seed(2)
    m = models.resnet18(num_classes=10, input_size=32)
    w = m.layer3[0].conv2.weight.data
    std = np.sqrt(2.0 / (256 * 9))
    assert abs(w.std() / std - 1) < 0.02
    assert abs(w.mean()) < 5 * std / np.sqrt(w.size)
    np.testing.assert_array_equal(m.layer1[0].bn1.weight.data, 1)
    np.testing.assert_array_equal(m.layer1[0].bn1.bias.data, 0)


# ===========================================================================
# torchvision's key names
# ===========================================================================

def _torchvision_resnet_keys(layers):
    """The state-dict keys of torchvision.models.resnet18/34, in order."""
    def bn(prefix):
        return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                          "num_batches_tracked")]
    keys = ["conv1.weight"] + bn("bn1")
    for stage, count in enumerate(layers, start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            keys += [f"{p}.conv1.weight"] + bn(f"{p}.bn1") + [f"{p}.conv2.weight"] + bn(f"{p}.bn2")
            if i == 0 and stage > 1:
                keys += [f"{p}.downsample.0.weight"] + bn(f"{p}.downsample.1")
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("make,layers", [(models.resnet18, (2, 2, 2, 2)),
                                         (models.resnet34, (3, 4, 6, 3))])
def test_resnet_state_dict_keys_as_torchvision(make, layers):
    m = make(num_classes=1000, input_size=32)
    sd = m.state_dict()
    assert list(sd) == _torchvision_resnet_keys(layers)
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["fc.weight"].shape == (1000, 512)
    assert sd["bn1.num_batches_tracked"].dtype == np.int64


def test_resnet_architecture_round_trip():
    convcore.manual_seed(3)
    m = models.resnet18(num_classes=5, input_size=32)
    again = nn.from_architecture(m.architecture())
    again.load_state_dict(m.state_dict())
    m.eval(), again.eval()
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(m(x), again(x))


def test_lenet5_architecture_round_trip():
    convcore.manual_seed(4)
    m = models.lenet5()
    again = nn.from_architecture(m.architecture())
    again.load_state_dict(m.state_dict())
    x = np.random.default_rng(4).standard_normal((2, 1, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(m(x), again(x))
