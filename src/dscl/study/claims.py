"""Claims on a study's cells.

Before a cell runs it is claimed (``<study folder>/claims/<cell>.json``, created atomically, with
the process id, host and start time), so several ``dscl study`` processes, and the ``--jobs``
of one, never train the same cell; a claim whose process is gone is taken over. A cell handed to
SLURM (:mod:`dscl.study.slurm`) is claimed by its job: the claim names the job id and is taken
over once the job no longer exists.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from dscl.errors import RunFolderError
from dscl.runfiles import atomic_write, read_json
from dscl.study.spec import Cell, Study

CLAIMS = "claims"


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
        return read_json(path)


def _describe_claim(holder: dict | None) -> str:
    if not holder:
        return "claimed by another study process; skipped"
    if holder.get("job_id"):
        return f"claimed by SLURM job {holder['job_id']} since {holder.get('started')}; skipped"
    return (
        f"claimed by process {holder.get('pid')} on {holder.get('host')} since "
        f"{holder.get('started')}; skipped"
    )
