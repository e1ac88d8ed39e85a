"""Aggregating a study's finished cells: ``results.json``, ``RESULTS.md`` and ``study.png``.

A *setting* is a point of the grid without the seed axis. Per setting: mean and sample standard
deviation over seeds of top-1, Many, Medium and Few. Per baseline (a study may name several), per
other setting: the paired difference to the baseline (same seed and same value of every axis the
baseline does not name) with its mean, sample standard deviation and 95% Student-t interval.
Everything written is a function of the finished cells alone (no clock), so re-aggregating gives
identical files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dscl import runfiles
from dscl.errors import RunFolderError
from dscl.runfiles import atomic_write
from dscl.study.cells import FINISHED, finished_dir, read_cell_record
from dscl.study.runner import cell_command, display_command
from dscl.study.spec import Cell, Study, value_text
from dscl.study.stats import summarize, t_interval

METRICS = ("top1", "many", "medium", "few")
LABELS = {"top1": "top-1", "many": "Many", "medium": "Medium", "few": "Few"}
FINDINGS = (
    runfiles.FINDINGS
)  # hand-written sentences in the results folder; RESULTS.md includes them
CONFIDENCE = 0.95
MAX_NAMED_CLASSES = 30  # the per-class panel names each class up to this many


def _read_metrics(study: Study, cell: Cell) -> dict:
    path = finished_dir(study, cell) / runfiles.METRICS
    return json.loads(path.read_text(encoding="utf-8"))


def _setting_values(study: Study, cell: Cell) -> dict[str, Any]:
    return {k: v for k, v in cell.settings.items() if k != study.seed_axis}


def _partner(
    study: Study, baseline: dict[str, Any], cell: Cell, by_coords: dict[tuple[int, ...], Cell]
) -> Cell:
    """The ``baseline`` cell paired with ``cell``: baseline values, everything else the same."""
    coords = list(cell.coords)
    for position, key in enumerate(study.axes):
        if key in baseline:
            wanted = value_text(baseline[key])
            coords[position] = [value_text(v) for v in study.axes[key]].index(wanted)
    return by_coords[tuple(coords)]


def aggregate(study: Study, states: dict[str, str]) -> dict[str, Any]:
    """The study's results from its finished cells (``states``: cell name -> state).

    Returns:
        A JSON-serialisable dict with ``cells`` (per cell: settings, finished, metrics, wall
        time), ``settings`` (per setting: n, seeds, mean/std/values of each metric and the mean
        per-class accuracy), ``paired`` (per baseline in order, named by ``against``, for
        each setting that is not that baseline and whose row no earlier table holds, negated
        or not (:func:`_pairings`); per
        metric: pairs, mean, std, 95% interval or None) and ``missing`` (names of unfinished
        cells).
    """
    metrics: dict[str, dict] = {}
    cells_out = []
    for cell in study.cells:
        finished = states[cell.name] == FINISHED
        entry: dict[str, Any] = {"name": cell.name, "settings": cell.settings}
        entry["finished"] = finished
        if finished:
            m = _read_metrics(study, cell)
            metrics[cell.name] = m
            entry["metrics"] = {k: m.get(k) for k in METRICS}
            record = read_cell_record(study, cell) or {}
            for key in ("wall_s", "resumed", "attempts", "attempts_timed", "attempts_wall_s"):
                entry[key] = record.get(key)
        cells_out.append(entry)

    groups = _groups(study)
    settings_out = []
    for cells in groups.values():
        done = [c for c in cells if c.name in metrics]
        row: dict[str, Any] = {"settings": _setting_values(study, cells[0])}
        row["n"] = len(done)
        row["cells"] = [c.name for c in done]
        if study.seed_axis:
            row["seeds"] = [c.settings[study.seed_axis] for c in done]
        for key in METRICS:
            values = [metrics[c.name][key] for c in done if metrics[c.name].get(key) is not None]
            row[key] = summarize(values) | {"values": values}
        row["per_class"] = _per_class_mean([metrics[c.name] for c in done])
        if row["per_class"] is not None:
            row["per_class"]["class_names"] = _class_names(study, done)
        settings_out.append(row)

    by_coords = {cell.coords: cell for cell in study.cells}
    paired_out = [
        _paired_row(study, baseline, cells, by_coords, metrics)
        for baseline, cells, left_out in _pairings(study)
        if left_out is None
    ]

    return {
        "study": study.name,
        "base": study.base,
        "overrides": study.overrides,
        "axes": study.axes,
        "seed_axis": study.seed_axis,
        "baseline": study.baseline,
        "baselines": study.baselines,
        "finished": len(metrics),
        "total": len(study.cells),
        "missing": [c.name for c in study.cells if c.name not in metrics],
        "settings": settings_out,
        "paired": paired_out,
        "cells": cells_out,
    }


def _groups(study: Study) -> dict[tuple[int, ...], list[Cell]]:
    """The cells of each setting (their seeds), by :meth:`Study.setting_key`, in grid order."""
    groups: dict[tuple[int, ...], list[Cell]] = {}
    for cell in study.cells:
        groups.setdefault(study.setting_key(cell), []).append(cell)
    return groups


def _pairings(study: Study) -> list[tuple[dict[str, Any], list[Cell], str | None]]:
    """Each baseline in turn with each setting that is not that baseline:
    ``(baseline, the setting's cells, why it is left out or None)``. A setting is left out
    ("negation") when an earlier table holds its partner against it, or ("repeat") the same
    two settings the same way round: e.g. against ``method: dscl`` after ``method: ce``, the
    row of ce would be the negation of dscl's row above."""
    by_coords = {cell.coords: cell for cell in study.cells}
    shown: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    out, groups = [], _groups(study)
    for baseline in study.baselines:
        for mine, cells in groups.items():
            theirs = study.setting_key(_partner(study, baseline, cells[0], by_coords))
            if theirs == mine:  # the baseline itself
                continue
            left_out = (
                "negation"
                if (theirs, mine) in shown
                else "repeat"
                if (mine, theirs) in shown
                else None
            )
            shown.add((mine, theirs))
            out.append((baseline, cells, left_out))
    return out


def _paired_row(
    study: Study,
    baseline: dict[str, Any],
    cells: list[Cell],
    by_coords: dict[tuple[int, ...], Cell],
    metrics: dict[str, dict],
) -> dict[str, Any]:
    """One setting's cells minus their ``baseline`` partners, per metric: pairs, mean, std,
    95% interval (None with fewer than two pairs) and the differences."""
    pairs = [(c, _partner(study, baseline, c, by_coords)) for c in cells]
    pairs = [(a, b) for a, b in pairs if a.name in metrics and b.name in metrics]
    row = {"settings": _setting_values(study, cells[0]), "against": dict(baseline)}
    row["pairs"] = [[a.name, b.name] for a, b in pairs]
    for key in METRICS:
        diffs = [
            metrics[a.name][key] - metrics[b.name][key]
            for a, b in pairs
            if metrics[a.name].get(key) is not None and metrics[b.name].get(key) is not None
        ]
        interval = t_interval(diffs, CONFIDENCE)
        row[key] = summarize(diffs) | {
            "ci95": None if interval is None else list(interval),
            "values": diffs,
        }
    return row


def _per_class_mean(runs: list[dict]) -> dict | None:
    """Mean per-class accuracy and training counts over runs (None where no run has a value)."""
    if not runs:
        return None
    width = max(len(m.get("per_class") or []) for m in runs)
    accuracy, counts = [], []
    for c in range(width):
        accs = [m["per_class"][c] for m in runs if c < len(m["per_class"] or [])]
        accs = [a for a in accs if a is not None]
        accuracy.append(math.fsum(accs) / len(accs) if accs else None)
        ns = [m["class_counts"][c] for m in runs if c < len(m.get("class_counts") or [])]
        counts.append(math.fsum(ns) / len(ns) if ns else None)
    return {"accuracy": accuracy, "class_counts": counts}


def _class_names(study: Study, cells: list[Cell]) -> list[str] | None:
    """The class names a finished cell's ``data_summary.json`` gives (None without one)."""
    for cell in cells:
        try:
            summary = json.loads((finished_dir(study, cell) / runfiles.DATA_SUMMARY).read_text())
        except (OSError, ValueError):
            continue
        names = summary.get("class_names") if isinstance(summary, dict) else None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return None


# ---------------------------------------------------------------- writing


def write_results(study: Study, results: dict[str, Any]) -> Path:
    """Write ``results.json``, ``study.png`` (when a cell finished) and ``RESULTS.md`` into the
    results folder, each through the one atomic writer.

    Returns:
        The path of ``RESULTS.md``.
    """
    folder = study.results_dir
    findings = read_findings(folder)  # before anything is written: an unreadable one stops here
    text = json.dumps(results, indent=1, ensure_ascii=False) + "\n"
    atomic_write(folder / runfiles.RESULTS_JSON, text)
    figure = None
    if results["finished"]:
        figure = folder / runfiles.STUDY_FIGURE
        atomic_write(figure, _figure_png(study, results))
    else:
        (folder / runfiles.STUDY_FIGURE).unlink(missing_ok=True)
    budgets = budget_comparison(study, results)
    if budgets["points"]:
        atomic_write(folder / runfiles.BUDGET_FIGURE, _budget_png(study, budgets))
    else:
        (folder / runfiles.BUDGET_FIGURE).unlink(missing_ok=True)
    page = results_markdown(study, results, figure is not None, budgets, findings)
    return atomic_write(folder / runfiles.RESULTS_MD, page)


def read_findings(folder: Path) -> str | None:
    """The hand-written ``FINDINGS.md`` of a results folder (None when it has none).

    The aggregate is rewritten whenever a cell finishes; what a person concluded from it lives in
    its own file, which ``RESULTS.md`` includes under "What it shows".
    """
    path = folder / FINDINGS
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise RunFolderError(f"{path}: cannot read it ({reason})") from None


def _stage1_epochs(study: Study) -> int | None:
    epochs = {cell.config.pretrain.epochs for cell in study.cells}
    return epochs.pop() if len(epochs) == 1 else None


def budget_comparison(study: Study, results: dict[str, Any]) -> dict[str, Any]:
    """This study's settings beside the same settings of the studies it names in ``compare``
    (other stage-1 budgets), read from their committed ``results.json``.

    Returns:
        ``{"studies": [{name, epochs, results_json, processors, missing}], "points": {label:
        [(epochs, study name, top1 summary, few summary), ...]}}``, points sorted by epochs.
    """
    from dscl.study.spec import load_study

    studies = [(study, results)]
    notes = []
    for name in study.compare:
        try:
            other = load_study(name)
        except Exception as err:  # noqa: BLE001 - reported in RESULTS.md, not fatal
            notes.append({"name": name, "missing": f"cannot read the study file ({err})"})
            continue
        path = other.results_dir / runfiles.RESULTS_JSON
        try:
            studies.append((other, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            notes.append({"name": other.name, "missing": f"no results in {path}"})
    points: dict[str, list] = {}
    listed = []
    for each, res in studies:
        epochs = _stage1_epochs(each)
        listed.append(
            {
                "name": each.name,
                "epochs": epochs,
                "finished": res["finished"],
                "total": res["total"],
            }
        )
        for row in res["settings"]:
            if not row["n"] or epochs is None:
                continue
            label = _label(row["settings"])
            points.setdefault(label, []).append(
                (epochs, each.name, row["n"], row["top1"], row["few"])
            )
    for label in points:
        points[label].sort(key=lambda point: point[0])
    points = {k: v for k, v in points.items() if len(v) > 1}
    return {"studies": listed + notes, "points": points if study.compare else {}}


def _label(settings: dict[str, Any]) -> str:
    if len(settings) == 1:
        return value_text(next(iter(settings.values())))
    return ", ".join(f"{k}={value_text(v)}" for k, v in settings.items())


def _fmt_summary(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    if stat["std"] is None:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def _fmt_paired(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{stat['mean']:+.2f}"
    if stat["std"] is not None:
        text += f" ± {stat['std']:.2f}"
    if stat["ci95"] is not None:
        low, high = stat["ci95"]
        text += f" [{low:+.2f}, {high:+.2f}]"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _machine_text(machine: dict, threads: int | None = None) -> str:
    parts = [
        f"processor {machine.get('processor') or 'unknown'}",
        f"machine {machine.get('machine') or 'unknown'}",
        f"{machine.get('cpus') or '?'} CPUs",
        f"torch {machine.get('torch') or '?'}",
    ]
    if threads is not None:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''} per cell")
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    return ", ".join(parts)


def results_markdown(
    study: Study,
    results: dict[str, Any],
    with_figure: bool = True,
    budgets: dict[str, Any] | None = None,
    findings: str | None = None,
) -> str:
    """``RESULTS.md``: the hand-written ``findings`` (if any), tables, figure, the comparison
    with other budgets, machine, per-cell wall times and commands."""
    axes = [k for k in study.axes if k != study.seed_axis]
    out = _md_head(study, results, findings)
    out += _md_accuracy(study, results, axes)
    for baseline in study.baselines:
        out += _md_paired(study, baseline, results, axes)
    if with_figure:
        out += [
            "## Figure",
            "",
            "Per-class test accuracy (mean over seeds) of each class, placed at its number of "
            "training images and named, and the group means with their sample std.",
            "",
            "![per-class accuracy and group means](study.png)",
            "",
        ]
    if budgets and study.compare:
        out += _md_budgets(budgets)
    out += _md_cells_and_machines(study, results)
    out += _md_commands(study)
    return "\n".join(out)


def _md_head(study: Study, results: dict[str, Any], findings: str | None) -> list[str]:
    """The title, the grid, what is finished and the hand-written findings."""
    out = [f"# Study `{study.name}`", ""]
    if study.description:
        out += [study.description.strip(), ""]
    shape = " × ".join(f"{k} ({len(v)})" for k, v in study.axes.items())
    out.append(f"Base config `{study.base}`; grid {shape} = {len(study.cells)} cells.")
    overrides = ", ".join(f"`{k}={value_text(v)}`" for k, v in study.overrides.items())
    out.append(f"Overrides for every cell: {overrides or 'none'}.")
    out.append(f"Finished: {results['finished']} of {results['total']} cells.")
    if results["missing"]:
        out.append("Missing: " + ", ".join(f"`{name}`" for name in results["missing"]) + ".")
    out.append("")
    if findings is not None and findings.strip():
        out += [f"## What it shows ({FINDINGS}, written by hand)", "", findings.strip(), ""]
    return out


def _md_accuracy(study: Study, results: dict[str, Any], axes: list[str]) -> list[str]:
    """The table of test accuracies per setting, mean ± sample std over the seeds."""
    over = f"over {study.seed_axis}s" if study.seed_axis else "(one run per setting)"
    out = [f"## Test accuracy (%), mean ± sample std {over}", ""]
    header = [*axes, "n", *(LABELS[k] for k in METRICS)]
    rows = []
    for row in results["settings"]:
        values = [value_text(row["settings"][k]) for k in axes]
        rows.append([*values, str(row["n"]), *(_fmt_summary(row[k]) for k in METRICS)])
    return [*out, *_table(header, rows), ""]


def _left_out_note(study: Study, baseline: dict[str, Any]) -> str:
    """The sentence naming the settings :func:`_pairings` leaves out of ``baseline``'s table
    ("" when none is)."""
    said = {  # (one setting, several)
        "negation": (
            "whose row would be the negation of one above",
            "whose rows would negate rows above",
        ),
        "repeat": ("whose row would repeat one above", "whose rows would repeat rows above"),
    }
    parts, pairings = [], _pairings(study)
    for reason, (one, several) in said.items():
        names = [
            ", ".join(f"{k}={value_text(v)}" for k, v in _setting_values(study, cells[0]).items())
            for b, cells, left_out in pairings
            if b == baseline and left_out == reason
        ]
        if names:
            parts.append(f"{' and '.join(names)}, {one if len(names) == 1 else several}")
    return f" Not repeated: {'; '.join(parts)}." if parts else ""


def _md_paired(
    study: Study, baseline: dict[str, Any], results: dict[str, Any], axes: list[str]
) -> list[str]:
    """The table of paired differences against ``baseline``, with their intervals."""
    against = ", ".join(f"{k}={value_text(v)}" for k, v in baseline.items())
    others = [k for k in study.axes if k not in baseline]
    out = [f"## Paired differences against {against} (percentage points)", ""]
    out.append(
        "Each cell minus the baseline cell with the same "
        + ", ".join(others or ["(no other axis)"])
        + f"; mean ± sample std over pairs and the {CONFIDENCE:.0%} Student-t interval "
        "[low, high] (none with a single pair)."
    )
    out[-1] += _left_out_note(study, baseline)
    out.append("")
    header = [*axes, "pairs", *(f"Δ {LABELS[k]}" for k in METRICS)]
    rows = []
    for row in results["paired"]:
        if row["against"] != baseline:
            continue
        values = [value_text(row["settings"][k]) for k in axes]
        pairs = str(len(row["pairs"]))
        rows.append([*values, pairs, *(_fmt_paired(row[k]) for k in METRICS)])
    return [*out, *_table(header, rows), ""]


def _md_budgets(budgets: dict[str, Any]) -> list[str]:
    """The comparison with the same study at other stage-1 budgets."""
    out = ["## Against other stage-1 budgets", ""]
    for entry in budgets["studies"]:
        if "missing" in entry:
            out.append(f"- `{entry['name']}`: {entry['missing']}")
        else:
            out.append(
                f"- `{entry['name']}`: {entry['epochs']} stage-1 epochs, "
                f"{entry['finished']} of {entry['total']} cells finished"
            )
    out.append("")
    if budgets["points"]:
        header = ["setting", "stage-1 epochs", "n", "top-1", "Few"]
        rows = []
        for label, pts in budgets["points"].items():
            for epochs, _, n, top1, few in pts:
                rows.append([label, str(epochs), str(n), _fmt_summary(top1), _fmt_summary(few)])
        out += [*_table(header, rows), ""]
        out += [
            "Mean ± sample std over the seeds each study has finished; the studies may have "
            "run on different CPUs (see each one's Machine section).",
            "",
            "![top-1 and Few against stage-1 epochs](budget.png)",
            "",
        ]
    return out


def _md_cells_and_machines(study: Study, results: dict[str, Any]) -> list[str]:
    """Each cell's figures, wall time and commit, then the machines the cells ran on."""
    out = ["## Cells", ""]
    header = ["cell", *(LABELS[k] for k in METRICS), "wall time", "commit"]
    rows = []
    machines: list[tuple[str, list[str]]] = []
    for entry, cell in zip(results["cells"], study.cells, strict=True):
        if not entry["finished"]:
            rows.append([f"`{cell.name}`", *("—" for _ in METRICS), "not finished", "—"])
            continue
        wall_text = _wall_text(entry)
        values = [_fmt_value(entry["metrics"][k]) for k in METRICS]
        record = read_cell_record(study, cell)
        commit = record.get("git_commit") if record else None
        commit_text = f"`{commit[:7]}`" if isinstance(commit, str) and commit else "not recorded"
        rows.append([f"`{cell.name}`", *values, wall_text, commit_text])
        if record and isinstance(record.get("machine"), dict):
            text = _machine_text(record["machine"], record.get("threads"))
            for known, names in machines:
                if known == text:
                    names.append(cell.name)
                    break
            else:
                machines.append((text, [cell.name]))
    out += [*_table(header, rows), ""]

    out += ["## Machine", ""]
    if not machines:
        out.append("Not recorded (no cell.json with a machine).")
    elif len(machines) == 1:
        out.append(f"{machines[0][0]} (every cell that recorded one).")
    else:
        for text, names in machines:
            out.append(f"- {text}: " + ", ".join(f"`{n}`" for n in names))
    out.append("")
    return out


def _md_commands(study: Study) -> list[str]:
    """The command of the study and of each cell."""
    out = [
        "## Commands",
        "",
        "The study (`--jobs N` runs N cells side by side; finished cells are collected into "
        f"`{study.results_as_written}`, from which the study continues on any machine):",
        "",
    ]
    study_file = Path(study.results_as_written) / runfiles.STUDY_FILE
    out += ["```", f"dscl study --config {study_file}", "```", ""]
    out += ["Each cell (`--resume auto` continues an interrupted cell and starts a fresh one):", ""]
    out.append("```")
    out += [display_command(cell_command(study, cell)) for cell in study.cells]
    out += ["```", ""]
    return out


def _wall_text(entry: dict) -> str:
    """A finished cell's wall time: in all when every attempt was timed, else what is known."""
    wall, attempts = entry.get("wall_s"), entry.get("attempts")
    if wall is None:
        return "not recorded"
    if not isinstance(attempts, int):  # a record from before attempts were counted
        return f"{wall:.1f} s" + (" (resumed: last attempt)" if entry.get("resumed") else "")
    if attempts <= 1:
        return f"{wall:.1f} s"
    total, timed = entry.get("attempts_wall_s") or wall, entry.get("attempts_timed") or 1
    if timed >= attempts:
        return f"{total:.1f} s in {attempts} attempts"
    return f"at least {total:.1f} s in {attempts} attempts ({timed} timed)"


def _fmt_value(value: Any) -> str:
    return "—" if value is None else f"{value:.2f}"


def _figure_png(study: Study, results: dict[str, Any]) -> bytes:
    """Per-class accuracy against training count, and group means with error bars."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for row in results["settings"] if row["n"] > 0]
    fig = Figure(figsize=(13, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1.0]})
    colours = [f"C{i % 10}" for i in range(len(rows))]
    _per_class_panel(left, rows, colours)
    _groups_panel(right, rows, colours)
    fig.suptitle(f"study {study.name}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _class_points(row: dict[str, Any]) -> list[tuple[float, float, str]]:
    """``(training count, accuracy, class name)`` of each class of a setting with both known."""
    per_class = row["per_class"] or {"accuracy": [], "class_counts": []}
    names = per_class.get("class_names") or []
    return [
        (n, a, names[c] if c < len(names) else f"class {c}")
        for c, (n, a) in enumerate(
            zip(per_class["class_counts"], per_class["accuracy"], strict=True)
        )
        if n is not None and a is not None and n > 0
    ]


def _per_class_panel(axes, rows: list[dict[str, Any]], colours: list[str]) -> None:
    """Each class's accuracy against its training count (log scale), one marker per setting."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    markers = "osD^vP*Xh<>"
    labelled: dict[float, str] = {}  # training count -> the class names at that count
    for i, (row, colour) in enumerate(zip(rows, colours, strict=True)):
        points = _class_points(row)
        if not points:
            continue
        # one point per class, no line (neighbouring classes have nothing to join them); the
        # settings are spread a little sideways so that equal accuracies stay visible
        spread = 1.0 + 0.04 * (i - (len(rows) - 1) / 2)
        xs = [n * spread for n, _, _ in points]
        axes.scatter(
            xs,
            [a for _, a, _ in points],
            s=28,
            marker=markers[i % len(markers)],
            color=colour,
            alpha=0.85,
            label=_label(row["settings"]),
        )
        for n, _, name in points:
            known = labelled.get(n)
            if known is None:
                labelled[n] = name
            elif name not in known.split(" / "):
                labelled[n] = f"{known} / {name}"
    axes.set_xscale("log")
    axes.xaxis.set_minor_locator(NullLocator())  # no minor labels printed over each other
    if 0 < len(labelled) <= MAX_NAMED_CLASSES:
        counts = sorted(labelled)
        axes.set_xticks(counts, [f"{labelled[n]} ({n:g})" for n in counts], rotation=60, ha="right")
        axes.tick_params(axis="x", labelsize=7)
        axes.set_xlabel("class (training images, log scale)")
    else:
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.set_xlabel("training images of the class (log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(-2, 102)
    axes.set_title("per-class accuracy (mean over seeds), one point per class")
    axes.grid(True, which="major", alpha=0.3)
    if rows:
        axes.legend(fontsize=8, loc="best")


def _groups_panel(axes, rows: list[dict[str, Any]], colours: list[str]) -> None:
    """Many/Medium/Few and top-1 means with sample-std error bars, one bar per setting."""
    groups = list(METRICS[1:]) + ["top1"]
    width = 0.8 / max(len(rows), 1)
    for i, (row, colour) in enumerate(zip(rows, colours, strict=True)):
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        means = [row[k]["mean"] if row[k]["mean"] is not None else math.nan for k in groups]
        stds = [row[k]["std"] or 0.0 for k in groups]
        axes.bar(
            xs, means, width, yerr=stds, capsize=2, color=colour, label=_label(row["settings"])
        )
    axes.set_xticks(range(len(groups)), [LABELS[k] for k in groups])
    axes.set_ylabel("test accuracy (%), mean ± sample std")
    axes.set_ylim(0, 100)
    axes.set_title("groups")
    axes.grid(True, axis="y", alpha=0.3)


def _budget_png(study: Study, budgets: dict[str, Any]) -> bytes:
    """Top-1 and Few (mean ± std over seeds) against stage-1 epochs, one line per setting."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for i, (label, pts) in enumerate(budgets["points"].items()):
        xs = [p[0] for p in pts]
        for ax, index in zip(axes, (3, 4), strict=True):
            means = [p[index]["mean"] for p in pts]
            stds = [p[index]["std"] or 0.0 for p in pts]
            ax.errorbar(
                xs, means, yerr=stds, marker="o", capsize=3, color=f"C{i % 10}", label=label
            )
    for ax, title in zip(axes, ("top-1", "Few"), strict=True):
        ax.set_xscale("log")
        ticks = sorted({p[0] for pts in budgets["points"].values() for p in pts})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("stage-1 epochs (log scale)")
        ax.set_ylabel(f"test {title} (%), mean ± sample std")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"study {study.name} against other stage-1 budgets")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()
