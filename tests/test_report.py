"""Tests for dscl.report: a self-contained HTML report from a fake run folder."""

import base64
import json
import re

import pytest
import torch

from dscl.engine.evaluate import classification_metrics
from dscl.report import write_report

IMAGE_PATTERN = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOG_LINES = [
    {"stage": "pretrain", "epoch": 0, "step": 10, "loss": 5.1, "loss_dscl": 4.0,
     "loss_pbsd": 0.7, "lr": 0.05, "images_per_sec": 800.0},
    {"stage": "pretrain", "epoch": 1, "step": 20, "loss": 4.8, "loss_dscl": 3.9,
     "loss_pbsd": 0.6, "lr": 0.04, "images_per_sec": 810.0},
    {"stage": "classifier", "epoch": 0, "step": 5, "loss": 1.5, "lr": 1.0},
    {"stage": "classifier", "epoch": 1, "step": 10, "loss": 1.2, "lr": 0.1},
    {"stage": "classifier", "epoch": 1, "val_top1": 61.0, "val_many": 70.0, "val_few": 20.0},
]  # fmt: skip


def _make_run(run_dir, *, with_metrics=True):
    lines = [json.dumps(record) for record in LOG_LINES]
    lines.insert(2, '{"stage": "pretrain", "step": 30, "loss": ')  # truncated: malformed
    lines.insert(4, "[1, 2, 3]")  # valid JSON but not an object: malformed
    (run_dir / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "config.yaml").write_text("method: dscl\nnote: a<b & c\n")
    if with_metrics:
        logits = torch.eye(4)[[0, 0, 1, 2, 2, 2, 1, 1]]  # (8, 4) one-hot predictions
        targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        metrics = classification_metrics(logits, targets, [150, 100, 20, 5])
        metrics.update(split="test", epoch=39, method="dscl+pbsd")
        metrics["class_names"] = ["cat", "dog", "<b>bird</b>", "$5 bill"]
        (run_dir / "metrics.json").write_text(json.dumps(metrics))


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in IMAGE_PATTERN.findall(page)]


def _assert_offline(page: str):
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert page.count("<img") == len(IMAGE_PATTERN.findall(page))  # every image is inline


def test_full_report(tmp_path):
    _make_run(tmp_path)
    path = write_report(tmp_path)
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    for heading in ("Summary", "Accuracy by shot group", "Confusion matrix", "Per-class accuracy",
                    "Training curves", "Validation curves", "Configuration"):  # fmt: skip
        assert f"<h2>{heading}</h2>" in page
    # 3 metric figures (group bars, accuracy vs count, confusion) + 2 stages of training curves
    # (pretrain, classifier) + 1 stage with validation lines (classifier).
    images = _images(page)
    assert len(images) == 6
    assert all(image.startswith(PNG_MAGIC) for image in images)
    _assert_offline(page)
    assert "Skipped 2 malformed line(s)" in page
    assert "note: a&lt;b &amp; c" in page and "a<b" not in page
    assert "<details>" in page
    assert "&lt;b&gt;bird&lt;/b&gt;" in page and "<b>bird" not in page
    assert "dscl+pbsd" in page and "62.50" in page  # method and top-1 (5 / 8)
    assert "n/a" not in page  # every group and class has a value in this case
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_report_without_metrics(tmp_path):
    _make_run(tmp_path, with_metrics=False)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "not been evaluated yet" in page
    assert "<h2>Per-class accuracy</h2>" not in page
    assert len(_images(page)) == 3  # pretrain and classifier curves + classifier validation
    _assert_offline(page)


def test_report_of_empty_folder_and_overwrite(tmp_path):
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "not been evaluated yet" in page and "No config.yaml" in page
    assert "No train_log.jsonl" in page and len(_images(page)) == 0
    _make_run(tmp_path)
    page = write_report(tmp_path).read_text(encoding="utf-8")  # replaces the earlier report
    assert len(_images(page)) == 6


def test_report_missing_group_and_class_shows_na(tmp_path):
    metrics = classification_metrics(torch.eye(3), torch.tensor([0, 1, 2]), [500, 500, 50])
    metrics["per_class"][2] = None  # as if class 2 had no test sample
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Few % (0 classes)</th><td>n/a" in page
    assert len(_images(page)) == 3


def test_unreadable_metrics_is_reported(tmp_path):
    (tmp_path / "metrics.json").write_text("{not json")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "metrics.json could not be read" in page


def test_missing_run_dir(tmp_path):
    with pytest.raises(ValueError, match="run_dir"):
        write_report(tmp_path / "absent")
