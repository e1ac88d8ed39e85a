"""``dscl study --launcher slurm``: every unfinished cell is one SLURM job, submitted through
submitit; ``--status`` shows where each cell stands, ``--wait`` follows the jobs to the end.

The submitting command claims each cell (:class:`dscl.study.claims.Claims`), submits it, and
writes the job id into the claim; a second ``dscl study`` on the grid skips a cell whose job is
still known to SLURM (pending, running, requeued) and takes over one whose job is gone. The job
(:mod:`dscl.study.slurm_job`) runs the cell's usual ``dscl run ... --resume auto`` (under
``torchrun`` for several GPUs or nodes), so a job that SLURM preempts or requeues continues from
the cell's checkpoint. Nothing here needs submitit but :func:`submit_cells`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dscl.errors import EXIT_INTERRUPTED, ConfigError, SetupError
from dscl.study.cells import (
    ATTEMPT_HEADER,
    FINISHED,
    INTERRUPTED,
    LOG_NAME,
    _read_attempts,
    cell_dir,
    cell_state,
    read_cell_record,
)
from dscl.study.claims import Claims
from dscl.study.launcher import Launcher
from dscl.study.slurm_jobs import (
    ACTIVE,
    GONE,
    SIGNAL_DELAY_S,
    WAITING,
    JobInfo,
    _last_line,
    _slurm,
    last_logged,
    query_jobs,
)
from dscl.study.spec import Cell, Study

JOBS_FOLDER = "slurm"  # <study folder>/slurm/<job id>_*: submitit's pickles and the jobs' logs
MAX_TIMEOUTS = 100  # submitit's own cap on requeues after a time limit (the stall rule decides)
WAIT_POLL_S = 30.0
# ---------------------------------------------------------------- checks before submitting


def check_launcher(study: Study, launcher: Launcher) -> None:
    """Check that cells can be submitted as asked, before any is: submitit, SLURM's commands,
    the partition, and ``sbatch --test-only`` with the cells' settings.

    Raises:
        SetupError: submitit or SLURM is missing here.
        ConfigError: one line naming the launcher key SLURM refuses.
    """
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise SetupError(
            "--launcher slurm needs submitit: pip install 'dscl[slurm]' (or pip install submitit)"
        ) from None
    missing = [name for name in ("sbatch", "squeue", "sinfo") if shutil.which(name) is None]
    if missing:
        raise SetupError(
            f"--launcher slurm: {', '.join(missing)} not found; run it on a "
            "machine of the cluster (a login node)"
        )
    if launcher.partition is not None:
        done = _slurm(["sinfo", "-h", "-o", "%R"])
        names = sorted(set(done.stdout.split())) if done is not None else []
        if done is not None and done.returncode == 0 and launcher.partition not in names:
            raise ConfigError(
                f"{study.path}: launcher.partition: no partition {launcher.partition!r} on this "
                f"cluster (partitions: {', '.join(names) or 'none'})"
            )
    _test_only(study, launcher)


_REFUSALS = (  # words of sbatch's refusal -> the launcher key to name
    ("partition", "partition"),
    ("account", "account"),
    ("qos", "qos"),
    ("time limit", "time"),
    ("gres", "gpus_per_cell"),
    ("gpu", "gpus_per_cell"),
    ("node count", "nodes"),
    ("cpu", "cpus_per_cell"),
    ("node configuration", "gpus_per_cell, cpus_per_cell or nodes"),
)


def _test_only(study: Study, launcher: Launcher) -> None:
    params = slurm_parameters(study, launcher)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in params.items()]
    for key, value in launcher.extra.items():
        flags.append(f"--{key}" if value is True else f"--{key}={value}")
    done = _slurm(["sbatch", "--test-only", *flags, "--wrap=true"])
    if done is None or done.returncode == 0:
        return
    message = " ".join(done.stderr.replace("sbatch: error:", "").split()) or "no reason given"
    lowered = message.lower()
    key = next((k for words, k in _REFUSALS if words in lowered), None)
    where = f"launcher.{key}" if key else "launcher"
    raise ConfigError(f"{study.path}: {where}: SLURM refuses these settings: {message}")


def slurm_parameters(study: Study, launcher: Launcher) -> dict:
    """The sbatch settings of every cell of ``study`` (submitit's parameter names)."""
    threads = study.cells[0].config.threads if study.cells else None
    params: dict = {
        "time": launcher.time_minutes,
        "nodes": launcher.nodes,
        "ntasks_per_node": 1,  # one task per node; it starts the node's processes (torchrun)
        "cpus_per_task": launcher.cpus_per_cell or threads or 1,
    }
    if launcher.gpus_per_cell:
        params["gpus_per_node"] = launcher.gpus_per_cell
    for key in ("partition", "account", "qos"):
        if getattr(launcher, key) is not None:
            params[key] = getattr(launcher, key)
    return params


# ---------------------------------------------------------------- submission


def _executor(study: Study, launcher: Launcher):
    import submitit

    folder = (study.study_dir / JOBS_FOLDER / "%j").absolute()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(
        **slurm_parameters(study, launcher),
        signal_delay_s=SIGNAL_DELAY_S,
        stderr_to_stdout=True,
        additional_parameters={"requeue": True, **launcher.extra},
    )
    return executor


def submit_cells(
    study: Study, cells: list[Cell], launcher: Launcher, stream, label: str
) -> tuple[dict[str, str], list[str]]:
    """Submit every unfinished one of ``cells`` as one SLURM job; return {cell: job id} and the
    names of the cells skipped because a live process or job holds them.

    Each cell is claimed before it is submitted and its claim then names the job, so a cell is
    never submitted twice while its job exists.
    """
    from dscl.study.slurm_job import CellJob

    claims = Claims(study, stream)
    submitted: dict[str, str] = {}
    skipped: list[str] = []
    executor = None
    for cell in cells:
        if cell_state(study, cell) == FINISHED:
            continue
        if not claims.take(cell):
            skipped.append(cell.name)
            print(
                f"study {label}: {cell.name}: {describe_holder(claims.holder(cell))}; skipped",
                file=stream,
                flush=True,
            )
            continue
        try:
            executor = executor or _executor(study, launcher)
            executor.update_parameters(job_name=f"dscl:{study.name}:{cell.name}")
            job = executor.submit(CellJob(study, cell.name, os.getcwd(), launcher))
        except BaseException as err:
            claims.release(cell)
            if isinstance(err, Exception) and not isinstance(err, (ConfigError, SetupError)):
                first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                raise SetupError(f"cell {cell.name}: sbatch failed: {first}") from None
            raise
        claims.set_job(cell, str(job.job_id))
        submitted[cell.name] = str(job.job_id)
        print(
            f"study {label}: {cell.name}: submitted as SLURM job {job.job_id}",
            file=stream,
            flush=True,
        )
    return submitted, skipped


def describe_holder(holder: dict | None) -> str:
    """Who holds a claim, in words."""
    if not holder:
        return "claimed by another study process"
    if holder.get("job_id"):
        return f"claimed by SLURM job {holder['job_id']} since {holder.get('started')}"
    return (
        f"claimed by process {holder.get('pid')} on {holder.get('host')} since "
        f"{holder.get('started')}"
    )


# ---------------------------------------------------------------- where the cells stand


@dataclass
class CellStatus:
    """One row of ``dscl study --status``."""

    cell: str
    state: str  # finished, running, pending, failed, interrupted, not started
    job: str = ""
    node: str = ""
    attempt: str = ""
    epoch: str = ""
    detail: str = ""


def _epoch_text(cell: Cell, record: dict | None) -> str:
    if not record or "epoch" not in record:
        return ""
    stage = record.get("stage", "")
    section = getattr(cell.config, "pretrain" if stage == "pretrain" else "classifier", None)
    total = getattr(section, "epochs", None)
    epoch = int(record["epoch"]) + 1
    return f"{stage} {epoch}/{total}" if total else f"{stage} {epoch}"


def _attempts(run_dir: Path) -> int:
    try:
        with open(run_dir / LOG_NAME, encoding="utf-8", errors="replace") as f:
            return sum(line.startswith(ATTEMPT_HEADER) for line in f)
    except OSError:
        return 0


def _failed_detail(study: Study, cell: Cell, job_id: str | None, why: str) -> str:
    log = cell_dir(study, cell) / LOG_NAME
    if not log.is_file() and job_id:
        log = study.study_dir / JOBS_FOLDER / job_id / f"{job_id}_0_log.out"
    line = _last_line(log) if log.is_file() else ""
    return f"{why}: {line or '(empty log)'} ({log})" if log.is_file() else f"{why}: no log yet"


def _job_status(study: Study, cell: Cell, job_id: str, info: JobInfo | None) -> CellStatus:
    run_dir = cell_dir(study, cell)
    row = CellStatus(cell.name, "failed", job=job_id)
    if info is None:
        row.state, row.detail = "unknown", "squeue is not available here"
    elif info.state in WAITING:
        row.state, row.detail = "pending", info.reason if info.reason != "None" else ""
    elif info.state in ACTIVE:
        row.state, row.node = "running", info.node
        row.attempt = str(max(1, _attempts(run_dir)))
        row.epoch = _epoch_text(cell, last_logged(run_dir))
    else:
        why = "job " + ("no longer known to SLURM" if info.state == GONE else info.state.lower())
        row.detail = _failed_detail(study, cell, job_id, why)
    return row


def _local_status(study: Study, cell: Cell, state: str, holder: dict | None) -> CellStatus:
    run_dir = cell_dir(study, cell)
    row = CellStatus(cell.name, "not started")
    if holder is not None and holder.get("pid") and not Claims.holder_gone(holder):
        row.state, row.node = "running", str(holder.get("host", ""))
        row.detail = f"process {holder.get('pid')}"
        row.epoch = _epoch_text(cell, last_logged(run_dir))
        return row
    attempts = _read_attempts(run_dir)
    code = attempts[-1].get("returncode") if attempts else None
    if code not in (None, 0, EXIT_INTERRUPTED):
        row.state = "failed"
        row.detail = _failed_detail(study, cell, None, f"exit code {code}")
    elif state == INTERRUPTED:
        row.state, row.epoch = "interrupted", _epoch_text(cell, last_logged(run_dir))
    return row


def cell_statuses(study: Study, cells: list[Cell]) -> list[CellStatus]:
    """Where each of ``cells`` stands (one squeue call for all their jobs)."""
    claims = Claims(study)
    holders = {cell.name: claims.holder(cell) for cell in cells}
    job_ids = [str(h["job_id"]) for h in holders.values() if h and h.get("job_id")]
    jobs = query_jobs(job_ids) if job_ids else {}
    rows = []
    for cell in cells:
        holder = holders[cell.name]
        job_id = str(holder["job_id"]) if holder and holder.get("job_id") else None
        info = None if jobs is None or job_id is None else jobs.get(job_id)
        state = cell_state(study, cell)
        if state == FINISHED and (info is None or info.state not in ACTIVE):
            record = read_cell_record(study, cell) or {}
            rows.append(CellStatus(cell.name, "finished", job=str(record.get("slurm_job") or "")))
        elif job_id is not None:
            rows.append(_job_status(study, cell, job_id, info))
        else:
            rows.append(_local_status(study, cell, state, holder))
    return rows


COLUMNS = ("cell", "state", "job", "node", "attempt", "epoch", "detail")
HEADINGS = ("cell", "state", "job", "node", "attempt", "last epoch", "detail")


def format_status(study: Study, rows: list[CellStatus]) -> str:
    """The ``--status`` table: one line per cell, columns aligned."""
    table = [list(HEADINGS)] + [[str(getattr(r, c)) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in table
    ]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    return f"study {study.name}: {len(rows)} cells: {summary}\n" + "\n".join(
        line.rstrip() for line in lines
    )


def wait_cells(
    study: Study,
    cells: list[Cell],
    stream,
    on_finished: Callable[[], None],
    poll_s: float = WAIT_POLL_S,
) -> list[CellStatus]:
    """Follow the SLURM jobs of ``cells`` until none is pending or running; print each change of
    a cell's state, and call ``on_finished`` (collect, aggregate) whenever cells have finished.

    Returns:
        The cells' last statuses.
    """
    seen: dict[str, str] = {}
    while True:
        rows = cell_statuses(study, cells)
        finished = False
        for row in rows:
            if seen.get(row.cell) == row.state:
                continue
            if row.cell in seen or row.state != "not started":
                where = f" (job {row.job})" if row.job else ""
                extra = f": {row.detail}" if row.detail and row.state == "failed" else ""
                print(
                    f"study {study.name}: {row.cell}: {row.state}{where}{extra}",
                    file=stream,
                    flush=True,
                )
            finished |= row.state == "finished" and row.cell in seen
            seen[row.cell] = row.state
        if finished:
            on_finished()
        if not any(row.job and row.state in ("pending", "running") for row in rows):
            return rows
        time.sleep(poll_s)


def print_status(study: Study, cells: list[Cell], out=None) -> int:
    """Print the ``--status`` table of ``cells``; exit code 0."""
    out = out if out is not None else sys.stdout
    print(format_status(study, cell_statuses(study, cells)), file=out, flush=True)
    return 0
