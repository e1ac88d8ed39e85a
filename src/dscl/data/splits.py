"""Pieces shared by the dataset builders: the ``DataSplits`` result and how splits are drawn.

Validation draws (see ``dscl.data.datasets`` for when each applies):
- ``lt_indices``: the long-tailed training subset (LDAM convention) plus a balanced validation
  set from the training images the subset did not keep; ``val_shortfall`` settles classes with too
  few unused images ("partial", "carve" or "error").
- ``carve_split``: up to ``val_per_class`` images per class carved out of training (a class
  always keeps one image).

``profile_counts`` deals the exponential profile out to the classes in the requested
``class_order``; ``skip_unreadable`` leaves out the image files that do not decode
(``skip_bad_images``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from dscl.data.imagesets import DataError, ImageFileDataset
from dscl.data.longtail import (
    balanced_holdout,
    carve_per_class,
    exponential_profile,
    order_profile,
    subsample_longtail,
)
from dscl.data.shots import ShotGroups
from dscl.settings import LABEL_ORDER

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class DataSplits:
    """Training, validation and test splits of one dataset.

    Attributes:
        train, val, test: the three splits (see ``dscl.data.datasets``).
        num_classes: C.
        class_names: C names.
        class_counts: (C,) training images per class (they define the shot groups).
        notes: anything the builder had to decide (a validation shortfall, skipped images).
        class_order: "label" or the integer seed that permuted the long-tailed profile.
        class_permutation: entry r is the class that received the r-th largest count of the
            profile drawn by dscl; None where the dataset's own lists fix the counts.
        bad_images: per split ("train", "val", "test"), the unreadable images that were skipped
            (``skip_bad_images``), each ``{"file": path, "error": "ExceptionType: message"}``.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    class_counts: list[int]
    notes: list[str] = field(default_factory=list)
    class_order: str | int = LABEL_ORDER
    class_permutation: list[int] | None = None
    bad_images: dict[str, list[dict[str, str]]] = field(
        default_factory=lambda: {split: [] for split in SPLITS}
    )

    def summary(self, many_threshold: int = 100, few_threshold: int = 20) -> dict[str, Any]:
        """Counts per split and class, imbalance ratio, shot groups and notes (JSON-ready)."""
        counts = self.class_counts
        shots = ShotGroups(many_threshold, few_threshold)
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "train": {"total": sum(counts), "counts": list(counts)},
            "val": {"total": len(self.val), "counts": list(self.val.class_counts)},
            "test": {"total": len(self.test), "counts": list(self.test.class_counts)},
            "imbalance_ratio": max(counts) / max(min(counts), 1),
            "class_order": self.class_order,
            "class_permutation": self.class_permutation,
            "thresholds": {"many": many_threshold, "few": few_threshold},
            "shot_groups": shots.assign(counts),
            "groups": shots.summary(counts),
            "bad_images": {split: list(found) for split, found in self.bad_images.items()},
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
    class_order: str | int
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
        raise DataError(f"root: {req.name} needs a data folder (pass root or set $DSCL_DATA)")
    return os.path.join(base, folder)


def flag_setting(req: SplitRequest, key: str, default: bool = True) -> bool:
    value = req.extra.get(key, default)
    if not isinstance(value, bool):
        raise DataError(f"{key} must be true or false, got {value!r}")
    return value


def make_splits(
    train: Any, val: Any, test: Any, notes: list[str], permutation: list[int] | None = None
) -> DataSplits:
    """``DataSplits`` of three datasets (C, names and counts from ``train``); logs the notes."""
    for note in notes:
        log.warning(note)
    return DataSplits(
        train,
        val,
        test,
        train.num_classes,
        list(train.class_names),
        train.class_counts,
        notes,
        class_permutation=permutation,
    )


def profile_counts(num_classes: int, req: SplitRequest) -> tuple[list[int], list[int]]:
    """(per-class counts, permutation) of the requested exponential profile and class order."""
    profile = exponential_profile(num_classes, req.n_max, req.imbalance_ratio)
    return order_profile(profile, None if req.class_order == LABEL_ORDER else req.class_order)


def skip_unreadable(splits: DataSplits, name: str) -> DataSplits:
    """``splits`` without the image files that do not decode, recorded in ``bad_images``.

    Every image of every file-backed split is decoded once (in threads). A split that lost images
    gets one note; a class that loses every training image is an error.

    Args:
        splits: the splits as built, no training class empty.
        name: the dataset, for messages.

    Raises:
        DataError: naming the class and one of its files when none of its training images reads.
    """
    parts, bad, notes, train_found = {}, {}, list(splits.notes), []
    for split in SPLITS:
        dataset = parts[split] = getattr(splits, split)
        found = dataset.find_unreadable() if isinstance(dataset, ImageFileDataset) else []
        bad[split] = [{"file": dataset.paths[i], "error": error} for i, error in found]
        if split == "train":
            train_found = found
        if found:
            gone = {i for i, _ in found}
            parts[split] = dataset.subset([i for i in range(len(dataset)) if i not in gone])
            first = bad[split][0]
            notes.append(
                f"{split}: {len(found)} unreadable images skipped (listed under bad_images), "
                f"e.g. {first['file']} ({first['error']})"
            )
            log.warning(notes[-1])
    counts = parts["train"].class_counts
    if 0 in counts:
        c = counts.index(0)
        i, error = next((i, error) for i, error in train_found if splits.train.targets[i] == c)
        raise DataError(
            f"{name} training set: every image of class {c} ({splits.class_names[c]}) is "
            f"unreadable, e.g. {splits.train.paths[i]} ({error})"
        )
    return replace(splits, **parts, class_counts=counts, notes=notes, bad_images=bad)


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
