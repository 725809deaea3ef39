"""Kept for compatibility: the later case studies now live in the
`convcore.models` package (inception.py, mobilenet.py, densenet.py,
resnet.py, nasnet.py). This module re-exports what it held, so old code
that imports `convcore.models_extra` keeps working; new code should import
from `convcore.models`."""
from .models.inception import IMAGENET_MEAN, IMAGENET_STD, Normalize, googlenet
from .models.densenet import densenet121
from .models.mobilenet import efficientnet_b0, mobilenet_v1, mobilenet_v2
from .models.nasnet import nasnet_a_large, nasnet_a_mobile
from .models.resnet import resnext50_32x4d, se_resnet50, wide_resnet50_2

__all__ = ["googlenet", "mobilenet_v1", "mobilenet_v2", "resnext50_32x4d", "wide_resnet50_2",
           "densenet121", "se_resnet50", "efficientnet_b0", "Normalize", "nasnet_a_mobile",
           "nasnet_a_large"]
