"""DenseNet-121 (Huang et al. 2017), torchvision's definition and names."""
from __future__ import annotations

from collections import OrderedDict

from ..nn.blocks import dense_block, transition
from ..nn.graph import Graph
from ..nn.layers import AdaptiveAvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU
from ..nn.module import Sequential
from ..nn.norm import BatchNorm2d
from ._common import checked, init_like_reference, input_shape_of, num_classes_of

__all__ = ["densenet121"]


def densenet121(num_classes: int = 1000, input_size=(3, 224, 224), growth_rate: int = 32,
                block_config=(6, 12, 24, 16), num_init_features: int = 64,
                bn_size: int = 4) -> Graph:
    """DenseNet-121 (Huang et al. 2017), torchvision's definition and names
    (7,978,856 parameters with 1000 classes): a 7x7/2 stem and max pool, four
    dense blocks (growth 32, bottleneck 4k) with halving transitions, BN,
    ReLU, pool, FC."""
    nc, shape = num_classes_of(num_classes), input_shape_of(input_size)
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
    init_like_reference(model, conv="fan_in", linear="zero_bias")
    return checked(model)
