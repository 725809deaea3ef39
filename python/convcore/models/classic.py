"""The lecture's classic chains: LeNet-5, AlexNet, ZFNet and VGG-16, written
in the lecture's notation (`SPECS`) and built by `convcore.build`.
"""
from __future__ import annotations

from ..builder import Network, build
from ._common import input_shape_of, num_classes_of

__all__ = ["lenet5", "alexnet", "zfnet", "vgg16", "SPECS"]

# The lecture's notation; FC sizes of the head are filled in per num_classes.
SPECS = {
    # LeNet-5 (LeCun et al. 1998) with ReLU and max pooling: 32x32 -> 28 -> 14 -> 10 -> 5.
    "lenet5": "CONV5-6/p0-RELU-POOL2-CONV5-16/p0-RELU-POOL2-FC-120-RELU-FC-84-RELU-FC-{classes}",
    # The notes' "Full (simplified) AlexNet architecture", 227x227x3 input.
    "alexnet": ("CONV11-96/s4/p0-RELU-POOL3/s2-NORM-"
                "CONV5-256/p2-RELU-POOL3/s2-NORM-"
                "CONV3-384/p1-RELU-CONV3-384/p1-RELU-CONV3-256/p1-RELU-POOL3/s2-"
                "DROPOUT-FC-4096-RELU-DROPOUT-FC-4096-RELU-FC-{classes}"),
    # ZFNet as Zeiler and Fergus built it (2013, Figure 3), 224x224x3 input:
    # CONV1 7x7/2 and CONV2 5x5/2, each followed by a 3x3/2 pool and contrast
    # normalisation: 224 -> 110 -> 55 -> 26 -> 13 -> 13 -> 13 -> 6. CONV3-5 have
    # the notes' 512, 1024, 512 filters ("AlexNet but ... use 512, 1024, 512").
    "zfnet": ("CONV7-96/s2/p1-RELU-POOL3/s2/ceil-NORM-"
              "CONV5-256/s2/p0-RELU-POOL3/s2/ceil-NORM-"
              "CONV3-512/p1-RELU-CONV3-1024/p1-RELU-CONV3-512/p1-RELU-POOL3/s2-"
              "DROPOUT-FC-4096-RELU-DROPOUT-FC-4096-RELU-FC-{classes}"),
    # The same with the paper's CONV3-5 filters (384, 384, 256, as AlexNet's).
    "zfnet_paper": ("CONV7-96/s2/p1-RELU-POOL3/s2/ceil-NORM-"
                    "CONV5-256/s2/p0-RELU-POOL3/s2/ceil-NORM-"
                    "CONV3-384/p1-RELU-CONV3-384/p1-RELU-CONV3-256/p1-RELU-POOL3/s2-"
                    "DROPOUT-FC-4096-RELU-DROPOUT-FC-4096-RELU-FC-{classes}"),
    # VGG-16 (configuration D), torchvision's layer order.
    "vgg16": ("[(CONV3-64-RELU)*2-POOL2]-[(CONV3-128-RELU)*2-POOL2]-"
              "[(CONV3-256-RELU)*3-POOL2]-[(CONV3-512-RELU)*3-POOL2]*2-"
              "FC-4096-RELU-DROPOUT-FC-4096-RELU-DROPOUT-FC-{classes}"),
}


def _chain(name: str, num_classes: int, input_size, channels: int,
           on_misfit: str = "warn") -> Network:
    classes = num_classes_of(num_classes)
    return build(SPECS[name].format(classes=classes), input_shape_of(input_size, channels),
                 on_misfit=on_misfit, name=name)


def lenet5(num_classes: int = 10, input_size=(1, 32, 32)) -> Network:
    """LeNet-5: two 5x5 conv + 2x2 max-pool stages, then FC 120-84-classes."""
    return _chain("lenet5", num_classes, input_size, 1)


def alexnet(num_classes: int = 1000, input_size=(3, 227, 227)) -> Network:
    """The lecture's AlexNet: CONV1 96 11x11/4, POOL1, NORM1, CONV2 256 5x5, POOL2,
    NORM2, CONV3-5 (384, 384, 256 3x3), POOL3, FC6-8 (4096, 4096, classes)."""
    return _chain("alexnet", num_classes, input_size, 3)


def zfnet(num_classes: int = 1000, input_size=(3, 224, 224), filters: str = "lecture") -> Network:
    """ZFNet (Zeiler and Fergus 2013, Figure 3): CONV1 96 7x7/2, POOL1 3x3/2,
    NORM1, CONV2 256 5x5/2, POOL2 3x3/2, NORM2, CONV3-5 3x3, POOL3 3x3/2,
    FC6-8 (4096, 4096, classes). At 224x224: 110 -> 55 -> 26 -> 13 -> 13 -> 6.

    filters="lecture" (default): CONV3-5 with 512, 1024, 512 filters, the notes'
    ZFNet (107,627,624 parameters with 1000 classes); filters="paper": 384, 384,
    256, the paper's (62,357,608). CONV1 and the pools floor and ceil their
    odd sizes on purpose, as the paper's sizes need, so no misfit warnings."""
    specs = {"lecture": "zfnet", "paper": "zfnet_paper"}
    if not isinstance(filters, str) or filters not in specs:
        raise ValueError(f"filters must be 'lecture' (CONV3-5 with 512, 1024, 512 filters) or "
                         f"'paper' (384, 384, 256), got {filters!r}")
    return _chain(specs[filters], num_classes, input_size, 3, on_misfit="ignore")


def vgg16(num_classes: int = 1000, input_size=(3, 224, 224)) -> Network:
    """VGG-16: thirteen 3x3 convs in five pooled stages, FC 4096-4096-classes
    (at 224x224 input: 138,357,544 parameters with 1000 classes)."""
    return _chain("vgg16", num_classes, input_size, 3)
