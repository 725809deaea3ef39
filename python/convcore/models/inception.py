"""GoogLeNet (Inception v1) as torchvision defines it, and `Normalize`, the
fixed per-channel layer of its transform_input.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..nn.blocks import basic_conv2d, inception
from ..nn.graph import Graph
from ..nn.layers import AdaptiveAvgPool2d, Dropout, Flatten, Linear, MaxPool2d
from ..nn.module import Module
from ..nn.norm import channel_sample_shape
from ._common import checked, init_like_reference, input_shape_of, num_classes_of

__all__ = ["googlenet", "Normalize", "IMAGENET_MEAN", "IMAGENET_STD"]


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
    nc, shape = num_classes_of(num_classes), input_shape_of(input_size)
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
    init_like_reference(model, conv="trunc_normal", linear="trunc_normal")
    return checked(model)
