"""A study's cells on disk: their folders, their state, their records, and which of them run.

A cell is finished when its committed results (``<results folder>/<cell>/``) or its run folder
hold ``metrics.json`` of the test split and a ``config.yaml`` equal to what the study resolves
for it now (:func:`dscl.config.first_difference` with :data:`dscl.config.STUDY_IGNORED_KEYS`);
what a folder holds is read by :func:`dscl.runfiles.run_state`. A finished cell whose saved config
differs is refused (the study file was changed under it). Each finished cell gets a small
``cell.json`` (wall time, command, threads, machine) and its small files are copied into the
results folder, the folder to commit: a study started on one machine is continued on another,
and aggregated, from the committed results alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dscl import runfiles
from dscl.config import ABSENT, STUDY_IGNORED_KEYS, config_to_dict, first_difference
from dscl.errors import ConfigError, RunFolderError
from dscl.runfiles import atomic_write, read_json, run_state
from dscl.study.committed import committed_files
from dscl.study.spec import Cell, Study, value_text

LOG_NAME = "stdout.log"
CELL_NAME = "cell.json"
ATTEMPTS_NAME = "attempts.jsonl"  # one line per attempt that ended (wall time, exit code)
ATTEMPT_HEADER = "==== dscl study "  # stdout.log's first line of every attempt
LOG_TAIL_LINES = 25
# A finished cell's small files, the ones copied into the results folder (never checkpoints).
RESULT_FILES = (
    runfiles.METRICS,
    runfiles.CONFIG,
    runfiles.DATA_SUMMARY,
    CELL_NAME,
    runfiles.TRAIN_LOG,
)
FRESH, STARTED, INTERRUPTED, FINISHED = "fresh", "started", "interrupted", "finished"


def cell_dir(study: Study, cell: Cell) -> Path:
    """The run folder of ``cell``: ``<study folder>/<cell name>``."""
    return study.study_dir / cell.name


def committed_dir(study: Study, cell: Cell) -> Path:
    """Where the cell's results are collected: ``<results folder>/<cell name>``."""
    return study.results_dir / cell.name


def finished_dir(study: Study, cell: Cell) -> Path:
    """The folder a finished cell's results are read from: the committed copy if there is one,
    else its run folder."""
    committed = committed_dir(study, cell)
    return committed if run_state(committed).has(runfiles.METRICS) else cell_dir(study, cell)


def _difference(study: Study, cell: Cell, saved: dict):
    return first_difference(saved, config_to_dict(cell.config), STUDY_IGNORED_KEYS)


def cell_state(study: Study, cell: Cell) -> str:
    """``fresh``, ``started`` (folder, no checkpoint), ``interrupted`` or ``finished``.

    Committed results count first: a cell whose results folder holds its metrics and a config
    equal to what the study resolves now is finished, whether or not a run folder exists here.
    A run folder is read by :func:`dscl.runfiles.run_state`: finished means its test split's
    ``metrics.json``, interrupted a checkpoint (the previous copies included) without it.

    Raises:
        ConfigError: the cell's committed results, or its run folder finished or interrupted
            with a checkpoint, were made under a config that differs from what the study
            resolves for it now (the message names the folder, the cell and the first differing
            key). Such a cell is never reinterpreted or resumed under the new settings, and never
            deleted by the study.
    """
    committed = run_state(committed_dir(study, cell))
    if committed.has(runfiles.METRICS):
        saved = committed.config
        if saved is None or not committed.finished:
            raise ConfigError(
                f"{committed.folder}: committed results of cell {cell.name} lack a readable "
                "config.yaml or test metrics.json; restore them from the repository or move the "
                "folder away to run the cell again"
            )
        diff = _difference(study, cell, saved)
        if diff is None:
            return FINISHED
        raise ConfigError(
            f"{committed.folder}: committed results of cell {cell.name} were made with "
            f"{diff.key}={_shown(diff.saved)}, the study now gives {diff.key}={_shown(diff.now)}; "
            "restore the study file, give the study a new name, or move that folder away to run "
            "the cell again (a cell is never reinterpreted)"
        )
    run_dir = cell_dir(study, cell)
    state = run_state(run_dir)
    if state.stage == runfiles.ABSENT:
        return FRESH
    if state.stage == runfiles.STARTED:
        return STARTED
    saved = state.config
    if saved is None:  # a run folder whose config.yaml is missing or unreadable
        return INTERRUPTED if state.checkpointed else STARTED
    diff = _difference(study, cell, saved)
    if diff is None:
        return FINISHED if state.finished else INTERRUPTED
    if state.finished:
        remedy = "restore the study file or give the study a new name"
        what = "finished"
    else:
        remedy = f"restore the study file, or delete {run_dir} to start the cell again"
        what = "was interrupted"
    raise ConfigError(
        f"{study.path}: cell {cell.name} {what} with {diff.key}={_shown(diff.saved)}, the study "
        f"now gives {diff.key}={_shown(diff.now)}; {remedy} (a cell is never reinterpreted)"
    )


def _shown(value: Any) -> str:
    return "(absent)" if value is ABSENT else value_text(value)


def collect_cell(study: Study, cell: Cell) -> Path | None:
    """Copy a finished cell's small files (:data:`RESULT_FILES`, never checkpoints) from its run
    folder into the results folder; return that folder, or None if there was nothing to copy
    (no finished run folder). Each file goes through the one atomic writer, ``metrics.json``
    last, so a half-collected cell is never taken for a finished one. A large confusion matrix
    or training log is committed compressed (:mod:`dscl.study.committed`)."""
    source = cell_dir(study, cell)
    if not run_state(source).finished:
        return None
    target = committed_dir(study, cell)
    names = [name for name in RESULT_FILES if name != runfiles.METRICS] + [runfiles.METRICS]
    for name in names:
        path = source / name
        if path.is_file():
            for out, data in committed_files(name, path.read_bytes()).items():
                atomic_write(target / out, data)
    return target


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    if text is None:
        return None
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: expected i/n with 0 <= i < n, e.g. 0/3")
    return i, n


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Cells ``i, i + n, i + 2n, ...`` of the grid order (all cells without a shard)."""
    if shard is None:
        return list(cells)
    i, n = shard
    return [cell for cell in cells if cell.index % n == i]


def parse_only(texts: list[str] | None, study: Study) -> dict[str, set[str]]:
    """``--only`` arguments (``KEY=V1,V2``, repeatable) -> {axis: the value texts to run}.

    Each key must be an axis of the study. The values are read as one YAML flow sequence, as a
    ``key=value`` override reads its value (``lr=[0.1, 0.2],[0.3, 0.4]`` is two values), and each
    must be one of the axis's values (compared as ``value_text``). Repeating a key adds values.
    """
    selected: dict[str, set[str]] = {}
    for text in texts or []:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--only {text}: expected KEY=VALUE[,VALUE...], e.g. method=ce,dscl")
        if key not in study.axes:
            raise ConfigError(
                f"--only {text}: {key!r} is not an axis of study {study.name} "
                f"(axes: {', '.join(study.axes)})"
            )
        try:
            parsed = yaml.safe_load(f"[{values}]")
        except yaml.YAMLError:
            raise ConfigError(f"--only {text}: cannot read the values as YAML") from None
        known = [value_text(value) for value in study.axes[key]]
        for value in map(value_text, parsed):
            if value not in known:
                raise ConfigError(
                    f"--only {text}: {value!r} is not a value of axis {key!r} "
                    f"(values: {', '.join(known)})"
                )
            selected.setdefault(key, set()).add(value)
    return selected


def only_cells(cells: list[Cell], only: dict[str, set[str]]) -> list[Cell]:
    """The cells whose value on every ``--only`` axis is one of the selected (all without)."""
    return [
        cell
        for cell in cells
        if all(value_text(cell.settings[key]) in values for key, values in only.items())
    ]


def write_study_file(study: Study, folder: Path | None = None) -> Path:
    """Write the resolved study (``study.yaml``) into ``folder`` (default: the study folder)."""
    folder = study.study_dir if folder is None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"{folder}: cannot create the study folder ({err.strerror})") from None
    return atomic_write(folder / runfiles.STUDY_FILE, study.to_yaml())


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _append_attempt(
    run_dir: Path, started_at: str, wall: float, returncode: int | None, note: dict | None = None
) -> None:
    line = {"started_at": started_at, "wall_s": round(wall, 1), "returncode": returncode}
    line.update(note or {})
    path = run_dir / ATTEMPTS_NAME
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write(path, before + json.dumps(line) + "\n")


def _read_attempts(run_dir: Path) -> list[dict]:
    """The timed attempts of a run folder (a line cut short by a crash is skipped)."""
    path = run_dir / ATTEMPTS_NAME
    if not path.is_file():
        return []
    attempts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("wall_s"), (int, float)):
            attempts.append(entry)
    return attempts


def _count_attempts(log_path: Path) -> int:
    """How many attempts ``stdout.log`` shows (each starts with a header line)."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return sum(line.startswith(ATTEMPT_HEADER) for line in f)


def read_cell_record(study: Study, cell: Cell) -> dict | None:
    """The ``cell.json`` the study wrote when ``cell`` finished, if any."""
    return read_json(finished_dir(study, cell) / CELL_NAME)
