"""``dscl study``: a grid of ordinary runs, run as subprocesses and aggregated over seeds.

    dscl study --config study_fashion_mnist_lt            # run (or continue) every cell
    dscl study --config my_study.yaml --jobs 2            # two cells side by side
    dscl study --config my_study.yaml --shard 1/3         # cells 1, 4, 7, ... on this machine
    dscl study --config my_study.yaml --only method=ce,dscl   # only the cells of these methods
    dscl study --config my_study.yaml --report-only       # aggregate what has finished
    dscl study --config my_study.yaml --launcher slurm    # one SLURM job per unfinished cell
    dscl study --config my_study.yaml --status            # where each cell stands
    dscl study --config my_study.yaml --wait              # follow the jobs, collect as they end

The study folder ``<output_dir>/<name>/`` holds ``study.yaml`` (the study as resolved), one run
folder per cell (named by its settings, e.g. ``seed-1_method-dscl+pbsd``, with the cell's
``stdout.log`` and ``cell.json``) and the cells' claims. The results folder (``results/<name>/``
by default, the one to commit) holds each finished cell's small files and the aggregate:
``results.json``, ``RESULTS.md`` and ``study.png``. Re-running the same command skips finished
cells (in either folder) and resumes an interrupted one. See :mod:`dscl.study.spec` for the study
file's schema.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from dscl import runfiles
from dscl.errors import EXIT_INTERRUPTED, ConfigError, RunFolderError
from dscl.study.cells import (
    FINISHED,
    cell_dir,
    cell_state,
    collect_cell,
    committed_dir,
    log_tail,
    only_cells,
    parse_only,
    parse_shard,
    shard_cells,
    write_study_file,
)
from dscl.study.claims import Claims
from dscl.study.launcher import KINDS, Launcher, launcher_for
from dscl.study.results import aggregate, results_markdown, write_results
from dscl.study.runner import CellFailed, cell_command, run_cell, run_cells
from dscl.study.spec import Cell, Study, cell_name, load_study, safe_value, value_text
from dscl.study.stats import sample_std, student_t_cdf, student_t_quantile, t_interval

__all__ = [
    "Cell",
    "CellFailed",
    "Claims",
    "Study",
    "add_study_parser",
    "aggregate",
    "cell_command",
    "cell_name",
    "cell_state",
    "cmd_study",
    "collect_cell",
    "load_study",
    "only_cells",
    "parse_only",
    "parse_shard",
    "results_markdown",
    "run_cell",
    "run_study",
    "safe_value",
    "sample_std",
    "shard_cells",
    "student_t_cdf",
    "student_t_quantile",
    "t_interval",
    "value_text",
    "write_results",
]


def add_study_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dscl study`` on the ``dscl`` command's subparsers."""
    p = sub.add_parser("study", help="a grid of runs (methods x seeds x settings), aggregated")
    p.add_argument("--config", required=True, help="study YAML file or shipped study name")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N cells at once (each with the study's threads; default 1)",
    )
    p.add_argument("--shard", metavar="i/n", help="run only cells i, i+n, i+2n, ... (0-based)")
    p.add_argument(
        "--only",
        action="append",
        metavar="KEY=V1,V2",
        help="run only the cells with these values of axis KEY (repeatable; with --shard: the "
        "shard's cells among them); the report still covers every finished cell",
    )
    p.add_argument(
        "--results",
        metavar="DIR",
        help="this invocation's results folder (default: the study file's `results`, else "
        "results/<name>); the study.yaml written there keeps the study file's own value",
    )
    p.add_argument(
        "--report-only", action="store_true", help="aggregate the finished cells, run nothing"
    )
    p.add_argument(
        "--launcher",
        choices=KINDS,
        help="where the cells run: local (here, --jobs at a time; the default) or slurm (one "
        "job per unfinished cell, through submitit; settings from the study file's launcher)",
    )
    p.add_argument(
        "--status",
        action="store_true",
        help="print each cell's state (finished, running, pending, failed, interrupted, "
        "not started); run nothing",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="with the slurm launcher: after submitting, follow the jobs until none is left, "
        "collecting finished cells and rewriting RESULTS.md as they come",
    )
    return p


def _sigterm_as_interrupt() -> object:
    """While the study runs, SIGTERM stops it as Ctrl-C does (its cells save a checkpoint)."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests): leave signals alone
        return None


def run_study(
    config: str,
    *,
    shard: str | None = None,
    only: list[str] | None = None,
    jobs: int = 1,
    results: str | Path | None = None,
    report_only: bool = False,
    launcher: str | None = None,
    status: bool = False,
    wait: bool = False,
    poll_s: float | None = None,
    runner=run_cell,
    stream=None,
) -> int:
    """Validate the study, run its unfinished cells (of the shard), then aggregate.

    Args:
        config: the study file (path or shipped name).
        shard: ``"i/n"`` to run every n-th cell starting at cell i.
        only: ``KEY=V1,V2`` texts: run only the cells with these axis values.
        jobs: how many cells run at once (each with the study's ``threads``).
        results: the results folder, instead of the study file's.
        report_only: run nothing; aggregate the cells that have finished (in the results
            folder or in run folders; the latter are collected into the results folder).
        launcher: ``"local"`` or ``"slurm"`` instead of the study file's launcher kind.
        status: print each cell's state and do nothing else.
        wait: (slurm) after submitting, follow the jobs to their end.
        poll_s: seconds between two looks at the queue while waiting.
        runner: runs one cell (tests replace it).
        stream: where progress and notes go (default: stderr).

    Returns:
        The exit code: 0, 1 when a cell failed (its log tail is printed), 75 when the study was
        interrupted (run the same command to continue).
    """
    stream = stream if stream is not None else sys.stderr
    selected = parse_shard(shard)
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: need at least 1")
    study = load_study(config)  # every cell's config is validated here, before anything runs
    if results is not None:
        study.results_dir = Path(results)
    chosen = parse_only(only, study)
    states = {cell.name: cell_state(study, cell) for cell in study.cells}  # refuses changes
    todo = only_cells(shard_cells(study.cells, selected), chosen)
    if status:
        from dscl.study.slurm import print_status

        return print_status(study, todo)
    if report_only and not study.study_dir.is_dir() and not study.results_dir.is_dir():
        raise RunFolderError(
            f"{study.study_dir}: no study folder and no results folder {study.results_dir} yet; "
            f"run `dscl study --config {config}` first"
        )
    use = _launcher(study, launcher, wait, report_only)
    _collect_finished(study, states, stream)
    write_study_file(study, study.results_dir)
    code = 0
    if not report_only:
        write_study_file(study)
        label = _label(study, shard, only)
        if use.kind == "slurm":
            code = _submit(study, todo, use, wait, poll_s, stream, label, config)
        else:
            code = _run_here(study, todo, states, runner, jobs, stream, label, config)
            if code != 0:
                return code
        states = {cell.name: cell_state(study, cell) for cell in study.cells}
    _aggregate(study, states, stream)
    return code


def _launcher(study: Study, kind: str | None, wait: bool, report_only: bool) -> Launcher:
    """The launcher this invocation uses; a SLURM one is checked against the cluster before
    anything is written or submitted."""
    use = launcher_for(study.path, study.launcher_as_written, kind)
    if wait and use.kind != "slurm":
        raise ConfigError(
            "--wait follows SLURM jobs: give --launcher slurm, or launcher: {kind: slurm, ...} "
            "in the study file"
        )
    if use.kind == "slurm" and not report_only:
        from dscl.study.slurm import check_launcher

        check_launcher(study, use)
    return use


def _label(study: Study, shard: str | None, only: list[str] | None) -> str:
    """The study's name in progress lines, with the part of the grid this process runs."""
    parts = ([f"shard {shard}"] if shard is not None else []) + [f"--only {t}" for t in only or []]
    return f"{study.name} ({', '.join(parts)})" if parts else study.name


def _aggregate(study: Study, states: dict[str, str], stream, quiet: bool = False) -> None:
    results_out = aggregate(study, states)
    path = write_results(study, results_out)
    if quiet:
        return
    finished = sum(state == FINISHED for state in states.values())
    print(f"study {study.name}: {finished} of {len(study.cells)} cells finished", file=stream)
    if results_out["missing"]:
        print(f"study {study.name}: missing: {', '.join(results_out['missing'])}", file=stream)
    print(f"results: {path}")


def _run_here(
    study: Study,
    todo: list[Cell],
    states: dict[str, str],
    runner,
    jobs: int,
    stream,
    label: str,
    config: str,
) -> int:
    """Run the unfinished ones of ``todo`` on this machine, ``jobs`` at a time; exit code."""
    threads = study.cells[0].config.threads if study.cells else None
    cores = os.cpu_count() or 1
    if threads is not None and jobs * threads > cores:
        print(
            f"study {study.name}: --jobs {jobs} x {threads} threads is more than the "
            f"{cores} cores here; the cells will slow each other down",
            file=stream,
        )
    previous = _sigterm_as_interrupt()
    try:
        skipped = run_cells(
            study, todo, states, runner=runner, jobs=jobs, stream=stream, label=label
        )
    except CellFailed as failure:
        print(f"---- last lines of {failure.log} ----", file=stream)
        print(log_tail(failure.log), file=stream)
        print(f"dscl: study {study.name} stopped: {failure}", file=stream, flush=True)
        return 1
    except KeyboardInterrupt:
        print(
            f"dscl: study {study.name} interrupted; its running cells saved a checkpoint. "
            f"Continue with: dscl study --config {config}",
            file=stream,
            flush=True,
        )
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if skipped:
        print(
            f"study {study.name}: {len(skipped)} cell(s) held by another study process: "
            + ", ".join(skipped),
            file=stream,
        )
    return 0


def _submit(
    study: Study,
    todo: list[Cell],
    launcher: Launcher,
    wait: bool,
    poll_s: float | None,
    stream,
    label: str,
    config: str,
) -> int:
    """Submit the unfinished ones of ``todo`` to SLURM; with ``wait``, follow them to the end.

    Returns:
        0, or 1 when ``wait`` saw a cell fail.
    """
    from dscl.study.slurm import WAIT_POLL_S, submit_cells, wait_cells

    submitted, skipped = submit_cells(study, todo, launcher, stream, label)
    print(
        f"study {label}: submitted {len(submitted)} cell(s) to SLURM"
        + (f", {len(skipped)} held by another study process or job" if skipped else ""),
        file=stream,
        flush=True,
    )
    if not wait:
        if submitted or skipped:
            print(
                f"Follow them with: dscl study --config {config} --status; collect them with: "
                f"dscl study --config {config} --launcher slurm --wait",
                file=stream,
            )
        return 0

    def collect() -> None:
        states = {cell.name: cell_state(study, cell) for cell in study.cells}
        _collect_finished(study, states, stream)
        _aggregate(study, states, stream, quiet=True)

    rows = wait_cells(study, todo, stream, collect, WAIT_POLL_S if poll_s is None else poll_s)
    failed = [row for row in rows if row.state == "failed"]
    for row in failed:
        print(f"dscl: study {study.name}: cell {row.cell} failed: {row.detail}", file=stream)
    return 1 if failed else 0


def _collect_finished(study: Study, states: dict[str, str], stream) -> None:
    """Copy every finished cell that has no committed results yet into the results folder
    (not a cell whose SLURM job still runs: the job collects it when it has written cell.json)."""
    claims = Claims(study, stream)
    for cell in study.cells:
        if (
            states[cell.name] != FINISHED
            or (committed_dir(study, cell) / runfiles.METRICS).exists()
        ):
            continue
        holder = claims.holder(cell)
        if holder and holder.get("job_id") and Claims.holder_gone(holder) is None:
            continue
        if collect_cell(study, cell) is not None:
            print(
                f"study {study.name}: collected {cell_dir(study, cell)} into "
                f"{committed_dir(study, cell)}",
                file=stream,
            )


def cmd_study(args: argparse.Namespace) -> int:
    """The ``dscl study`` command."""
    return run_study(
        args.config,
        shard=args.shard,
        only=args.only,
        jobs=args.jobs,
        results=args.results,
        report_only=args.report_only,
        launcher=args.launcher,
        status=args.status,
        wait=args.wait,
    )
