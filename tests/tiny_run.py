"""The tiny run the end-to-end tests share: a synthetic long-tailed set, a stage in seconds."""

from __future__ import annotations

import json
from pathlib import Path

# synthetic_lt with 40..4 images per class (about 150 in all), 16 px: a stage takes seconds.
TINY = [
    "data.name=synthetic_lt",
    "data.n_max=40",
    "data.imbalance_ratio=10",
    "data.image_size=16",
    "data.val_per_class=4",
    "data.extra={image_size: 16, test_per_class: 10}",
    "data.many_threshold=30",
    "data.few_threshold=10",
    "pretrain.epochs=1",
    "pretrain.batch_size=32",
    "pretrain.queue_size=64",
    "pretrain.warmup_epochs=0",
    "classifier.epochs=2",
    "classifier.batch_size=32",
    "classifier.base_lr=0.5",
    "classifier.milestones=[1]",
    "log_every=1",
]


def metrics_counts(run_dir: Path) -> list[int]:
    return json.loads((run_dir / "metrics.json").read_text())["class_counts"]


def tiny(tmp: Path, *extra: str) -> list[str]:
    return [*TINY, f"output_dir={tmp}", *extra]
