"""Kept for compatibility: NASNet-A now lives in `convcore.models.nasnet`.
This module re-exports what it held, so old code that imports
`convcore.nasnet` keeps working; new code should import from
`convcore.models` (the builders) or `convcore.models.nasnet` (its layers)."""
from .models.nasnet import (ScheduledDropPath, ShiftedSubsample, ZeroPad, nasnet_a_large,
                            nasnet_a_mobile, set_drop_path_progress)

__all__ = ["nasnet_a_mobile", "nasnet_a_large", "ShiftedSubsample", "ZeroPad",
           "ScheduledDropPath", "set_drop_path_progress"]
