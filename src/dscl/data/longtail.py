"""Long-tailed profiles, subsampling and held-out splits.

The exponential profile and the subsampling follow the CIFAR-LT convention of the LDAM code
(Cao et al., 2019), which PaCo, BCL and DSCL reuse: class i keeps
``n_i = int(n_max * (1 / IR) ** (i / (C - 1)))`` images, chosen by shuffling the indices of each
class in turn with one NumPy ``RandomState`` seeded once. CIFAR-100-LT at IR 100 therefore has
10,847 training images, at IR 50 12,608, at IR 10 19,573; CIFAR-10-LT at IR 100 has 12,406.

Shot groups (Many / Medium / Few) live in ``dscl.data.shots``.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np


def exponential_profile(num_classes: int, n_max: int, imbalance_ratio: float) -> list[int]:
    """Images per class of an exponentially decaying long-tailed profile.

    ``n_i = floor(n_max * IR^(-i / (C - 1)))``, computed exactly as the LDAM code does
    (``int(n_max * (1 / IR) ** (i / (C - 1)))``) so that float rounding matches the published
    counts.

    Args:
        num_classes: C, at least 2.
        n_max: images of the largest class (class 0).
        imbalance_ratio: IR = n_max / n_min, at least 1.

    Returns:
        C counts, non-increasing, the first equal to ``n_max``.

    Raises:
        ValueError: on a bad argument, or if the profile leaves a class with no image.
    """
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not _is_int(n_max) or n_max < 1:
        raise ValueError(f"n_max must be a positive integer, got {n_max!r}")
    if not isinstance(imbalance_ratio, Real) or not imbalance_ratio >= 1:
        raise ValueError(f"imbalance_ratio must be a number >= 1, got {imbalance_ratio!r}")
    factor = 1.0 / float(imbalance_ratio)
    counts = [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if counts[-1] < 1:
        raise ValueError(
            f"n_max={n_max} with imbalance_ratio={imbalance_ratio} leaves class "
            f"{counts.index(0)} with no image; raise n_max or lower imbalance_ratio"
        )
    return counts


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _as_targets(targets: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(targets)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"targets must be a 1-D sequence of integers, got shape {array.shape}")
    if array.size and array.min() < 0:
        raise ValueError(f"targets must be non-negative, got {int(array.min())}")
    return array.astype(np.int64)


def order_profile(profile: Sequence[int], seed: int | None) -> tuple[list[int], list[int]]:
    """Deal the counts of a profile out to the classes: which class gets which count.

    Args:
        profile: (C,) counts, largest first (``exponential_profile``).
        seed: None gives count r to class r (label order, the benchmark convention); an integer
            draws the order ``np.random.default_rng(seed).permutation(C)``.

    Returns:
        (per-class counts (C,), permutation (C,)) with ``counts[permutation[r]] == profile[r]``:
        ``permutation[r]`` is the class that receives the r-th largest count.
    """
    num_classes = len(profile)
    if seed is None:
        permutation = list(range(num_classes))
    else:
        permutation = np.random.default_rng(seed).permutation(num_classes).tolist()
    counts = [0] * num_classes
    for rank, c in enumerate(permutation):
        counts[c] = int(profile[rank])
    return counts, permutation


def subsample_longtail(
    targets: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int
) -> np.ndarray:
    """Indices of a long-tailed subset keeping ``counts[c]`` images of each class c.

    LDAM convention: one ``np.random.RandomState(seed)``; for c = 0, 1, ... shuffle the indices of
    class c (in dataset order) and keep the first ``counts[c]``. The result is in class order,
    then shuffled order within a class, exactly as the reference code builds its arrays.

    Args:
        targets: (N,) class label of every image of the full (balanced) training set.
        counts: C images to keep per class.
        seed: the NumPy seed of the convention (LDAM's ``rand_number``, 0 by default there).

    Returns:
        (sum(counts),) int64 indices into ``targets``.
    """
    labels = _as_targets(targets)
    if any(int(n) < 0 for n in counts):
        raise ValueError(f"counts must be non-negative, got {list(counts)}")
    rng = np.random.RandomState(seed)
    kept = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than the {n} to keep")
        rng.shuffle(idx)
        kept.append(idx[: int(n)])
    return np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)


def balanced_holdout(
    targets: Sequence[int] | np.ndarray,
    exclude: Sequence[int] | np.ndarray,
    per_class: int,
    seed: int,
    num_classes: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """A balanced, seeded held-out set drawn from images NOT in ``exclude``.

    Used for the validation split of subsampled datasets: the images the long-tailed subset did
    not keep. A class with fewer than ``per_class`` unused images gives all it has.

    Args:
        targets: (N,) labels of the full training set.
        exclude: indices that must not be drawn (the long-tailed training subset).
        per_class: images wanted per class.
        seed: seed of the draw (independent of the subsampling stream).
        num_classes: C; defaults to max(targets) + 1.

    Returns:
        ((M,) int64 indices in class order, sorted within a class; per-class shortfall, length C).
    """
    labels = _as_targets(targets)
    if not _is_int(per_class) or per_class < 0:
        raise ValueError(f"per_class must be a non-negative integer, got {per_class!r}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    free = np.ones(len(labels), dtype=bool)
    free[np.asarray(exclude, dtype=np.int64)] = False
    rng = np.random.default_rng([seed, 0x5EED])  # a stream separate from the LT subsampling
    chosen, shortfall = [], []
    for c in range(num_classes):
        pool = np.flatnonzero((labels == c) & free)
        take = min(per_class, len(pool))
        chosen.append(np.sort(rng.choice(pool, size=take, replace=False)))
        shortfall.append(per_class - take)
    return np.concatenate(chosen).astype(np.int64), shortfall


def carve_per_class(
    targets: Sequence[int] | np.ndarray, per_class: int, seed: int, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split a training set into (kept, carved): up to ``per_class`` images of each class carved.

    A class never loses its last image: class c gives ``min(per_class, n_c - 1)``.

    Args:
        targets: (N,) labels of the training set.
        per_class: images to carve per class.
        seed: seed of the draw.
        num_classes: C; defaults to max(targets) + 1.

    Returns:
        (kept indices sorted, carved indices in class order), both int64.
    """
    labels = _as_targets(targets)
    if not _is_int(per_class) or per_class < 0:
        raise ValueError(f"per_class must be a non-negative integer, got {per_class!r}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng([seed, 0xCA7E])
    carved = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        take = max(0, min(per_class, len(idx) - 1))
        carved.append(np.sort(rng.choice(idx, size=take, replace=False)))
    carved_idx = np.concatenate(carved).astype(np.int64) if carved else np.zeros(0, np.int64)
    keep = np.ones(len(labels), dtype=bool)
    keep[carved_idx] = False
    return np.flatnonzero(keep).astype(np.int64), carved_idx


def class_counts(targets: Sequence[int] | np.ndarray, num_classes: int) -> list[int]:
    """Images per class: (C,) counts of ``targets`` (labels in [0, C))."""
    labels = _as_targets(targets)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {int(labels.max())} is outside [0, {num_classes})")
    return np.bincount(labels, minlength=num_classes).tolist()
