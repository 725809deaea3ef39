"""The rest of the lecture's case studies: GoogLeNet, MobileNet v1 and v2,
ResNeXt, Wide ResNet, DenseNet, SE-ResNet and EfficientNet-B0.

Each is a Graph (or the zoo's ResNet) whose module names are torchvision's
(timm's for SE-ResNet's `se`, which torchvision lacks), so state dicts
exported from those load with `load_state_dict`; parameter counts equal
the references' (tests/test_models_extra.py builds the references in plain
torch.nn and compares). Every model takes `num_classes` and `input_size`
(an int, (H, W) or (C, H, W)); the default is the ImageNet 224x224x3.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from .nn import init
from .nn.blocks import (_make_divisible, basic_conv2d, conv_norm_act, dense_block,
                        depthwise_separable, inception, inverted_residual, mbconv,
                        se_bottleneck, transition)
from .nn.graph import Graph
from .nn.layers import AdaptiveAvgPool2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from .nn.module import Module, Sequential
from .nn.norm import BatchNorm2d, channel_sample_shape

__all__ = ["googlenet", "mobilenet_v1", "mobilenet_v2", "resnext50_32x4d", "wide_resnet50_2",
           "densenet121", "se_resnet50", "efficientnet_b0", "Normalize", "nasnet_a_mobile",
           "nasnet_a_large"]


def _input_shape(input_size) -> tuple:
    from .models import _input_shape as shape_of
    return shape_of(input_size, 3)


def _classes(num_classes) -> int:
    if not isinstance(num_classes, (int, np.integer)) or int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def _checked(model: Graph) -> Graph:
    """Fails early, naming the layer, when the input is too small for the net."""
    model.output_shape(model.input_shape)
    return model


def _init(model: Module, conv: str, linear: str) -> None:
    """The references' initialisations. conv: 'fan_out' / 'fan_in' (He normal)
    or 'trunc_normal' (GoogLeNet's N(0, 0.01) truncated at +-2, weights of FC
    layers too); linear: 'normal' (N(0, 0.01), bias 0), 'uniform' (U(+-1/sqrt(out)),
    bias 0), 'zero_bias' (PyTorch's default weight, bias 0) or 'default'.
    BatchNorm keeps weight 1, bias 0."""
    rng = init.generator()
    for m in model.modules():
        if isinstance(m, Conv2d):
            dt = m.weight.data.dtype
            if conv == "trunc_normal":
                m.weight.data = np.clip(rng.standard_normal(m.weight.shape) * 0.01, -2, 2) \
                    .astype(dt)
            else:
                m.weight.data = init.kaiming_normal(m.weight.shape, mode=conv, dtype=dt)
            if m.bias is not None:
                m.bias.data = np.zeros_like(m.bias.data)
        elif isinstance(m, Linear):
            dt = m.weight.data.dtype
            if linear == "normal":
                m.weight.data = (rng.standard_normal(m.weight.shape) * 0.01).astype(dt)
            elif linear == "uniform":
                bound = 1.0 / math.sqrt(m.out_features)
                m.weight.data = init.uniform(m.weight.shape, bound, dt)
            elif linear == "trunc_normal":
                m.weight.data = np.clip(rng.standard_normal(m.weight.shape) * 0.01, -2, 2) \
                    .astype(dt)
            if linear in ("normal", "uniform", "zero_bias") and m.bias is not None:
                m.bias.data = np.zeros_like(m.bias.data)


# ----------------------------------------------------------------------- GoogLeNet

class Normalize(Module):
    """y = (x - mean) / std per channel, with mean and std fixed (not trained):
    torchvision's transforms.Normalize as a layer; GoogLeNet's transform_input
    is one. The graph format needs no op of its own for it: it is saved as
    what it equals, a BatchNorm2d in evaluation mode without affine
    parameters (running_mean = mean, running_var = std ** 2, eps 0), which
    the C++ runner and convcore.compile run as a per-channel scale and shift.
    So its state-dict entries carry BatchNorm2d's names. The statistics are
    made float64 whatever the model's dtype, as torchvision's constants are
    Python floats: a float64 model gets them unrounded, a float32 one rounds
    the scale and shift once, to float32 (its file holds the two tensors as
    F64, which every reader takes; model.to() converts them as any buffer)."""

    def __init__(self, mean, std):
        super().__init__()
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        std = np.asarray(std, dtype=np.float64).reshape(-1)
        if mean.size < 1 or mean.shape != std.shape:
            raise ValueError(f"mean and std must be two lists of one value per channel, got "
                             f"{mean.size} and {std.size} values")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ValueError(f"mean must be finite and std positive and finite, got mean "
                             f"{mean.tolist()}, std {std.tolist()}")
        self.mean, self.std = mean.tolist(), std.tolist()
        self.num_features = mean.size
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_var", std * std)
        self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))

    def _scale_shift(self, x):
        # as the engine computes a batch norm's scale and shift: in double from
        # the stored statistics, then in the input's dtype (operators only, so
        # GPU arrays work too)
        scale = 1.0 / self.running_var.astype(np.float64) ** 0.5
        shift = -self.running_mean.astype(np.float64) * scale
        shape = (1, self.num_features, 1, 1)
        return scale.astype(x.dtype).reshape(shape), shift.astype(x.dtype).reshape(shape)

    def _check(self, x):
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"Normalize({self.num_features} channels) expects input of shape "
                             f"(N, {self.num_features}, H, W), got {tuple(x.shape)}")

    def forward(self, x):
        self._check(x)
        scale, shift = self._scale_shift(x)
        return x * scale + shift

    def backward(self, grad_output):
        self._check(grad_output)
        return grad_output * self._scale_shift(grad_output)[0]

    def output_shape(self, input_shape):
        return channel_sample_shape(f"Normalize({self.num_features} channels)",
                                    self.num_features, input_shape)

    def lower(self, g, x, prefix):
        return g.node("BatchNorm2d", [x], name=prefix,
                      attrs=dict(num_features=self.num_features, eps=0.0, affine=False,
                                 track_running_stats=True))

    def config(self):
        return dict(mean=self.mean, std=self.std)

    def extra_repr(self):
        return f"mean={self.mean}, std={self.std}"


# torchvision's transform_input: input normalised with ImageNet's mean and std
# (transforms.Normalize) is rescaled to the (x - 0.5) / 0.5 normalisation that
# the Inception weights ported from TensorFlow were trained with:
# x * (std / 0.5) + (mean - 0.5) / 0.5, i.e. (x - (0.5 - mean) / std) / (0.5 / std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transform_input() -> Normalize:
    return Normalize(mean=[(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
                     std=[0.5 / s for s in IMAGENET_STD])


# (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj): the paper's Table 1
_INCEPTION = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}


def _inception_aux(in_channels: int, num_classes: int, dropout: float = 0.7) -> Graph:
    """GoogLeNet's auxiliary classifier: 4x4 average pool, 1x1 conv 128,
    FC 1024 + ReLU, dropout 0.7, FC classes."""
    return Graph(OrderedDict(
        pool=AdaptiveAvgPool2d(4), conv=basic_conv2d(in_channels, 128, 1), flatten=Flatten(),
        fc1=Linear(2048, 1024), dropout=Dropout(dropout), fc2=Linear(1024, num_classes),
    ), ["p = pool(x)", "c = conv(p)", "f = flatten(c)", "h = fc1(f)", "r = relu(h)",
        "d = dropout(r)", "out = fc2(d)"])


def googlenet(num_classes: int = 1000, input_size=(3, 224, 224), aux_logits: bool = False,
              dropout: float = 0.2, transform_input: bool = False) -> Graph:
    """GoogLeNet (Inception v1, Szegedy et al. 2014) as torchvision defines
    it (BN after every conv; 6,624,904 parameters with 1000 classes, 13,004,888
    with the auxiliary classifiers). With aux_logits, forward returns
    (logits, aux2, aux1) while training, as torchvision's GoogLeNetOutputs,
    and backward takes a tuple of three gradients; eval returns the logits.

    transform_input=True (torchvision's, which its pretrained weights use)
    first rescales input normalised with ImageNet's mean and std to the
    (x - 0.5) / 0.5 normalisation: x[:, c] * (std[c] / 0.5) + (mean[c] - 0.5) / 0.5.
    It is a fixed `Normalize` child, `transform_input`, with no parameters;
    its three buffers are the only state-dict keys torchvision's lacks, so
    torchvision's weights load with load_state_dict(state, strict=False)."""
    nc, shape = _classes(num_classes), _input_shape(input_size)
    m = OrderedDict()
    if transform_input:
        if shape[0] != 3:
            raise ValueError(f"transform_input rescales the three ImageNet channels (RGB); the "
                             f"input has {shape[0]} (input_size {shape})")
        m["transform_input"] = _transform_input()
    m.update(
        conv1=basic_conv2d(shape[0], 64, 7, stride=2, padding=3),
        maxpool1=MaxPool2d(3, stride=2, ceil_mode=True),
        conv2=basic_conv2d(64, 64, 1),
        conv3=basic_conv2d(64, 192, 3, padding=1),
        maxpool2=MaxPool2d(3, stride=2, ceil_mode=True))
    order = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
             "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d",
             "inception4e", "maxpool4", "inception5a", "inception5b"]
    for name in order[5:]:
        if name == "maxpool3":
            m[name] = MaxPool2d(3, stride=2, ceil_mode=True)
        elif name == "maxpool4":
            m[name] = MaxPool2d(2, stride=2, ceil_mode=True)
        else:
            m[name] = inception(*_INCEPTION[name])
    if aux_logits:
        m["aux1"] = _inception_aux(512, nc)
        m["aux2"] = _inception_aux(528, nc)
    m["avgpool"] = AdaptiveAvgPool2d(1)
    m["flatten"] = Flatten()
    m["dropout"] = Dropout(dropout)
    m["fc"] = Linear(1024, nc)
    nodes, prev = [], "x"
    first = ["transform_input"] if transform_input else []
    for name in first + order + ["avgpool", "flatten", "dropout", "fc"]:
        nodes.append(f"{name}_out = {name}({prev})")
        prev = f"{name}_out"
        if aux_logits and name == "inception4a":
            nodes.append(f"aux1_out = aux1({prev})")
        if aux_logits and name == "inception4d":
            nodes.append(f"aux2_out = aux2({prev})")
    outputs = ["fc_out", "aux2_out", "aux1_out"] if aux_logits else None
    model = Graph(m, nodes, outputs=outputs, name="googlenet", input_shape=shape)
    _init(model, conv="trunc_normal", linear="trunc_normal")
    return _checked(model)


# ----------------------------------------------------------------------- MobileNets

def _classifier_head(features: Sequential, in_features: int, num_classes: int, dropout: float,
                     name: str, shape: tuple) -> Graph:
    return Graph.chain(OrderedDict(
        features=features, avgpool=AdaptiveAvgPool2d(1), flatten=Flatten(),
        classifier=Sequential(Dropout(dropout), Linear(in_features, num_classes))),
        name=name, input_shape=shape)


# (out channels, stride) of MobileNet v1's 13 depthwise-separable blocks (paper, Table 1)
_MOBILENET_V1 = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + \
    [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def mobilenet_v1(num_classes: int = 1000, input_size=(3, 224, 224),
                 dropout: float = 0.001) -> Graph:
    """MobileNet v1 (Howard et al. 2017): a 3x3/2 conv, 13 depthwise-separable
    blocks, global pool, FC; BN and ReLU after every conv. Names follow
    torchvision's MobileNet v2 (features.N, classifier.1); the count,
    4,231,976 with 1000 classes, is the Keras reference's trainable one
    (the paper's "4.2 million"); the Keras head's dropout is 0.001."""
    nc, shape = _classes(num_classes), _input_shape(input_size)
    layers, c = [conv_norm_act(shape[0], 32, 3, 2)], 32
    for out, stride in _MOBILENET_V1:
        layers.append(depthwise_separable(c, out, stride))
        c = out
    model = _classifier_head(Sequential(*layers), c, nc, dropout, "mobilenet_v1", shape)
    _init(model, conv="fan_out", linear="normal")
    return _checked(model)


# (expansion t, channels c, repeats n, stride s): the paper's Table 2
_MOBILENET_V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(num_classes: int = 1000, input_size=(3, 224, 224), width_mult: float = 1.0,
                 dropout: float = 0.2) -> Graph:
    """MobileNet v2 (Sandler et al. 2018), torchvision's definition and names
    (3,504,872 parameters with 1000 classes)."""
    nc, shape = _classes(num_classes), _input_shape(input_size)
    c = _make_divisible(32 * width_mult)
    last = _make_divisible(1280 * max(1.0, width_mult))
    layers = [conv_norm_act(shape[0], c, 3, 2, activation="relu6")]
    for t, ch, n, s in _MOBILENET_V2:
        out = _make_divisible(ch * width_mult)
        for i in range(n):
            layers.append(inverted_residual(c, out, s if i == 0 else 1, t))
            c = out
    layers.append(conv_norm_act(c, last, 1, activation="relu6"))
    model = _classifier_head(Sequential(*layers), last, nc, dropout, "mobilenet_v2", shape)
    _init(model, conv="fan_out", linear="normal")
    return _checked(model)


# ---------------------------------------------------------------------- EfficientNet

# (expand ratio, kernel, stride, in, out, layers): EfficientNet-B0 (Tan & Le 2019, Table 1)
_EFFICIENTNET_B0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
                    (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
                    (6, 3, 1, 192, 320, 1)]


def efficientnet_b0(num_classes: int = 1000, input_size=(3, 224, 224), dropout: float = 0.2,
                    stochastic_depth_prob: float = 0.2) -> Graph:
    """EfficientNet-B0, torchvision's definition and names (5,288,548
    parameters with 1000 classes): a 3x3/2 stem, 16 MBConv blocks with SE and
    SiLU in 7 stages, a 1x1 conv to 1280, pool, dropout, FC. Stochastic depth
    grows linearly from 0 to stochastic_depth_prob over the blocks."""
    nc, shape = _classes(num_classes), _input_shape(input_size)
    total = sum(cfg[5] for cfg in _EFFICIENTNET_B0)
    layers = [conv_norm_act(shape[0], 32, 3, 2, activation="silu")]
    block_id = 0
    for expand, k, stride, cin, cout, n in _EFFICIENTNET_B0:
        stage = []
        for i in range(n):
            sd = stochastic_depth_prob * block_id / total
            stage.append(mbconv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1,
                                expand, sd))
            block_id += 1
        layers.append(Sequential(*stage))
    layers.append(conv_norm_act(320, 1280, 1, activation="silu"))
    model = _classifier_head(Sequential(*layers), 1280, nc, dropout, "efficientnet_b0", shape)
    _init(model, conv="fan_out", linear="uniform")
    return _checked(model)


# -------------------------------------------------------------------------- DenseNet

def densenet121(num_classes: int = 1000, input_size=(3, 224, 224), growth_rate: int = 32,
                block_config=(6, 12, 24, 16), num_init_features: int = 64,
                bn_size: int = 4) -> Graph:
    """DenseNet-121 (Huang et al. 2017), torchvision's definition and names
    (7,978,856 parameters with 1000 classes): a 7x7/2 stem and max pool, four
    dense blocks (growth 32, bottleneck 4k) with halving transitions, BN,
    ReLU, pool, FC."""
    nc, shape = _classes(num_classes), _input_shape(input_size)
    f = OrderedDict(
        conv0=Conv2d(shape[0], num_init_features, 7, stride=2, padding=3, bias=False),
        norm0=BatchNorm2d(num_init_features), relu0=ReLU(),
        pool0=MaxPool2d(3, stride=2, padding=1))
    c = num_init_features
    for i, n in enumerate(block_config):
        f[f"denseblock{i + 1}"] = dense_block(n, c, bn_size, growth_rate)
        c += n * growth_rate
        if i != len(block_config) - 1:
            f[f"transition{i + 1}"] = transition(c, c // 2)
            c //= 2
    f["norm5"] = BatchNorm2d(c)
    model = Graph(OrderedDict(features=Sequential(f), avgpool=AdaptiveAvgPool2d(1),
                              flatten=Flatten(), classifier=Linear(c, nc)),
                  ["f = features(x)", "r = relu(f)", "p = avgpool(r)", "v = flatten(p)",
                   "out = classifier(v)"], name="densenet121", input_shape=shape)
    _init(model, conv="fan_in", linear="zero_bias")
    return _checked(model)


# --------------------------------------------------------------- ResNet variants

def resnext50_32x4d(num_classes: int = 1000, input_size=(3, 224, 224)) -> Module:
    """ResNeXt-50 32x4d (Xie et al. 2017): ResNet-50 whose 3x3 convolutions
    have 32 groups of 4 (x stage) channels (25,028,904 parameters)."""
    from .models import ResNet
    return ResNet("bottleneck", (3, 4, 6, 3), num_classes, input_size, groups=32,
                  width_per_group=4)


def wide_resnet50_2(num_classes: int = 1000, input_size=(3, 224, 224)) -> Module:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016, torchvision's variant):
    ResNet-50 with the bottleneck 3x3 width doubled (68,883,240 parameters)."""
    from .models import ResNet
    return ResNet("bottleneck", (3, 4, 6, 3), num_classes, input_size, width_per_group=128)


def se_resnet50(num_classes: int = 1000, input_size=(3, 224, 224),
                reduction: int = 16) -> Graph:
    """SE-ResNet-50 (Hu et al. 2018): ResNet-50 with a squeeze-and-excitation
    module in every bottleneck (28,088,024 parameters with 1000 classes, as
    the common reference implementations). torchvision's ResNet names plus
    `se.fc1` / `se.fc2` (timm's)."""
    nc, shape = _classes(num_classes), _input_shape(input_size)
    m = OrderedDict(conv1=Conv2d(shape[0], 64, 7, stride=2, padding=3, bias=False),
                    bn1=BatchNorm2d(64), maxpool=MaxPool2d(3, stride=2, padding=1))
    inplanes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        blocks = []
        for i in range(count):
            blocks.append(se_bottleneck(inplanes, planes, (1 if stage == 0 else 2) if i == 0
                                        else 1, reduction=reduction))
            inplanes = planes * 4
        m[f"layer{stage + 1}"] = Sequential(*blocks)
    m["avgpool"] = AdaptiveAvgPool2d(1)
    m["flatten"] = Flatten()
    m["fc"] = Linear(inplanes, nc)
    nodes = ["c1 = conv1(x)", "b1 = bn1(c1)", "r1 = relu(b1)", "p1 = maxpool(r1)",
             "l1 = layer1(p1)", "l2 = layer2(l1)", "l3 = layer3(l2)", "l4 = layer4(l3)",
             "p = avgpool(l4)", "v = flatten(p)", "out = fc(v)"]
    model = Graph(m, nodes, name="se_resnet50", input_shape=shape)
    _init(model, conv="fan_out", linear="default")
    return _checked(model)


# ---------------------------------------------------------------------------- NASNet
# NASNet-A Mobile and Large, as Keras defines them (their own file: python/convcore/nasnet.py)
from .nasnet import nasnet_a_large, nasnet_a_mobile  # noqa: E402
