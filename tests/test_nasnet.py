"""NASNet-A Mobile and Large (python/convcore/models/nasnet.py): Keras' parameter
counts, shapes, the TensorFlow-style padding rewritten with symmetric
layers, forward/backward, ScheduledDropPath, save/load and compile."""
import numpy as np
import pytest

import convcore as cc
from convcore import functional as F
from convcore import models
from convcore.models.nasnet import (ScheduledDropPath, ShiftedSubsample, ZeroPad, _Net,
                                   _separable, nasnet_a_large, nasnet_a_mobile,
                                   set_drop_path_progress)

# Keras' count_params() minus the BN moving statistics (convcore's buffers)
MOBILE_PARAMS, LARGE_PARAMS = 5_289_978, 88_753_150


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_mobile_parameter_count_shape_and_summary():
    m = models.get("nasnet_a_mobile")
    assert m.num_parameters() == MOBILE_PARAMS
    rows = m.summary((3, 224, 224), print_fn=None)
    assert sum(r["params"] for r in rows) == MOBILE_PARAMS
    assert m.output_shape((3, 224, 224)) == (1000,)
    # Keras' final feature map: 7x7x1056 (the penultimate filters)
    assert m.node_shapes((3, 224, 224))["final_relu"] == (1056, 7, 7)
    # every trainable tensor is Keras': BN moving statistics and the fixed
    # resampling kernels are buffers
    assert all(not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
               for k, _ in m.named_parameters())


@pytest.mark.slow
def test_large_parameter_count_and_shape():
    m = models.get("nasnet_a_large")
    assert m.num_parameters() == LARGE_PARAMS
    assert m.node_shapes((3, 331, 331))["final_relu"] == (4032, 11, 11)
    rows = m.summary((3, 331, 331), print_fn=None)
    assert sum(r["params"] for r in rows) == LARGE_PARAMS


def test_counts_scale_with_classes_and_names_are_torch_style():
    m = nasnet_a_mobile(num_classes=10)
    assert m.num_parameters() == MOBILE_PARAMS - 1056 * 990 - 990
    keys = list(m.state_dict())
    assert keys[:2] == ["conv0.weight", "conv0_bn.weight"]
    assert "cell_stem_2_path_1.conv.weight" in keys  # the factorized reduction
    assert "cell_0_comb_iter_0_left.separable_1.depthwise.weight" in keys
    assert "cell_reduce_4_comb_iter_1_left.subsample.weight" in keys  # a buffer
    assert keys[-2:] == ["last_linear.weight", "last_linear.bias"]
    bn = m.conv0_bn
    assert bn.eps == 1e-3 and abs(bn.momentum - 0.0003) < 1e-12


def test_too_small_or_mixed_parity_input_is_refused():
    with pytest.raises(ValueError, match="32x32"):
        nasnet_a_mobile(input_size=31)
    with pytest.raises(ValueError, match="odd or both even"):
        nasnet_a_mobile(input_size=(3, 32, 34))


# -------------------------------------------- the padding rewrites against Keras' definitions

@pytest.mark.parametrize("size", [7, 8])
def test_shifted_subsample_is_kerases_pad_crop_pool(size):
    """Keras' factorized path: ZeroPadding2D(((0, 1), (0, 1))), Cropping2D(((1, 0), (1, 0))),
    AveragePooling2D(1, strides=2)."""
    x = _rng().standard_normal((2, 3, size, size)).astype(np.float32)
    keras = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))[:, :, 1:, 1:][:, :, ::2, ::2]
    mod = ShiftedSubsample(3).eval()
    y = mod(x)
    np.testing.assert_array_equal(y, keras)
    g = _rng(1).standard_normal(y.shape).astype(np.float32)
    gx = mod.backward(g)  # the adjoint: <y, g> == <x, gx>
    assert np.isclose(np.sum(y * g, dtype=np.float64), np.sum(x * gx, dtype=np.float64))
    np.testing.assert_array_equal(cc.compile(mod)(x), y)  # the one-hot depthwise conv


def test_zero_pad_backward_and_compiled():
    x = _rng().standard_normal((2, 3, 5, 6)).astype(np.float32)
    mod = ZeroPad(3).eval()
    y = mod(x)
    np.testing.assert_array_equal(y, np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))))
    np.testing.assert_array_equal(mod.backward(y), x)
    np.testing.assert_array_equal(cc.compile(mod)(x), y)


def _keras_pad(x, k):
    """imagenet_utils.correct_pad: one less at the top/left for an even size."""
    h = x.shape[2]
    before = k // 2 - (1 - h % 2)
    return np.pad(x, ((0, 0), (0, 0), (before, k // 2), (before, k // 2)))


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_stride2_separable_is_tensorflows(size, k):
    x = _rng().standard_normal((2, 4, size, size))
    sep = _separable(4, 6, k, 2, (size, size)).to(np.float64)
    dw, pw = sep.depthwise.weight.data, sep.pointwise.weight.data
    ref = F.conv2d(F.conv2d(_keras_pad(x, k), dw, stride=2, groups=4), pw)
    np.testing.assert_allclose(sep(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_stride2_pooling_over_kerases_zero_padding(size, kind):
    """Keras pools the reduction cell's h over explicit zeros (ZeroPadding2D,
    then 3x3/2 'valid'): zeros count in the mean and in the max."""
    x = _rng().standard_normal((2, 4, size, size)) - 0.5
    net = _Net(0.0, 1)
    net.pool_branch("b", "x", kind, 4, 2, (size, size))
    branch = net.modules["b"].to(np.float64)
    padded = _keras_pad(x, 3)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    ref = windows.max(axis=(-1, -2)) if kind == "max" else windows.mean(axis=(-1, -2))
    np.testing.assert_allclose(branch(x), ref, rtol=1e-12, atol=1e-12)
    assert np.any(ref == 0.0) == (kind == "max")  # the zeros did win some border maxima


# ------------------------------------------------------------- running, saving, compiling

def _directional_check(m, x, g, gx, eps, rtol):
    """<gx, d> against a central difference of <m(x), g> along a random d."""
    d = _rng(2).standard_normal(x.shape)
    num = (np.sum(m(x + eps * d) * g) - np.sum(m(x - eps * d) * g)) / (2 * eps)
    assert np.isclose(np.sum(gx * d), num, rtol=rtol), (np.sum(gx * d), num)


@pytest.mark.parametrize("size", [32, 44])
def test_small_forward_backward_matches_finite_differences(size):
    """Eval mode (BN with running statistics): ReLU and max pooling are the
    only non-linearities, so a small step crosses no kink (for these
    weights: the initial ones depend on the generator's state otherwise, and
    some draws put a ReLU or a max within a step of its kink)."""
    cc.manual_seed(4)
    m = nasnet_a_mobile(num_classes=3, input_size=size).to(np.float64)
    m.eval()
    x = _rng().standard_normal((2, 3, size, size))
    y = m(x)
    assert y.shape == (2, 3) and np.all(np.isfinite(y))
    g = _rng(1).standard_normal(y.shape)
    m.zero_grad()
    gx = m.backward(g)
    assert gx.shape == x.shape
    _directional_check(m, x, g, gx, 1e-6, 1e-6)
    w = m.cell_0_comb_iter_0_left.separable_1.depthwise.weight
    grad_w, base, eps = w.grad.copy(), w.data.copy(), 1e-6
    dw = _rng(3).standard_normal(w.shape)
    w.data = base + eps * dw
    plus = np.sum(m(x) * g)
    w.data = base - eps * dw
    minus = np.sum(m(x) * g)
    w.data = base
    assert np.isclose(np.sum(grad_w * dw), (plus - minus) / (2 * eps), rtol=1e-6)


def test_training_mode_backward_matches_finite_differences():
    """Training mode normalises the last cells over a few values per channel
    (1x1 and 2x2 maps), strongly curved: the difference needs a tiny step."""
    m = nasnet_a_mobile(num_classes=3, input_size=32).to(np.float64)
    x = _rng().standard_normal((8, 3, 32, 32))
    y = m(x)
    g = _rng(1).standard_normal(y.shape)
    m.zero_grad()
    _directional_check(m, x, g, m.backward(g), 1e-8, 1e-5)


def test_training_step_lowers_the_loss():
    cc.manual_seed(0)
    m = nasnet_a_mobile(num_classes=4, input_size=32)
    x = _rng().standard_normal((8, 3, 32, 32)).astype(np.float32)
    t = np.arange(8) % 4
    loss_fn = cc.nn.CrossEntropyLoss()
    opt = cc.optim.SGD(m.parameters(), lr=0.005)
    losses = []
    for _ in range(2):
        loss = loss_fn(m(x), t)
        m.zero_grad()
        m.backward(loss_fn.backward())
        opt.step()
        losses.append(float(loss))
    assert losses[1] < losses[0]


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("size", [32, 44])
def test_compile_and_saved_file_equal_eager(dtype, tol, size, tmp_path):
    m = nasnet_a_mobile(num_classes=5, input_size=size).to(dtype)
    m(_rng(5).standard_normal((4, 3, size, size)).astype(dtype))  # move BN statistics
    m.eval()
    x = _rng().standard_normal((2, 3, size, size)).astype(dtype)
    eager = m(x)
    scale = np.abs(eager).max()
    assert np.abs(cc.compile(m)(x) - eager).max() <= tol * scale
    path = tmp_path / "nasnet.safetensors"
    m.save(path)
    assert np.abs(cc.compile(str(path))(x) - eager).max() <= tol * scale
    loaded = cc.load(path)
    loaded.eval()
    np.testing.assert_array_equal(loaded(x), eager)


# ---------------------------------------------------------------------- ScheduledDropPath

def test_scheduled_drop_path_schedule_and_eval():
    m = nasnet_a_mobile(num_classes=3, input_size=32, drop_path_prob=0.4)
    drops = [d for d in m.modules() if isinstance(d, ScheduledDropPath)]
    ratios = sorted({d.cell_ratio for d in drops})
    assert ratios[0] == pytest.approx(1 / 16) and ratios[-1] == 1.0  # 16 cells
    assert len(ratios) == 16
    x = np.ones((4000, 1, 1, 1), dtype=np.float32)
    last = next(d for d in drops if d.cell_ratio == 1.0)
    np.testing.assert_array_equal(last(x), x)  # progress 0: nothing dropped yet
    set_drop_path_progress(m, 0.5)
    y = last(x)
    assert last.p == pytest.approx(0.2)
    assert abs(np.mean(y == 0) - 0.2) < 0.03
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.8], rtol=1e-6)
    np.testing.assert_array_equal(last.backward(x), y)
    set_drop_path_progress(m, 3.0)  # clipped at the end of the schedule
    last(x)
    assert last.p == pytest.approx(0.4)
    m.eval()
    np.testing.assert_array_equal(last(x), x)


def test_drop_path_is_an_identity_node_and_random_only_in_training():
    m = nasnet_a_mobile(num_classes=3, input_size=32, drop_path_prob=0.5)
    set_drop_path_progress(m, 1.0)
    ops = {n["op"] for n in m.to_graph()["nodes"]}
    assert "Identity" in ops and ops <= set(cc.nn.lowering.LAYER_OPS) | {"add", "concat"}
    x = _rng().standard_normal((2, 3, 32, 32)).astype(np.float32)
    m.eval()
    np.testing.assert_array_equal(m(x), m(x))


def test_default_drop_path_is_tf_slims():
    """TF-slim trains Large with drop path keep probability 0.7, Mobile with 1."""
    import inspect
    assert inspect.signature(nasnet_a_large).parameters["drop_path_prob"].default == 0.3
    assert inspect.signature(nasnet_a_mobile).parameters["drop_path_prob"].default == 0.0


# ------------------------------------------------------------- the Keras twin (keras + jax)

# Keras' separable-block ids -> convcore's branch names, per cell type
_KERAS_BRANCH = {"normal_left1": "comb_iter_0_left", "normal_right1": "comb_iter_0_right",
                 "normal_left2": "comb_iter_1_left", "normal_right2": "comb_iter_1_right",
                 "normal_left5": "comb_iter_4_left",
                 "reduction_left1": "comb_iter_0_left", "reduction_right1": "comb_iter_0_right",
                 "reduction_right2": "comb_iter_1_right", "reduction_right3": "comb_iter_2_right",
                 "reduction_left4": "comb_iter_4_left"}


def _convcore_module(model, keras_name):
    """The convcore module holding the weights of Keras' layer keras_name."""
    import re
    fixed = {"stem_conv1": "conv0", "stem_bn1": "conv0_bn", "predictions": "last_linear"}
    if keras_name in fixed:
        return getattr(model, fixed[keras_name])

    def cell(block):  # Keras' block id -> convcore's cell name
        return f"cell_{block}"

    m = re.fullmatch(r"separable_conv_([12])(_bn)?_(normal_left\d|normal_right\d|"
                     r"reduction_left\d|reduction_right\d)_(.+)", keras_name)
    if m:
        i, bn, branch, block = m.groups()
        b = getattr(model, f"{cell(block)}_{_KERAS_BRANCH[branch]}")
        return getattr(b, f"bn_sep_{i}" if bn else f"separable_{i}")
    m = re.fullmatch(r"(normal|reduction)_(conv|bn)_1_(.+)", keras_name)
    if m:
        return getattr(getattr(model, f"{cell(m.group(3))}_conv_1x1"), m.group(2))
    m = re.fullmatch(r"adjust_(conv_1|conv_2|conv_projection|bn)_(.+)", keras_name)
    if m:
        part, c = m.group(1), cell(m.group(2))
        if part == "conv_1":
            return getattr(model, f"{c}_path_1").conv
        if part == "conv_2":
            return getattr(model, f"{c}_path_2").conv
        if part == "conv_projection":
            return getattr(model, f"{c}_conv_prev_1x1").conv
        return getattr(model, f"{c}_final_path_bn", None) or \
            getattr(model, f"{c}_conv_prev_1x1").bn
    raise KeyError(keras_name)


def _to_keras(model, kmodel):
    """Copies every convcore weight into the Keras model (layouts: Keras
    kernels are (kh, kw, in, out), depthwise (kh, kw, in, 1), Dense (in, out))."""
    copied = set()
    for layer in kmodel.layers:
        if not layer.weights:
            continue
        m = _convcore_module(model, layer.name)
        kind = type(layer).__name__
        if kind == "SeparableConv2D":
            w = [m.depthwise.weight.data.transpose(2, 3, 0, 1),
                 m.pointwise.weight.data.transpose(2, 3, 1, 0)]
            copied.update({id(m.depthwise.weight), id(m.pointwise.weight)})
        elif kind == "Conv2D":
            w = [m.weight.data.transpose(2, 3, 1, 0)]
            copied.add(id(m.weight))
        elif kind == "BatchNormalization":
            assert layer.epsilon == m.eps and abs(layer.momentum - (1 - m.momentum)) < 1e-12
            w = [m.weight.data, m.bias.data, m.running_mean, m.running_var]
            copied.update({id(m.weight), id(m.bias)})
        elif kind == "Dense":
            w = [m.weight.data.T, m.bias.data]
            copied.update({id(m.weight), id(m.bias)})
        else:
            raise AssertionError(f"unexpected Keras layer {layer.name} ({kind})")
        layer.set_weights([np.asarray(a, dtype=np.float32) for a in w])
    # every trainable convcore tensor went to exactly one Keras weight
    assert copied == {id(p) for p in model.parameters()}


def _randomise_bn(model, rng):
    for m in model.modules():
        if isinstance(m, cc.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = rng.uniform(0.5, 1.5, c).astype(np.float32)
            m.bias.data = rng.uniform(-0.3, 0.3, c).astype(np.float32)
            m.running_mean = rng.uniform(-0.3, 0.3, c).astype(np.float32)
            m.running_var = rng.uniform(0.5, 2.0, c).astype(np.float32)


def _keras_twin_differences(variant, size, classes=10, batch=2):
    """Largest |convcore - Keras| / max|Keras| of the logits: eval mode (moving
    statistics) and training mode (batch statistics), Keras' weights copied from
    a convcore model with random BN affine parameters and statistics."""
    import os
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    pytest.importorskip("jax")
    if keras.backend.backend() != "jax":
        pytest.skip("the Keras twin runs with KERAS_BACKEND=jax")
    build = {"mobile": (nasnet_a_mobile, keras.applications.NASNetMobile),
             "large": (nasnet_a_large, keras.applications.NASNetLarge)}[variant]
    cc.manual_seed(0)
    model = build[0](num_classes=classes, input_size=size)
    _randomise_bn(model, _rng(4))
    kmodel = build[1](weights=None, input_shape=(size, size, 3), classes=classes,
                      classifier_activation=None)
    assert sum(int(np.prod(w.shape)) for w in kmodel.trainable_weights) == \
        model.num_parameters()
    _to_keras(model, kmodel)
    x = _rng(5).standard_normal((batch, 3, size, size)).astype(np.float32)
    xk = x.transpose(0, 2, 3, 1)
    diffs = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        ours = model(x)
        theirs = np.asarray(kmodel(xk, training=mode == "train"))
        diffs[mode] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    return diffs


@pytest.mark.slow
def test_keras_twin_mobile_64():
    """64x64 and a batch of 8: training mode normalises the last cells over
    2x2x8 values per channel (at 32x32 with a batch of 2, over two values,
    float32 alone moves the logits by 7%: convcore's own float32 and float64
    differ that much)."""
    diffs = _keras_twin_differences("mobile", 64, batch=8)
    print("NASNet-A Mobile 64x64 vs Keras:", diffs)
    assert diffs["eval"] <= 1e-5 and diffs["train"] <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("variant,size", [("mobile", 224), ("large", 331)])
def test_keras_twin_full_size(variant, size):
    diffs = _keras_twin_differences(variant, size, classes=1000)
    print(f"NASNet-A {variant} {size}x{size} vs Keras:", diffs)
    assert diffs["eval"] <= 1e-5 and diffs["train"] <= 1e-4
