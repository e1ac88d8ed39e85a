"""Run files, without torch: the names of the files in a run folder (``<output_dir>/<name>/``),
what a run folder holds and how far its run got (:func:`run_state`), the one atomic writer of
the files written whole (checkpoints, configs, metrics, reports, study results; the training log
is appended), and the commit a run is made from."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

import yaml

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
# Every file a run writes into its folder (besides the TENSORBOARD folder): what ``--overwrite``
# removes, so that nothing of the run it replaces is left to be read as part of the new one.
RUN_FILES = (
    PRETRAIN,
    LAST,
    BEST,
    METRICS,
    TRAIN_LOG,
    REPORT,
    CONFIG,
    DATA_SUMMARY,
    PRETRAIN_PREV,
    LAST_PREV,
)

# How far a run got (:attr:`RunState.stage`), read from the files of its folder alone
ABSENT = "absent"  # no run folder
STARTED = "started"  # a folder without a checkpoint or test metrics
STAGE1 = "stage1"  # stage 1's checkpoint is the newest: stage 1 interrupted or done
STAGE2 = "stage2"  # a stage-2 checkpoint, no test metrics: stage 2 interrupted, or evaluation left
FINISHED = "finished"  # metrics.json of the test split: the run's result
STAGE1_CHECKPOINTS = (PRETRAIN, PRETRAIN_PREV)
STAGE2_CHECKPOINTS = (LAST, LAST_PREV)


@dataclass(frozen=True)
class RunState:
    """What a run folder holds, as :func:`run_state` found it.

    Whether stage 1 (or stage 2) finished is written inside its checkpoint alone, so a folder
    whose newest checkpoint is stage 1's is :data:`STAGE1` either way; ``dscl`` commands that need
    to know read the checkpoint on top of this (``dscl.cli.plan_resume``).

    The commands count a folder as done differently, each through one property here:
    :attr:`finished` (``dscl study``: the test split's metrics.json) and :attr:`holds_run`
    (``dscl pretrain`` and ``dscl run`` refuse to replace such a folder without ``--overwrite``
    or ``--resume``: any checkpoint, or metrics.json of any split). ``--resume`` has nothing left
    to do once the checkpoint says its stage finished and, for stage 2, a metrics.json of any
    split is present (the command's own evaluation is its last step).
    """

    folder: Path
    exists: bool
    files: frozenset[str]  # which of the run files that tell the state are present

    def has(self, name: str) -> bool:
        """Whether the folder holds the file ``name`` (one of :func:`run_state`'s names)."""
        return name in self.files

    @property
    def stage1_checkpoint(self) -> bool:
        """Stage 1's checkpoint, or the previous copy of it, is present."""
        return any(name in self.files for name in STAGE1_CHECKPOINTS)

    @property
    def stage2_checkpoint(self) -> bool:
        """Stage 2's training checkpoint (``last.pt``), or the previous copy of it, is present."""
        return any(name in self.files for name in STAGE2_CHECKPOINTS)

    @property
    def stage2_reached(self) -> bool:
        """Stage 2 saved a checkpoint: ``last.pt`` (or its previous copy) or ``best.pt``
        (``classifier.mode=keep`` writes ``best.pt`` alone)."""
        return self.stage2_checkpoint or BEST in self.files

    @property
    def checkpointed(self) -> bool:
        """Some checkpoint is present: a run to continue (or a finished one)."""
        return self.stage1_checkpoint or self.stage2_reached

    @functools.cached_property
    def metrics(self) -> dict | None:
        """``metrics.json`` when it reads as a JSON object, else None."""
        return read_json(self.folder / METRICS) if METRICS in self.files else None

    @functools.cached_property
    def config(self) -> dict | None:
        """``config.yaml`` when it reads as a YAML mapping, else None (no error: a caller that
        must report a broken file reads it with ``dscl.config.load_yaml``)."""
        if CONFIG not in self.files:
            return None
        try:
            data = yaml.safe_load((self.folder / CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None

    @property
    def finished(self) -> bool:
        """The run's result is written: ``metrics.json`` of the test split (one without a
        ``split`` field, as older runs wrote it, counts as the test split)."""
        return self.metrics is not None and self.metrics.get("split", "test") == "test"

    @property
    def holds_run(self) -> bool:
        """The folder holds something a new run would replace: a checkpoint, or ``metrics.json``
        of any split."""
        return self.checkpointed or METRICS in self.files

    @property
    def stage(self) -> str:
        """How far the run got: :data:`ABSENT`, :data:`STARTED`, :data:`STAGE1`,
        :data:`STAGE2` or :data:`FINISHED`."""
        if not self.exists:
            return ABSENT
        if self.finished:
            return FINISHED
        if self.stage2_reached:
            return STAGE2
        return STAGE1 if self.stage1_checkpoint else STARTED


def run_state(folder: str | Path) -> RunState:
    """What the run folder ``folder`` holds and how far its run got, from its files alone (no
    checkpoint is opened; ``metrics.json`` and ``config.yaml`` are read when asked for)."""
    folder = Path(folder)
    names = (*STAGE1_CHECKPOINTS, *STAGE2_CHECKPOINTS, BEST, METRICS, CONFIG)
    present = frozenset(name for name in names if (folder / name).is_file())
    return RunState(folder, folder.exists(), present)


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


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``; None when the file is missing, unreadable or holds no
    object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
