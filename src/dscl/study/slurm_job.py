"""What a study cell's SLURM job runs: :class:`CellJob`, submitted (pickled) by submitit.

On the cell's first node the job runs the cell as ``dscl study`` would
(:func:`dscl.study.runner.run_cell`: ``dscl run ... --resume auto``, its log appended to
``<cell>/stdout.log``, ``cell.json`` and the collected results at the end), then releases the
cell's claim. With several GPUs or nodes each node runs ``torchrun`` (``python -m
torch.distributed.run``) around the command, which gives every process the RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT that :mod:`dscl.dist` reads.

Preemption and time limits:

- SIGTERM (preemption, ``scontrol requeue``, ``scancel``) reaches every process of the job; the
  cell saves its checkpoint and exits 75, and SLURM requeues the job (it is submitted with
  ``--requeue``) or ends it.
- SIGUSR2, which submitit asks SLURM to send :data:`dscl.study.slurm_jobs.SIGNAL_DELAY_S` before the
  time limit, is ignored by the cell's processes; submitit calls :meth:`CellJob.checkpoint`,
  which stops the cell with SIGTERM (it saves), and requeues the job.
- A requeued job starts the cell again with ``--resume auto``: it continues where it stopped.
  A job whose last :data:`STALL_LIMIT` attempts each ended where it began (the cell's newest
  ``train_log.jsonl`` record unchanged) stops with a line saying so in the cell's log.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from dscl import plugins
from dscl.study.cells import LOG_NAME, _read_attempts, cell_dir
from dscl.study.claims import Claims
from dscl.study.launcher import Launcher
from dscl.study.runner import CellFailed, cell_env, run_cell, running_cells
from dscl.study.slurm_jobs import SIGNAL_DELAY_S, last_logged
from dscl.study.spec import Cell, Study

STALL_LIMIT = 3  # requeues in a row without progress before a job gives up
BASE_PORT = 20000  # MASTER_PORT = BASE_PORT + job id mod PORT_RANGE
PORT_RANGE = 20000


class CellStalled(RuntimeError):
    """The job's cell was requeued :data:`STALL_LIMIT` times in a row without progress."""


def progress(run_dir: Path) -> list | None:
    """Where a cell's training stands: the newest log record's ``[stage, epoch, step]``."""
    record = last_logged(run_dir)
    if record is None:
        return None
    return [record.get("stage"), record.get("epoch"), record.get("step")]


def stalled_reason(run_dir: Path, job_id: str, limit: int = STALL_LIMIT) -> str | None:
    """Why job ``job_id`` must not run its cell again, or None.

    The cell's attempts (``attempts.jsonl``) are read from the newest back: while they belong to
    this job, failed or were stopped, and ended where they began, they count; ``limit`` of them
    mean the job has been requeued that many times in a row without progress.
    """
    count, where = 0, None
    for attempt in reversed(_read_attempts(run_dir)):
        if str(attempt.get("job_id")) != str(job_id) or attempt.get("returncode") == 0:
            break
        if "progress_end" not in attempt or attempt["progress_end"] != attempt.get(
            "progress_start"
        ):
            break
        count, where = count + 1, attempt["progress_end"]
    if count < limit:
        return None
    at = "before its first logged step" if where is None else f"at {where[0]} epoch {where[1]}"
    at = at if where is None else f"{at} step {where[2]}"
    return (
        f"SLURM job {job_id} was requeued {count} times in a row without progress (each attempt "
        f"ended where it began, {at}); stopping. Look at the log above, then run dscl study again"
    )


def node_command(cmd: list[str], launcher: Launcher, env: Any) -> list[str]:
    """The command this node of the job starts: the cell's own with one process, else
    ``torchrun`` around it with one process per GPU (one per node for CPU cells)."""
    if launcher.nodes == 1 and launcher.gpus_per_cell <= 1:
        return cmd
    job = str(env.job_id).split("_")[0]
    port = BASE_PORT + (int(job) % PORT_RANGE if job.isdigit() else 0)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={launcher.nodes}",
        f"--node_rank={env.node}",
        f"--nproc_per_node={max(1, launcher.gpus_per_cell)}",
        f"--master_addr={env.hostnames[0]}",
        f"--master_port={port}",
        *cmd[1:],  # -m dscl.cli run ...
    ]


class CellJob(submitit.helpers.Checkpointable):
    """One cell of a study, run by a SLURM job (pickled by submitit at submission).

    Args:
        study: the study as validated at submission (its results folder made absolute).
        cell_name: the cell to run.
        cwd: the submitting command's folder (relative study paths are read from it).
        launcher: the launcher settings (GPUs and nodes per cell).
    """

    def __init__(self, study: Study, cell_name: str, cwd: str, launcher: Launcher) -> None:
        study = dataclasses.replace(study, results_dir=Path(cwd, study.results_dir))
        self.study, self.cell_name, self.cwd, self.launcher = study, cell_name, cwd, launcher

    def __getstate__(self) -> dict[str, Any]:
        """What submitit pickles: the study packed with its plugins, since the cells' configs
        may hold settings of a ``.py`` plugin that the job's process imports first."""
        entries = getattr(self.study, "plugins", [])  # a study unpickled from an older job: none
        return {**self.__dict__, "study": plugins.pickled(self.study, entries)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        study = state["study"]  # a job pickled before plugins existed holds the study itself
        self.__dict__.update(
            state, study=plugins.unpickled(study) if isinstance(study, dict) else study
        )

    def _cell(self) -> Cell:
        return next(cell for cell in self.study.cells if cell.name == self.cell_name)

    def __call__(self) -> str:
        os.chdir(self.cwd)
        env = submitit.JobEnvironment()
        cell = self._cell()
        if env.global_rank != 0:
            return self._other_node(cell, env)
        run_dir = cell_dir(self.study, cell)
        job_id = str(env.job_id)
        why = stalled_reason(run_dir, job_id)
        if why is not None:
            with open(run_dir / LOG_NAME, "a", encoding="utf-8") as log:
                log.write(f"dscl study: {why}\n")
            raise CellStalled(why)
        start = progress(run_dir)
        _handle_once(signal.SIGUSR2)

        def note() -> dict[str, Any]:
            return {
                "job_id": job_id,
                "node": env.hostname,
                "progress_start": start,
                "progress_end": progress(run_dir),
            }

        run_cell(
            self.study,
            cell,
            wrap=lambda cmd: node_command(cmd, self.launcher, env),
            attempt_note=note,
            record_note={"slurm_job": job_id},
            ignore_signals=(signal.SIGUSR2,),
        )
        Claims(self.study).release_job(cell, job_id)
        return cell.name

    def _other_node(self, cell: Cell, env: Any) -> str:
        from dscl.study.runner import cell_command

        cmd = node_command(cell_command(self.study, cell), self.launcher, env)
        code = subprocess.call(
            cmd,
            env=cell_env(cell),
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN),
        )
        if code != 0:
            raise CellFailed(cell, code, Path(f"the job's log of node {env.node}"))
        return cell.name

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR2 (the time limit is near): stop the cell, which saves
        its checkpoint, then let submitit requeue this job."""
        stop_from_handler(timeout=SIGNAL_DELAY_S / 2)
        return super().checkpoint(*args, **kwargs)


def _handle_once(signum: int) -> None:
    """Let the handler of ``signum`` (submitit's: checkpoint, requeue, exit) run once: SLURM may
    deliver the signal to a process twice, and a second run inside the first would requeue the
    job twice and trip over its own files."""
    handler = signal.getsignal(signum)
    if not callable(handler):
        return
    busy = []

    def once(number: int, frame: Any) -> None:
        if busy:
            return
        busy.append(number)
        handler(number, frame)

    signal.signal(signum, once)


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has ended, leaving it to be reaped by its Popen (``WNOWAIT``)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def stop_from_handler(timeout: float) -> None:
    """SIGTERM the cell subprocesses and wait until they have ended (each saves its checkpoint;
    SIGKILL after ``timeout`` s). Safe in a signal handler that interrupts ``Popen.wait``: the
    children are watched without being reaped, which that wait still does."""
    procs = running_cells()
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # does nothing if the child is gone
    deadline = time.monotonic() + timeout
    for proc in procs:
        while proc.returncode is None and not _exited(proc.pid):
            if time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
