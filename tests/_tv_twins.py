"""Plain torch.nn twins of torchvision's GoogLeNet, MobileNet v2,
EfficientNet-B0, DenseNet-121 and ResNe(X)t bottleneck nets (torchvision
itself is not installed), written from torchvision's definitions with the
same module names, plus MobileNet v1 (Keras's layers, torchvision-style
names) and SE-ResNet-50 (timm's `se.fc1` / `se.fc2`). Imported only when
torch is."""
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from convcore.interop.torch import TorchStochasticDepth


def make_divisible(v, divisor=8, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation (children 0, 1, 2)."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU, eps=1e-5):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout, eps=eps)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


# ------------------------------------------------------------------ GoogLeNet

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    def __init__(self, cin, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(cin, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(cin, pool_proj, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    def __init__(self, cin, num_classes, dropout=0.7):
        super().__init__()
        self.conv = BasicConv2d(cin, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, (4, 4))
        x = torch.flatten(self.conv(x), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class GoogLeNet(nn.Module):
    def __init__(self, num_classes=1000, aux_logits=False, dropout=0.2, transform_input=False):
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes)
            self.aux2 = InceptionAux(528, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

    def _transform_input(self, x):
        # ImageNet's Normalize(mean, std) -> (x - 0.5) / 0.5, with torchvision's
        # Python-float constants, channel by channel
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        return torch.cat([x[:, c:c + 1] * (std[c] / 0.5) + (mean[c] - 0.5) / 0.5
                          for c in range(3)], 1)

    def forward(self, x):
        if self.transform_input:
            x = self._transform_input(x)
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux_logits and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux_logits and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.aux_logits and self.training:
            return x, aux2, aux1
        return x


# ------------------------------------------------------------------ MobileNets

class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(inp, hidden, 1, act=nn.ReLU6))
        layers += [ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.2):
        super().__init__()
        c = 32
        features = [ConvNormActivation(3, c, stride=2, act=nn.ReLU6)]
        for t, ch, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
            for i in range(n):
                features.append(InvertedResidual(c, ch, s if i == 0 else 1, t))
                c = ch
        features.append(ConvNormActivation(c, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.001):
        super().__init__()
        features, c = [ConvNormActivation(3, 32, 3, 2)], 32
        for out, s in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + \
                [(512, 1)] * 5 + [(1024, 2), (1024, 1)]:
            features.append(nn.Sequential(ConvNormActivation(c, c, 3, s, groups=c),
                                          ConvNormActivation(c, out, 1)))
            c = out
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(1024, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------- EfficientNet

class SqueezeExcitation(nn.Module):
    def __init__(self, cin, csq, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(cin, csq, 1)
        self.fc2 = nn.Conv2d(csq, cin, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


# torchvision.ops.StochasticDepth (the identity in eval mode or at p=0): the
# one of convcore's torch mirror, which is written as torchvision's
StochasticDepth = TorchStochasticDepth


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand_ratio, sd_prob):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        expanded = make_divisible(cin * expand_ratio, 8)
        layers = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, act=nn.SiLU))
        layers += [ConvNormActivation(expanded, expanded, k, stride, groups=expanded,
                                      act=nn.SiLU),
                   SqueezeExcitation(expanded, max(1, cin // 4), activation=nn.SiLU),
                   ConvNormActivation(expanded, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result) + x
        return result


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.2, stochastic_depth_prob=0.2):
        super().__init__()
        setting = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
                   (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
                   (6, 3, 1, 192, 320, 1)]
        layers = [ConvNormActivation(3, 32, 3, 2, act=nn.SiLU)]
        total, block_id = sum(s[5] for s in setting), 0
        for e, k, s, cin, cout, n in setting:
            stage = []
            for i in range(n):
                sd = stochastic_depth_prob * float(block_id) / total
                stage.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e, sd))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        layers.append(ConvNormActivation(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------------- DenseNet

class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n, cin, bn_size, growth):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet121(nn.Module):
    def __init__(self, num_classes=1000, growth=32, block_config=(6, 12, 24, 16), init=64,
                 bn_size=4):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, init, 7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(init)), ("relu0", nn.ReLU()),
            ("pool0", nn.MaxPool2d(3, stride=2, padding=1))]))
        c = init
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(n, c, bn_size, growth))
            c += n * growth
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(c, c // 2))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------- ResNet, ResNeXt, SE

class Bottleneck(nn.Module):
    """torchvision's Bottleneck; with se, timm's SE module after bn3."""

    def __init__(self, inplanes, planes, stride=1, groups=1, base_width=64, se=False):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out = planes * 4
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.se = SqueezeExcitation(out, out // 16) if se else None
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes=1000, groups=1, width_per_group=64, se=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(inplanes, planes, (1 if i == 0 else 2) if j == 0 else 1,
                                         groups, width_per_group, se))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


TWINS = {
    "googlenet": GoogLeNet,
    "mobilenet_v1": MobileNetV1,
    "mobilenet_v2": MobileNetV2,
    "resnext50_32x4d": partial(ResNet50, groups=32, width_per_group=4),
    "wide_resnet50_2": partial(ResNet50, width_per_group=128),
    "densenet121": DenseNet121,
    "se_resnet50": partial(ResNet50, se=True),
    "efficientnet_b0": EfficientNetB0,
}
