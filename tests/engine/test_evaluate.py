"""Tests for dscl.engine.evaluate: metrics against hand-computed cases, predict_logits, table."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dscl.data.shots import assign_shot_groups
from dscl.engine.evaluate import (
    classification_metrics,
    format_metrics_table,
    predict_logits,
)

# Training counts hitting the threshold edges exactly (many > 100, 20 <= medium <= 100, few < 20):
# 150 -> many, 100 -> medium (edge), 20 -> medium (edge), 5 -> few.
HAND_COUNTS = [150, 100, 20, 5]
HAND_TARGETS = [0, 0, 1, 1, 2, 2, 3, 3]
HAND_PREDS = [0, 0, 1, 2, 2, 2, 1, 1]


def one_hot_logits(predictions: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose argmax is the given prediction; the other scores are distinct and lower."""
    base = torch.arange(num_classes, dtype=torch.float32).flip(0) * 0.1  # (C,) 0.3, 0.2, ...
    logits = base.repeat(len(predictions), 1)  # (N, C)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = 5.0
    return logits


def hand_metrics() -> dict:
    return classification_metrics(
        one_hot_logits(HAND_PREDS, 4), torch.tensor(HAND_TARGETS), HAND_COUNTS
    )


def test_shot_groups_at_threshold_edges():
    assert assign_shot_groups(HAND_COUNTS) == ["many", "medium", "medium", "few"]
    assert assign_shot_groups([101, 100, 20, 19]) == ["many", "medium", "medium", "few"]


def test_hand_computed_case():
    metrics = hand_metrics()
    # Correct: class 0 2/2, class 1 1/2, class 2 2/2, class 3 0/2 -> 5 of 8 samples.
    assert metrics["top1"] == 62.5  # 5 / 8 * 100
    assert metrics["top5"] == 100.0  # top-min(5, 4) = top-4 covers every class
    assert metrics["per_class"] == [100.0, 50.0, 100.0, 0.0]
    assert metrics["many"] == 100.0  # class 0 only
    assert metrics["medium"] == 75.0  # classes 1 and 2: (50 + 100) / 2
    assert metrics["few"] == 0.0  # class 3 only
    assert metrics["group_sizes"] == {"many": 1, "medium": 2, "few": 1}
    assert metrics["shot_thresholds"] == {"many": 100, "few": 20}
    assert metrics["num_samples"] == 8
    assert metrics["class_counts"] == HAND_COUNTS


def test_confusion_matrix():
    # Rows true class, columns predicted, from HAND_TARGETS / HAND_PREDS pair by pair.
    assert hand_metrics()["confusion"] == [
        [2, 0, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 2, 0],
        [0, 2, 0, 0],
    ]


def test_result_is_json_serialisable():
    metrics = hand_metrics()
    assert json.loads(json.dumps(metrics)) == metrics


def test_thresholds_are_arguments():
    # With many > 19 and few < 6: 150, 100, 20 are many; 5 is few; medium is empty.
    metrics = classification_metrics(
        one_hot_logits(HAND_PREDS, 4),
        torch.tensor(HAND_TARGETS),
        HAND_COUNTS,
        many_threshold=19,
        few_threshold=6,
    )
    assert metrics["many"] == pytest.approx((100.0 + 50.0 + 100.0) / 3, abs=1e-12)
    assert metrics["medium"] is None
    assert metrics["few"] == 0.0
    assert metrics["group_sizes"] == {"many": 3, "medium": 0, "few": 1}


def test_group_accuracy_is_class_averaged_not_sample_averaged():
    # Medium classes 1 and 2 with an unbalanced test set: class 1 gets 1 of 4, class 2 1 of 1.
    targets = [1, 1, 1, 1, 2]
    preds = [1, 0, 0, 0, 2]
    metrics = classification_metrics(one_hot_logits(preds, 4), torch.tensor(targets), HAND_COUNTS)
    assert metrics["medium"] == 62.5  # (25 + 100) / 2, not the sample average 2 / 5 = 40
    assert metrics["per_class"] == [None, 25.0, 100.0, None]
    assert metrics["many"] is None  # class 0 has no test sample
    assert metrics["few"] is None  # class 3 has no test sample
    assert metrics["top1"] == 40.0  # 2 / 5 * 100


def test_forced_single_class_predictor():
    targets = torch.tensor([0, 1, 2, 2, 3, 4, 2, 0, 1, 3, 4, 4])  # class 2: 3 of 12 samples
    logits = torch.zeros(12, 5)
    logits[:, 2] = 10.0
    metrics = classification_metrics(logits, targets, [500, 80, 50, 10, 3])
    assert metrics["top1"] == 25.0  # 3 / 12 * 100
    assert metrics["per_class"] == [0.0, 0.0, 100.0, 0.0, 0.0]
    assert metrics["confusion"][2] == [0, 0, 3, 0, 0]
    assert [row[2] for row in metrics["confusion"]] == [2, 2, 3, 2, 3]


def test_top5_ranks_the_target():
    logits = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(3, 1)  # (3, 7)
    targets = torch.tensor([0, 4, 5])  # ranks 1, 5 and 6
    metrics = classification_metrics(logits, targets, [10] * 7)
    assert metrics["top1"] == pytest.approx(100.0 / 3, abs=1e-12)  # only target 0
    assert metrics["top5"] == pytest.approx(200.0 / 3, abs=1e-12)  # rank 6 is outside top-5


def test_top5_with_fewer_than_five_classes():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    metrics = classification_metrics(logits, torch.tensor([0, 2]), [30, 30, 30])
    assert metrics["top1"] == 0.0
    assert metrics["top5"] == 100.0  # top-3 of 3 classes


def test_empty_group_gives_none():
    metrics = classification_metrics(one_hot_logits([0, 1], 2), torch.tensor([0, 1]), [500, 200])
    assert metrics["many"] == 100.0
    assert metrics["medium"] is None
    assert metrics["few"] is None
    assert metrics["group_sizes"] == {"many": 2, "medium": 0, "few": 0}


@pytest.mark.parametrize(
    ("logits", "targets", "counts", "kwargs", "match"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), [1], {}, "logits"),
        (
            torch.zeros(4, 2, dtype=torch.long),
            torch.zeros(4, dtype=torch.long),
            [1, 1],
            {},
            "logits",
        ),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), [1, 1], {}, "logits"),
        (torch.zeros(4, 2), torch.zeros(4), [1, 1], {}, "targets"),
        (torch.zeros(4, 2), torch.zeros(4, 1, dtype=torch.long), [1, 1], {}, "targets"),
        (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), [1, 1], {}, "targets"),
        (torch.zeros(4, 2), torch.tensor([0, 1, 2, 0]), [1, 1], {}, "targets"),
        (torch.zeros(4, 2), torch.tensor([0, -1, 1, 0]), [1, 1], {}, "targets"),
        (torch.zeros(4, 2), torch.zeros(4, dtype=torch.bool), [1, 1], {}, "targets"),
        (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), [1, 1, 1], {}, "class_counts"),
        (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), [1, -1], {}, "class_counts"),
        (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), [1, 2.5], {}, "class_counts"),
        (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), [1, 1], {"few_threshold": -1}, "few"),
        (
            torch.zeros(4, 2),
            torch.zeros(4, dtype=torch.long),
            [1, 1],
            {"many_threshold": 10, "few_threshold": 20},
            "many_threshold",
        ),
        (torch.full((4, 2), float("nan")), torch.zeros(4, dtype=torch.long), [1, 1], {}, "logits"),
    ],
)
def test_validation_errors(logits, targets, counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(logits, targets, counts, **kwargs)


def test_format_metrics_table():
    table = format_metrics_table(
        {"top1": 62.5, "top5": 100.0, "many": 100.0, "medium": None, "few": 0.0,
         "group_sizes": {"many": 1, "medium": 0, "few": 3}}
    )  # fmt: skip
    assert table == (
        "metric     acc %  classes\n"
        "-------------------------\n"
        "Top-1      62.50\n"
        "Top-5     100.00\n"
        "Many      100.00  1\n"
        "Medium       n/a  0\n"
        "Few         0.00  3"
    )


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Dropout(p=0.9))
        self.classifier = nn.Linear(8, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))


def _loader() -> DataLoader:
    images = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    return DataLoader(TensorDataset(images, labels), batch_size=3)  # 3 + 3 + 1


def test_predict_logits_eval_mode_cpu_and_mode_restored():
    model = _TinyNet().train()
    model.backbone.eval()  # a frozen backbone inside a training classifier: mixed modes
    logits, targets = predict_logits(model, _loader(), "cpu")
    assert logits.device.type == "cpu" and targets.device.type == "cpu"
    assert logits.dtype == torch.float32 and targets.dtype == torch.int64
    assert logits.shape == (7, 3)
    assert targets.tolist() == [0, 1, 2, 0, 1, 2, 0]
    # Dropout p=0.9 would change the outputs in train mode; eval mode makes them the plain layers.
    images = _loader().dataset.tensors[0]
    with torch.no_grad():
        expected = model.classifier(model.backbone[0](images))
    torch.testing.assert_close(logits, expected)
    assert model.training and model.classifier.training
    assert not model.backbone.training and not model.backbone[1].training


def test_predict_logits_restores_mode_after_error():
    model = _TinyNet().train()
    bad = [(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))]  # wrong feature size
    with pytest.raises(RuntimeError):
        predict_logits(model, bad, "cpu")
    assert all(module.training for module in model.modules())


def test_predict_logits_autocast_bfloat16():
    model = _TinyNet()
    full, _ = predict_logits(model, _loader(), "cpu")
    half, _ = predict_logits(model, _loader(), torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    # bfloat16 keeps 8 mantissa bits (relative error ~4e-3 per op); two small layers stay < 5e-2.
    torch.testing.assert_close(half, full, atol=5e-2, rtol=5e-2)


def test_predict_logits_empty_loader():
    with pytest.raises(ValueError, match="loader"):
        predict_logits(_TinyNet(), [], "cpu")


def test_many_classes_skip_the_confusion_matrix_but_keep_per_class():
    from dscl.engine.evaluate import MAX_CONFUSION_CLASSES

    num_classes = MAX_CONFUSION_CLASSES + 1
    targets = torch.tensor([0, 1, 1, num_classes - 1])
    logits = torch.zeros(4, num_classes)
    logits[0, 0] = logits[1, 1] = logits[2, 0] = logits[3, 5] = 1.0  # right, right, wrong, wrong
    m = classification_metrics(logits, targets, [50] * num_classes)
    assert m["confusion"] is None
    assert m["support"][:2] == [1, 2] and m["support"][num_classes - 1] == 1
    assert m["per_class"][0] == 100.0 and m["per_class"][1] == 50.0
    assert m["per_class"][num_classes - 1] == 0.0 and m["per_class"][2] is None
    assert m["top1"] == 50.0
