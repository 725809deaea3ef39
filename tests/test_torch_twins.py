"""Whole-model parity with PyTorch: hand-written torch twins of lenet5,
the lecture's alexnet, resnet18 (torchvision's module names) and a small
BN / LRN / padding-mode net get convcore's state dict under the *same keys*,
run forward on the same input and one backward of the same loss; outputs,
the loss, the input gradient, every parameter gradient and the updated
buffers must agree to float32 (or float64) precision.

The error reported is, per tensor, max|convcore - torch| / max|torch| (the
largest deviation relative to the tensor's own scale), maximised over the
tensors of a group (all parameter gradients together, say); for parameter
gradients the scale is at least 1e-3 of the model's largest parameter
gradient. Gradients that are zero in exact arithmetic (a conv bias followed
by a training-mode batch norm) are listed apart ("zero grads": their
largest value over the model's largest gradient).  The figures go
to _helpers.PARITY_ERRORS (printed in pytest's terminal summary under
"twin ...") and test_print_parity_table prints them as a table (-s)."""

from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch not installed: whole-model parity with PyTorch twins skipped")
import torch.nn.functional as F  # noqa: E402
from torch import nn as tnn  # noqa: E402

import convcore  # noqa: E402
from _helpers import PARITY_ERRORS  # noqa: E402
from convcore import models  # noqa: E402
from convcore import nn  # noqa: E402

# scaled tolerances: float32 sums over thousands of terms, float64 the same
TOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-10}
LABEL_SMOOTHING = 0.1

# (model, dtype, mode) -> {"output": err, "loss": err, ...}; printed by
# test_print_parity_table
TABLE = OrderedDict()


def scaled_err(actual, expected, floor=0.0):
    """max|a - e| / max(max|e|, floor)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(np.abs(e).max() if e.size else 0.0, floor)
    if scale == 0.0:
        return float(np.abs(a).max()) if a.size else 0.0
    return float(np.abs(a - e).max() / scale)


def record(model, dtype, mode, what, err):
    key = (model, np.dtype(dtype).name, mode)
    row = TABLE.setdefault(key, OrderedDict())
    row[what] = max(row.get(what, 0.0), err)
    pkey = f"twin {model} {mode} {what}[{np.dtype(dtype).name}]"
    PARITY_ERRORS[pkey] = max(PARITY_ERRORS.get(pkey, 0.0), err)


# ===========================================================================
# the torch twins
# ===========================================================================

class TorchLeNet5(tnn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = tnn.Sequential(
            tnn.Conv2d(1, 6, 5), tnn.ReLU(), tnn.MaxPool2d(2),
            tnn.Conv2d(6, 16, 5), tnn.ReLU(), tnn.MaxPool2d(2))
        self.classifier = tnn.Sequential(
            tnn.Linear(400, 120), tnn.ReLU(), tnn.Linear(120, 84), tnn.ReLU(),
            tnn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class TorchAlexNet(tnn.Module):
    """The notes' AlexNet: CONV1 96 11x11/4, POOL1 3/2, NORM1, CONV2 256 5x5
    pad 2, POOL2, NORM2, CONV3-5 (384, 384, 256) 3x3 pad 1, POOL3, FC6-8."""

    def __init__(self, num_classes=1000, pooled=6):
        super().__init__()
        lrn = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
        self.features = tnn.Sequential(
            tnn.Conv2d(3, 96, 11, stride=4), tnn.ReLU(), tnn.MaxPool2d(3, 2),
            tnn.LocalResponseNorm(**lrn),
            tnn.Conv2d(96, 256, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
            tnn.LocalResponseNorm(**lrn),
            tnn.Conv2d(256, 384, 3, padding=1), tnn.ReLU(),
            tnn.Conv2d(384, 384, 3, padding=1), tnn.ReLU(),
            tnn.Conv2d(384, 256, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(3, 2))
        self.classifier = tnn.Sequential(
            tnn.Dropout(0.5), tnn.Linear(256 * pooled * pooled, 4096), tnn.ReLU(),
            tnn.Dropout(0.5), tnn.Linear(4096, 4096), tnn.ReLU(),
            tnn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class TorchBasicBlock(tnn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU()
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(inplanes, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TorchResNet(tnn.Module):
    """torchvision.models.resnet.ResNet with BasicBlocks, same module names."""

    def __init__(self, layers=(2, 2, 2, 2), num_classes=1000):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.relu = tnn.ReLU()
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(count):
                blocks.append(TorchBasicBlock(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes
            setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = tnn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_net_pair():
    """Conv padding modes, BN, LRN, grouped/dilated 'same' conv, pools, GAP:
    a convcore Sequential and its torch twin (keys "0.weight", ...), built by
    the same constructor calls (convcore's layer API is torch's)."""
    def build(lib):
        return lib.Sequential(
            lib.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
            lib.BatchNorm2d(8),
            lib.ReLU(),
            lib.LocalResponseNorm(3, alpha=0.05, beta=0.75, k=1.0),
            lib.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2, padding_mode="circular"),
            lib.BatchNorm2d(8, momentum=0.3),
            lib.ReLU(),
            lib.MaxPool2d(3, stride=2, padding=1),
            lib.Conv2d(8, 6, (2, 3), stride=(1, 2), padding=(1, 1), padding_mode="replicate"),
            lib.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
            lib.AdaptiveAvgPool2d(2),
            lib.Flatten(),
            lib.Linear(24, 5),
        )
    return build(nn), build(tnn)


def _randomise_bn(cc_model, seed):
    """Non-trivial BN affine parameters and running statistics (the fresh
    ones are 1/0/0/1, which would hide a swapped weight and bias)."""
    rng = np.random.default_rng(seed)
    for m in cc_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            dt = m.weight.data.dtype
            m.weight.data[:] = rng.uniform(0.5, 1.5, c).astype(dt)
            m.bias.data[:] = (rng.standard_normal(c) * 0.2).astype(dt)
            m.running_mean[:] = (rng.standard_normal(c) * 0.1).astype(dt)
            m.running_var[:] = rng.uniform(0.5, 1.5, c).astype(dt)


# ===========================================================================
# the comparison
# ===========================================================================

def copy_into_torch(cc_model, t_model, dtype):
    """convcore's state dict into the twin, under the same keys (strict)."""
    cc_sd = cc_model.state_dict()
    t_model.to(torch.float64 if np.dtype(dtype) == np.float64 else torch.float32)
    assert list(cc_sd) == list(t_model.state_dict()), "state-dict keys differ from the twin's"
    for key, value in t_model.state_dict().items():
        assert tuple(value.shape) == cc_sd[key].shape, key
    t_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                             for k, v in cc_sd.items()}, strict=True)


RELU_MARGIN = 5e-7    # relative to the largest |input| of that ReLU: a few float32 roundings


def pick_input(t_model, shape, seed, dtype, train, tries=30):
    """A normal input for which every ReLU input of the twin keeps a margin
    from 0: |v| >= RELU_MARGIN * max|v| over that ReLU call. A ReLU input
    within float32 rounding of 0 (in a 64x64 ResNet-18 there are a few
    around 1e-7) can land on either side in two correct float32
    implementations, and the gradients then legitimately differ at that
    element; such inputs test nothing and are passed over, in seed order,
    so the choice is deterministic."""
    smallest = [np.inf]

    def hook(module, inputs, output):
        v = inputs[0].detach().abs()
        top = float(v.max())
        if top > 0:
            smallest[0] = min(smallest[0], float(v.min()) / top)

    handles = [m.register_forward_hook(hook) for m in t_model.modules()
               if isinstance(m, tnn.ReLU)]
    buffers = {k: v.clone() for k, v in t_model.named_buffers()}   # train mode moves them
    t_model.train(train)
    try:
        for k in range(tries):
            x = _input(shape, seed + 1000 * k).astype(dtype)
            smallest[0] = np.inf
            with torch.no_grad():
                t_model(torch.from_numpy(x))
            if smallest[0] >= RELU_MARGIN:
                return x
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for k, v in t_model.named_buffers():
                v.copy_(buffers[k])
    raise AssertionError(f"no input of {tries} kept its ReLU inputs {RELU_MARGIN} from 0")


def compare_models(name, cc_model, t_model, x, targets, dtype, train, backward=True,
                   zero_grads=()):
    """One forward (and backward of a label-smoothed cross-entropy) through
    both; asserts and records the scaled errors. x: an array, or (shape,
    seed) to draw one with pick_input. zero_grads: parameters whose gradient
    is zero in exact arithmetic (a conv bias followed by a training-mode
    batch norm): both sides give rounding noise there, so they are checked
    to be negligible against the model's largest gradient instead."""
    tol = TOL[np.dtype(dtype)]
    mode = ("train" if train else "eval") + ("" if backward else ", forward only")
    if isinstance(x, tuple):
        x = pick_input(t_model, *x, dtype=dtype, train=train) if backward else \
            _input(*x).astype(dtype)
    cc_model.train(train)
    t_model.train(train)
    x = x.astype(dtype)
    y = cc_model(x)
    xt = torch.from_numpy(x.copy()).requires_grad_(backward)
    yt = t_model(xt)
    errors = OrderedDict()
    assert y.dtype == np.dtype(dtype) and y.shape == tuple(yt.shape)
    errors["output"] = scaled_err(y, yt.detach().numpy())
    if backward:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        loss = loss_fn(y, targets)
        lt = F.cross_entropy(yt, torch.from_numpy(targets), label_smoothing=LABEL_SMOOTHING)
        errors["loss"] = abs(loss - float(lt.detach())) / abs(float(lt.detach()))
        cc_model.zero_grad()
        gx = cc_model.backward(loss_fn.backward())
        lt.backward()
        errors["grad input"] = scaled_err(gx, xt.grad.numpy())
        t_params = dict(t_model.named_parameters())
        cc_params = OrderedDict(cc_model.named_parameters())
        assert list(cc_params) == list(t_params)
        largest = max(float(p.grad.abs().max()) for p in t_params.values())
        for n in zero_grads:
            errors["zero grads"] = max(errors.get("zero grads", 0.0),
                                       float(np.abs(cc_params[n].grad).max()) / largest)
        # the scale of a small gradient is floored at 1e-3 of the largest
        per_param = {n: scaled_err(p.grad, t_params[n].grad.numpy(), 1e-3 * largest)
                     for n, p in cc_params.items() if n not in zero_grads}
        worst = max(per_param, key=per_param.get)
        errors["grad params"] = per_param[worst]
        errors["worst param"] = worst
    cc_sd = cc_model.state_dict()
    buffers = {k: v for k, v in t_model.state_dict().items()
               if "running" in k or "num_batches" in k}
    if buffers:
        for k, v in buffers.items():
            if k.endswith("num_batches_tracked"):
                assert int(cc_sd[k]) == int(v), k
        errors["buffers"] = max(scaled_err(cc_sd[k], v.numpy()) for k, v in buffers.items()
                                if not k.endswith("num_batches_tracked"))
    for what, err in errors.items():
        if what != "worst param":
            record(name, dtype, mode, what, err)
    bad = {k: v for k, v in errors.items() if k != "worst param" and v > tol}
    assert not bad, f"{name} [{np.dtype(dtype).name}, {mode}]: errors above {tol:.0e}: " \
                    f"{bad} (worst parameter: {errors.get('worst param')})"
    return y, errors


def _input(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ===========================================================================
# lenet5
# ===========================================================================

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lenet5_twin(dtype):
    convcore.manual_seed(10)
    m = models.lenet5().to(dtype)
    t = TorchLeNet5()
    copy_into_torch(m, t, dtype)
    targets = np.array([3, 1, 4, 1])
    compare_models("lenet5", m, t, ((4, 1, 32, 32), 10), targets, dtype, train=True)


# ===========================================================================
# alexnet
# ===========================================================================

@pytest.fixture(scope="module")
def alexnet_pair():
    """The full lecture AlexNet (227x227, 1000 classes) and its twin, float32."""
    convcore.manual_seed(11)
    m = models.alexnet()
    t = TorchAlexNet()
    copy_into_torch(m, t, np.float32)
    return m, t


def test_alexnet_twin_forward_227(alexnet_pair):
    """The lecture's AlexNet at its own 227x227 input, batch 1, float32,
    eval mode (dropout off): the output logits."""
    m, t = alexnet_pair
    with torch.no_grad():
        compare_models("alexnet", m, t, ((1, 3, 227, 227), 11), None, np.float32,
                       train=False, backward=False)


@pytest.mark.slow
def test_alexnet_twin_forward_backward_227(alexnet_pair):
    m, t = alexnet_pair
    # (at this size one ReLU input near 0 moves a gradient by a part in ~1e5
    # only, so the input is not screened)
    compare_models("alexnet", m, t, _input((2, 3, 227, 227), 12), np.array([7, 999]),
                   np.float32, train=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_alexnet_twin_small_input(dtype):
    """The same layers at 67x67 (POOL3 gives 1x1x256), 10 classes: forward
    and backward in the default run."""
    convcore.manual_seed(13)
    m = models.alexnet(num_classes=10, input_size=67).to(dtype)
    t = TorchAlexNet(num_classes=10, pooled=1)
    copy_into_torch(m, t, dtype)
    compare_models("alexnet@67", m, t, ((2, 3, 67, 67), 13), np.array([0, 9]), dtype,
                   train=False)


def test_alexnet_twin_dropout_zero_train_mode():
    """Train mode with p = 0 on both sides: the same as eval."""
    convcore.manual_seed(14)
    m = models.alexnet(num_classes=10, input_size=67)
    for d in m.modules():
        if isinstance(d, nn.Dropout):
            d.p = 0.0
    t = TorchAlexNet(num_classes=10, pooled=1)
    for d in t.modules():
        if isinstance(d, tnn.Dropout):
            d.p = 0.0
    copy_into_torch(m, t, np.float32)
    compare_models("alexnet@67", m, t, ((2, 3, 67, 67), 14), np.array([2, 5]),
                   np.float32, train=True)


# ===========================================================================
# resnet18
# ===========================================================================

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("train", [True, False])
def test_resnet18_twin(dtype, train):
    convcore.manual_seed(15)
    m = models.resnet18(num_classes=10, input_size=64).to(dtype)
    _randomise_bn(m, 15)
    t = TorchResNet((2, 2, 2, 2), num_classes=10)
    copy_into_torch(m, t, dtype)
    # 64x64, batch 2: layer4 is 2x2, 8 values per channel for its batch norms
    # (at 32x32 it is 1x1 with 2 values, so ill-conditioned that PyTorch's
    # own float32 result is 3% off its float64 one)
    compare_models("resnet18", m, t, ((2, 3, 64, 64), 15), np.array([1, 8]), dtype,
                   train=train)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resnet18_twin_224(dtype):
    """ResNet-18 at the lecture's 224x224, batch 2, training mode. In float32
    only the forward (output, loss, batch-norm buffers) is compared: of the
    ~5 million ReLU inputs of two images some lie within float32 rounding of
    0 whatever the input (no seed of 30 keeps them all RELU_MARGIN from 0, as
    pick_input does for the small twins), and one that lands on the other
    side in either library reroutes the gradient of a whole receptive field.
    On a Zen 3 (AVX2) machine PyTorch's own float32 gradients differed from
    its float64 ones by 1e-2 at the input and 5e-2 on layer4.0.conv2.weight
    (convcore's: 2.5e-2 at the input, 9e-6 on that weight). The backward is
    compared in float64, where no rounding reaches a ReLU's sign."""
    convcore.manual_seed(16)
    m = models.resnet18().to(dtype)
    _randomise_bn(m, 16)
    t = TorchResNet((2, 2, 2, 2), num_classes=1000)
    copy_into_torch(m, t, dtype)
    compare_models("resnet18@224", m, t, _input((2, 3, 224, 224), 16), np.array([5, 500]),
                   dtype, train=True, backward=dtype == np.float64)


def test_resnet34_twin_keys_and_forward():
    convcore.manual_seed(17)
    m = models.resnet34(num_classes=10, input_size=32)
    t = TorchResNet((3, 4, 6, 3), num_classes=10)
    copy_into_torch(m, t, np.float32)
    with torch.no_grad():
        compare_models("resnet34", m, t, ((2, 3, 32, 32), 17), None, np.float32,
                       train=False, backward=False)


# ===========================================================================
# BN / LRN / padding modes
# ===========================================================================

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("train", [True, False])
def test_small_net_twin(dtype, train):
    convcore.manual_seed(18)
    m, t = small_net_pair()
    m.to(dtype)
    _randomise_bn(m, 18)
    copy_into_torch(m, t, dtype)
    compare_models("bn-lrn-padding net", m, t, ((3, 3, 11, 10), 18),
                   np.array([0, 4, 2]), dtype, train=train,
                   zero_grads=("0.bias", "4.bias") if train else ())


def test_small_net_twin_two_steps_running_stats():
    """Two training forwards move the running statistics identically."""
    convcore.manual_seed(19)
    m, t = small_net_pair()
    m.to(np.float64)
    copy_into_torch(m, t, np.float64)
    m.train(), t.train()
    for step in range(2):
        x = _input((4, 3, 9, 9), 19 + step)
        m(x)
        with torch.no_grad():
            t(torch.from_numpy(x))
    cc_sd = m.state_dict()
    for key, value in t.state_dict().items():
        assert scaled_err(cc_sd[key], value.numpy()) <= 1e-12, key
    assert int(cc_sd["1.num_batches_tracked"]) == 2


# ===========================================================================
# the table for the README
# ===========================================================================

COLUMNS = ["output", "loss", "grad input", "grad params", "buffers", "zero grads"]


def format_table():
    lines = ["max scaled error vs PyTorch: max|convcore - torch| / max|torch| per tensor",
             f"{'model':22} {'dtype':8} {'mode':22} " + " ".join(f"{c:>12}" for c in COLUMNS)]
    for (model, dtype, mode), row in TABLE.items():
        cells = [f"{row[c]:12.2e}" if c in row else f"{'-':>12}" for c in COLUMNS]
        lines.append(f"{model:22} {dtype:8} {mode:22} " + " ".join(cells))
    return "\n".join(lines)


def test_print_parity_table():
    """Runs last in this module (file order): prints the figures gathered
    above (visible with -s; the same numbers are in the terminal summary)."""
    if not TABLE:
        pytest.skip("no parity test ran")
    print("\n" + format_table())
