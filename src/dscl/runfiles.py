"""Run files, without torch: the names of the files in a run folder (``<output_dir>/<name>/``),
the one atomic writer of the files written whole (checkpoints, configs, metrics, reports, study
results; the training log is appended), and the commit a run is made from."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, BinaryIO

PRETRAIN = "pretrain.pt"  # stage 1's checkpoint, written after every epoch
LAST = "last.pt"  # stage 2's newest checkpoint
BEST = "best.pt"  # stage 2's checkpoint of the best validation epoch
METRICS = "metrics.json"  # the evaluation of a checkpoint (test split: the run's result)
TRAIN_LOG = "train_log.jsonl"  # one JSON record per logged step or epoch
REPORT = "report.html"
CONFIG = "config.yaml"  # the run's resolved config
DATA_SUMMARY = "data_summary.json"  # class counts, splits and shot groups of the data
TENSORBOARD = "tensorboard"  # a folder

# A study's results folder (``results/<study>/``): the aggregate and what is written beside it
STUDY_FILE = "study.yaml"  # the study file as the results were made with it
RESULTS_JSON = "results.json"  # the aggregate, machine-readable
RESULTS_MD = "RESULTS.md"  # the aggregate, to read
FINDINGS = "FINDINGS.md"  # hand-written sentences; RESULTS.md includes them
STUDY_FIGURE = "study.png"  # per-class accuracy and group means
BUDGET_FIGURE = "budget.png"  # top-1 and Few against stage-1 epochs (studies that compare)


def previous_name(name: str) -> str:
    """The name of the file that ``name`` replaced: ``pretrain.pt`` -> ``pretrain.prev.pt``."""
    path = PurePath(name)
    return f"{path.stem}.prev{path.suffix}"


PRETRAIN_PREV = previous_name(PRETRAIN)
LAST_PREV = previous_name(LAST)


@functools.cache
def git_commit() -> str | None:
    """The commit of the source tree this package runs from, or None outside a git checkout.

    Asked once per process: every checkpoint of a run carries the same answer."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def atomic_write(
    path: str | Path,
    content: bytes | str | Callable[[BinaryIO], None],
    *,
    verify: Callable[[Path], None] | None = None,
    keep_previous: bool = False,
) -> Path:
    """Write a file atomically: a temporary file in the same folder, fsync, then a rename.

    A crash or a full disk mid-write leaves the previous file intact (a SIGKILL mid-write can
    leave the temporary file; resuming the run folder removes it).

    Args:
        path: the file to (re)place; its folder is created if needed.
        content: bytes, text (written as UTF-8), or a function that writes to a binary handle.
        verify: called on the written temporary file before it replaces ``path``; raises if the
            file cannot be read back.
        keep_previous: move the file being replaced to :func:`previous_path` first, so an older
            good copy survives whatever happens to the new one.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        if verify is not None:
            verify(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are meant to be shared
        if keep_previous and path.is_file():
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _keep_previous(path: Path) -> None:
    """Make ``previous_path(path)`` a copy of ``path`` while ``path`` itself stays in place (a
    hard link renamed over the old previous file), so some readable checkpoint exists at every
    moment; where hard links are not supported, ``path`` is moved instead."""
    link = path.with_name(f".{path.name}.prev-link.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous_path(path))
        return
    os.replace(link, previous_path(path))


def previous_path(path: str | Path) -> Path:
    """Where the file that ``path`` replaced is kept: ``pretrain.pt`` -> ``pretrain.prev.pt``."""
    path = Path(path)
    return path.with_name(previous_name(path.name))


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(payload, indent=1, default=str))
