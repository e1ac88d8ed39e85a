"""What the submitting side of ``dscl study --launcher slurm`` and a cell's job share, with no
import of the rest of the study: the SLURM job states and queries (``squeue``, ``sacct``), the
signal delay before a time limit, and a run's newest training-log record.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dscl import runfiles

SIGNAL_DELAY_S = 120  # SIGUSR2 this long before the time limit: the cell saves and is requeued
# job states in which the job still exists and will run (again)
ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}
WAITING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SUSPENDED", "STOPPED"}
GONE = "GONE"  # the state of a job no command of this cluster knows any more


@dataclass(frozen=True)
class JobInfo:
    """What squeue says of one job."""

    state: str
    node: str = ""
    reason: str = ""


def _slurm(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess | None:
    """Run a SLURM command; None where it is not installed or does not answer."""
    if shutil.which(args[0]) is None:
        return None
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _squeue(job_ids: list[str]) -> dict[str, JobInfo] | None:
    done = _slurm(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%N|%r"])
    if done is None or (done.returncode != 0 and "Invalid job id" not in done.stderr):
        return None
    jobs = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            jobs[parts[0]] = JobInfo(parts[1], parts[2], parts[3])
    return jobs


def _sacct_state(job_id: str) -> str | None:
    """The state the accounting database keeps of a job squeue no longer shows (None: none)."""
    done = _slurm(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    if done is None or done.returncode != 0 or not done.stdout.strip():
        return None
    return done.stdout.split()[0].split()[0]


def query_jobs(job_ids: Iterable[str]) -> dict[str, JobInfo] | None:
    """Job id -> :class:`JobInfo` for each of ``job_ids`` (state :data:`GONE` for a job that no
    SLURM command knows any more); None where SLURM's commands are not installed here."""
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return {}
    jobs = _squeue(ids)
    if jobs is None:
        return None
    if len(jobs) < len(ids) and len(ids) > 1:  # an unknown id can hide the others: one by one
        for job_id in ids:
            if job_id not in jobs:
                jobs.update(_squeue([job_id]) or {})
    for job_id in ids:
        if job_id not in jobs:
            jobs[job_id] = JobInfo(_sacct_state(job_id) or GONE)
    return jobs


def job_gone(job_id: str) -> str | None:
    """Why the job of a claim no longer holds it (``"cancelled"``, ``"no longer known to
    SLURM"``), or None while it is pending, running or requeued, or where SLURM cannot be asked
    (no squeue here: the claim is respected)."""
    jobs = query_jobs([job_id])
    if jobs is None:
        return None
    state = jobs[str(job_id)].state
    if state in ACTIVE:
        return None
    return "no longer known to SLURM" if state == GONE else state.lower()


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    lines = [line for line in lines if line.strip()]
    return lines[-1].strip() if lines else ""


def last_logged(run_dir: Path) -> dict | None:
    """The newest record of the run's ``train_log.jsonl`` (None without one)."""
    line = _last_line(run_dir / runfiles.TRAIN_LOG)
    try:
        record = json.loads(line) if line else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
