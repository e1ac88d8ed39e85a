"""Long-tailed datasets, shot groups and the class-balanced sampler.

The multi-view transforms live in ``dscl.data.views`` (imported on their own).
"""

from dscl.data.datasets import DATASETS, DatasetSpec, DataSplits, build_splits, build_splits_for
from dscl.data.imagesets import (
    ArrayImageDataset,
    DataError,
    ImageFileDataset,
    load_rgb,
    to_rgb,
)
from dscl.data.longtail import (
    balanced_holdout,
    carve_per_class,
    class_counts,
    exponential_profile,
    order_profile,
    subsample_longtail,
)
from dscl.data.samplers import ClassBalancedSampler
from dscl.data.shots import (
    SHOT_GROUPS,
    ShotGroups,
    assign_shot_groups,
    shot_group_summary,
    shot_groups,
)

__all__ = [
    "DATASETS",
    "SHOT_GROUPS",
    "ArrayImageDataset",
    "ClassBalancedSampler",
    "DataError",
    "DataSplits",
    "DatasetSpec",
    "ImageFileDataset",
    "ShotGroups",
    "assign_shot_groups",
    "balanced_holdout",
    "build_splits",
    "build_splits_for",
    "carve_per_class",
    "class_counts",
    "exponential_profile",
    "load_rgb",
    "order_profile",
    "shot_group_summary",
    "shot_groups",
    "subsample_longtail",
    "to_rgb",
]
