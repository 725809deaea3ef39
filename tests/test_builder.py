"""convcore.build: the lecture's notation (grammar, options, defaults),
the list-of-dicts form, parse errors, "doesn't fit" warnings, and the
features/classifier split with PyTorch key names."""

import warnings

import numpy as np
import pytest

import convcore
from convcore import nn
from convcore.builder import BuildError, MisfitWarning, Network, parse

EXAMPLE = "[(CONV3-64-RELU)*2-POOL2]*3-(FC-512-RELU)*2-FC-10"


def _build(spec, shape, **kw):
    """build() that fails the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return convcore.build(spec, shape, **kw)


def _shapes(net, input_shape):
    """Output shape of each layer (one sample), following the implicit
    flatten before the classifier."""
    shapes, shape = [], tuple(input_shape)
    for m in net.features:
        shape = m.output_shape(shape)
        shapes.append(shape)
    if len(net.classifier):
        shape = (int(np.prod(shape)),)
        for m in net.classifier:
            shape = m.output_shape(shape)
            shapes.append(shape)
    return shapes


# ===========================================================================
# the example
# ===========================================================================

def test_example_layers_shapes_and_parameters():
    net = _build(EXAMPLE, (3, 32, 32))
    assert isinstance(net, Network) and isinstance(net, nn.Module)
    stage = [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert [type(m) for m in net.features] == stage * 3
    assert [type(m) for m in net.classifier] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU,
                                                 nn.Linear]
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 64)] + [(64, 64)] * 5
    for c in convs:       # CONV3: 3x3, stride 1, the lecture's (F - 1) / 2 zero padding
        assert (c.kernel_size, c.stride, c.padding, c.dilation, c.groups) == \
            ((3, 3), (1, 1), (1, 1), (1, 1), 1)
    for p in (m for m in net.features if isinstance(m, nn.MaxPool2d)):
        assert p.kernel_size == (2, 2) and p.stride == (2, 2) and p.padding == (0, 0)
    fcs = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(4 * 4 * 64, 512), (512, 512),
                                                              (512, 10)]
    expected_shapes = [
        (64, 32, 32), (64, 32, 32), (64, 32, 32), (64, 32, 32), (64, 16, 16),
        (64, 16, 16), (64, 16, 16), (64, 16, 16), (64, 16, 16), (64, 8, 8),
        (64, 8, 8), (64, 8, 8), (64, 8, 8), (64, 8, 8), (64, 4, 4),
        (512,), (512,), (512,), (512,), (10,),
    ]
    assert _shapes(net, (3, 32, 32)) == expected_shapes
    assert net.output_shape((3, 32, 32)) == (10,)
    # by hand: CONV 3->64: 3*9*64 + 64; five CONV 64->64: 64*9*64 + 64 each;
    # FC 1024->512, 512->512, 512->10 with biases
    by_hand = (3 * 9 * 64 + 64) + 5 * (64 * 9 * 64 + 64) + \
        (1024 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    assert by_hand == 979_018
    assert net.num_parameters() == by_hand
    assert sum(p.size for p in net.parameters()) == by_hand


def test_example_forward_backward():
    convcore.manual_seed(0)
    net = _build(EXAMPLE, (3, 32, 32))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    y = net(x)
    assert y.shape == (2, 10) and y.dtype == np.float32
    gx = net.backward(np.ones_like(y))
    assert gx.shape == x.shape
    assert all(p.grad.any() for p in net.parameters())


def test_example_key_names():
    net = _build(EXAMPLE, (3, 32, 32))
    keys = list(net.state_dict())
    conv_idx = [0, 2, 5, 7, 10, 12]
    expected = [f"features.{i}.{w}" for i in conv_idx for w in ("weight", "bias")] + \
        [f"classifier.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]
    assert keys == expected


def test_example_parse_is_flat_and_expanded():
    layers = parse(EXAMPLE)
    kinds = [layer["type"] for layer in layers]
    assert kinds == (["conv", "relu", "conv", "relu", "maxpool"] * 3 +
                     ["fc", "relu", "fc", "relu", "fc"])
    # the repeats are copies, not one shared dict
    layers[0]["out_channels"] = 1
    assert layers[2]["out_channels"] == 64


# ===========================================================================
# grammar
# ===========================================================================

def test_case_and_whitespace_insensitive():
    a = parse("CONV3-64-RELU-POOL2-FC-10")
    assert parse("conv3-64-relu-pool2-fc-10") == a
    assert parse("Conv3-64 - ReLU - Pool2 - FC-10") == a
    assert parse("  CONV3-64-RELU-POOL2-FC-10  ") == a


def test_nested_groups_and_repeats():
    assert [l["type"] for l in parse("[(RELU)*2-(POOL2-RELU)*2]*2")] == \
        ["relu", "relu", "maxpool", "relu", "maxpool", "relu"] * 2
    assert parse("(RELU)") == parse("[RELU]") == parse("RELU*1") == [{"type": "relu"}]
    assert len(parse("CONV3-8*3")) == 3


def test_conv_options():
    (layer,) = parse("CONV5x3-8/s2/p1/d2/g2")
    assert layer == {"type": "conv", "out_channels": 8, "kernel_size": [5, 3], "padding": 1,
                     "stride": 2, "dilation": 2, "groups": 2}
    net = _build("CONV5x3-8/s2/p1/d2/g2", (4, 15, 11), on_misfit="ignore")
    c = net.features[0]
    assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
            c.groups) == (4, 8, (5, 3), (2, 2), (1, 1), (2, 2), 2)
    # (15 + 2 - 2*4 - 1) / 2 + 1 = 5, (11 + 2 - 2*2 - 1) / 2 + 1 = 5
    assert net.output_shape((4, 15, 11)) == (8, 5, 5)
    assert c.weight.shape == (8, 2, 5, 3)


def test_conv_default_padding_keeps_size():
    for k in (1, 3, 5, 7):
        net = _build(f"CONV{k}-4", (2, 9, 9))
        assert net.features[0].padding == ((k - 1) // 2,) * 2
        assert net.output_shape((2, 9, 9)) == (4, 9, 9)
    # an even kernel: (F - 1) // 2 pads 1 for F = 4, and the output shrinks by one
    assert parse("CONV4-4")[0]["padding"] == [1, 1]
    assert _build("CONV4-4/s1", (2, 9, 9), on_misfit="ignore").output_shape((2, 9, 9)) == \
        (4, 8, 8)


def test_conv_same_and_valid():
    net = _build("CONV4-3/same-CONV5-3/valid-CONV2x4-3/same/d2", (2, 10, 9))
    a, b, c = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert a.padding == "same" and b.padding == "valid" and c.padding == "same"
    assert _shapes(net, (2, 10, 9)) == [(3, 10, 9), (3, 6, 5), (3, 6, 5)]


def test_pool_options():
    (layer,) = parse("POOL3/s2/p1/d2/ceil")
    assert layer == {"type": "maxpool", "kernel_size": 3, "stride": 2, "padding": 1,
                     "dilation": 2, "ceil_mode": True}
    assert parse("MAXPOOL3/s2") == parse("POOL3/s2")
    assert parse("POOL") == [{"type": "maxpool", "kernel_size": 2}]
    net = _build("POOL3/s2/p1/ceil", (1, 8, 8), on_misfit="ignore")
    m = net.features[0]
    assert isinstance(m, nn.MaxPool2d)
    assert (m.kernel_size, m.stride, m.padding, m.ceil_mode) == ((3, 3), (2, 2), (1, 1), True)
    # ceil((8 + 2 - 3) / 2) + 1 = 5 (the last window starts inside the input)
    assert net.output_shape((1, 8, 8)) == (1, 5, 5)


def test_avgpool():
    net = _build("AVGPOOL3/s2/p1/ceil-AVGPOOL2", (2, 9, 9), on_misfit="ignore")
    a, b = net.features
    assert isinstance(a, nn.AvgPool2d) and isinstance(b, nn.AvgPool2d)
    assert (a.kernel_size, a.stride, a.padding, a.ceil_mode) == ((3, 3), (2, 2), (1, 1), True)
    assert (b.kernel_size, b.stride) == ((2, 2), (2, 2))
    assert _shapes(net, (2, 9, 9)) == [(2, 5, 5), (2, 2, 2)]


def test_dropout_probability():
    assert parse("DROPOUT0.3") == [{"type": "dropout", "p": 0.3}]
    assert parse("DROPOUT") == [{"type": "dropout", "p": 0.5}]
    assert parse("DROP0.25") == [{"type": "dropout", "p": 0.25}]
    net = _build("FC-8-RELU-DROPOUT0.3-FC-2", (5,))
    drops = [m for m in net.classifier if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == [0.3]


def test_gap_bn_norm_flatten():
    net = _build("CONV3-6-BN-RELU-NORM-LRN-GAP-FLATTEN-FC-4", (3, 5, 5))
    types = [type(m) for m in net.features]
    assert types == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.LocalResponseNorm,
                     nn.LocalResponseNorm, nn.AdaptiveAvgPool2d, nn.Flatten]
    bn = net.features[1]
    assert bn.num_features == 6
    gap = net.features[5]
    assert _shapes(net, (3, 5, 5))[5] == (6, 1, 1)
    assert gap.output_shape((6, 5, 5)) == (6, 1, 1)
    assert net.output_shape((3, 5, 5)) == (4,)
    assert net.classifier[0].in_features == 6


def test_norm_defaults_are_alexnets():
    """NORM: Krizhevsky et al. 2012, n = 5, alpha = 1e-4, beta = 0.75, k = 2."""
    lrn = _build("NORM", (8, 3, 3)).features[0]
    assert isinstance(lrn, nn.LocalResponseNorm)
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)


def test_norm_options_in_dict_form():
    lrn = _build([{"type": "lrn", "size": 3, "k": 1.0}], (8, 3, 3)).features[0]
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (3, 1e-4, 0.75, 1.0)


def test_softmax_at_the_end_adds_nothing():
    convcore.manual_seed(1)
    a = _build("CONV3-4-RELU-POOL2-FC-3-SOFTMAX", (2, 4, 4))
    convcore.manual_seed(1)
    b = _build("CONV3-4-RELU-POOL2-FC-3", (2, 4, 4))
    assert parse("FC-3-SOFTMAX")[-1] == {"type": "softmax"}
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    x = np.random.default_rng(1).standard_normal((2, 2, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))   # logits: the loss applies the softmax


@pytest.mark.parametrize("spec", ["SOFTMAX-FC-10", "FC-10-SOFTMAX-RELU",
                                  "CONV3-8-SOFTMAX-POOL2", "FC-10-SOFTMAX-SOFTMAX-FC-2"])
def test_softmax_not_at_the_end_is_an_error(spec):
    """SOFTMAX is only accepted at the end (where it adds nothing); anywhere
    else dropping it silently would build a different network."""
    with pytest.raises(BuildError, match="(?i)softmax"):
        convcore.build(spec, (3, 8, 8))


# ===========================================================================
# the list-of-dicts form
# ===========================================================================

def test_dict_form_equals_string():
    spec = "CONV5-6/p0-RELU-POOL2/s2-CONV3-8/s2/d1-BN-NORM-DROPOUT0.2-FC-12-RELU-FC-3"
    layers = parse(spec)
    assert isinstance(layers, list) and all(isinstance(l, dict) for l in layers)
    convcore.manual_seed(2)
    a = _build(spec, (3, 16, 16), on_misfit="ignore")
    convcore.manual_seed(2)
    b = _build(layers, (3, 16, 16), on_misfit="ignore")
    assert a.layers == b.layers == layers
    assert a.architecture() == b.architecture()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


def test_dict_form_written_by_hand():
    layers = [
        {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "fc", "out_features": 5, "name": "head"},   # 'name' is ignored
    ]
    net = _build(layers, (1, 6, 6))
    assert [type(m) for m in net.features] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert net.classifier[0].in_features == 4 * 3 * 3
    assert net.output_shape((1, 6, 6)) == (5,)


@pytest.mark.parametrize("spec,exc", [
    ([{"type": "conv", "out_channels": 4, "kernel_size": 3}, "relu"], TypeError),
    ([{"type": "warp"}], BuildError),
    ([{"out_channels": 4}], BuildError),
    ([], BuildError),
    (42, TypeError),
    ([{"type": "conv", "out_channels": 4, "kernel_size": 3, "colour": 1}], BuildError),
])
def test_dict_form_errors(spec, exc):
    with pytest.raises(exc):
        convcore.build(spec, (3, 8, 8))


def test_network_architecture_round_trip():
    convcore.manual_seed(3)
    net = _build("CONV3-4-BN-RELU-POOL2-DROPOUT-FC-3", (2, 6, 6))
    again = nn.from_architecture(net.architecture())
    assert isinstance(again, Network)
    again.load_state_dict(net.state_dict())
    net.eval(), again.eval()
    x = np.random.default_rng(3).standard_normal((2, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(net(x), again(x))


# ===========================================================================
# parse errors
# ===========================================================================

@pytest.mark.parametrize("spec,words", [
    ("FOO-3", ["FOO", "position 0"]),
    ("CONV3-8-BLOB", ["BLOB", "position 8"]),
    ("CONV3", ["CONV3", "count"]),
    ("CONV3-RELU", ["CONV3", "count"]),
    ("FC", ["FC", "count"]),
    ("FC-RELU", ["FC", "count"]),
    ("CONV-8", ["CONV", "kernel"]),
    ("CONV3-64/q2", ["/q2", "position 8", "conv"]),
    ("POOL2/g2", ["/g2", "maxpool"]),
    ("AVGPOOL3/d2", ["/d2", "avgpool"]),
    ("FC-10/s2", ["/s2", "fc"]),
    ("RELU/p1", ["/p1", "relu"]),
    ("CONV3-8/s", ["/s", "conv"]),           # an option that needs a number
    ("POOL2/ceil2", ["/ceil2", "maxpool"]),  # one that takes none
    ("(CONV3-8", ["')'"]),
    ("[CONV3-8", ["']'"]),
    ("CONV3-8)", ["')'", "position 7"]),
    ("[CONV3-8)", ["position 8"]),
    ("(CONV3-8]-RELU", ["position 8"]),
    ("CONV3-8-", ["end"]),
    ("CONV3-8--RELU", ["position 8"]),
    ("-CONV3-8", ["position 0"]),
    ("CONV3-8*", ["end"]),
    ("CONV3-8*0", ["position", "0"]),
    ("(CONV3-8)*0", ["position", "0"]),
    ("CONV3-8 RELU", ["RELU", "position 8"]),
    ("CONV3-8-RELU!", ["position 12"]),
    ("()", ["position 1"]),
    ("DROPOUT0.3.2", ["DROPOUT0.3.2"]),
])
def test_parse_errors(spec, words):
    with pytest.raises(BuildError) as info:
        convcore.build(spec, (3, 8, 8))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec(spec):
    with pytest.raises(BuildError, match="empty"):
        convcore.build(spec, (3, 8, 8))


@pytest.mark.parametrize("spec,words", [
    ("CONV3-0", ["layer 0", "out_channels"]),
    ("FC-0", ["layer 0", "out_features"]),
    ("RELU-CONV0-8", ["layer 1", "kernel"]),
    ("POOL0", ["layer 0", "kernel"]),
    ("POOL3/s0", ["layer 0", "stride"]),
    ("CONV3-8/s0", ["layer 0", "stride"]),
    ("CONV3-8/g3", ["layer 0", "groups"]),
    ("CONV3-8/s2/same", ["layer 0", "same"]),
    ("DROPOUT1.5", ["layer 0", "1.5"]),
    ("CONV3-8/d0", ["layer 0", "dilation"]),
])
def test_bad_layer_arguments_raise_build_error_naming_the_layer(spec, words):
    """A count, size or option that no layer can take is a BuildError naming
    the layer (not a bare ValueError from deep inside, nor a ZeroDivisionError)."""
    with pytest.raises(BuildError) as info:
        convcore.build(spec, (3, 8, 8))
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("spec", ["POOL0", "POOL3/s0", "CONV3-8/s0", "CONV0-8"])
@pytest.mark.parametrize("on_misfit", ["error", "ignore"])
def test_zero_sizes_raise_build_error_in_every_misfit_mode(spec, on_misfit):
    with pytest.raises(BuildError, match="layer 0"):
        convcore.build(spec, (3, 8, 8), on_misfit=on_misfit)


def test_image_layer_after_fc_is_an_error():
    with pytest.raises(BuildError, match="layer 1"):
        convcore.build("FC-10-CONV3-8", (3, 8, 8))


@pytest.mark.parametrize("shape", [(3, 8), (3, 0, 8), (0,), ()])
def test_bad_input_shape(shape):
    with pytest.raises(BuildError):
        convcore.build("CONV3-8", shape)


def test_build_error_is_a_value_error():
    assert issubclass(BuildError, ValueError)
    assert issubclass(MisfitWarning, UserWarning)


# ===========================================================================
# "doesn't fit"
# ===========================================================================

def test_lecture_doesnt_fit_warns_naming_layer_and_sizes():
    """The lecture: 7x7 input, 3x3 filter, stride 3: (7 - 3) / 3 + 1 = 2.33,
    "doesn't fit!" The output floors to 2x2."""
    with pytest.warns(MisfitWarning) as record:
        net = convcore.build("CONV3-4/s3/p0", (1, 7, 7))
    assert len(record) == 1
    message = str(record[0].message)
    for word in ("layer 0", "conv", "7", "3", "stride 3", "2.333"):
        assert word in message, f"{word!r} not in {message!r}"
    assert record[0].filename == __file__   # points at the caller of build()
    assert net.output_shape((1, 7, 7)) == (4, 2, 2)


def test_doesnt_fit_strict_raises():
    with pytest.raises(BuildError, match="layer 0") as info:
        convcore.build("CONV3-4/s3/p0", (1, 7, 7), strict=True)
    assert "7" in str(info.value) and "stride 3" in str(info.value)


def test_doesnt_fit_names_the_right_layer():
    with pytest.warns(MisfitWarning, match=r"layer 2 \(maxpool"):
        convcore.build("CONV3-4-RELU-POOL2", (1, 7, 7))   # 7 / 2 floors
    with pytest.raises(BuildError, match=r"layer 2 \(maxpool"):
        convcore.build("CONV3-4-RELU-POOL2", (1, 7, 7), strict=True)


def test_ceil_mode_misfit_message_is_true():
    """With /ceil the last window is kept (7x7, POOL2: 4x4 out): a warning,
    if any, must not claim that the output floors."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        net = convcore.build("POOL2/ceil", (1, 7, 7))
    assert net.output_shape((1, 7, 7)) == (1, 4, 4)
    for w in record:
        assert "floor" not in str(w.message), str(w.message)


def test_doesnt_fit_ignore():
    net = _build("CONV3-4/s3/p0", (1, 7, 7), on_misfit="ignore")
    assert net.output_shape((1, 7, 7)) == (4, 2, 2)


@pytest.mark.parametrize("spec", ["CONV3-4/s1/p0", "CONV3-4/s2/p0", "CONV3-4/s3/p1",
                                  "CONV3-4", "POOL3/s2", "POOL7", "AVGPOOL3/s2/p1"])
def test_fitting_layers_do_not_warn(spec):
    """The lecture's 7x7 examples that fit: stride 1 -> 5x5, stride 2 -> 3x3;
    with padding 1 stride 3 fits again ((7 + 2 - 3) / 3 + 1 = 3)."""
    _build(spec, (1, 7, 7), strict=True)


@pytest.mark.parametrize("spec,on_misfit", [("POOL8", "warn"), ("POOL8", "ignore"),
                                            ("CONV9-4/p0", "ignore"),
                                            ("CONV3-4/p0-CONV3-4/p0-CONV3-4/p0-CONV3-4/p0",
                                             "ignore"),
                                            ("POOL2-POOL2-POOL2", "ignore")])
def test_empty_output_always_raises(spec, on_misfit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BuildError, match="layer"):
            convcore.build(spec, (1, 7, 7), on_misfit=on_misfit)


def test_bad_on_misfit():
    with pytest.raises(ValueError):
        convcore.build("RELU", (1, 7, 7), on_misfit="shout")


# ===========================================================================
# features / classifier
# ===========================================================================

def test_dropout_before_first_fc_goes_to_classifier():
    net = _build("CONV3-4-RELU-POOL2-DROPOUT0.3-DROPOUT-FC-6-RELU-DROPOUT-FC-2", (1, 6, 6))
    assert [type(m) for m in net.features] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert [type(m) for m in net.classifier] == [nn.Dropout, nn.Dropout, nn.Linear, nn.ReLU,
                                                 nn.Dropout, nn.Linear]
    assert list(net.state_dict()) == ["features.0.weight", "features.0.bias",
                                      "classifier.2.weight", "classifier.2.bias",
                                      "classifier.5.weight", "classifier.5.bias"]


def test_dropout_in_features_stays_there():
    net = _build("CONV3-4-DROPOUT-CONV3-4-FC-2", (1, 4, 4))
    assert [type(m) for m in net.features] == [nn.Conv2d, nn.Dropout, nn.Conv2d]
    assert [type(m) for m in net.classifier] == [nn.Linear]


def test_no_fc_means_no_classifier():
    net = _build("CONV3-4-RELU-POOL2", (1, 6, 6))
    assert len(net.classifier) == 0
    x = np.zeros((2, 1, 6, 6), np.float32)
    y = net(x)
    assert y.shape == (2, 4, 3, 3)
    assert net.backward(np.ones_like(y)).shape == x.shape
    assert list(net.state_dict()) == ["features.0.weight", "features.0.bias"]


def test_only_fc_layers():
    net = _build("FC-8-RELU-FC-3", (5,))
    assert len(net.features) == 0
    x = np.random.default_rng(4).standard_normal((4, 5)).astype(np.float32)
    assert net(x).shape == (4, 3)
    assert net.backward(np.ones((4, 3), np.float32)).shape == (4, 5)


def test_flatten_between_features_and_classifier():
    convcore.manual_seed(5)
    net = _build("CONV3-2/p0-FC-3", (1, 4, 4))
    x = np.random.default_rng(5).standard_normal((2, 1, 4, 4)).astype(np.float32)
    conv, fc = net.features[0], net.classifier[0]
    expected = fc(conv(x).reshape(2, -1))
    np.testing.assert_array_equal(net(x), expected)
    gx = net.backward(np.ones((2, 3), np.float32))
    assert gx.shape == x.shape
