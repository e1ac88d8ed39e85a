"""Shot groups: Many / Medium / Few classes by their number of training images.

The one home of the rule (Liu et al., 2019, OLTR), used by the data summary, the evaluation
metrics and the report: Many has more than ``many_threshold`` training images (default 100),
Few fewer than ``few_threshold`` (default 20), Medium the rest
(``few_threshold <= count <= many_threshold``). The thresholds are validated once, when a
``ShotGroups`` is made; every function here goes through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

SHOT_GROUPS = ("many", "medium", "few")  # the group names, in reporting order


@dataclass(frozen=True)
class ShotGroups:
    """Many / Medium / Few split of classes by their number of training images.

    Attributes:
        many_threshold: classes with strictly more training images are "many".
        few_threshold: classes with strictly fewer training images are "few"; the rest are
            "medium". Both are non-negative integers with ``few_threshold <= many_threshold``.

    Raises:
        ValueError: on a threshold that is not a non-negative integer, or on
            ``few_threshold > many_threshold``.
    """

    many_threshold: int = 100
    few_threshold: int = 20

    def __post_init__(self) -> None:
        for name in ("many_threshold", "few_threshold"):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.few_threshold > self.many_threshold:
            raise ValueError(
                f"few_threshold ({self.few_threshold}) must not exceed "
                f"many_threshold ({self.many_threshold})"
            )

    def group_of(self, count: int) -> str:
        """ "many", "medium" or "few" for a class with ``count`` training images."""
        if count > self.many_threshold:
            return "many"
        return "few" if count < self.few_threshold else "medium"

    def labels(self, counts: Sequence[int]) -> list[str]:
        """Group name of every class: (C,) counts -> C strings from ``SHOT_GROUPS``."""
        return [self.group_of(int(count)) for count in counts]

    def assign(self, counts: Sequence[int]) -> dict[str, list[int]]:
        """Class indices per group: keys ``SHOT_GROUPS``, each list in class order."""
        groups: dict[str, list[int]] = {name: [] for name in SHOT_GROUPS}
        for c, name in enumerate(self.labels(counts)):
            groups[name].append(c)
        return groups

    def summary(self, counts: Sequence[int]) -> dict[str, dict[str, int]]:
        """Per group: number of classes, total images, smallest and largest class (0 if empty)."""
        out = {}
        for name, members in self.assign(counts).items():
            sizes = [int(counts[c]) for c in members]
            out[name] = {
                "classes": len(members),
                "images": sum(sizes),
                "min": min(sizes, default=0),
                "max": max(sizes, default=0),
            }
        return out


def assign_shot_groups(
    class_counts: Sequence[int], *, many_threshold: int = 100, few_threshold: int = 20
) -> list[str]:
    """Shot group of every class from its number of training images.

    Args:
        class_counts: training images per class, length C.
        many_threshold: classes with strictly more training images are "many".
        few_threshold: classes with strictly fewer training images are "few"; the rest
            (``few_threshold <= count <= many_threshold``) are "medium".

    Returns:
        A list of C strings, each one of ``"many"``, ``"medium"``, ``"few"``.
    """
    return ShotGroups(many_threshold, few_threshold).labels(class_counts)


def shot_groups(
    class_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20
) -> dict[str, list[int]]:
    """Class indices per shot group (keys "many", "medium", "few"); see ``ShotGroups``."""
    return ShotGroups(many_threshold, few_threshold).assign(class_counts)


def shot_group_summary(
    class_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20
) -> dict[str, dict[str, int]]:
    """Per group: number of classes, total images, smallest and largest class (0 when empty)."""
    return ShotGroups(many_threshold, few_threshold).summary(class_counts)
