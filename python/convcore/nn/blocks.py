"""The building blocks of the later case studies, as Sequentials and Graphs
whose child names are torchvision's, so its state dicts load:

    conv_norm_act          Conv2dNormActivation: conv, BN, activation (0, 1, 2)
    basic_conv2d           GoogLeNet's BasicConv2d: conv, bn (eps 1e-3), ReLU
    inception              Inception v1 module: four branches joined by concat
    depthwise_separable    MobileNet v1: 3x3 depthwise + BN + ReLU, 1x1 + BN + ReLU
    inverted_residual      MobileNet v2: 1x1 expand, 3x3 depthwise, 1x1 linear, add
    squeeze_excitation     SENet: global pool, 1x1 reduce, act, 1x1 expand, sigmoid, mul
    mbconv                 EfficientNet: inverted residual with SE and stochastic depth
    dense_layer / dense_block / transition    DenseNet-BC
    se_bottleneck          SE-ResNet: torchvision's Bottleneck + se after bn3

Each builder returns a plain Sequential or Graph (no new module types), so
saved files hold only the graph lines and the layers, which the C++ runner
reads as well.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from .activation import ReLU6, Sigmoid, SiLU, StochasticDepth
from .graph import Graph
from .layers import AdaptiveAvgPool2d, AvgPool2d, Conv2d, MaxPool2d, ReLU
from .module import Module, Sequential
from .norm import BatchNorm2d

_ACTIVATIONS = {"relu": ReLU, "relu6": ReLU6, "silu": SiLU, "sigmoid": Sigmoid}


def _activation(name: Optional[str]) -> Optional[Module]:
    if name is None:
        return None
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or None, got {name!r}")
    return _ACTIVATIONS[name]()


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's channel rounding (from the TF reference): the nearest
    multiple of divisor, never more than 10% below v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                  groups: int = 1, activation: Optional[str] = "relu",
                  eps: float = 1e-5) -> Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias, 'same'-style padding
    (k - 1) // 2), BatchNorm2d and the activation, children 0, 1, 2."""
    layers = [Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=(kernel_size - 1) // 2, groups=groups, bias=False),
              BatchNorm2d(out_channels, eps=eps)]
    act = _activation(activation)
    if act is not None:
        layers.append(act)
    return Sequential(*layers)


def basic_conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> Sequential:
    """GoogLeNet's BasicConv2d: conv (no bias), bn (eps 0.001), ReLU."""
    return Sequential(OrderedDict(
        conv=Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                    bias=False),
        bn=BatchNorm2d(out_channels, eps=0.001),
        relu=ReLU()))


def inception(in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
              ch5x5: int, pool_proj: int) -> Graph:
    """Inception v1 module (Szegedy et al. 2014), torchvision's layout: 1x1;
    1x1 -> 3x3; 1x1 -> "5x5"; 3x3 max pool -> 1x1; concatenated along
    channels. As torchvision (and so its weights), the "5x5" branch uses a
    3x3 convolution."""
    return Graph(OrderedDict(
        branch1=basic_conv2d(in_channels, ch1x1, 1),
        branch2=Sequential(basic_conv2d(in_channels, ch3x3red, 1),
                           basic_conv2d(ch3x3red, ch3x3, 3, padding=1)),
        branch3=Sequential(basic_conv2d(in_channels, ch5x5red, 1),
                           basic_conv2d(ch5x5red, ch5x5, 3, padding=1)),
        branch4=Sequential(MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                           basic_conv2d(in_channels, pool_proj, 1)),
    ), ["b1 = branch1(x)", "b2 = branch2(x)", "b3 = branch3(x)", "b4 = branch4(x)",
        "out = concat(b1, b2, b3, b4)"])


def depthwise_separable(in_channels: int, out_channels: int, stride: int = 1,
                        activation: str = "relu") -> Sequential:
    """MobileNet v1's block: a 3x3 depthwise convolution (one filter per
    channel) and a 1x1 pointwise one, each with BN and the activation:
    9 C + C C' weights instead of 9 C C'."""
    return Sequential(conv_norm_act(in_channels, in_channels, 3, stride, groups=in_channels,
                                    activation=activation),
                      conv_norm_act(in_channels, out_channels, 1, activation=activation))


def inverted_residual(inp: int, oup: int, stride: int, expand_ratio: int) -> Graph:
    """MobileNet v2's block (Sandler et al. 2018), torchvision's names: conv =
    [1x1 expand + BN + ReLU6 (if expand_ratio > 1), 3x3 depthwise + BN +
    ReLU6, 1x1 project, BN]; the input is added when the shape is kept."""
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    hidden = int(round(inp * expand_ratio))
    layers = []
    if expand_ratio != 1:
        layers.append(conv_norm_act(inp, hidden, 1, activation="relu6"))
    layers += [conv_norm_act(hidden, hidden, 3, stride, groups=hidden, activation="relu6"),
               Conv2d(hidden, oup, 1, bias=False), BatchNorm2d(oup)]
    nodes = ["y = conv(x)"]
    if stride == 1 and inp == oup:
        nodes.append("out = add(x, y)")
    return Graph(OrderedDict(conv=Sequential(*layers)), nodes)


def squeeze_excitation(input_channels: int, squeeze_channels: int, activation: str = "relu",
                       scale_activation: str = "sigmoid") -> Graph:
    """Squeeze-and-excitation (Hu et al. 2018), torchvision's
    SqueezeExcitation: s = sigmoid(fc2(act(fc1(avgpool(x))))), out = x * s,
    fc1 and fc2 1x1 convolutions with bias."""
    return Graph(OrderedDict(
        avgpool=AdaptiveAvgPool2d(1),
        fc1=Conv2d(input_channels, squeeze_channels, 1),
        activation=_activation(activation),
        fc2=Conv2d(squeeze_channels, input_channels, 1),
        scale_activation=_activation(scale_activation),
    ), ["p = avgpool(x)", "s1 = fc1(p)", "s2 = activation(s1)", "s3 = fc2(s2)",
        "s = scale_activation(s3)", "out = mul(x, s)"])


def mbconv(input_channels: int, out_channels: int, kernel: int, stride: int,
           expand_ratio: float, stochastic_depth_prob: float) -> Graph:
    """EfficientNet's MBConv (torchvision's names): block = [1x1 expand + BN +
    SiLU (if expand_ratio > 1), kxk depthwise + BN + SiLU, SE (squeeze to
    input_channels / 4, SiLU), 1x1 project + BN]; with the shape kept, the
    block's output goes through stochastic depth and adds to the input."""
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    expanded = _make_divisible(input_channels * expand_ratio, 8)
    layers = []
    if expanded != input_channels:
        layers.append(conv_norm_act(input_channels, expanded, 1, activation="silu"))
    layers.append(conv_norm_act(expanded, expanded, kernel, stride, groups=expanded,
                                activation="silu"))
    layers.append(squeeze_excitation(expanded, max(1, input_channels // 4), "silu"))
    layers.append(conv_norm_act(expanded, out_channels, 1, activation=None))
    modules = OrderedDict(block=Sequential(*layers))
    nodes = ["y = block(x)"]
    if stride == 1 and input_channels == out_channels:
        modules["stochastic_depth"] = StochasticDepth(stochastic_depth_prob, "row")
        nodes += ["d = stochastic_depth(y)", "out = add(d, x)"]
    return Graph(modules, nodes)


def dense_layer(num_input_features: int, growth_rate: int, bn_size: int) -> Sequential:
    """DenseNet-BC's layer: BN-ReLU-1x1 conv (bn_size * k) - BN-ReLU-3x3 conv (k)."""
    return Sequential(OrderedDict(
        norm1=BatchNorm2d(num_input_features), relu1=ReLU(),
        conv1=Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False),
        norm2=BatchNorm2d(bn_size * growth_rate), relu2=ReLU(),
        conv2=Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)))


def dense_block(num_layers: int, num_input_features: int, bn_size: int,
                growth_rate: int) -> Graph:
    """A dense block (Huang et al. 2017): each layer takes the concatenation
    of the block's input and every earlier layer's output, and the block
    returns them all: num_input_features + num_layers * growth_rate channels."""
    modules, nodes, prev = OrderedDict(), [], "x"
    for i in range(1, num_layers + 1):
        modules[f"denselayer{i}"] = dense_layer(num_input_features + (i - 1) * growth_rate,
                                                growth_rate, bn_size)
        nodes += [f"f{i} = denselayer{i}({prev})", f"c{i} = concat({prev}, f{i})"]
        prev = f"c{i}"
    return Graph(modules, nodes)


def transition(num_input_features: int, num_output_features: int) -> Sequential:
    """DenseNet's transition: BN, ReLU, 1x1 conv, 2x2 average pool."""
    return Sequential(OrderedDict(
        norm=BatchNorm2d(num_input_features), relu=ReLU(),
        conv=Conv2d(num_input_features, num_output_features, 1, bias=False),
        pool=AvgPool2d(2, stride=2)))


def se_bottleneck(inplanes: int, planes: int, stride: int = 1, groups: int = 1,
                  base_width: int = 64, reduction: int = 16) -> Graph:
    """SE-ResNet's bottleneck: torchvision's Bottleneck (1x1, 3x3 with the
    stride, 1x1 x4, projection shortcut when the shape changes) with a
    squeeze-and-excitation module (fc1/fc2 1x1 convs with bias, reduction 16,
    timm's `se` names) rescaling the body's output before the addition."""
    width = int(planes * (base_width / 64.0)) * groups
    out = planes * 4
    modules = OrderedDict(
        conv1=Conv2d(inplanes, width, 1, bias=False), bn1=BatchNorm2d(width),
        conv2=Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False),
        bn2=BatchNorm2d(width),
        conv3=Conv2d(width, out, 1, bias=False), bn3=BatchNorm2d(out),
        se=squeeze_excitation(out, out // reduction))
    nodes = ["a1 = conv1(x)", "a2 = bn1(a1)", "a3 = relu(a2)", "a4 = conv2(a3)", "a5 = bn2(a4)",
             "a6 = relu(a5)", "a7 = conv3(a6)", "a8 = bn3(a7)", "a9 = se(a8)"]
    shortcut = "x"
    if stride != 1 or inplanes != out:
        modules["downsample"] = Sequential(Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                           BatchNorm2d(out))
        nodes.append("sc = downsample(x)")
        shortcut = "sc"
    nodes += [f"s = add(a9, {shortcut})", "out = relu(s)"]
    return Graph(modules, nodes)
