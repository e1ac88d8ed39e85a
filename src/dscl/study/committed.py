"""What of a finished cell goes into the results folder (the one to commit), kept small.

A cell's small files (:data:`dscl.study.cells.RESULT_FILES`) are copied as they are, except
where the paper's scale would make them large:

- ``metrics.json`` of more than :data:`INLINE_CONFUSION_CLASSES` classes keeps everything the
  aggregate and the figures read (accuracies, per-class accuracy, supports, class counts and
  names, groups) but not its C x C confusion matrix: that goes, gzip-compressed, into
  ``confusion.json.gz`` beside it (``"confusion": null, "confusion_file": "confusion.json.gz"``
  in the committed metrics). At ImageNet-LT's 1,000 classes the matrix is almost all of the
  run folder's 6 MB ``metrics.json``.
- A ``train_log.jsonl`` larger than :data:`COMPRESS_OVER_BYTES` is committed gzip-compressed as
  ``train_log.jsonl.gz`` (nothing the study aggregates reads it).

Smaller cells are copied byte for byte, so the committed studies made before read as they did.
Compression uses a zero timestamp: collecting a cell twice writes the same bytes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from dscl import runfiles

INLINE_CONFUSION_CLASSES = 100  # above this, the committed metrics.json leaves the matrix out
COMPRESS_OVER_BYTES = 256 * 1024
CONFUSION_FILE = "confusion.json.gz"


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _split_metrics(raw: bytes) -> dict[str, bytes]:
    """``metrics.json`` for the results folder, and its confusion matrix when that is large."""
    try:
        metrics = json.loads(raw)
    except ValueError:
        return {runfiles.METRICS: raw}
    confusion = metrics.get("confusion") if isinstance(metrics, dict) else None
    if not isinstance(confusion, list) or len(confusion) <= INLINE_CONFUSION_CLASSES:
        return {runfiles.METRICS: raw}
    metrics["confusion"] = None
    metrics["confusion_file"] = CONFUSION_FILE
    matrix = json.dumps(confusion, separators=(",", ":")).encode()
    return {
        CONFUSION_FILE: _gzip(matrix),
        runfiles.METRICS: json.dumps(metrics, indent=1, default=str).encode(),
    }


def committed_files(name: str, raw: bytes) -> dict[str, bytes]:
    """The files (name -> bytes) a cell's file ``name`` becomes in the results folder."""
    if name == runfiles.METRICS:
        return _split_metrics(raw)
    if name == runfiles.TRAIN_LOG and len(raw) > COMPRESS_OVER_BYTES:
        return {f"{name}.gz": _gzip(raw)}
    return {name: raw}


def read_confusion(folder: Path) -> list[list[int]] | None:
    """The confusion matrix of a finished cell's folder (run folder or committed copy), from its
    ``metrics.json`` or the compressed side file that one names; None where there is none."""
    metrics: Any = json.loads((folder / runfiles.METRICS).read_text(encoding="utf-8"))
    if metrics.get("confusion") is not None:
        return metrics["confusion"]
    side = metrics.get("confusion_file")
    if not side or not (folder / side).is_file():
        return None
    return json.loads(gzip.decompress((folder / side).read_bytes()))
