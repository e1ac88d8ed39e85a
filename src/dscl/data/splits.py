"""Pieces shared by the dataset builders: the ``DataSplits`` result and how splits are drawn.

Validation draws (see ``dscl.data.datasets`` for when each applies):
- ``lt_indices``: the long-tailed training subset (LDAM convention) plus a balanced validation
  set from the training images the subset did not keep; ``val_shortfall`` settles classes with too
  few unused images ("partial", "carve" or "error").
- ``carve_split``: up to ``val_per_class`` images per class carved out of training (a class
  always keeps one image).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from dscl.data.imagesets import DataError
from dscl.data.longtail import (
    balanced_holdout,
    carve_per_class,
    shot_group_summary,
    shot_groups,
    subsample_longtail,
)

log = logging.getLogger(__name__)
VAL_SHORTFALL = ("partial", "carve", "error")


@dataclass
class DataSplits:
    """Training, validation and test splits of one dataset.

    ``class_counts`` are the training images per class (they define the shot groups); ``notes``
    record anything the builder had to decide (e.g. a validation shortfall).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    class_counts: list[int]
    notes: list[str] = field(default_factory=list)

    def summary(self, many_threshold: int = 100, few_threshold: int = 20) -> dict[str, Any]:
        """Counts per split and class, imbalance ratio, shot groups and notes (JSON-ready)."""
        counts = self.class_counts
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "train": {"total": sum(counts), "counts": list(counts)},
            "val": {"total": len(self.val), "counts": list(self.val.class_counts)},
            "test": {"total": len(self.test), "counts": list(self.test.class_counts)},
            "imbalance_ratio": max(counts) / max(min(counts), 1),
            "thresholds": {"many": many_threshold, "few": few_threshold},
            "shot_groups": shot_groups(counts, many_threshold, few_threshold),
            "groups": shot_group_summary(counts, many_threshold, few_threshold),
            "notes": list(self.notes),
        }


@dataclass
class SplitRequest:
    """The arguments of one ``build_splits`` call, validated, with defaults filled in."""

    name: str
    root: str | None
    n_max: int | None
    imbalance_ratio: float | None
    seed: int
    val_per_class: int
    skip_bad_images: bool
    download: bool
    val_shortfall: str
    extra: dict[str, Any]


def data_root(req: SplitRequest, folder: str) -> str:
    if req.root:
        return req.root
    base = os.environ.get("DSCL_DATA")
    if not base:
        raise ValueError(f"root: {req.name} needs a data folder (pass root or set $DSCL_DATA)")
    return os.path.join(base, folder)


def flag_setting(req: SplitRequest, key: str, default: bool = True) -> bool:
    value = req.extra.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def make_splits(train: Any, val: Any, test: Any, notes: list[str]) -> DataSplits:
    for note in notes:
        log.warning(note)
    return DataSplits(
        train, val, test, train.num_classes, list(train.class_names), train.class_counts, notes
    )


def lt_indices(
    targets: list[int], counts: list[int], req: SplitRequest
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(training subset, validation from unused images, notes) for a long-tailed profile."""
    labels = np.asarray(targets, dtype=np.int64)
    kept = subsample_longtail(labels, counts, req.seed)
    val, shortfall = balanced_holdout(labels, kept, req.val_per_class, req.seed, len(counts))
    notes, moved = [], []
    for c, missing in enumerate(shortfall):
        if not missing:
            continue
        have = req.val_per_class - missing
        if req.val_shortfall == "error":
            raise DataError(
                f"{req.name}: class {c} has only {have} training images left for "
                f"validation, {req.val_per_class} wanted (val_shortfall='error')"
            )
        if req.val_shortfall == "partial":
            notes.append(
                f"validation: class {c} has {have} of {req.val_per_class} images (the "
                "long-tailed subset keeps the rest of its training images)"
            )
            continue
        members = kept[labels[kept] == c]
        take = min(missing, len(members) - 1)
        moved.append(members[len(members) - take :])
        notes.append(
            f"validation: {take} training images of class {c} moved to validation "
            f"({len(members)} -> {len(members) - take})"
        )
    if moved:
        gone = np.concatenate(moved)
        kept = kept[~np.isin(kept, gone)]
        val = np.concatenate([val, gone])
        val = val[np.argsort(labels[val], kind="stable")]
    return kept, val, notes


def carve_split(train: Any, req: SplitRequest) -> tuple[Any, Any, list[str]]:
    keep, carved = carve_per_class(train.targets, req.val_per_class, req.seed, train.num_classes)
    note = (
        f"validation: {len(carved)} images (up to {req.val_per_class} per class) carved out "
        "of the training set"
    )
    return train.subset(keep), train.subset(carved), [note]
