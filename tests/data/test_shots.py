"""Shot groups (Many / Medium / Few): one rule for the data summary, the metrics and the report."""

import pytest
import torch

from dscl.data import SHOT_GROUPS, DataSplits, ShotGroups, shot_group_summary, shot_groups
from dscl.data.shots import assign_shot_groups
from dscl.engine.evaluate import classification_metrics

FASHION_LT_COUNTS = [1280, 691, 373, 201, 108, 58, 31, 17, 9, 5]


def test_shot_groups_at_threshold_edges():
    counts = [101, 100, 20, 19, 500, 1, 21, 99]
    assert shot_groups(counts) == {"many": [0, 4], "medium": [1, 2, 6, 7], "few": [3, 5]}
    groups = ShotGroups(many_threshold=100, few_threshold=20)
    assert [groups.group_of(n) for n in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]
    assert shot_groups([10, 5, 4], many_threshold=5, few_threshold=5) == {
        "many": [0],
        "medium": [1],
        "few": [2],
    }


def test_shot_group_summary_exact():
    summary = shot_group_summary(FASHION_LT_COUNTS)
    assert summary == {
        "many": {"classes": 5, "images": 2653, "min": 108, "max": 1280},
        "medium": {"classes": 2, "images": 89, "min": 31, "max": 58},
        "few": {"classes": 3, "images": 31, "min": 5, "max": 17},
    }
    assert shot_group_summary([500])["few"] == {"classes": 0, "images": 0, "min": 0, "max": 0}


@pytest.mark.parametrize("many, few", [(20, 100), (-1, 0), (100, 2.5), (True, 0)])
def test_shot_groups_reject_bad_thresholds(many, few):
    with pytest.raises(ValueError):
        ShotGroups(many, few)


def test_labels_and_indices_agree():
    counts = [101, 100, 20, 19, 500, 1, 21, 99]
    labels = assign_shot_groups(counts)
    assert labels == ["many", "medium", "medium", "few", "many", "few", "medium", "medium"]
    groups = shot_groups(counts)
    assert list(groups) == list(SHOT_GROUPS) == ["many", "medium", "few"]
    assert {name: [c for c, g in enumerate(labels) if g == name] for name in SHOT_GROUPS} == groups
    # Equal thresholds: only a count of exactly 20 is medium.
    assert assign_shot_groups(counts, many_threshold=20, few_threshold=20) == [
        "many", "many", "medium", "few", "many", "few", "many", "many"
    ]  # fmt: skip


def test_metrics_and_data_summary_use_the_same_groups():
    # Thresholds 50 / 10 on the Fashion-MNIST-LT profile: many = 0-5, medium = 6-7, few = 8-9.
    counts = FASHION_LT_COUNTS
    logits = torch.eye(10)  # one test sample per class, all correct
    metrics = classification_metrics(
        logits, torch.arange(10), counts, many_threshold=50, few_threshold=10
    )
    assert metrics["group_sizes"] == {"many": 6, "medium": 2, "few": 2}

    class _Split:
        class_counts = [1] * 10

        def __len__(self):
            return 10

    splits = DataSplits(_Split(), _Split(), _Split(), 10, list("abcdefghij"), counts)
    summary = splits.summary(50, 10)
    assert summary["shot_groups"] == {
        "many": [0, 1, 2, 3, 4, 5], "medium": [6, 7], "few": [8, 9]
    }  # fmt: skip
    assert {g: v["classes"] for g, v in summary["groups"].items()} == metrics["group_sizes"]


@pytest.mark.parametrize("many, few", [(10, 20), (-1, 0)])
def test_every_entry_point_rejects_the_same_thresholds(many, few):
    with pytest.raises(ValueError, match="threshold"):
        assign_shot_groups([5], many_threshold=many, few_threshold=few)
    with pytest.raises(ValueError, match="threshold"):
        classification_metrics(
            torch.eye(2), torch.arange(2), [5, 5], many_threshold=many, few_threshold=few
        )
    with pytest.raises(ValueError, match="threshold"):
        shot_group_summary([5], many, few)
