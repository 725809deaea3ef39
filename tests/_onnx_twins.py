"""Plain torch.nn twins of the torchvision classification families that
tests/_tv_twins.py does not hold: ResNet-18, VGG-11, AlexNet, MobileNet v3
(small and large), SqueezeNet 1.1, MNASNet 0.5 and RegNet X/Y 400MF, written
from torchvision's definitions with the same module names (torchvision's
PyPI build does not load with the CPU build of PyTorch here). VGG and AlexNet
take `width`, a divisor of their channel counts, so that the default tests
can run them at 224x224 (their adaptive pooling needs that size) cheaply;
width=1 is torchvision's. Imported only when torch is."""
import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from _tv_twins import TWINS as _TV_TWINS
from _tv_twins import make_divisible


class ConvNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation (children 0, 1, 2)."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, norm=nn.BatchNorm2d,
                 act=nn.ReLU, dilation=1):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 * dilation, dilation=dilation,
                            groups=groups, bias=False), norm(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation."""

    def __init__(self, input_channels, squeeze_channels, activation=nn.ReLU,
                 scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


# ------------------------------------------------------------------ ResNet-18

class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, planes, stride),
                                                         BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------- VGG, AlexNet

class VGG11(nn.Module):
    def __init__(self, num_classes=1000, width=1):
        super().__init__()
        layers, cin = [], 3
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v // width, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v // width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = 4096 // width
        self.classifier = nn.Sequential(
            nn.Linear(cin * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class AlexNet(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.5, width=1):
        super().__init__()
        c = [64 // width, 192 // width, 384 // width, 256 // width]
        self.features = nn.Sequential(
            nn.Conv2d(3, c[0], 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[3], 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        hidden = 4096 // width
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c[3] * 36, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# -------------------------------------------------------------- MobileNet v3

class InvertedResidualV3(nn.Module):
    def __init__(self, cin, k, expanded, cout, use_se, act, stride, norm):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, norm=norm, act=act))
        layers.append(ConvNormActivation(expanded, expanded, k, stride, groups=expanded,
                                         norm=norm, act=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8),
                                            scale_activation=nn.Hardsigmoid))
        layers.append(ConvNormActivation(expanded, cout, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        return result + x if self.use_res_connect else result


_V3_LARGE = [(16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2),
             (24, 3, 72, 24, False, "RE", 1), (24, 5, 72, 40, True, "RE", 2),
             (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
             (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1),
             (80, 3, 184, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
             (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
             (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1),
             (160, 5, 960, 160, True, "HS", 1)]
_V3_SMALL = [(16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2),
             (24, 3, 88, 24, False, "RE", 1), (24, 5, 96, 40, True, "HS", 2),
             (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
             (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1),
             (48, 5, 288, 96, True, "HS", 2), (96, 5, 576, 96, True, "HS", 1),
             (96, 5, 576, 96, True, "HS", 1)]


class MobileNetV3(nn.Module):
    def __init__(self, setting, last_channel, num_classes=1000, dropout=0.2):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers = [ConvNormActivation(3, setting[0][0], 3, 2, norm=norm, act=nn.Hardswish)]
        for cin, k, expanded, cout, use_se, act, stride in setting:
            layers.append(InvertedResidualV3(cin, k, expanded, cout, use_se,
                                             nn.Hardswish if act == "HS" else nn.ReLU, stride,
                                             norm))
        last_in = setting[-1][3]
        layers.append(ConvNormActivation(last_in, 6 * last_in, 1, norm=norm, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel), nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------- SqueezeNet

class Fire(nn.Module):
    def __init__(self, inplanes, squeeze, e1, e3):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True), Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
            nn.MaxPool2d(3, 2, ceil_mode=True), Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256))
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Conv2d(512, num_classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# -------------------------------------------------------------------- MNASNet

_BN_MOMENTUM = 1 - 0.9997


class _InvertedResidualMnas(nn.Module):
    def __init__(self, cin, cout, k, stride, expansion):
        super().__init__()
        mid = cin * expansion
        self.apply_residual = cin == cout and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, k, padding=k // 2, stride=stride, groups=mid, bias=False),
            nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM))

    def forward(self, x):
        return self.layers(x) + x if self.apply_residual else self.layers(x)


def _stack(cin, cout, k, stride, expansion, repeats):
    return nn.Sequential(_InvertedResidualMnas(cin, cout, k, stride, expansion),
                         *[_InvertedResidualMnas(cout, cout, k, 1, expansion)
                           for _ in range(repeats - 1)])


def _round_to_multiple_of(val, divisor, round_up_bias=0.9):
    new_val = max(divisor, int(val + divisor / 2) // divisor * divisor)
    return new_val if new_val >= round_up_bias * val else new_val + divisor


class MNASNet(nn.Module):
    def __init__(self, alpha=0.5, num_classes=1000, dropout=0.2):
        super().__init__()
        d = [_round_to_multiple_of(v * alpha, 8) for v in (32, 16, 24, 40, 80, 96, 192, 320)]
        bn = partial(nn.BatchNorm2d, momentum=_BN_MOMENTUM)
        self.layers = nn.Sequential(
            nn.Conv2d(3, d[0], 3, padding=1, stride=2, bias=False), bn(d[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(d[0], d[0], 3, padding=1, stride=1, groups=d[0], bias=False), bn(d[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(d[0], d[1], 1, padding=0, stride=1, bias=False), bn(d[1]),
            _stack(d[1], d[2], 3, 2, 3, 3), _stack(d[2], d[3], 5, 2, 3, 3),
            _stack(d[3], d[4], 5, 2, 6, 3), _stack(d[4], d[5], 3, 1, 6, 2),
            _stack(d[5], d[6], 5, 2, 6, 4), _stack(d[6], d[7], 3, 1, 6, 1),
            nn.Conv2d(d[7], 1280, 1, padding=0, stride=1, bias=False), bn(1280),
            nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.layers(x).mean([2, 3]))


# --------------------------------------------------------------------- RegNet

class BottleneckTransform(nn.Sequential):
    def __init__(self, width_in, width_out, stride, group_width, bottleneck_multiplier,
                 se_ratio):
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width
        layers = OrderedDict()
        layers["a"] = ConvNormActivation(width_in, w_b, 1)
        layers["b"] = ConvNormActivation(w_b, w_b, 3, stride, groups=g)
        if se_ratio:
            layers["se"] = SqueezeExcitation(w_b, int(round(se_ratio * width_in)))
        layers["c"] = ConvNormActivation(w_b, width_out, 1, act=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    def __init__(self, width_in, width_out, stride, group_width, bottleneck_multiplier,
                 se_ratio):
        super().__init__()
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = ConvNormActivation(width_in, width_out, 1, stride, act=None)
        self.f = BottleneckTransform(width_in, width_out, stride, group_width,
                                     bottleneck_multiplier, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = (self.proj(x) if self.proj is not None else x) + self.f(x)
        return self.activation(x)


class AnyStage(nn.Sequential):
    def __init__(self, width_in, width_out, stride, depth, group_width, bottleneck_multiplier,
                 se_ratio, stage_index):
        super().__init__()
        for i in range(depth):
            self.add_module(f"block{stage_index}-{i}", ResBottleneckBlock(
                width_in if i == 0 else width_out, width_out, stride if i == 0 else 1,
                group_width, bottleneck_multiplier, se_ratio))


def _block_params(depth, w_0, w_a, w_m, group_width, bottleneck_multiplier=1.0):
    """torchvision's BlockParams.from_init_params: (width, stride, depth,
    group width, bottleneck multiplier) per stage."""
    widths_cont = torch.arange(depth) * w_a + w_0
    block_capacity = torch.round(torch.log(widths_cont / w_0) / math.log(w_m))
    block_widths = (torch.round(torch.divide(w_0 * torch.pow(w_m, block_capacity), 8)) * 8
                    ).int().tolist()
    num_stages = len(set(block_widths))
    splits = [w != wp or r != rp for w, wp, r, rp in
              zip(block_widths + [0], [0] + block_widths, block_widths + [0], [0] + block_widths)]
    stage_widths = [w for w, t in zip(block_widths, splits[:-1]) if t]
    stage_depths = torch.diff(torch.tensor([d for d, t in enumerate(splits) if t])).int().tolist()
    # _adjust_widths_groups_compatibilty
    widths = [int(w * bottleneck_multiplier) for w in stage_widths]
    group_widths = [min(group_width, w) for w in widths]
    ws_bot = [make_divisible(w, g) for w, g in zip(widths, group_widths)]
    stage_widths = [int(w / bottleneck_multiplier) for w in ws_bot]
    return [(w, 2, d, g, bottleneck_multiplier) for w, d, g in
            zip(stage_widths, stage_depths, group_widths)][:num_stages]


class RegNet(nn.Module):
    def __init__(self, params, se_ratio=None, num_classes=1000, stem_width=32):
        super().__init__()
        self.stem = ConvNormActivation(3, stem_width, 3, 2)
        width, blocks = stem_width, []
        for i, (w_out, stride, depth, group_width, mult) in enumerate(params):
            blocks.append((f"block{i + 1}", AnyStage(width, w_out, stride, depth, group_width,
                                                     mult, se_ratio, i + 1)))
            width = w_out
        self.trunk_output = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(torch.flatten(x, start_dim=1))


def regnet_x_400mf(num_classes=1000):
    return RegNet(_block_params(22, 24, 24.48, 2.54, 16), num_classes=num_classes)


def regnet_y_400mf(num_classes=1000):
    return RegNet(_block_params(16, 48, 27.89, 2.09, 8), se_ratio=0.25, num_classes=num_classes)


# The families of issue 20: name -> (constructor, the default tests' keyword
# arguments, the default tests' input size). VGG and AlexNet need 224x224 (their
# adaptive pooling to 7x7 and 6x6 exports only when it is a plain one), so the
# default tests narrow them instead.
FAMILIES = {
    "resnet18": (ResNet18, {}, 64),
    "resnet50": (_TV_TWINS["resnext50_32x4d"].func, {}, 64),
    "resnext50_32x4d": (_TV_TWINS["resnext50_32x4d"], {}, 64),
    "vgg11": (VGG11, {"width": 8}, 224),
    "alexnet": (AlexNet, {"width": 4}, 224),
    "googlenet": (_TV_TWINS["googlenet"], {}, 64),
    "densenet121": (_TV_TWINS["densenet121"], {}, 64),
    "mobilenet_v2": (_TV_TWINS["mobilenet_v2"], {}, 64),
    "mobilenet_v3_small": (partial(MobileNetV3, _V3_SMALL, 1024), {}, 64),
    "mobilenet_v3_large": (partial(MobileNetV3, _V3_LARGE, 1280), {}, 64),
    "efficientnet_b0": (_TV_TWINS["efficientnet_b0"], {}, 64),
    "squeezenet1_1": (SqueezeNet11, {}, 64),
    "mnasnet0_5": (MNASNet, {}, 64),
    "regnet_x_400mf": (regnet_x_400mf, {}, 64),
    "regnet_y_400mf": (regnet_y_400mf, {}, 64),
}
