"""A self-contained HTML report of one run: headline metrics, per-class results and curves.

``write_report(run_dir)`` reads ``metrics.json``, ``train_log.jsonl`` and ``config.yaml`` from the
run folder and writes ``report.html`` beside them. Figures are PNGs embedded as base64, and the
page loads nothing from the network, so it opens from disk anywhere. Matplotlib is imported only
when a report is written and is driven through its Agg canvas directly, so the process-wide
pyplot backend is never touched.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path

from dscl import runfiles
from dscl.data.shots import SHOT_GROUPS, assign_shot_groups
from dscl.runfiles import atomic_write

GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
MAX_NAMED_CLASSES = 30  # confusion-matrix axes carry class names up to this many classes
STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:4px}"
    "pre{background:#f6f6f6;padding:1em;overflow-x:auto}.note{color:#a33}"
)


def write_report(run_dir: str | Path) -> Path:
    """Build ``run_dir/report.html`` from the run's metrics, training log and config.

    Args:
        run_dir: an existing run folder. ``metrics.json`` (from
            :func:`dscl.engine.evaluate.classification_metrics`, plus ``split``, ``epoch``,
            ``method`` and optionally ``class_names``), ``train_log.jsonl`` (one JSON object per
            line with ``stage``, ``step``/``epoch`` and ``loss*``, ``lr``, ``val_*`` keys) and
            ``config.yaml`` are each optional; what is missing is said on the page.

    Returns:
        The path of the written report (written atomically).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir must be an existing directory, got {str(run_dir)!r}")
    metrics, metrics_error = _read_metrics(run_dir / runfiles.METRICS)
    log_path = run_dir / runfiles.TRAIN_LOG
    records, malformed = _read_log(log_path)
    body = [f"<h1>Run report: {html.escape(run_dir.resolve().name)}</h1>", "<h2>Summary</h2>"]
    if metrics is None:
        body.append(f'<p class="note">{html.escape(metrics_error)}</p>')
    else:
        body += _summary_section(metrics)
    body.append("<h2>Training curves</h2>")
    if not log_path.is_file():
        body.append('<p class="note">No train_log.jsonl in this run folder.</p>')
    if malformed:
        body.append(
            f'<p class="note">Skipped {malformed} malformed line(s) in train_log.jsonl.</p>'
        )
    body += [_img(fig) for fig in _curve_figures(records, "train")]
    val_figs = _curve_figures(records, "val")
    if val_figs:
        body.append("<h2>Validation curves</h2>")
        body += [_img(fig) for fig in val_figs]
    body.append("<h2>Configuration</h2>")
    config_path = run_dir / runfiles.CONFIG
    if config_path.is_file():
        config_text = html.escape(config_path.read_text(encoding="utf-8", errors="replace"))
        body.append(f"<details><summary>config.yaml</summary><pre>{config_text}</pre></details>")
    else:
        body.append('<p class="note">No config.yaml in this run folder.</p>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>dscl report: {html.escape(run_dir.resolve().name)}</title>"
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    return atomic_write(run_dir / runfiles.REPORT, page)


def _read_metrics(path: Path) -> tuple[dict | None, str]:
    if not path.is_file():
        return None, "This run has not been evaluated yet (no metrics.json): curves only."
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, f"metrics.json could not be read ({error}): curves only."
    if not isinstance(metrics, dict) or "per_class" not in metrics:
        return None, "metrics.json does not hold a metrics dict: curves only."
    return metrics, ""


def _read_log(path: Path) -> tuple[list[dict], int]:
    """Parsed log lines and the number of malformed (non-JSON or non-object) lines."""
    records, malformed = [], 0
    if not path.is_file():
        return records, malformed
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            malformed += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            malformed += 1
    return records, malformed


def _fmt(value: object, digits: int = 2) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "n/a" if value is None else html.escape(str(value))


def _summary_section(metrics: dict) -> list[str]:
    counts = metrics.get("class_counts", [])
    per_class = metrics["per_class"]
    thresholds = metrics.get("shot_thresholds", {"many": 100, "few": 20})
    groups = assign_shot_groups(
        counts, many_threshold=thresholds["many"], few_threshold=thresholds["few"]
    )
    names = metrics.get("class_names") or []
    if len(names) != len(per_class):  # absent or inconsistent: fall back to class indices
        names = [str(i) for i in range(len(per_class))]
    sizes = metrics.get("group_sizes", {})
    head = [("Method", metrics.get("method")), ("Split", metrics.get("split"))]
    head += [("Epoch", metrics.get("epoch")), ("Test samples", metrics.get("num_samples"))]
    head += [("Top-1 %", metrics.get("top1")), ("Top-5 %", metrics.get("top5"))]
    for group in SHOT_GROUPS:
        label = f"{group.capitalize()} % ({sizes.get(group, '?')} classes)"
        head.append((label, metrics.get(group)))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in head)
    out = [f"<table>{rows}</table>", "<h2>Accuracy by shot group</h2>"]
    out.append(_img(_group_bars(metrics)))
    out.append(_img(_accuracy_vs_count(per_class, counts, groups, thresholds)))
    if metrics.get("confusion") is not None:
        out += ["<h2>Confusion matrix</h2>", _img(_confusion_figure(metrics["confusion"], names))]
    support = metrics.get("support") or [sum(row) for row in metrics["confusion"]]
    cells = "".join(
        f"<tr><td>{i}</td><td>{html.escape(str(n))}</td><td>{c}</td><td>{g}</td>"
        f"<td>{s}</td><td>{_fmt(a)}</td></tr>"
        for i, (n, c, g, s, a) in enumerate(
            zip(names, counts, groups, support, per_class, strict=True)
        )
    )
    header = "<tr><th>#</th><th>class</th><th>train images</th><th>group</th>"
    header += "<th>test images</th><th>accuracy %</th></tr>"
    out += ["<h2>Per-class accuracy</h2>", f"<table>{header}{cells}</table>"]
    return out


def _new_figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _img(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="figure">'


def _group_bars(metrics: dict):
    fig = _new_figure(5.0, 3.5)
    ax = fig.add_subplot()
    labels = ["Top-1", "Many", "Medium", "Few"]
    values = [metrics.get(key) for key in ("top1", *SHOT_GROUPS)]
    colours = ["#555555"] + [GROUP_COLOURS[g] for g in SHOT_GROUPS]
    bars = ax.bar(labels, [v or 0.0 for v in values], color=colours)
    for bar, value in zip(bars, values, strict=True):
        text = "n/a" if value is None else f"{value:.1f}"
        top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
        ax.annotate(text, top, ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Top-1 and shot-group accuracy")
    return fig


def _accuracy_vs_count(per_class: list, counts: list, groups: list[str], thresholds: dict):
    fig = _new_figure()
    ax = fig.add_subplot()
    for group in SHOT_GROUPS:
        # Classes with no training image sit at 0.5 so that the log axis can show them.
        points = [(max(c, 0.5), a, g) for a, c, g in zip(per_class, counts, groups, strict=True)]
        points = [(c, a) for c, a, g in points if g == group and a is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, s=14, color=GROUP_COLOURS[group], label=group)
    for name in ("many", "few"):  # Many is count > many, Few is count < few
        ax.axvline(max(thresholds[name], 0.5), color="#888888", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("Per-class accuracy against training count")
    if any(a is not None for a in per_class):
        ax.legend(fontsize=8)
    return fig


def _confusion_figure(confusion: list[list[int]], names: list):
    import numpy as np

    matrix = np.asarray(confusion, dtype=np.float64)  # (C, C) rows true, columns predicted
    matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)  # row-normalised
    size = min(9.0, 4.0 + 0.15 * len(names))
    fig = _new_figure(size, size * 0.85)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if len(names) <= MAX_NAMED_CLASSES:
        labels = [str(n).replace("$", r"\$") for n in names]  # "$" would start mathtext
        ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), labels, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (rows normalised)")
    return fig


def _series(records: list[dict], kind: str) -> dict[str, dict[str, tuple[list, list]]]:
    """stage -> key -> (x, y) for numeric keys of one kind: "loss", "lr" or "val"."""
    out: dict = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for index, record in enumerate(records):
        stage = str(record.get("stage", "train"))
        # Validation lines are per epoch; training lines per step (line index when absent).
        order = ("epoch", "step") if kind == "val" else ("step", "epoch")
        x = next((record[k] for k in order if _is_number(record.get(k))), index)
        for key, value in record.items():
            wanted = {
                "loss": key == "loss" or key.startswith("loss_"),
                "lr": key == "lr" or key.startswith("lr_"),
                "val": key.startswith("val_"),
            }[kind]
            if wanted and _is_number(value):
                out[stage][key][0].append(x)
                out[stage][key][1].append(value)
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _curve_figures(records: list[dict], which: str) -> list:
    """One figure per stage: loss and lr panels ("train") or validation metrics ("val")."""
    kinds = ("loss", "lr") if which == "train" else ("val",)
    per_kind = {kind: _series(records, kind) for kind in kinds}
    in_log_order = dict.fromkeys(str(record.get("stage", "train")) for record in records)
    stages = [stage for stage in in_log_order if any(stage in s for s in per_kind.values())]
    figures = []
    for stage in stages:
        fig = _new_figure(5.0 * len(kinds), 3.5)
        for position, kind in enumerate(kinds, start=1):
            ax = fig.add_subplot(1, len(kinds), position)
            for key, (xs, ys) in sorted(per_kind[kind].get(stage, {}).items()):
                ax.plot(xs, ys, label=key, linewidth=1.2, marker="." if len(xs) < 30 else None)
            ax.set_xlabel("epoch" if kind == "val" else "step")
            ax.set_title(f"{stage}: {'learning rate' if kind == 'lr' else kind}")
            if ax.lines:
                ax.legend(fontsize=8)
        figures.append(fig)
    return figures
