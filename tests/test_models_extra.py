"""The later case studies of the zoo (convcore/models/: inception.py,
mobilenet.py, densenet.py, resnet.py): parameter counts against the
references, torchvision's state-dict keys and shapes, the summary's totals
and multiply-adds against the twins' own layers, one training step whose
loss falls, save/load, GoogLeNet's auxiliary outputs, and whole-model
parity with the torch twins (tests/_tv_twins.py)."""
import warnings

import numpy as np
import pytest

import convcore
from convcore import models, nn

# The references' parameter counts with 1000 classes: torchvision's where it
# has the model; MobileNet v1: the Keras reference's trainable count;
# SE-ResNet-50: the common reference implementations' (Cadene's
# pretrainedmodels, timm's seresnet50).
REFERENCE = {
    "googlenet": 6_624_904,
    "mobilenet_v1": 4_231_976,
    "mobilenet_v2": 3_504_872,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240,
    "densenet121": 7_978_856,
    "se_resnet50": 28_088_024,
    "efficientnet_b0": 5_288_548,
}
NAMES = list(REFERENCE)
SMALL = 32   # the input side for the steps: every net ends at 1x1 (GoogLeNet's aux at 2x2)

try:
    import torch
    import _tv_twins as tv
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")


def _quiet(make, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make(*args, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name):
    m = _quiet(models.get, name)
    assert m.num_parameters() == REFERENCE[name]
    rows = m.summary((3, 224, 224), print_fn=None)
    assert sum(r["params"] for r in rows) == REFERENCE[name]
    assert m.output_shape((3, 224, 224)) == (1000,)


def test_googlenet_aux_count_and_classes():
    assert models.googlenet(aux_logits=True).num_parameters() == 13_004_888
    # 1000 -> 10 classes: the fc (1024 x 990 + 990) and both aux fc2s (1024 x 990 + 990)
    small = models.googlenet(num_classes=10, aux_logits=True).num_parameters()
    assert small == 13_004_888 - 3 * (1024 * 990 + 990)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "10"])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        models.mobilenet_v2(num_classes=bad)


def test_too_small_input_names_the_layer():
    # 8 -> 4 (stem) -> 2 (pool0) -> 1 (transition1) -> 0: transition2's pool
    with pytest.raises(ValueError, match="^features: .*too small"):
        models.densenet121(input_size=8)
    with pytest.raises(ValueError, match="input_size"):
        models.densenet121(input_size=(1, 2, 3, 4))


@needs_torch
@pytest.mark.parametrize("name", NAMES)
def test_reference_twin_count_and_keys(name):
    """The twins written from torchvision's definitions (the references)
    have the counts above, and exactly convcore's keys, order and shapes."""
    twin = tv.TWINS[name](num_classes=1000)
    assert sum(p.numel() for p in twin.parameters()) == REFERENCE[name]
    ours = models.get(name).state_dict()
    theirs = twin.state_dict()
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert tuple(v.shape) == ours[k].shape, k


@needs_torch
def test_googlenet_aux_twin_keys():
    ours = models.googlenet(aux_logits=True).state_dict()
    assert list(ours) == list(tv.GoogLeNet(aux_logits=True).state_dict())


@needs_torch
@pytest.mark.parametrize("name", NAMES)
def test_summary_macs_match_the_twin(name):
    """Multiply-adds of the summary vs the twin's conv and linear layers
    counted from the shapes they really produce (64x64 input)."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * \
                module.kernel_size[1]
            total[0] += output[0].numel() * k
        else:
            total[0] += module.in_features * module.out_features

    twin = tv.TWINS[name](num_classes=10).eval()
    for m in twin.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        twin(torch.zeros(1, 3, 64, 64))
    rows = models.get(name, num_classes=10, input_size=64).summary((3, 64, 64), print_fn=None)
    assert sum(r["macs"] for r in rows) == total[0]


def test_summary_rows_show_joins():
    rows = models.googlenet().summary((3, 224, 224), print_fn=None)
    concat = [r for r in rows if r["name"] == "CONCAT"]
    assert len(concat) == 9
    assert concat[0]["layer"] == "inception3a.out" and concat[0]["output"] == (256, 28, 28)
    assert rows[-1]["output"] == (1000,)
    rows = models.efficientnet_b0().summary((3, 224, 224), print_fn=None)
    assert sum(r["name"] == "MUL" for r in rows) == 16       # one SE per MBConv
    assert sum(r["name"] == "ADD" for r in rows) == 9        # the shape-keeping MBConvs


def _batch(n=4, side=SMALL, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, side, side)).astype(np.float32), \
        rng.integers(0, classes, n)


def _loss_after_steps(model, x, y, steps=1, lr=0.005):
    """Losses before and after SGD steps, in train mode with the same dropout
    and stochastic-depth masks each time (the generator reseeded)."""
    loss_fn = nn.CrossEntropyLoss()
    opt = convcore.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps + 1):
        convcore.manual_seed(7)
        out = model(x)
        losses.append(loss_fn(out[0] if isinstance(out, tuple) else out, y))
        model.zero_grad()
        g = loss_fn.backward()
        model.backward((g, None, None) if isinstance(out, tuple) else g)
        opt.step()
    return losses


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n == "wide_resnet50_2" else n for n in NAMES])
def test_training_step_lowers_the_loss(name):
    convcore.manual_seed(0)
    model = models.get(name, num_classes=10, input_size=SMALL)
    x, y = _batch()
    before, after = _loss_after_steps(model, x, y)
    assert np.isfinite(before) and after < before, (before, after)
    assert all(np.all(np.isfinite(p.grad)) for p in model.parameters())


def test_googlenet_aux_outputs_train_and_eval():
    convcore.manual_seed(0)
    model = models.googlenet(num_classes=10, input_size=SMALL, aux_logits=True)
    x, y = _batch()
    out = model(x)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(4, 10)] * 3
    # torchvision's training loss: main + 0.3 * (aux1 + aux2)
    losses = [nn.CrossEntropyLoss() for _ in range(3)]
    for lf, o in zip(losses, out):
        lf(o, y)
    gx = model.backward(tuple(lf.backward() * w for lf, w in zip(losses, (1.0, 0.3, 0.3))))
    assert gx.shape == x.shape and np.any(model.aux1.fc2.weight.grad)
    model.eval()
    assert model(x).shape == (4, 10)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n == "wide_resnet50_2" else n for n in NAMES])
def test_save_load_same_outputs(name, tmp_path):
    convcore.manual_seed(1)
    model = models.get(name, num_classes=10, input_size=SMALL)
    x, y = _batch(2)
    _loss_after_steps(model, x, y)      # trained weights and running statistics
    model.eval()
    path = tmp_path / f"{name}.safetensors"
    model.save(path)
    again = convcore.load(path)
    assert not again.training
    np.testing.assert_array_equal(again(x), model(x))
    assert getattr(again, "name", None) == getattr(model, "name", None)


# ---------------------------------------------------------------- whole-model twins

def _twin_pair(name, dtype, **both):
    kwargs = dict(num_classes=10, input_size=SMALL, **both)
    tkw = dict(num_classes=10, **both)
    if name in ("googlenet", "mobilenet_v1", "mobilenet_v2"):   # dropout masks differ
        kwargs["dropout"] = tkw["dropout"] = 0.0
    if name == "efficientnet_b0":
        kwargs.update(dropout=0.0, stochastic_depth_prob=0.0)
        tkw.update(dropout=0.0, stochastic_depth_prob=0.0)
    convcore.manual_seed(2)
    ours = models.get(name, **kwargs).to(dtype)
    rng = np.random.default_rng(3)
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data[:] = rng.uniform(0.5, 1.5, c)
            m.bias.data[:] = rng.standard_normal(c) * 0.2
            m.running_mean[:] = rng.standard_normal(c) * 0.1
            m.running_var[:] = rng.uniform(0.5, 1.5, c)
    twin = tv.TWINS[name](**tkw).to(torch.float64 if dtype == np.float64 else torch.float32)
    # (GoogLeNet's transform_input: constants in torchvision, buffers in convcore)
    twin.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                          for k, v in ours.state_dict().items()
                          if not k.startswith("transform_input.")})
    return ours, twin


def _rel(a, b):
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


MODEL_TABLE = {}
BIG = ("resnext50_32x4d", "wide_resnet50_2", "se_resnet50")   # ResNet-50-sized: slow twins


@needs_torch
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n
                                  for n in NAMES])
def test_model_twin(name, train):
    """float64, batch 2 at 32x32: logits, input gradient and every parameter
    gradient of a cross-entropy loss equal the twin's."""
    from _helpers import PARITY_ERRORS
    ours, twin = _twin_pair(name, np.float64)
    errs = _twin_errors(ours, twin, train)
    mode = "train" if train else "eval"
    for what, e in errs.items():
        MODEL_TABLE[(name, mode, what)] = e
        PARITY_ERRORS[f"model {name} {mode} {what}[float64]"] = e
    assert max(errs.values()) < 1e-9, errs


def _twin_errors(ours, twin, train, dtype=np.float64):
    """Relative differences of the logits, the input gradient and the
    parameter gradients of a cross-entropy loss, batch 2."""
    ours.train(train), twin.train(train)
    # Training-mode BN over a batch of 2 at 1x1 (32x32 input) normalises two
    # numbers: ill-conditioned, so train mode runs at 64x64 (2x2 at the end).
    x, y = _batch(2, side=64 if train else SMALL)
    x = x.astype(dtype)
    out = ours(x)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(out, y)
    ours.zero_grad()
    gx = ours.backward(loss_fn.backward())
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    ot = twin(xt)
    torch.nn.functional.cross_entropy(ot, torch.from_numpy(y)).backward()
    tp = dict(twin.named_parameters())
    largest = max(float(p.grad.abs().max()) for p in tp.values())
    errs = {"output": _rel(out, ot.detach().numpy()), "grad input": _rel(gx, xt.grad.numpy()),
            "grad params": max(float(np.abs(p.grad - tp[k].grad.numpy()).max()) /
                               max(float(tp[k].grad.abs().max()), 1e-3 * largest)
                               for k, p in ours.named_parameters())}
    return errs


# ------------------------------------------------------ GoogLeNet's transform_input

TRANSFORM_KEYS = ["transform_input.running_mean", "transform_input.running_var",
                  "transform_input.num_batches_tracked"]


def test_googlenet_transform_input_adds_no_parameters():
    plain = models.googlenet()
    model = _quiet(models.googlenet, transform_input=True)
    assert model.num_parameters() == REFERENCE["googlenet"]
    assert list(model.state_dict()) == TRANSFORM_KEYS + list(plain.state_dict())
    # torchvision's constants: x * (std / 0.5) + (mean - 0.5) / 0.5 is
    # (x - running_mean) / sqrt(running_var)
    t = model.transform_input
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(1 / np.sqrt(t.running_var), std / 0.5, rtol=1e-15)
    np.testing.assert_allclose(-t.running_mean / np.sqrt(t.running_var), (mean - 0.5) / 0.5,
                               rtol=1e-14)
    rows = model.summary((3, 224, 224), print_fn=None)
    assert (rows[0]["layer"], rows[0]["params"], rows[0]["output"]) == \
        ("transform_input", 0, (3, 224, 224))
    assert sum(r["params"] for r in rows) == REFERENCE["googlenet"]
    with pytest.raises(ValueError, match="transform_input rescales the three ImageNet"):
        models.googlenet(input_size=(1, 64, 64), transform_input=True)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, H, W\)"):
        model.transform_input(np.zeros((1, 4, 8, 8), np.float32))


@needs_torch
def test_googlenet_transform_input_is_torchvisions_bit_for_bit():
    """float32: the same scale and shift as torchvision's (its Python-float
    constants rounded once to float32), so the transformed input is equal."""
    model = models.googlenet(num_classes=10, input_size=SMALL, transform_input=True)
    twin = tv.GoogLeNet(num_classes=10, transform_input=True)
    x = _batch()[0] * 3
    np.testing.assert_array_equal(model.transform_input(x),
                                  twin._transform_input(torch.from_numpy(x)).numpy())


@needs_torch
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_googlenet_transform_input_twin(train):
    """float64: logits, input gradient and parameter gradients equal
    torchvision's GoogLeNet(transform_input=True) twin's."""
    from _helpers import PARITY_ERRORS
    ours, twin = _twin_pair("googlenet", np.float64, transform_input=True)
    assert sorted(set(ours.state_dict()) - set(twin.state_dict())) == sorted(TRANSFORM_KEYS)
    errs = _twin_errors(ours, twin, train)
    mode = "train" if train else "eval"
    for what, e in errs.items():
        MODEL_TABLE[("googlenet, transform_input=True", mode, what)] = e
        PARITY_ERRORS[f"model googlenet transform_input {mode} {what}[float64]"] = e
    assert max(errs.values()) < 1e-9, errs


@needs_torch
def test_googlenet_transform_input_loads_torchvision_weights():
    """torchvision's state dict lacks only the transform's three buffers:
    it loads with strict=False and gives torchvision's logits (float32)."""
    torch.manual_seed(0)
    twin = tv.GoogLeNet(num_classes=10, transform_input=True).eval()
    # He-normal convolutions and batch norm away from the identity: with the
    # default initialisation the eval logits hardly depend on the input
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_in")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    model = models.googlenet(num_classes=10, input_size=SMALL, transform_input=True).eval()
    state = {k: v.numpy() for k, v in twin.state_dict().items()}
    with pytest.raises(KeyError, match="transform_input.running_mean"):
        model.load_state_dict(state)
    model.load_state_dict(state, strict=False)
    x = _batch(2)[0]
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    assert _rel(model(x), expected) < 1e-5
    plain = models.googlenet(num_classes=10, input_size=SMALL).eval()
    plain.load_state_dict(state)
    assert _rel(plain(x), expected) > 1e-2      # the comparison sees the transform


def test_googlenet_transform_input_saves_lowers_and_compiles(tmp_path):
    """Saved, the transform is a BatchNorm2d node (eval, no affine, eps 0)
    that convcore.load, the graph's reference interpreter and the compiled
    engine (convcore::Net's) all run as eager does."""
    from test_lowering import assert_graph_runs_as_model, randomize_batch_norm
    convcore.manual_seed(4)
    model = models.googlenet(num_classes=10, input_size=SMALL, aux_logits=True,
                             transform_input=True)
    x, y = _batch(2)
    _loss_after_steps(model, x, y)      # trained weights; the transform stays fixed
    t = model.transform_input
    np.testing.assert_array_equal(t.running_var, _quiet(models.googlenet, transform_input=True)
                                  .transform_input.running_var)
    # He-normal convolutions: with GoogLeNet's N(0, 0.01) ones and batch norm's
    # running statistics, the eval logits hardly depend on the input at all
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = nn.init.kaiming_normal(m.weight.shape, mode="fan_in")
    model = randomize_batch_norm(model, np.random.default_rng(5)).eval()
    graph = assert_graph_runs_as_model(model, model.input_shape)
    assert graph["nodes"][0] == {
        "op": "BatchNorm2d", "name": "transform_input", "inputs": ["x"],
        "outputs": ["transform_input"],
        "attrs": {"num_features": 3, "eps": 0.0, "affine": False, "track_running_stats": True}}
    assert graph["nodes"][1]["inputs"] == ["transform_input"]
    expected = model(x)
    path = str(tmp_path / "googlenet_t.safetensors")
    model.save(path)
    again = convcore.load(path)
    assert isinstance(again.transform_input, type(t)) and not again.training
    np.testing.assert_array_equal(again(x), expected)
    for engine in (convcore.compile(model), convcore.compile(path)):
        assert _rel(engine(x), expected) < 1e-5
    # without the transform the logits differ far beyond that bound
    model.transform_input._set_buffer("running_var", np.ones(3))
    model.transform_input._set_buffer("running_mean", np.zeros(3))
    assert _rel(model(x), expected) > 1e-2
