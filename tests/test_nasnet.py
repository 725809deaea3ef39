"""NASNet-A Mobile and Large (python/convcore/nasnet.py): Keras' parameter
counts, shapes, the TensorFlow-style padding rewritten with symmetric
layers, forward/backward, ScheduledDropPath, save/load and compile."""
import numpy as np
import pytest

import convcore as cc
from convcore import functional as F
from convcore import models
from convcore.nasnet import (ScheduledDropPath, ShiftedSubsample, ZeroPad, _Net, _separable,
                             nasnet_a_large, nasnet_a_mobile, set_drop_path_progress)

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
    only non-linearities, so a small step crosses no kink."""
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
