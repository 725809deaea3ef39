"""The mobile nets: MobileNet v1 (depthwise-separable blocks), MobileNet v2
(inverted residuals) and EfficientNet-B0 (MBConv: inverted residuals with
squeeze-and-excitation and SiLU), each a features Sequential and a
pooled classifier head, with torchvision's names.
"""
from __future__ import annotations

from collections import OrderedDict

from ..nn.blocks import (_make_divisible, conv_norm_act, depthwise_separable,
                         inverted_residual, mbconv)
from ..nn.graph import Graph
from ..nn.layers import AdaptiveAvgPool2d, Dropout, Flatten, Linear
from ..nn.module import Sequential
from ._common import checked, init_like_reference, input_shape_of, num_classes_of

__all__ = ["mobilenet_v1", "mobilenet_v2", "efficientnet_b0"]


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
    nc, shape = num_classes_of(num_classes), input_shape_of(input_size)
    layers, c = [conv_norm_act(shape[0], 32, 3, 2)], 32
    for out, stride in _MOBILENET_V1:
        layers.append(depthwise_separable(c, out, stride))
        c = out
    model = _classifier_head(Sequential(*layers), c, nc, dropout, "mobilenet_v1", shape)
    init_like_reference(model, conv="fan_out", linear="normal")
    return checked(model)


# (expansion t, channels c, repeats n, stride s): the paper's Table 2
_MOBILENET_V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(num_classes: int = 1000, input_size=(3, 224, 224), width_mult: float = 1.0,
                 dropout: float = 0.2) -> Graph:
    """MobileNet v2 (Sandler et al. 2018), torchvision's definition and names
    (3,504,872 parameters with 1000 classes)."""
    nc, shape = num_classes_of(num_classes), input_shape_of(input_size)
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
    init_like_reference(model, conv="fan_out", linear="normal")
    return checked(model)


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
    nc, shape = num_classes_of(num_classes), input_shape_of(input_size)
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
    init_like_reference(model, conv="fan_out", linear="uniform")
    return checked(model)
