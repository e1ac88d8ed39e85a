"""``dscl study``: a grid of ordinary runs, run as subprocesses and aggregated over seeds.

    dscl study --config study_fashion_mnist_lt            # run (or continue) every cell
    dscl study --config my_study.yaml --shard 1/3         # cells 1, 4, 7, ... on this machine
    dscl study --config my_study.yaml --report-only       # aggregate what has finished

The study folder ``<output_dir>/<name>/`` holds ``study.yaml`` (the study as resolved), one run
folder per cell (named by its settings, e.g. ``method-dscl+pbsd_seed-1``, with the cell's
``stdout.log`` and ``cell.json``), and the aggregate: ``results.json``, ``RESULTS.md`` and
``study.png``. Re-running the same command skips finished cells and resumes an interrupted one.
See :mod:`dscl.study.spec` for the study file's schema.
"""

from __future__ import annotations

import argparse
import sys

from dscl.errors import RunFolderError
from dscl.study.results import aggregate, results_markdown, write_results
from dscl.study.runner import (
    FINISHED,
    CellFailed,
    cell_command,
    cell_state,
    log_tail,
    parse_shard,
    run_cell,
    run_cells,
    shard_cells,
    write_study_file,
)
from dscl.study.spec import Cell, Study, cell_name, load_study, safe_value, value_text
from dscl.study.stats import sample_std, student_t_cdf, student_t_quantile, t_interval

__all__ = [
    "Cell",
    "CellFailed",
    "Study",
    "add_study_parser",
    "aggregate",
    "cell_command",
    "cell_name",
    "cell_state",
    "cmd_study",
    "load_study",
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
    p.add_argument("--shard", metavar="i/n", help="run only cells i, i+n, i+2n, ... (0-based)")
    p.add_argument(
        "--report-only", action="store_true", help="aggregate the finished cells, run nothing"
    )
    return p


def run_study(
    config: str,
    *,
    shard: str | None = None,
    report_only: bool = False,
    runner=run_cell,
    stream=None,
) -> int:
    """Validate the study, run its unfinished cells (of the shard), then aggregate.

    Args:
        config: the study file (path or shipped name).
        shard: ``"i/n"`` to run every n-th cell starting at cell i.
        report_only: run nothing; aggregate the cells that have finished.
        runner: runs one cell (tests replace it).
        stream: where progress and notes go (default: stderr).

    Returns:
        The exit code: 0, or 1 when a cell failed (its log tail is printed).
    """
    stream = stream if stream is not None else sys.stderr
    selected = parse_shard(shard)
    study = load_study(config)  # every cell's config is validated here, before anything runs
    states = {cell.name: cell_state(study, cell) for cell in study.cells}  # refuses changes
    if report_only and not study.study_dir.is_dir():
        raise RunFolderError(
            f"{study.study_dir}: no study folder yet; run `dscl study --config {config}` first"
        )
    write_study_file(study)
    if not report_only:
        todo = shard_cells(study.cells, selected)
        try:
            label = study.name if shard is None else f"{study.name} (shard {shard})"
            run_cells(study, todo, states, runner=runner, stream=stream, label=label)
        except CellFailed as failure:
            print(f"---- last lines of {failure.log} ----", file=stream)
            print(log_tail(failure.log), file=stream)
            print(f"dscl: study {study.name} stopped: {failure}", file=stream, flush=True)
            return 1
        states = {cell.name: cell_state(study, cell) for cell in study.cells}
    results = aggregate(study, states)
    path = write_results(study, results)
    finished = sum(state == FINISHED for state in states.values())
    print(f"study {study.name}: {finished} of {len(study.cells)} cells finished", file=stream)
    if results["missing"]:
        print(f"study {study.name}: missing: {', '.join(results['missing'])}", file=stream)
    print(f"results: {path}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """The ``dscl study`` command."""
    return run_study(args.config, shard=args.shard, report_only=args.report_only)
