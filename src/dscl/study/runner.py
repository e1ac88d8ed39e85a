"""Running a study: one ``dscl run`` subprocess per cell, skipping finished cells.

A cell is finished when its committed results (``<results folder>/<cell>/``) or its run folder
hold ``metrics.json`` of the test split and a ``config.yaml`` equal to what the study resolves
for it now (:func:`dscl.config.first_difference` with :data:`dscl.config.STUDY_IGNORED_KEYS`).
A finished cell whose saved config differs is refused (the study file was changed under it).
Each finished cell gets a small ``cell.json`` (wall time, command, threads, machine) and its
small files are copied into the results folder, the folder to commit: a study started on one
machine is continued on another, and aggregated, from the committed results alone.

Before a cell runs it is claimed (``<study folder>/claims/<cell>.json``, created atomically, with
the process id, host and start time), so several ``dscl study`` processes, and the ``--jobs``
of one, never train the same cell; a claim whose process is gone is taken over. A cell handed to
SLURM (:mod:`dscl.study.slurm`) is claimed by its job: the claim names the job id and is taken
over once the job no longer exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from dscl import runfiles
from dscl.config import ABSENT, STUDY_IGNORED_KEYS, config_to_dict, first_difference
from dscl.cpuinfo import cpu_model
from dscl.errors import ConfigError, RunFolderError
from dscl.runfiles import atomic_write, git_commit
from dscl.study.committed import committed_files
from dscl.study.spec import Cell, Study, value_text

LOG_NAME = "stdout.log"
CELL_NAME = "cell.json"
ATTEMPTS_NAME = "attempts.jsonl"  # one line per attempt that ended (wall time, exit code)
ATTEMPT_HEADER = "==== dscl study "  # stdout.log's first line of every attempt
CLAIMS = "claims"
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
    return committed if (committed / runfiles.METRICS).is_file() else cell_dir(study, cell)


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


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _saved_config(run_dir: Path) -> dict | None:
    try:
        data = yaml.safe_load((run_dir / runfiles.CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _is_finished(folder: Path) -> bool:
    metrics = _read_json(folder / runfiles.METRICS)
    return metrics is not None and metrics.get("split", "test") == "test"


def _difference(study: Study, cell: Cell, saved: dict):
    return first_difference(saved, config_to_dict(cell.config), STUDY_IGNORED_KEYS)


def cell_state(study: Study, cell: Cell) -> str:
    """``fresh``, ``started`` (folder, no checkpoint), ``interrupted`` or ``finished``.

    Committed results count first: a cell whose results folder holds its metrics and a config
    equal to what the study resolves now is finished, whether or not a run folder exists here.

    Raises:
        ConfigError: the cell's committed results, or its run folder finished or interrupted
            with a stage-1 checkpoint, were made under a config that differs from what the study
            resolves for it now (the message names the folder, the cell and the first differing
            key). Such a cell is never reinterpreted or resumed under the new settings, and never
            deleted by the study.
    """
    committed = committed_dir(study, cell)
    if (committed / runfiles.METRICS).is_file():
        saved = _saved_config(committed)
        if saved is None or not _is_finished(committed):
            raise ConfigError(
                f"{committed}: committed results of cell {cell.name} lack a readable "
                "config.yaml or test metrics.json; restore them from the repository or move the "
                "folder away to run the cell again"
            )
        diff = _difference(study, cell, saved)
        if diff is None:
            return FINISHED
        raise ConfigError(
            f"{committed}: committed results of cell {cell.name} were made with "
            f"{diff.key}={_shown(diff.saved)}, the study now gives {diff.key}={_shown(diff.now)}; "
            "restore the study file, give the study a new name, or move that folder away to run "
            "the cell again (a cell is never reinterpreted)"
        )
    run_dir = cell_dir(study, cell)
    if not run_dir.exists():
        return FRESH
    finished = _is_finished(run_dir)
    interrupted = (run_dir / runfiles.PRETRAIN).is_file()
    saved = _saved_config(run_dir) if finished or interrupted else None
    if saved is None:
        return INTERRUPTED if interrupted else STARTED
    diff = _difference(study, cell, saved)
    if diff is None:
        return FINISHED if finished else INTERRUPTED
    if finished:
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
    if not _is_finished(source):
        return None
    target = committed_dir(study, cell)
    names = [name for name in RESULT_FILES if name != runfiles.METRICS] + [runfiles.METRICS]
    for name in names:
        path = source / name
        if path.is_file():
            for out, data in committed_files(name, path.read_bytes()).items():
                atomic_write(target / out, data)
    return target


def gpu_slots() -> list[str]:
    """The GPUs this process may hand to cells, as ``CUDA_VISIBLE_DEVICES`` entries: those of
    its own ``CUDA_VISIBLE_DEVICES`` when set, else every GPU; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return [entry.strip() for entry in visible.split(",") if entry.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def gpu_name(slot: int | None) -> str | None:
    """The model of this process's GPU number ``slot`` (its first without one), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(slot or 0)


def machine_info(gpu_slot: int | None = None) -> dict[str, Any]:
    """The machine a cell ran on (no host name), with the model of the GPU it was given
    (``gpu_slot``, its index among :func:`gpu_slots`) or of the first GPU."""
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
        "gpu": gpu_name(gpu_slot),
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


# The cells' subprocesses running now in this process (several with --jobs), so that an
# interrupted study stops every one of them. Reentrant: a SLURM job stops its cell from a signal
# handler (dscl.study.slurm_job), which may run while this thread holds the lock.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.RLock()


def running_cells() -> list[subprocess.Popen]:
    """The cell subprocesses this process started and has not seen end."""
    with _RUNNING_LOCK:
        return list(_RUNNING)


def stop_running_cells(timeout: float = 30.0) -> None:
    """SIGTERM every cell subprocess this process started and still runs (each saves its
    checkpoint), then wait for them (SIGKILL for one still running after ``timeout`` s)."""
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        stop_process(proc, timeout)


def cell_env(cell: Cell, gpu: str | None = None) -> dict[str, str]:
    """The environment of ``cell``'s subprocess: this one's, with ``OMP_NUM_THREADS`` set to the
    cell's ``threads`` and ``CUDA_VISIBLE_DEVICES`` to ``gpu`` when one is given."""
    env = dict(os.environ)
    if cell.config.threads is not None:
        env["OMP_NUM_THREADS"] = str(cell.config.threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def run_cell(
    study: Study,
    cell: Cell,
    gpu: int | None = None,
    *,
    wrap: Callable[[list[str]], list[str]] | None = None,
    attempt_note: Callable[[], dict[str, Any]] | None = None,
    record_note: dict[str, Any] | None = None,
    ignore_signals: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Run one unfinished cell as a subprocess; write and return its ``cell.json`` record and
    collect its small files into the results folder.

    The subprocess's stdout and stderr go to ``<cell>/stdout.log`` (appended, one header line
    per attempt); ``OMP_NUM_THREADS`` is set to the cell's ``threads``, and with ``gpu`` (an
    index into :func:`gpu_slots`) the cell sees that GPU alone. Every attempt that ends,
    finished, failed or stopped, appends its wall time to ``<cell>/attempts.jsonl``; the record
    sums them (``attempts_wall_s``) and counts the attempts the log shows (``attempts``), so a
    cell resumed across machines says how long it took in all, and whether an attempt ended
    without a time (a killed study: ``attempts_timed`` < ``attempts``).

    A SLURM job runs its cell through the same function (:mod:`dscl.study.slurm_job`) with:

    Args:
        wrap: turns the cell's command into the one to start (``torchrun`` around it).
        attempt_note: called when the attempt ends; its fields join the attempt's line.
        record_note: fields added to ``cell.json``.
        ignore_signals: signals the subprocess starts with ignored (the job's own SIGUSR2).

    Raises:
        CellFailed: the subprocess failed or left no finished run.
    """
    run_dir = cell_dir(study, cell)
    cmd = cell_command(study, cell, run_dir)
    cmd = wrap(cmd) if wrap is not None else cmd
    resumed = (run_dir / runfiles.PRETRAIN).is_file()  # an interrupted cell: it continues
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CELL_NAME).unlink(missing_ok=True)
    log_path = run_dir / LOG_NAME
    env = cell_env(cell, None if gpu is None else gpu_slots()[gpu])
    start = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    returncode = None
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"{ATTEMPT_HEADER}{study.name}: {display_command(cmd)}\n")
            log.flush()
            with _deferred(ignore_signals):  # their handlers see the child registered
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=_ignoring(ignore_signals) if ignore_signals else None,
                )
                with _RUNNING_LOCK:
                    _RUNNING.add(proc)
            try:
                returncode = proc.wait()
            except BaseException:  # Ctrl-C or an error here: do not leave the run behind
                stop_process(proc)
                returncode = proc.returncode
                raise
            finally:
                with _RUNNING_LOCK:
                    _RUNNING.discard(proc)
    finally:
        wall = time.perf_counter() - start
        note = attempt_note() if attempt_note is not None else {}
        _append_attempt(run_dir, started_at, wall, returncode, note)
    if returncode != 0:
        raise CellFailed(cell, returncode, log_path)
    if cell_state(study, cell) != FINISHED:
        raise CellFailed(cell, returncode, log_path)
    timed = _read_attempts(run_dir)
    record = {
        "cell": cell.name,
        "settings": cell.settings,
        "wall_s": round(wall, 1),
        "resumed": resumed,
        "attempts": max(len(timed), _count_attempts(log_path)),
        "attempts_timed": len(timed),
        "attempts_wall_s": round(sum(a["wall_s"] for a in timed), 1),
        "command": display_command(cmd),
        "threads": cell.config.threads,
        "git_commit": git_commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(gpu),
        **(record_note or {}),
    }
    atomic_write(run_dir / CELL_NAME, json.dumps(record, indent=1) + "\n")
    collect_cell(study, cell)
    return record


@contextlib.contextmanager
def _deferred(signals: tuple[int, ...]):
    """Hold ``signals`` back while the block runs (delivered at its end): a handler of this
    process never runs between the fork of a cell's subprocess and its registration, nor in the
    forked child before it execs."""
    if not signals:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ignoring(signals: tuple[int, ...]) -> Callable[[], None]:
    def start_ignoring() -> None:  # in the child, before exec: ignored signals stay ignored
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)

    return start_ignoring


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
    return _read_json(finished_dir(study, cell) / CELL_NAME)


# ---------------------------------------------------------------- claims


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this host still runs (the same process, where the start time
    tells a reused process id apart)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    now = _process_start(pid)
    return start is None or now is None or now == start


class Claims:
    """The claims of one study process on the cells of a study folder.

    ``claims/<cell>.json`` is created with ``O_CREAT | O_EXCL``, so of several processes (or
    ``--jobs`` threads of one) exactly one gets each cell. A claim held by a process of this
    host that no longer runs is taken over (renamed away first, so that only one taker wins);
    a claim of another host is respected (nothing here can tell whether it still runs; delete
    the file to release it).
    """

    def __init__(self, study: Study, stream=None) -> None:
        self.folder = study.study_dir / CLAIMS
        self.stream = stream if stream is not None else sys.stderr
        self.host = socket.gethostname()
        self.token = f"{self.host}:{os.getpid()}:{time.time_ns()}"
        self.held: set[str] = set()
        self._lock = threading.Lock()

    def path(self, cell: Cell) -> Path:
        return self.folder / f"{cell.name}.json"

    def take(self, cell: Cell) -> bool:
        """Claim ``cell``; False when another live process holds it."""
        path = self.path(cell)
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create(path):
                with self._lock:
                    self.held.add(cell.name)
                return True
            holder = self._read(path)
            if holder is None:  # being written this moment, or unreadable: another one's
                return False
            if holder.get("token") == self.token:
                return False  # held by another job of this process
            why = self.holder_gone(holder)
            if why is None:
                return False
            stale = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.stale")
            try:
                os.rename(path, stale)
            except FileNotFoundError:
                continue  # another process took it over first; try to create it again
            stale.unlink(missing_ok=True)
            if holder.get("job_id"):
                whose = f"SLURM job {holder['job_id']}"
            else:
                whose = f"process {holder.get('pid')} on {holder.get('host')}"
            print(
                f"study: taking over cell {cell.name}: its claim by {whose} "
                f"(since {holder.get('started')}) is gone{f' ({why})' if why else ''}",
                file=self.stream,
                flush=True,
            )
        return False

    def release_job(self, cell: Cell, job_id: str) -> None:
        """Remove the claim on ``cell`` if it names SLURM job ``job_id`` (its cell finished)."""
        path = self.path(cell)
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(holder, dict) and str(holder.get("job_id")) == str(job_id):
            path.unlink(missing_ok=True)

    def holder(self, cell: Cell) -> dict | None:
        """What the claim file of ``cell`` says (None without one)."""
        return self._read(self.path(cell))

    @staticmethod
    def holder_gone(holder: dict) -> str | None:
        """Why the holder of a claim no longer holds it: ``""`` for a process of this host that
        has ended, the job's state for a SLURM job that is no longer pending, running or
        requeued; None while it lives, or where nothing here can tell (a process of another
        host, a job where SLURM's commands are not installed)."""
        if holder.get("job_id"):
            from dscl.study.slurm_jobs import job_gone

            return job_gone(str(holder["job_id"]))
        if holder.get("host") != socket.gethostname():
            return None
        if _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
            return None
        return ""

    def set_job(self, cell: Cell, job_id: str) -> None:
        """Hand this process's claim on ``cell`` to SLURM job ``job_id``: the claim names the job
        and lives as long as the job does (this process no longer releases it)."""
        path = self.path(cell)
        holder = self._read(path)
        if holder is None or holder.get("token") != self.token:
            raise RunFolderError(f"{path}: the claim of cell {cell.name} was taken from us")
        holder.update(job_id=str(job_id), launcher="slurm")
        atomic_write(path, json.dumps(holder) + "\n")
        with self._lock:
            self.held.discard(cell.name)

    def release(self, cell: Cell) -> None:
        """Remove this process's claim on ``cell`` (a claim of another process is left)."""
        with self._lock:
            if cell.name not in self.held:
                return
            self.held.discard(cell.name)
        path = self.path(cell)
        holder = self._read(path)
        if holder is not None and holder.get("token") == self.token:
            path.unlink(missing_ok=True)

    def release_all(self, cells: list[Cell]) -> None:
        for cell in cells:
            self.release(cell)

    def _create(self, path: Path) -> bool:
        record = {
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "host": self.host,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": self.token,
        }
        # Written to a temporary file first and linked into place: the claim appears whole.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        try:
            os.link(tmp, path)  # fails if the claim exists: atomic, like O_CREAT | O_EXCL
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    @staticmethod
    def _read(path: Path) -> dict | None:
        return _read_json(path)


# ---------------------------------------------------------------- progress and scheduling


class Progress:
    """One progress display over the grid: tqdm on a terminal, plain lines otherwise.

    Safe to call from several job threads."""

    def __init__(self, total: int, done: int, label: str, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.label = total, done, label
        self.spent: list[float] = []
        self.running: list[str] = []
        self.bar = None
        self._lock = threading.Lock()
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, desc=label, unit="cell", file=self.stream, leave=True
            )

    def start(self, cell: Cell, note: str = "", jobs: int = 1) -> None:
        with self._lock:
            self.running.append(cell.name)
            if self.bar is not None:
                self.bar.set_postfix_str(", ".join(self.running), refresh=True)
                return
            eta = ""
            if self.spent:  # the grid's remaining cells (this one included) at the mean so far
                cells, mean = self.total - self.done, sum(self.spent) / len(self.spent)
                eta = (
                    f"; {cells} cell{'s' if cells != 1 else ''} left at {_duration(mean)} "
                    f"each: about {_duration(cells * mean / jobs)}"
                )
            position = self.done + len(self.running)
            self._print(f"[{position}/{self.total}] {cell.name}: running{note}{eta}")

    def finish(self, cell: Cell, seconds: float) -> None:
        with self._lock:
            self.spent.append(seconds)
            self.done += 1
            self.running.remove(cell.name)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(", ".join(self.running), refresh=True)
            else:
                self._print(f"[{self.done}/{self.total}] {cell.name}: done in {_duration(seconds)}")

    def skip(self, cell: Cell, why: str) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.write(f"study {self.label}: {cell.name}: {why}")
            else:
                self._print(f"{cell.name}: {why}")

    def abandon(self, cell: Cell) -> None:
        with self._lock:
            if cell.name in self.running:
                self.running.remove(cell.name)

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


def _describe_claim(holder: dict | None) -> str:
    if not holder:
        return "claimed by another study process; skipped"
    if holder.get("job_id"):
        return f"claimed by SLURM job {holder['job_id']} since {holder.get('started')}; skipped"
    return (
        f"claimed by process {holder.get('pid')} on {holder.get('host')} since "
        f"{holder.get('started')}; skipped"
    )


def run_cells(
    study: Study,
    cells: list[Cell],
    states: dict[str, str],
    *,
    runner: Callable[[Study, Cell], dict] = run_cell,
    jobs: int = 1,
    stream=None,
    label: str | None = None,
) -> list[str]:
    """Run the unfinished ones of ``cells``, ``jobs`` at a time, under one progress display.

    Cells are handed out in grid order; each is claimed first (a cell claimed by another live
    process is skipped with a line saying so) and released when it ends. After a failure no new
    cell starts; the cells still running finish, then the first failure is raised. With several
    jobs on a machine with several GPUs, job slot i runs its cells on GPU i mod (number of GPUs)
    (``runner(study, cell, gpu=i mod n)``), so the jobs do not all train on the first GPU.

    Returns:
        The names of the cells skipped because another process held them.

    Raises:
        CellFailed: a cell failed (the first one to fail).
        KeyboardInterrupt: the study was interrupted; every running cell was stopped with
            SIGTERM (each saved a checkpoint) and its claim released.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: need at least 1")
    todo = [cell for cell in cells if states[cell.name] != FINISHED]
    done = len(cells) - len(todo)
    progress = Progress(len(cells), done, label or study.name, stream)
    claims = Claims(study, progress.stream)
    lock = threading.Lock()
    queue = list(todo)
    failures: list[BaseException] = []
    skipped: list[str] = []
    gpus = len(gpu_slots()) if jobs > 1 else 0

    def next_cell() -> Cell | None:
        while True:
            with lock:
                if failures or not queue:
                    return None
                cell = queue.pop(0)
            if cell_state(study, cell) == FINISHED:  # another process finished it meanwhile
                with lock:
                    progress.done += 1
                continue
            if claims.take(cell):
                return cell
            with lock:
                skipped.append(cell.name)
            progress.skip(cell, _describe_claim(claims.holder(cell)))

    def work(slot: int = 0) -> None:
        placement = {"gpu": slot % gpus} if gpus > 1 else {}
        while True:
            try:
                cell = next_cell()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                with lock:
                    failures.append(err)
                return
            if cell is None:
                return
            note = " (resuming)" if states[cell.name] == INTERRUPTED else ""
            progress.start(cell, note, jobs)
            start = time.perf_counter()
            try:
                runner(study, cell, **placement)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                progress.abandon(cell)
                with lock:
                    failures.append(err)
                return
            finally:
                claims.release(cell)
            progress.finish(cell, time.perf_counter() - start)

    try:
        if jobs == 1:
            work()
        else:
            threads = [
                threading.Thread(target=work, args=(i,), name=f"study-job-{i}", daemon=True)
                for i in range(jobs)
            ]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(timeout=0.2)
    except BaseException:
        with lock:
            queue.clear()
        stop_running_cells()
        claims.release_all(cells)
        raise
    finally:
        progress.close()
    if failures:
        raise failures[0]
    return skipped
