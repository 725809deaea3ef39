"""NASNet-A (Zoph et al. 2018) as Keras' `keras.applications.NASNetMobile`
and `NASNetLarge` define it: 5,289,978 and 88,753,150 trainable parameters
with 1000 classes.

The model is one Graph. A NASNet cell takes two inputs (the previous cell's
output and the one before), which a Graph child cannot, so each cell's
layers are children of the top-level Graph named `<cell>_<part>`
(`cell_0_comb_iter_0_left.separable_1.depthwise.weight`), with the cell's
adds and concat as graph joins. Cells are named after Keras' block ids:
`cell_stem_1`, `cell_stem_2`, `cell_0`, ..., `cell_reduce_4`, ...; the parts
after PyTorch ports of NASNet (`conv_1x1`, `comb_iter_<i>_left/right`,
`path_1`, `path_2`, `final_path_bn`, `conv_prev_1x1`, `separable_1`,
`bn_sep_1`).

Keras pads stride-2 layers TensorFlow's way: with an even input size, one
row and column less at the top and left than at the bottom and right
(`correct_pad`), and the reduction cells max-pool over explicit zero
padding. The graph format's layers pad symmetrically (max pooling with
-inf), so:

* a stride-2 layer on an even size runs with stride 1 and symmetric
  padding, then `ShiftedSubsample` keeps the odd rows and columns, which
  are exactly the positions Keras' asymmetric window centres on;
* zero padding before max pooling is `ZeroPad`;
* the factorized reduction's pad-and-crop path is `ShiftedSubsample` too
  (row 2i+1 of its input, zero past the edge).

Both are fixed, parameter-free layers saved as depthwise convolutions with
one-hot kernels (buffers `weight`), so files need no new op; eagerly they
copy slices, which the compiled one-hot convolution reproduces exactly.

Batch norm has Keras' eps 1e-3 and momentum 0.9997 (PyTorch's 0.0003);
BN moving statistics are buffers, hence the counts above are Keras'
trainable ones. `ScheduledDropPath` adds the TF-slim training's drop path
(Keras has none); it is the identity in eval mode.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Tuple

import numpy as np

from ..nn.activation import StochasticDepth
from ..nn.graph import Graph
from ..nn.layers import AdaptiveAvgPool2d, AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU
from ..nn.module import Module
from ..nn.norm import BatchNorm2d
from ._common import checked, init_like_reference, input_shape_of, num_classes_of

__all__ = ["nasnet_a_mobile", "nasnet_a_large", "ShiftedSubsample", "ZeroPad",
           "ScheduledDropPath", "set_drop_path_progress"]


# ----------------------------------------------------------------- fixed layers

class _OneHotDepthwise(Module):
    """A fixed resampling of each channel, saved as a depthwise Conv2d whose
    kernel is one-hot (a buffer, not a parameter)."""

    kernel, stride, padding, tap = 1, 1, 0, (0, 0)

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)
        if self.channels < 1:
            raise ValueError(f"channels must be positive, got {channels!r}")
        w = np.zeros((self.channels, 1, self.kernel, self.kernel), dtype=np.float32)
        w[:, :, self.tap[0], self.tap[1]] = 1.0
        self.register_buffer("weight", w)

    def _check(self, x):
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__}({self.channels}) expects input of shape "
                             f"(N, {self.channels}, H, W), got {tuple(x.shape)}")

    def lower(self, g, x, prefix):
        return g.node("Conv2d", [x], name=prefix, attrs=dict(
            in_channels=self.channels, out_channels=self.channels, kernel_size=self.kernel,
            stride=self.stride, padding=self.padding, groups=self.channels, bias=False))

    def config(self):
        return dict(channels=self.channels)

    def extra_repr(self):
        return str(self.channels)


class ShiftedSubsample(_OneHotDepthwise):
    """y[:, :, i, j] = x[:, :, 2i+1, 2j+1], zero where that is past the edge;
    output ceil(H/2) x ceil(W/2). Keras' factorized reduction (pad bottom
    and right, crop top and left, 1x1 pooling with stride 2) and the odd
    positions of a stride-1 result (TensorFlow's 'same' stride 2 on an even
    size). Saved as a 3x3 depthwise conv, stride 2, padding 1, one at (2, 2)."""

    kernel, stride, padding, tap = 3, 2, 1, (2, 2)

    def forward(self, x):
        self._check(x)
        self._shape = x.shape
        n, c, h, w = x.shape
        out = np.zeros((n, c, (h + 1) // 2, (w + 1) // 2), dtype=x.dtype)
        src = x[:, :, 1::2, 1::2]
        out[:, :, :src.shape[2], :src.shape[3]] = src
        return out

    def backward(self, grad_output):
        gx = np.zeros(self._shape, dtype=grad_output.dtype)
        h2, w2 = gx[:, :, 1::2, 1::2].shape[2:]
        gx[:, :, 1::2, 1::2] = grad_output[:, :, :h2, :w2]
        return gx

    def output_shape(self, input_shape):
        c, h, w = (int(d) for d in input_shape)
        return (c, (h + 1) // 2, (w + 1) // 2)


class ZeroPad(_OneHotDepthwise):
    """One row and column of zeros on every side (Keras' ZeroPadding2D before
    the reduction cells' max pooling, which PyTorch-style pooling would pad
    with -inf). Saved as a 1x1 depthwise conv with padding 1 and weight 1."""

    kernel, stride, padding, tap = 1, 1, 1, (0, 0)

    def forward(self, x):
        self._check(x)
        return np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))

    def backward(self, grad_output):
        return np.ascontiguousarray(grad_output[:, :, 1:-1, 1:-1])

    def output_shape(self, input_shape):
        c, h, w = (int(d) for d in input_shape)
        return (c, h + 2, w + 2)


class ScheduledDropPath(StochasticDepth):
    """NASNet's ScheduledDropPath (TF-slim's drop_path, version v3): while
    training, drops a cell branch per sample with probability
    drop_prob * cell_ratio * min(1, progress) and scales survivors by the
    inverse keep probability; cell_ratio = (cell index + 1) / cells, progress
    = training step / total steps (set with `set_drop_path_progress`). The
    identity in eval mode, so it is saved as an Identity node."""

    def __init__(self, drop_prob: float = 0.0, cell_ratio: float = 1.0, progress: float = 0.0):
        super().__init__(0.0)
        if not 0.0 <= float(drop_prob) <= 1.0 or not 0.0 <= float(cell_ratio) <= 1.0:
            raise ValueError(f"drop_prob and cell_ratio must lie in [0, 1], got {drop_prob}, "
                             f"{cell_ratio}")
        self.drop_prob, self.cell_ratio = float(drop_prob), float(cell_ratio)
        self.progress = float(progress)

    def forward(self, x):
        self.p = self.drop_prob * self.cell_ratio * min(1.0, max(0.0, self.progress))
        return super().forward(x)

    def lower(self, g, x, prefix):
        return g.node("Identity", [x], name=prefix, attrs={})

    def config(self):
        return dict(drop_prob=self.drop_prob, cell_ratio=self.cell_ratio, progress=self.progress)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}, cell_ratio={self.cell_ratio:.4g}"


def set_drop_path_progress(model: Module, progress: float) -> None:
    """Sets the fraction of training done (step / total steps, clipped to
    [0, 1]) on every ScheduledDropPath of model: drop probabilities grow
    linearly with it."""
    for m in model.modules():
        if isinstance(m, ScheduledDropPath):
            m.progress = float(progress)


# ------------------------------------------------------------------- building

def _bn(c: int) -> BatchNorm2d:
    return BatchNorm2d(c, eps=1e-3, momentum=1 - 0.9997)  # Keras' momentum 0.9997


def _stride2_even(h: int, w: int) -> bool:
    """Whether a stride-2 'same' layer needs Keras' asymmetric padding."""
    if h % 2 != w % 2:
        raise ValueError(f"this NASNet needs feature maps whose height and width are both odd "
                         f"or both even at every reduction, got {h}x{w}")
    return h % 2 == 0


def _separable(cin: int, cout: int, k: int, stride: int, size: Tuple[int, int]) -> Graph:
    """Keras' SeparableConv2D without bias: depthwise k x k, then pointwise."""
    m = OrderedDict()
    if stride == 2 and _stride2_even(*size):
        m["depthwise"] = Conv2d(cin, cin, k, stride=1, padding=k // 2, groups=cin, bias=False)
        m["subsample"] = ShiftedSubsample(cin)
    else:
        m["depthwise"] = Conv2d(cin, cin, k, stride=stride, padding=k // 2, groups=cin,
                                bias=False)
    m["pointwise"] = Conv2d(cin, cout, 1, bias=False)
    return Graph.chain(m)


def _half(size):
    return ((size[0] + 1) // 2, (size[1] + 1) // 2)


class _Net:
    """Collects the top-level graph's children and nodes, cell by cell."""

    def __init__(self, drop_prob: float, cells: int):
        self.modules, self.nodes = OrderedDict(), []
        self.drop_prob, self.cells, self.cell_index = drop_prob, cells, 0

    def call(self, name: str, module: Module, x: str) -> str:
        self.modules[name] = module
        self.nodes.append(f"{name}_y = {name}({x})")
        return f"{name}_y"

    def joins(self, op: str, out: str, *inputs: str) -> str:
        self.nodes.append(f"{out} = {op}({', '.join(inputs)})")
        return out

    def drop(self) -> ScheduledDropPath:
        return ScheduledDropPath(self.drop_prob, (self.cell_index + 1) / self.cells)

    def branch(self, name, x, *layers) -> str:
        """A cell branch (an op of the paper's cell) followed by drop path."""
        m = OrderedDict(layers)
        m["drop_path"] = self.drop()
        return self.call(name, Graph.chain(m), x)

    def sep_branch(self, name, x, cin, f, k, stride, size) -> str:
        """Keras' _separable_conv_block: ReLU, sep conv, BN, ReLU, sep conv, BN."""
        return self.branch(name, x, ("relu1", ReLU()),
                           ("separable_1", _separable(cin, f, k, stride, size)),
                           ("bn_sep_1", _bn(f)), ("relu2", ReLU()),
                           ("separable_2", _separable(f, f, k, 1, size)), ("bn_sep_2", _bn(f)))

    def pool_branch(self, name, x, kind, c, stride, size) -> str:
        """3x3 pooling. stride 1: Keras' 'same' average pooling (padding left
        out of the mean). stride 2: over Keras' zero padding (correct_pad)."""
        if stride == 1:
            return self.branch(name, x, ("avgpool", AvgPool2d(3, 1, 1, count_include_pad=False)))
        even = _stride2_even(*size)
        layers = []
        if kind == "max":
            layers += [("pad", ZeroPad(c)), ("maxpool", MaxPool2d(3, stride=1 if even else 2))]
        else:  # zeros counted in the mean, as Keras pools over padded zeros
            layers += [("avgpool", AvgPool2d(3, 1 if even else 2, 1, count_include_pad=True))]
        if even:
            layers.append(("subsample", ShiftedSubsample(c)))
        return self.branch(name, x, *layers)

    def adjust(self, cell, p, pc, psize, size, f):
        """Keras' _adjust_block: p brought to x's size and f channels (p None:
        the first cell, which takes its own input x unchanged, as Keras)."""
        if p is None:
            return None, None
        if psize != size:  # factorized reduction: two 1x1 convs on shifted grids
            r = self.joins("relu", f"{cell}_p_relu", p)
            a = self.call(f"{cell}_path_1", Graph.chain(OrderedDict(
                avgpool=AvgPool2d(1, 2), conv=Conv2d(pc, f // 2, 1, bias=False))), r)
            b = self.call(f"{cell}_path_2", Graph.chain(OrderedDict(
                subsample=ShiftedSubsample(pc), conv=Conv2d(pc, f // 2, 1, bias=False))), r)
            cat = self.joins("concat", f"{cell}_p_cat", a, b)
            return self.call(f"{cell}_final_path_bn", _bn(f // 2 * 2), cat), f // 2 * 2
        if pc != f:
            r = self.joins("relu", f"{cell}_p_relu", p)
            return self.call(f"{cell}_conv_prev_1x1", Graph.chain(OrderedDict(
                conv=Conv2d(pc, f, 1, bias=False), bn=_bn(f))), r), f
        return p, pc

    def stem_1x1(self, cell, x, c, f):
        r = self.joins("relu", f"{cell}_x_relu", x)
        return self.call(f"{cell}_conv_1x1", Graph.chain(OrderedDict(
            conv=Conv2d(c, f, 1, bias=False), bn=_bn(f))), r)

    def normal_cell(self, cell, x, c, p, pc, size, psize, f):
        p, pc = self.adjust(cell, p, pc, psize, size, f)
        h = self.stem_1x1(cell, x, c, f)
        s = self.sep_branch
        a = s(f"{cell}_comb_iter_0_left", h, f, f, 5, 1, size)
        b = s(f"{cell}_comb_iter_0_right", p, pc, f, 3, 1, size)
        x1 = self.joins("add", f"{cell}_comb_iter_0", a, b)
        a = s(f"{cell}_comb_iter_1_left", p, pc, f, 5, 1, size)
        b = s(f"{cell}_comb_iter_1_right", p, pc, f, 3, 1, size)
        x2 = self.joins("add", f"{cell}_comb_iter_1", a, b)
        a = self.pool_branch(f"{cell}_comb_iter_2_left", h, "avg", f, 1, size)
        x3 = self.joins("add", f"{cell}_comb_iter_2", a, p)
        a = self.pool_branch(f"{cell}_comb_iter_3_left", p, "avg", pc, 1, size)
        b = self.pool_branch(f"{cell}_comb_iter_3_right", p, "avg", pc, 1, size)
        x4 = self.joins("add", f"{cell}_comb_iter_3", a, b)
        a = s(f"{cell}_comb_iter_4_left", h, f, f, 3, 1, size)
        x5 = self.joins("add", f"{cell}_comb_iter_4", a, h)
        self.cell_index += 1
        return self.joins("concat", f"{cell}_out", p, x1, x2, x3, x4, x5), pc + 5 * f

    def reduction_cell(self, cell, x, c, p, pc, size, psize, f):
        p, pc = self.adjust(cell, p, pc, psize, size, f)
        if p is None:
            p, pc = x, c
        h = self.stem_1x1(cell, x, c, f)
        s, pool = self.sep_branch, self.pool_branch
        a = s(f"{cell}_comb_iter_0_left", h, f, f, 5, 2, size)
        b = s(f"{cell}_comb_iter_0_right", p, pc, f, 7, 2, size)
        x1 = self.joins("add", f"{cell}_comb_iter_0", a, b)
        a = pool(f"{cell}_comb_iter_1_left", h, "max", f, 2, size)
        b = s(f"{cell}_comb_iter_1_right", p, pc, f, 7, 2, size)
        x2 = self.joins("add", f"{cell}_comb_iter_1", a, b)
        a = pool(f"{cell}_comb_iter_2_left", h, "avg", f, 2, size)
        b = s(f"{cell}_comb_iter_2_right", p, pc, f, 5, 2, size)
        x3 = self.joins("add", f"{cell}_comb_iter_2", a, b)
        a = pool(f"{cell}_comb_iter_3_left", x1, "avg", f, 1, _half(size))
        x4 = self.joins("add", f"{cell}_comb_iter_3", a, x2)
        a = s(f"{cell}_comb_iter_4_left", x1, f, f, 3, 1, _half(size))
        b = pool(f"{cell}_comb_iter_4_right", h, "max", f, 2, size)
        x5 = self.joins("add", f"{cell}_comb_iter_4", a, b)
        self.cell_index += 1
        return self.joins("concat", f"{cell}_out", x2, x3, x4, x5), 4 * f


def _nasnet(name, num_classes, input_size, penultimate_filters, num_blocks, stem_filters,
            skip_reduction, drop_path_prob, filter_multiplier=2) -> Graph:
    """Keras' NASNet(): a 3x3/2 stem conv, two reduction cells, then
    num_blocks normal cells, a reduction cell, num_blocks normal cells, a
    reduction cell, num_blocks normal cells; ReLU, global pool, FC."""
    nc, shape = num_classes_of(num_classes), input_shape_of(input_size)
    if shape[1] < 32 or shape[2] < 32:
        raise ValueError(f"NASNet needs an input of at least 32x32 (as Keras), got {shape}")
    filters = penultimate_filters // 24
    fm = filter_multiplier
    net = _Net(float(drop_path_prob), 3 * num_blocks + 4)
    x = net.call("conv0", Conv2d(shape[0], stem_filters, 3, stride=2, bias=False), "x")
    x = net.call("conv0_bn", _bn(stem_filters), x)
    c, size = stem_filters, ((shape[1] - 3) // 2 + 1, (shape[2] - 3) // 2 + 1)
    # p is the input of the cell before (None: the cell's own input, unadjusted)
    x, c = net.reduction_cell("cell_stem_1", x, c, None, None, size, None, filters // fm ** 2)
    p, pc, psize, size = "conv0_bn_y", stem_filters, size, _half(size)
    prev = ("cell_stem_1_out", c, size)
    x, c = net.reduction_cell("cell_stem_2", x, c, p, pc, size, psize, filters // fm)
    p, pc, psize = prev
    size = _half(size)
    for stage in range(3):
        f = filters * fm ** stage
        for i in range(num_blocks):
            block = stage * num_blocks + i + (stage > 0)  # Keras' block ids
            prev = (x, c, size)
            x, c = net.normal_cell(f"cell_{block}", x, c, p, pc, size, psize, f)
            p, pc, psize = prev
        if stage == 2:
            break
        reduce_in = (x, c, size)
        x, c = net.reduction_cell(f"cell_reduce_{(stage + 1) * num_blocks}", x, c, p, pc, size,
                                  psize, f * fm)
        size = _half(size)
        if not skip_reduction:  # Keras: p0, the reduction's input; else the cell before's
            p, pc, psize = reduce_in
    r = net.joins("relu", "final_relu", x)
    v = net.call("avgpool", AdaptiveAvgPool2d(1), r)
    v = net.call("flatten", Flatten(), v)
    net.call("last_linear", Linear(c, nc), v)
    model = Graph(net.modules, net.nodes, name=name, input_shape=shape)
    init_like_reference(model, conv="fan_in", linear="default")  # Keras: he_normal convs
    return checked(model)


def nasnet_a_mobile(num_classes: int = 1000, input_size=(3, 224, 224),
                    drop_path_prob: float = 0.0) -> Graph:
    """NASNet-A Mobile (4 @ 1056), Keras' NASNetMobile: 5,289,978 trainable
    parameters with 1000 classes. drop_path_prob is the final ScheduledDropPath
    probability of the last cell (TF-slim's mobile setting uses none)."""
    return _nasnet("nasnet_a_mobile", num_classes, input_size, 1056, 4, 32, False,
                   drop_path_prob)


def nasnet_a_large(num_classes: int = 1000, input_size=(3, 331, 331),
                   drop_path_prob: float = 0.3) -> Graph:
    """NASNet-A Large (6 @ 4032), Keras' NASNetLarge: 88,753,150 trainable
    parameters with 1000 classes; TF-slim's drop path keep probability 0.7."""
    return _nasnet("nasnet_a_large", num_classes, input_size, 4032, 6, 96, True,
                   drop_path_prob)
