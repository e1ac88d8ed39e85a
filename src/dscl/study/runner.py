"""Running a study: one ``dscl run`` subprocess per cell, skipping finished cells.

A cell is finished when its run folder holds ``metrics.json`` of the test split and a
``config.yaml`` equal to what the study resolves for it now. A finished cell whose saved config
differs is refused (the study file was changed under it). Each finished cell gets a small
``cell.json`` (wall time, command, machine) written by the study.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from dscl.config import config_to_dict
from dscl.cpuinfo import cpu_model
from dscl.errors import ConfigError, RunFolderError
from dscl.study.spec import Cell, Study, value_text

LOG_NAME = "stdout.log"
CELL_NAME = "cell.json"
LOG_TAIL_LINES = 25
IGNORED_KEYS = ("output_dir",)


class _Absent:
    """A key missing from one of two compared configs."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()
FRESH, STARTED, INTERRUPTED, FINISHED = "fresh", "started", "interrupted", "finished"


def cell_dir(study: Study, cell: Cell) -> Path:
    """The run folder of ``cell``: ``<study folder>/<cell name>``."""
    return study.study_dir / cell.name


def cell_command(study: Study, cell: Cell, run_dir: Path | None = None) -> list[str]:
    """The ``dscl run`` command line of an unfinished ``cell``.

    Always with ``--resume auto``: a fresh cell starts, an interrupted one continues from its
    newest checkpoint in whichever stage it stopped (mid-epoch included), and a finished one is
    left alone. ``run_dir`` is accepted for the callers' convenience; the command does not
    depend on it.
    """
    cmd = [sys.executable, "-m", "dscl.cli", "run", "--config", study.base, "--name", cell.name]
    cmd += [*study.override_texts, *cell.overrides, f"output_dir={study.study_dir}"]
    return [*cmd, "--resume", "auto"]


def display_command(cmd: list[str]) -> str:
    """``cmd`` as one shell line, with ``python`` for the interpreter's path."""
    shown = ["python", *cmd[1:]] if cmd and cmd[0] == sys.executable else list(cmd)
    return shlex.join(shown)


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: numbers by value (8 == 8.0), booleans and text by type too."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def first_difference(saved: dict, now: dict) -> tuple[str, Any, Any] | None:
    """The first dotted key (in ``now``'s order) whose value differs, or ``None``.

    ``output_dir`` is not compared: it says where the folder is, not what ran in it.
    """
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    for key in [*flat_now, *(k for k in flat_saved if k not in flat_now)]:
        if key in IGNORED_KEYS:
            continue
        a, b = flat_saved.get(key, ABSENT), flat_now.get(key, ABSENT)
        if a is ABSENT or b is ABSENT or not _same(a, b):
            return key, a, b
    return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _saved_config(run_dir: Path) -> dict | None:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def cell_state(study: Study, cell: Cell) -> str:
    """``fresh``, ``started`` (folder, no checkpoint), ``interrupted`` or ``finished``.

    Raises:
        ConfigError: the cell finished, or was interrupted with a stage-1 checkpoint, under a
            config that differs from what the study resolves for it now (the message names the
            cell and the first differing key). Such a cell is never reinterpreted or resumed
            under the new settings, and never deleted by the study.
    """
    run_dir = cell_dir(study, cell)
    if not run_dir.exists():
        return FRESH
    metrics = _read_json(run_dir / "metrics.json")
    finished = metrics is not None and metrics.get("split", "test") == "test"
    interrupted = (run_dir / "pretrain.pt").is_file()
    saved = _saved_config(run_dir) if finished or interrupted else None
    if saved is None:
        return INTERRUPTED if interrupted else STARTED
    diff = first_difference(saved, config_to_dict(cell.config))
    if diff is None:
        return FINISHED if finished else INTERRUPTED
    key, before, after = (diff[0], *(_shown(v) for v in diff[1:]))
    if finished:
        remedy = "restore the study file or give the study a new name"
        what = "finished"
    else:
        remedy = f"restore the study file, or delete {run_dir} to start the cell again"
        what = "was interrupted"
    raise ConfigError(
        f"{study.path}: cell {cell.name} {what} with {key}={before}, the study now gives "
        f"{key}={after}; {remedy} (a cell is never reinterpreted)"
    )


def _shown(value: Any) -> str:
    return "(absent)" if value is ABSENT else value_text(value)


def machine_info() -> dict[str, Any]:
    """The machine a cell ran on (no host name)."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {
        "processor": cpu_model() or platform.processor() or None,
        "machine": platform.machine() or None,
        "system": platform.system() or None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch_version,
    }


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_study_file(study: Study) -> Path:
    """Write the resolved study (``study.yaml``) into the study folder."""
    try:
        study.study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(
            f"{study.study_dir}: cannot create the study folder ({err.strerror})"
        ) from None
    path = study.study_dir / "study.yaml"
    _write_atomic(path, study.to_yaml())
    return path


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class CellFailed(RuntimeError):
    """A cell's ``dscl run`` exited with an error (not a user error of the study itself)."""

    def __init__(self, cell: Cell, returncode: int, log: Path) -> None:
        super().__init__(f"cell {cell.name} failed with exit code {returncode} (log: {log})")
        self.cell, self.returncode, self.log = cell, returncode, log


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """End ``proc`` if it still runs: SIGTERM (a run then saves its checkpoint), and SIGKILL if
    it has not exited within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_cell(study: Study, cell: Cell) -> dict[str, Any]:
    """Run one unfinished cell as a subprocess; write and return its ``cell.json`` record.

    The subprocess's stdout and stderr go to ``<cell>/stdout.log`` (appended, one header line
    per attempt).

    Raises:
        CellFailed: the subprocess failed or left no finished run.
    """
    run_dir = cell_dir(study, cell)
    cmd = cell_command(study, cell, run_dir)
    resumed = (run_dir / "pretrain.pt").is_file()  # an interrupted cell: it continues
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CELL_NAME).unlink(missing_ok=True)
    log_path = run_dir / LOG_NAME
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"==== dscl study {study.name}: {display_command(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait()
        except BaseException:  # Ctrl-C or an error here: do not leave the run behind
            stop_process(proc)
            raise
    wall = time.perf_counter() - start
    if returncode != 0:
        raise CellFailed(cell, returncode, log_path)
    if cell_state(study, cell) != FINISHED:
        raise CellFailed(cell, returncode, log_path)
    record = {
        "cell": cell.name,
        "settings": cell.settings,
        "wall_s": round(wall, 1),
        "resumed": resumed,
        "command": display_command(cmd),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    _write_atomic(run_dir / CELL_NAME, json.dumps(record, indent=1) + "\n")
    return record


def read_cell_record(study: Study, cell: Cell) -> dict | None:
    """The ``cell.json`` the study wrote when ``cell`` finished, if any."""
    return _read_json(cell_dir(study, cell) / CELL_NAME)


class Progress:
    """One progress display over the grid: tqdm on a terminal, plain lines otherwise."""

    def __init__(self, total: int, done: int, label: str, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.label = total, done, label
        self.spent: list[float] = []
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, desc=label, unit="cell", file=self.stream, leave=True
            )

    def start(self, cell: Cell, note: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(cell.name, refresh=True)
            return
        eta = ""
        if self.spent:
            left = (self.total - self.done) * sum(self.spent) / len(self.spent)
            eta = f", ETA {_duration(left)}"
        self._print(f"[{self.done + 1}/{self.total}] {cell.name}: running{note}{eta}")

    def finish(self, cell: Cell, seconds: float) -> None:
        self.spent.append(seconds)
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            self._print(f"[{self.done}/{self.total}] {cell.name}: done in {_duration(seconds)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _print(self, text: str) -> None:
        print(f"study {self.label}: {text}", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def run_cells(
    study: Study,
    cells: list[Cell],
    states: dict[str, str],
    *,
    runner: Callable[[Study, Cell], dict] = run_cell,
    stream=None,
    label: str | None = None,
) -> None:
    """Run the unfinished ones of ``cells`` in order under one progress display."""
    done = sum(states[c.name] == FINISHED for c in cells)
    progress = Progress(len(cells), done, label or study.name, stream)
    try:
        for cell in cells:
            if states[cell.name] == FINISHED:
                continue
            note = " (resuming)" if states[cell.name] == INTERRUPTED else ""
            progress.start(cell, note)
            start = time.perf_counter()
            runner(study, cell)
            progress.finish(cell, time.perf_counter() - start)
    finally:
        progress.close()
