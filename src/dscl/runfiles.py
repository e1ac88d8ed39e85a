"""The names of the files in a run folder (``<output_dir>/<name>/``), in one place."""

from __future__ import annotations

from pathlib import PurePath

PRETRAIN = "pretrain.pt"  # stage 1's checkpoint, written after every epoch
LAST = "last.pt"  # stage 2's newest checkpoint
BEST = "best.pt"  # stage 2's checkpoint of the best validation epoch
METRICS = "metrics.json"  # the evaluation of a checkpoint (test split: the run's result)
TRAIN_LOG = "train_log.jsonl"  # one JSON record per logged step or epoch
REPORT = "report.html"
CONFIG = "config.yaml"  # the run's resolved config
DATA_SUMMARY = "data_summary.json"  # class counts, splits and shot groups of the data
TENSORBOARD = "tensorboard"  # a folder


def previous_name(name: str) -> str:
    """The name of the file that ``name`` replaced: ``pretrain.pt`` -> ``pretrain.prev.pt``."""
    path = PurePath(name)
    return f"{path.stem}.prev{path.suffix}"


PRETRAIN_PREV = previous_name(PRETRAIN)
LAST_PREV = previous_name(LAST)
