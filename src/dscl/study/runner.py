"""Running a study: one ``dscl run`` subprocess per cell, skipping finished cells.

Which cells are finished, and what a finished cell leaves, is :mod:`dscl.study.cells`; before a
cell runs it is claimed (:mod:`dscl.study.claims`), so no two study processes train it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from dscl import runfiles
from dscl.cpuinfo import processor_name
from dscl.errors import ConfigError
from dscl.runfiles import atomic_write, git_commit
from dscl.study.cells import (
    ATTEMPT_HEADER,
    CELL_NAME,
    FINISHED,
    INTERRUPTED,
    LOG_NAME,
    _append_attempt,
    _count_attempts,
    _read_attempts,
    cell_dir,
    cell_state,
    collect_cell,
    read_cell_record,
)
from dscl.study.claims import Claims, _describe_claim
from dscl.study.progress import Progress
from dscl.study.spec import Cell, Study


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
        "processor": processor_name(),
        "machine": platform.machine() or None,
        "system": platform.system() or None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch_version,
        "gpu": gpu_name(gpu_slot),
    }


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
    resumed = runfiles.run_state(run_dir).checkpointed  # an interrupted cell: it continues
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


def _run_jobs(work: Callable[[int], None], jobs: int) -> None:
    """``work(slot)`` for each of ``jobs`` slots: in this thread for one, else in threads joined
    in short waits, so that a signal (KeyboardInterrupt) reaches this thread meanwhile."""
    if jobs == 1:
        work(0)
        return
    threads = [
        threading.Thread(target=work, args=(i,), name=f"study-job-{i}", daemon=True)
        for i in range(jobs)
    ]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=0.2)


def _progress(study: Study, cells: list[Cell], todo: list[Cell], label: str, stream) -> Progress:
    """The display over ``cells``, its estimates from the wall times of the finished ones
    (their ``cell.json``, earlier sessions' included) by setting."""
    waiting = {cell.name for cell in todo}
    known = []
    for cell in cells:
        wall = None if cell.name in waiting else (read_cell_record(study, cell) or {}).get("wall_s")
        if isinstance(wall, (int, float)):
            known.append((cell, float(wall)))
    done = len(cells) - len(todo)
    return Progress(
        len(cells), done, label, stream, todo=todo, known=known, setting=study.setting_key
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
    progress = _progress(study, cells, todo, label or study.name, stream)
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
                progress.finished_elsewhere(cell)
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
        _run_jobs(work, jobs)
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
