"""``dscl study``: grid expansion, validation, aggregation and statistics, sharding, resuming.

Aggregation is checked on fabricated cell folders against hand-computed values; the end-to-end
tests run tiny studies on the synthetic dataset (a few seconds per cell on one thread).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from dscl.cli import main
from dscl.config import config_to_yaml
from dscl.errors import ConfigError, RunFolderError
from dscl.study import (
    CellFailed,
    Claims,
    aggregate,
    cell_command,
    cell_name,
    cell_state,
    load_study,
    only_cells,
    parse_only,
    parse_shard,
    run_study,
    safe_value,
    shard_cells,
    student_t_cdf,
    student_t_quantile,
    t_interval,
    write_results,
)
from dscl.study.cells import RESULT_FILES
from dscl.study.stats import regularized_incomplete_beta, sample_std

# synthetic_lt with 40..4 images per class, 16 px: one cell takes a few seconds (as test_cli.py)
TINY = {
    "data.name": "synthetic_lt",
    "data.n_max": 40,
    "data.imbalance_ratio": 10,
    "data.image_size": 16,
    "data.val_per_class": 4,
    "data.extra": {"image_size": 16, "test_per_class": 10},
    "data.many_threshold": 30,
    "data.few_threshold": 10,
    "pretrain.epochs": 1,
    "pretrain.batch_size": 32,
    "pretrain.queue_size": 64,
    "pretrain.warmup_epochs": 0,
    "classifier.epochs": 2,
    "classifier.batch_size": 32,
    "classifier.base_lr": 0.5,
    "classifier.milestones": [1],
    "log_every": 1,
    "threads": 1,
}
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+=~-]+$")


def write_study(tmp_path: Path, name: str = "s", filename: str = "study.yaml", **fields) -> Path:
    data = {"name": name, "base": "fashion_mnist_lt"}
    data.update(fields)
    data.setdefault("overrides", {})
    data["overrides"] = {"output_dir": str(tmp_path / "runs"), **data["overrides"]}
    data.setdefault("results", str(tmp_path / "results" / name))
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fabricate(
    study, cell, top1, many=None, medium=None, few=None, wall=1.5, per_class=None, commit=None
):
    """A finished cell folder as `dscl run` and the study would leave it."""
    folder = study.study_dir / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_to_yaml(cell.config))
    metrics = {
        "top1": top1,
        "many": many,
        "medium": medium,
        "few": few,
        "per_class": per_class or [top1, top1 / 2],
        "class_counts": [100, 5],
        "split": "test",
        "method": cell.config.method,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    machine = {"processor": "x86_64", "machine": "x86_64", "cpus": 2, "torch": "9.9"}
    record = {"cell": cell.name, "wall_s": wall, "resumed": False, "machine": machine}
    if commit is not None:
        record["git_commit"] = commit
    (folder / "cell.json").write_text(json.dumps(record))


def by_name(study):
    return {cell.name: cell for cell in study.cells}


# ---------------------------------------------------------------- grid and names


def test_grid_order_names_and_configs(tmp_path: Path):
    path = write_study(
        tmp_path,
        axes={
            "method": ["ce", "dscl+pbsd"],
            "data.patch_scale": [[0.05, 0.6], [0.2, 1.0]],
            "seed": [0, 1],
        },
        overrides={"pretrain.epochs": 3},
    )
    study = load_study(path)
    names = [cell.name for cell in study.cells]
    assert names == [
        "method-ce_data.patch_scale-0.05-0.6_seed-0",
        "method-ce_data.patch_scale-0.05-0.6_seed-1",
        "method-ce_data.patch_scale-0.2-1.0_seed-0",
        "method-ce_data.patch_scale-0.2-1.0_seed-1",
        "method-dscl+pbsd_data.patch_scale-0.05-0.6_seed-0",
        "method-dscl+pbsd_data.patch_scale-0.05-0.6_seed-1",
        "method-dscl+pbsd_data.patch_scale-0.2-1.0_seed-0",
        "method-dscl+pbsd_data.patch_scale-0.2-1.0_seed-1",
    ]
    assert [cell.index for cell in study.cells] == list(range(8))
    assert all(SAFE_NAME.match(n) for n in names) and len(set(names)) == 8
    assert names == [cell.name for cell in load_study(path).cells]  # stable
    cell = study.cells[6]
    assert cell.settings == {"method": "dscl+pbsd", "data.patch_scale": [0.2, 1.0], "seed": 0}
    cfg = cell.config
    assert (cfg.method, cfg.data.patch_scale, cfg.seed) == ("dscl+pbsd", [0.2, 1.0], 0)
    assert cfg.pretrain.epochs == 3 and cfg.name == cell.name
    assert study.study_dir == tmp_path / "runs" / "s"
    assert cell_command(study, cell) == [
        sys.executable,
        "-m",
        "dscl.cli",
        "run",
        "--config",
        "fashion_mnist_lt",
        "--name",
        "method-dscl+pbsd_data.patch_scale-0.2-1.0_seed-0",
        "pretrain.epochs=3",
        "threads=1",  # every cell of a study trains with the same thread count
        "method=dscl+pbsd",
        "data.patch_scale=[0.2, 1.0]",
        "seed=0",
        f"output_dir={tmp_path / 'runs' / 's'}",
        "--resume",
        "auto",
    ]


def test_safe_values_and_long_names():
    assert safe_value("dscl+pbsd") == "dscl+pbsd"
    assert safe_value("a b/c:d") == "a~b~c~d"
    assert safe_value([0.05, 0.6]) == "0.05-0.6"
    assert safe_value({"image_size": 16}) == "image_size=16"
    assert (safe_value(True), safe_value(None), safe_value(8.0), safe_value([])) == (
        "true",
        "null",
        "8.0",
        "empty",
    )
    a = cell_name({"data.root": "x" * 300 + "a", "seed": 0})
    b = cell_name({"data.root": "x" * 300 + "b", "seed": 0})
    assert len(a) == len(b) == 150 and a != b and SAFE_NAME.match(a)
    assert a == cell_name({"data.root": "x" * 300 + "a", "seed": 0})


def test_colliding_names_are_refused(tmp_path: Path):
    path = write_study(tmp_path, axes={"data.root": ["a b", "a/b"], "seed": [0]})
    with pytest.raises(ConfigError, match="same folder name"):
        load_study(path)


# ---------------------------------------------------------------- validation


AXES = {"method": ["ce", "dscl"], "seed": [0, 1]}


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"axes": AXES, "axis": {"seed": [0]}}, ["axis: unknown key"]),
        ({"axes": AXES, "baseline": {"method": "supcon"}}, ["baseline.method", "supcon"]),
        ({"axes": AXES, "baseline": {"dscl.beta": 8}}, ["baseline.dscl.beta"]),
        ({"axes": AXES, "baseline": {"seed": 0}}, ["baseline.seed"]),
        ({"axes": AXES, "baseline": []}, ["baseline: need a mapping", "or a list"]),
        ({"axes": AXES, "baseline": [{"method": "ce"}, "dscl"]}, ["baseline[1]: need"]),
        ({"axes": AXES, "baseline": [{"method": "ce"}, {"method": "x"}]}, ["baseline[1].method"]),
        ({"axes": AXES, "baseline": [{"method": "ce"}] * 2}, ["baseline[1]: the same", "twice"]),
        ({"axes": {"method": ["ce"], "seed": []}}, ["axes.seed", "empty axis"]),
        ({"axes": {"method": "ce"}}, ["axes.method", "list"]),
        ({"axes": {"seed": [0, 0]}}, ["axes.seed", "twice"]),
        ({"axes": {}}, ["axes"]),
        ({"axes": {"name": ["a"]}}, ["axes.name"]),
        ({"axes": AXES, "overrides": {"pretrain.epochs": "x"}}, ["overrides", "pretrain.epochs"]),
        ({"axes": AXES, "overrides": {"pretrain.epoch": 3}}, ["overrides", "pretrain.epoch"]),
        ({"axes": AXES, "overrides": {"seed": 3}}, ["axes.seed", "also in overrides"]),
        ({"axes": AXES, "overrides": {"name": "x"}}, ["overrides.name"]),
        ({"axes": {"method": ["ce", "foo"]}}, ["cell method-foo", "method", "foo"]),
        ({"axes": {"dscl.beta": [-1.0]}}, ["cell dscl.beta--1.0", "dscl.beta"]),
        ({"axes": AXES, "base": "no_such_config"}, ["base", "no_such_config"]),
        ({"axes": AXES, "name": "a/b"}, ["name"]),
    ],
)
def test_study_file_validation(tmp_path: Path, fields: dict, fragments: list[str]):
    path = write_study(tmp_path, **fields)
    with pytest.raises(ConfigError) as caught:
        load_study(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_validation_error_is_one_line_exit_2(tmp_path: Path, capsys):
    path = write_study(tmp_path, axes={"method": ["ce"], "seed": []})
    assert main(["study", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "axes.seed" in err and str(path) in err
    assert not (tmp_path / "runs").exists()  # nothing was created before validation


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (29, 2.045), (1000, 1.962)]
)
def test_t_quantile_table_values(df: int, expected: float):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-expected, abs=6e-4)


def test_t_cdf_closed_forms():
    for t in (-4.0, -0.3, 0.0, 1.0, 12.706):
        # df = 1 is the Cauchy distribution; df = 2 has CDF 1/2 + t / (2 sqrt(2 + t^2))
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        closed = 0.5 + t / (2 * math.sqrt(2 + t * t))
        assert student_t_cdf(t, 2) == pytest.approx(closed, abs=1e-13)
    # df = 2 quantile in closed form: (2p - 1) / sqrt(2 p (1 - p))
    assert student_t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(0.04875), abs=1e-10)
    # I_0.4(2, 3) = P(Binomial(4, 0.4) >= 2) = 0.3456 + 0.1536 + 0.0256
    assert regularized_incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-13)


def test_sample_std_and_interval():
    assert sample_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3))
    assert sample_std([5.0]) is None and t_interval([5.0]) is None
    low, high = t_interval([1.0, 3.0])  # mean 2, s = sqrt(2), half = 12.7062 * sqrt(2)/sqrt(2)
    assert (low, high) == pytest.approx((2 - 12.7062047, 2 + 12.7062047), abs=1e-6)


# ---------------------------------------------------------------- aggregation


def test_aggregation_against_hand_values(tmp_path: Path):
    path = write_study(
        tmp_path,
        axes={"method": ["ce", "dscl"], "seed": [0, 1, 2]},
        baseline={"method": "ce"},
    )
    study = load_study(path)
    cells = by_name(study)
    top1 = {"ce": [50.0, 52.0, 54.0], "dscl": [53.0, 52.0, 58.0]}
    few = {"ce": [10.0, 20.0, 30.0], "dscl": [15.0, 20.0, 40.0]}
    for method in ("ce", "dscl"):
        for seed in range(3):
            cell = cells[f"method-{method}_seed-{seed}"]
            commit = "0123abcd" * 5 if (method, seed) == ("ce", 0) else None
            fabricate(study, cell, top1[method][seed], 70.0, None, few[method][seed], commit=commit)
    states = {c.name: cell_state(study, c) for c in study.cells}
    assert set(states.values()) == {"finished"}
    results = aggregate(study, states)
    assert results["missing"] == [] and results["finished"] == 6
    ce, dscl = results["settings"]
    assert ce["settings"] == {"method": "ce"} and ce["n"] == 3 and ce["seeds"] == [0, 1, 2]
    assert ce["top1"]["mean"] == pytest.approx(52.0) and ce["top1"]["std"] == pytest.approx(2.0)
    # dscl top-1: mean 163/3; squared deviations (16 + 49 + 121) / 9 = 186/9, over n - 1 = 2
    assert dscl["top1"]["mean"] == pytest.approx(163 / 3)
    assert dscl["top1"]["std"] == pytest.approx(math.sqrt(186 / 18))
    assert dscl["many"]["mean"] == pytest.approx(70.0) and dscl["many"]["std"] == 0.0
    assert dscl["medium"] == {"n": 0, "mean": None, "std": None, "values": []}
    assert dscl["per_class"]["accuracy"] == pytest.approx([163 / 3, 163 / 6])
    [paired] = results["paired"]
    assert paired["settings"] == {"method": "dscl"} and len(paired["pairs"]) == 3
    # top-1 differences 3, 0, 4: mean 7/3, s^2 = (4 + 49 + 25) / 9 / 2 = 13/3
    diff = paired["top1"]
    assert diff["values"] == [3.0, 0.0, 4.0]
    assert diff["mean"] == pytest.approx(7 / 3) and diff["std"] == pytest.approx(math.sqrt(13 / 3))
    half = 4.302653 * math.sqrt(13 / 3) / math.sqrt(3)
    assert diff["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half], abs=1e-5)
    # few differences 5, 0, 10: mean 5, s = 5, half = 4.302653 * 5 / sqrt(3)
    half = 4.302653 * 5 / math.sqrt(3)
    assert paired["few"]["ci95"] == pytest.approx([5 - half, 5 + half], abs=1e-5)
    assert paired["medium"]["mean"] is None and paired["medium"]["ci95"] is None

    page_path = write_results(study, results)
    page = page_path.read_text()
    # the cells table names the commit each cell ran from (cell.json), where it was recorded
    assert "| `method-ce_seed-0` | 50.00 | 70.00 | — | 10.00 | 1.5 s | `0123abc` |" in page
    assert "| `method-ce_seed-1` |" in page and "| 1.5 s | not recorded |" in page
    assert "| ce | 3 | 52.00 ± 2.00 | 70.00 ± 0.00 | — | 20.00 ± 10.00 |" in page
    assert "| dscl | 3 | +2.33 ± 2.08 [-2.84, +7.50] |" in page
    assert "1.5 s" in page and "processor x86_64, machine x86_64, 2 CPUs, torch 9.9" in page
    assert "![per-class accuracy and group means](study.png)" in page
    assert page_path == study.results_dir / "RESULTS.md"
    assert (study.results_dir / "study.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((study.results_dir / "results.json").read_text())
    assert saved["paired"][0]["top1"]["values"] == [3.0, 0.0, 4.0]
    write_results(study, aggregate(study, states))
    assert page_path.read_text() == page  # deterministic

    # an unfinished cell: two pairs (df = 1), then one pair (no interval)
    (study.study_dir / "method-dscl_seed-2" / "metrics.json").unlink()
    states = {c.name: cell_state(study, c) for c in study.cells}
    results = aggregate(study, states)
    assert results["missing"] == ["method-dscl_seed-2"]
    diff = results["paired"][0]["top1"]
    assert diff["mean"] == pytest.approx(1.5) and diff["std"] == pytest.approx(math.sqrt(4.5))
    half = 12.706205 * math.sqrt(4.5) / math.sqrt(2)
    assert diff["ci95"] == pytest.approx([1.5 - half, 1.5 + half], abs=1e-5)
    (study.study_dir / "method-dscl_seed-1" / "metrics.json").unlink()
    states = {c.name: cell_state(study, c) for c in study.cells}
    diff = aggregate(study, states)["paired"][0]["top1"]
    assert diff == {"n": 1, "mean": 3.0, "std": None, "ci95": None, "values": [3.0]}
    page = write_results(study, aggregate(study, states)).read_text()
    assert "Missing: `method-dscl_seed-1`, `method-dscl_seed-2`." in page


def test_pairs_match_every_axis_outside_the_baseline(tmp_path: Path):
    path = write_study(
        tmp_path,
        axes={"method": ["ce", "dscl"], "dscl.beta": [2.0, 8.0], "seed": [0, 1]},
        baseline={"method": "ce"},
    )
    study = load_study(path)
    top1 = {
        ("ce", 2.0): [10.0, 12.0],
        ("ce", 8.0): [30.0, 34.0],
        ("dscl", 2.0): [11.0, 15.0],
        ("dscl", 8.0): [40.0, 40.0],
    }
    for cell in study.cells:
        s = cell.settings
        fabricate(study, cell, top1[(s["method"], s["dscl.beta"])][s["seed"]])
    results = aggregate(study, {c.name: cell_state(study, c) for c in study.cells})
    assert [row["settings"] for row in results["settings"]] == [
        {"method": "ce", "dscl.beta": 2.0},
        {"method": "ce", "dscl.beta": 8.0},
        {"method": "dscl", "dscl.beta": 2.0},
        {"method": "dscl", "dscl.beta": 8.0},
    ]
    low, high = results["paired"]
    assert low["settings"] == {"method": "dscl", "dscl.beta": 2.0}
    assert low["pairs"][1] == [
        "method-dscl_dscl.beta-2.0_seed-1",
        "method-ce_dscl.beta-2.0_seed-1",
    ]
    assert low["top1"]["values"] == [1.0, 3.0] and high["top1"]["values"] == [10.0, 6.0]
    assert high["top1"]["mean"] == pytest.approx(8.0)
    assert high["top1"]["std"] == pytest.approx(math.sqrt(8.0))


def test_each_baseline_has_its_paired_table(tmp_path: Path):
    """``baseline`` as a list: differences against each in turn; a later table leaves out the
    earlier baselines (their rows would be negations of rows above)."""
    path = write_study(
        tmp_path,
        axes={"method": ["ce", "dscl", "bcl"], "seed": [0, 1, 2]},
        baseline=[{"method": "ce"}, {"method": "dscl"}],
    )
    study = load_study(path)
    assert study.baselines == [{"method": "ce"}, {"method": "dscl"}]
    assert study.baseline == {"method": "ce"}
    assert load_study(path).to_yaml() == study.to_yaml()
    assert yaml.safe_load(study.to_yaml())["baseline"] == [{"method": "ce"}, {"method": "dscl"}]
    top1 = {"ce": [50.0, 52.0, 54.0], "dscl": [53.0, 52.0, 58.0], "bcl": [55.0, 51.0, 60.0]}
    for cell in study.cells:
        fabricate(study, cell, top1[cell.settings["method"]][cell.settings["seed"]])
    results = aggregate(study, {c.name: cell_state(study, c) for c in study.cells})
    rows = [(r["settings"]["method"], r["against"]["method"]) for r in results["paired"]]
    assert rows == [("dscl", "ce"), ("bcl", "ce"), ("bcl", "dscl")]
    assert results["paired"][1]["top1"]["values"] == [5.0, -1.0, 6.0]
    assert results["paired"][2]["top1"]["values"] == [2.0, -1.0, 2.0]
    assert results["paired"][2]["pairs"][0] == ["method-bcl_seed-0", "method-dscl_seed-0"]
    assert results["baselines"] == study.baselines
    page = write_results(study, results).read_text()
    ce_table = page.index("## Paired differences against method=ce")
    dscl_table = page.index("## Paired differences against method=dscl")
    assert ce_table < dscl_table
    assert "Not repeated: method=ce, whose row would be the negation of one above." in page
    assert page.count("| bcl | 3 |") == 3  # accuracy, against ce, against dscl
    assert "| bcl | 3 | +1.00 ± 1.73 [-3.30, +5.30] |" in page[dscl_table:]
    assert "| dscl | 3 |" not in page[dscl_table:]


def test_a_baseline_on_another_axis_keeps_every_other_setting(tmp_path: Path):
    """Only the earlier baselines of the same axes are left out of a later table: against
    dscl.beta=8.0, method=ce at beta 2 is a comparison no earlier table holds."""
    path = write_study(
        tmp_path,
        axes={"method": ["ce", "dscl"], "dscl.beta": [2.0, 8.0], "seed": [0, 1]},
        baseline=[{"method": "ce"}, {"dscl.beta": 8.0}],
    )
    study = load_study(path)
    for cell in study.cells:
        s = cell.settings
        fabricate(study, cell, 10.0 * (s["method"] == "dscl") + s["dscl.beta"] + s["seed"])
    results = aggregate(study, {c.name: cell_state(study, c) for c in study.cells})
    rows = [(r["settings"], r["against"]) for r in results["paired"]]
    assert rows == [
        ({"method": "dscl", "dscl.beta": 2.0}, {"method": "ce"}),
        ({"method": "dscl", "dscl.beta": 8.0}, {"method": "ce"}),
        ({"method": "ce", "dscl.beta": 2.0}, {"dscl.beta": 8.0}),
        ({"method": "dscl", "dscl.beta": 2.0}, {"dscl.beta": 8.0}),
    ]
    assert [r["top1"]["values"] for r in results["paired"]] == [[10.0] * 2] * 2 + [[-6.0] * 2] * 2
    assert "Not repeated" not in write_results(study, results).read_text()


def test_a_later_baseline_naming_more_axes_repeats_no_comparison(tmp_path: Path):
    """Baselines whose axes overlap without being equal: a row an earlier table holds, the same
    way round or negated, is left out and named; every other comparison stays."""
    axes = {"method": ["ce", "dscl"], "dscl.beta": [2.0, 8.0], "seed": [0, 1]}

    def pairs(baselines: list[dict]) -> tuple[list, str]:
        study = load_study(write_study(tmp_path, axes=axes, baseline=baselines))
        for cell in study.cells:
            s = cell.settings
            fabricate(study, cell, 10.0 * (s["method"] == "dscl") + s["dscl.beta"] + s["seed"])
        results = aggregate(study, {c.name: cell_state(study, c) for c in study.cells})
        rows = [
            (r["settings"]["method"], r["settings"]["dscl.beta"], r["against"])
            for r in results["paired"]
        ]
        return rows, write_results(study, results).read_text()

    # against (dscl, 8.0): (ce, 8.0) would negate "(dscl, 8.0) - (ce, 8.0)" of the first table
    rows, page = pairs([{"method": "ce"}, {"method": "dscl", "dscl.beta": 8.0}])
    later = {"method": "dscl", "dscl.beta": 8.0}
    assert [(m, b) for m, b, against in rows if against == later] == [("ce", 2.0), ("dscl", 2.0)]
    assert "Not repeated: method=ce, dscl.beta=8.0, whose row would be the negation of one" in page
    # against (ce, 2.0): (dscl, 2.0) would be "(dscl, 2.0) - (ce, 2.0)" of the first table again
    rows, page = pairs([{"method": "ce"}, {"method": "ce", "dscl.beta": 2.0}])
    later = {"method": "ce", "dscl.beta": 2.0}
    assert [(m, b) for m, b, against in rows if against == later] == [("ce", 8.0), ("dscl", 8.0)]
    assert "Not repeated: method=dscl, dscl.beta=2.0, whose row would repeat one above." in page


# ---------------------------------------------------------------- changes, shards, flags


def test_changed_study_is_refused(tmp_path: Path, capsys, monkeypatch):
    axes = {"method": ["ce", "dscl"], "seed": [0]}
    path = write_study(tmp_path, axes=axes, overrides={"pretrain.epochs": 3})
    study = load_study(path)
    for cell in study.cells:
        fabricate(study, cell, 50.0)
    assert run_study(str(path), report_only=True) == 0
    # a new seed leaves the finished cells as they were: accepted, the new cells are missing
    write_study(tmp_path, axes={**axes, "seed": [0, 1]}, overrides={"pretrain.epochs": 3})
    assert run_study(str(path), report_only=True) == 0
    assert "missing: method-ce_seed-1, method-dscl_seed-1" in capsys.readouterr().err
    # another stage-1 budget would reinterpret them: refused, naming the cell and the key
    write_study(tmp_path, axes=axes, overrides={"pretrain.epochs": 4})
    with pytest.raises(ConfigError) as caught:
        run_study(str(path), report_only=True)
    message = str(caught.value)
    assert "cell method-ce_seed-0" in message and "pretrain.epochs=3" in message
    assert "pretrain.epochs=4" in message
    assert main(["study", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    # an interrupted cell (stage-1 checkpoint, no metrics) is not resumed under other settings
    shutil.rmtree(study.results_dir / "method-ce_seed-0")  # (its collected copy)
    (study.study_dir / "method-ce_seed-0" / "metrics.json").unlink()
    (study.study_dir / "method-ce_seed-0" / "pretrain.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="was interrupted with pretrain.epochs=3.*delete"):
        run_study(str(path), report_only=True)
    fabricate(study, study.cells[0], 50.0)
    # the same folder spelled another way (relative output_dir) is not a change
    write_study(tmp_path, axes=axes, overrides={"pretrain.epochs": 3})
    relative = tmp_path / "relative.yaml"
    data = {"name": "s", "base": "fashion_mnist_lt", "axes": axes}
    data["overrides"] = {"output_dir": "runs", "pretrain.epochs": 3}
    relative.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    assert run_study(str(relative), report_only=True) == 0


def test_shards_and_skipping(tmp_path: Path):
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    for bad in ("3/3", "-1/2", "a/b", "1", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    path = write_study(tmp_path, axes={"method": ["ce", "dscl", "supcon", "dscl+pbsd"]})
    study = load_study(path)
    cells = study.cells
    assert [c.index for c in shard_cells(cells, (1, 3))] == [1]
    path = write_study(tmp_path, axes={"method": ["ce", "dscl"], "seed": [0, 1, 2, 3]})
    cells = load_study(path).cells
    assert [c.index for c in shard_cells(cells, (1, 3))] == [1, 4, 7]
    assert [c.index for c in shard_cells(cells, (0, 3))] == [0, 3, 6]
    assert len(shard_cells(cells, None)) == 8

    ran: list[str] = []

    def fake_runner(study, cell):
        ran.append(cell.name)
        fabricate(study, cell, 10.0 * cell.index)
        return {}

    assert run_study(str(path), shard="1/3", runner=fake_runner) == 0
    assert ran == ["method-ce_seed-1", "method-dscl_seed-0", "method-dscl_seed-3"]
    results = json.loads((tmp_path / "results" / "s" / "results.json").read_text())
    assert results["finished"] == 3 and len(results["missing"]) == 5
    ran.clear()
    assert run_study(str(path), runner=fake_runner) == 0  # the rest, finished ones skipped
    assert ran == [c.name for c in cells if c.index not in (1, 4, 7)]
    ran.clear()
    assert run_study(str(path), runner=fake_runner) == 0
    assert ran == []


def test_only_runs_the_selected_axis_values(tmp_path: Path, capsys):
    axes = {
        "seed": [0, 1],
        "method": ["ce", "dscl", "bcl"],
        "data.crop_scale": [[0.2, 1.0], [0.5, 1.0]],
    }
    path = write_study(tmp_path, axes=axes)
    study = load_study(path)
    chosen = parse_only(["method=ce,bcl", "seed=1"], study)
    assert chosen == {"method": {"ce", "bcl"}, "seed": {"1"}}
    names = [c.name for c in only_cells(study.cells, chosen)]
    assert (
        names
        == [
            c.name
            for c in study.cells
            if c.settings["method"] in ("ce", "bcl") and c.settings["seed"] == 1
        ]
        and len(names) == 4
    )
    # commas inside brackets belong to the value; a repeated key adds values
    assert parse_only(["data.crop_scale=[0.2, 1.0],[0.5, 1.0]"], study) == {
        "data.crop_scale": {"[0.2, 1.0]", "[0.5, 1.0]"}
    }
    assert parse_only(["data.crop_scale=[0.2,1.0]"], study) == {"data.crop_scale": {"[0.2, 1.0]"}}
    assert parse_only(["method=ce", "method=dscl"], study) == {"method": {"ce", "dscl"}}
    assert only_cells(study.cells, {}) == study.cells
    for bad, fragment in [
        ("method", "expected KEY=VALUE"),
        ("method=", "expected KEY=VALUE"),
        ("lr=0.1", "'lr' is not an axis of study s (axes: seed, method, data.crop_scale)"),
        ("method=paco", "'paco' is not a value of axis 'method' (values: ce, dscl, bcl)"),
        ("seed=0,3", "'3' is not a value of axis 'seed'"),
        ("method=[ce", "cannot read the values as YAML"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            parse_only([bad], study)
    # the command: exit 2, one line naming the argument, nothing run
    assert main(["study", "--config", str(path), "--only", "method=sgd"]) == 2
    assert "--only method=sgd" in capsys.readouterr().err
    assert not study.study_dir.exists()

    ran: list[str] = []

    def fake_runner(study, cell):
        ran.append(cell.name)
        fabricate(study, cell, 50.0 + cell.index)
        return {}

    assert run_study(str(path), only=["method=dscl"], shard="0/2", runner=fake_runner) == 0
    assert ran == [
        c.name for c in study.cells if c.settings["method"] == "dscl" and c.index % 2 == 0
    ]
    results = json.loads((tmp_path / "results" / "s" / "results.json").read_text())
    assert results["finished"] == len(ran) and len(results["missing"]) == 12 - len(ran)
    ran.clear()
    assert run_study(str(path), only=["method=dscl"], runner=fake_runner) == 0  # the rest of dscl
    assert ran == [c.name for c in study.cells if c.settings["method"] == "dscl" and c.index % 2]


def test_cell_command_resumes_automatically_whatever_the_folder(tmp_path: Path):
    study = load_study(write_study(tmp_path, axes={"method": ["ce"]}))
    cell = study.cells[0]
    folder = study.study_dir / cell.name
    fresh = cell_command(study, cell, folder)
    assert fresh[-3:] == [f"output_dir={study.study_dir}", "--resume", "auto"]
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_to_yaml(cell.config))
    assert cell_command(study, cell, folder) == fresh
    (folder / "pretrain.pt").write_bytes(b"")
    assert cell_command(study, cell, folder) == fresh
    assert cell_state(study, cell) == "interrupted"


def test_a_cell_left_with_the_previous_checkpoint_alone_is_interrupted(tmp_path: Path):
    """A cell killed while its stage-1 checkpoint was replaced (where hard links are not
    supported) holds pretrain.prev.pt alone; ``--resume auto`` continues from it, so the study
    counts the cell interrupted and refuses it under a changed config, as with pretrain.pt."""
    study = load_study(write_study(tmp_path, axes={"method": ["ce"]}))
    cell = study.cells[0]
    folder = study.study_dir / cell.name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_to_yaml(cell.config))
    (folder / "pretrain.prev.pt").write_bytes(b"")
    assert cell_state(study, cell) == "interrupted"
    saved = yaml.safe_load(config_to_yaml(cell.config))
    saved["seed"] += 1
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="was interrupted with seed="):
        cell_state(study, cell)


def test_failed_cell_stops_with_its_log(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = {"data.name": "image_folder", "data.root": str(tmp_path / "nowhere")}
    path = write_study(tmp_path, axes={"method": ["ce", "dscl"]}, overrides=overrides)
    assert main(["study", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "cell method-ce failed with exit code 2" in err
    assert "dscl: error:" in err and "nowhere" in err  # the tail of the cell's log
    assert (tmp_path / "runs" / "s" / "method-ce" / "stdout.log").is_file()
    assert not (tmp_path / "runs" / "s" / "method-dscl").exists()  # stopped at the first
    attempts = (tmp_path / "runs" / "s" / "method-ce" / "attempts.jsonl").read_text()
    (attempt,) = [json.loads(line) for line in attempts.splitlines()]
    assert attempt["returncode"] == 2 and attempt["wall_s"] > 0


def test_wall_time_of_a_cell_over_its_attempts():
    from dscl.study.results import _wall_text

    assert _wall_text({"wall_s": None}) == "not recorded"
    # a record from before attempts were counted
    assert _wall_text({"wall_s": 12.0, "resumed": False}) == "12.0 s"
    assert _wall_text({"wall_s": 12.0, "resumed": True}) == "12.0 s (resumed: last attempt)"
    one = {"wall_s": 12.0, "resumed": False, "attempts": 1, "attempts_timed": 1}
    assert _wall_text({**one, "attempts_wall_s": 12.0}) == "12.0 s"
    three = {"wall_s": 5.0, "resumed": True, "attempts": 3, "attempts_wall_s": 30.5}
    assert _wall_text({**three, "attempts_timed": 3}) == "30.5 s in 3 attempts"
    assert _wall_text({**three, "attempts_timed": 2}) == "at least 30.5 s in 3 attempts (2 timed)"


def test_shipped_study_config_validates():
    study = load_study("study_fashion_mnist_lt")
    assert len(study.cells) == 21 and study.baseline == {"method": "ce"}
    assert study.cells[-1].name == "method-paco_seed-2"
    assert study.cells[0].config.data.class_order == 1
    assert study.cells[0].config.pretrain.epochs == 30
    assert study.cells[0].config.pretrain.knn_every == 5
    assert {c.config.threads for c in study.cells} == {1}
    paper = load_study("study_fashion_mnist_lt_paper")
    assert [c.name for c in paper.cells[:6]] == [
        "seed-0_method-ce",
        "seed-0_method-supcon",
        "seed-0_method-dscl",
        "seed-0_method-dscl+pbsd",
        "seed-0_method-bcl",
        "seed-0_method-paco",
    ]  # seed-major: every finished prefix of seeds is a complete paired comparison
    assert len(paper.cells) == 18
    cfg = paper.cells[3].config
    assert (cfg.pretrain.epochs, cfg.pretrain.warmup_epochs) == (200, 10)
    assert (cfg.classifier.epochs, cfg.classifier.milestones) == (40, [20, 30])
    assert (cfg.pretrain.batch_size, cfg.pretrain.queue_size, cfg.pretrain.encoder_momentum) == (
        128,
        1024,
        0.99,
    )
    assert (cfg.data.image_size, cfg.data.class_order, cfg.threads, cfg.amp) == (28, 1, 2, "auto")
    assert str(paper.results_dir) == "results/study_fashion_mnist_lt_paper"


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_study_end_to_end_then_rerun_skips(tmp_path: Path, monkeypatch, capsys):
    """2 methods x 2 seeds on synthetic data; a re-run skips every cell, same RESULTS.md."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = write_study(
        tmp_path,
        name="tiny",
        overrides=TINY,
        axes={"method": ["ce", "dscl"], "seed": [0, 1]},
        baseline={"method": "ce"},
    )
    assert main(["study", "--config", str(path)]) == 0
    out = capsys.readouterr()
    folder = tmp_path / "runs" / "tiny"
    committed = tmp_path / "results" / "tiny"
    assert f"results: {committed / 'RESULTS.md'}" in out.out
    assert "[4/4] method-dscl_seed-1: done" in out.err  # plain progress lines off a terminal
    names = ["method-ce_seed-0", "method-ce_seed-1", "method-dscl_seed-0", "method-dscl_seed-1"]
    top1 = {}
    for name in names:
        for file in ("metrics.json", "config.yaml", "cell.json", "stdout.log", "best.pt"):
            assert (folder / name / file).is_file(), (name, file)
        record = json.loads((folder / name / "cell.json").read_text())
        assert record["wall_s"] > 0 and record["resumed"] is False
        assert record["attempts"] == record["attempts_timed"] == 1
        assert record["attempts_wall_s"] == record["wall_s"]
        top1[name] = json.loads((folder / name / "metrics.json").read_text())["top1"]
        assert "Top-1" in (folder / name / "stdout.log").read_text()
    for name in names:  # the small files are collected, checkpoints are not
        assert sorted(p.name for p in (committed / name).iterdir()) == sorted(RESULT_FILES)
        for file in RESULT_FILES:
            assert (committed / name / file).read_bytes() == (folder / name / file).read_bytes()
    results = json.loads((committed / "results.json").read_text())
    ce, dscl = results["settings"]
    assert ce["top1"]["mean"] == pytest.approx((top1[names[0]] + top1[names[1]]) / 2)
    diffs = [top1[names[2]] - top1[names[0]], top1[names[3]] - top1[names[1]]]
    assert results["paired"][0]["top1"]["values"] == pytest.approx(diffs)
    assert (committed / "study.png").is_file() and (folder / "study.yaml").is_file()
    assert load_study(folder / "study.yaml").cells[0].config == load_study(path).cells[0].config
    assert (committed / "study.yaml").read_bytes() == (folder / "study.yaml").read_bytes()
    page = (committed / "RESULTS.md").read_bytes()
    logs = {n: (folder / n / "stdout.log").read_bytes() for n in names}

    assert main(["study", "--config", str(path)]) == 0
    assert "running" not in capsys.readouterr().err
    assert {n: (folder / n / "stdout.log").read_bytes() for n in names} == logs
    assert (committed / "RESULTS.md").read_bytes() == page
    assert main(["study", "--config", str(path), "--report-only"]) == 0
    assert (committed / "RESULTS.md").read_bytes() == page
    # the committed results alone: no run folders, the same aggregate, nothing to run
    shutil.rmtree(tmp_path / "runs")
    assert main(["study", "--config", str(path), "--report-only"]) == 0
    assert (committed / "RESULTS.md").read_bytes() == page
    assert main(["study", "--config", str(path)]) == 0
    assert "running" not in capsys.readouterr().err
    assert not (folder / names[0]).exists()


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["kill", "term"])
def test_killed_study_resumes_to_completion(tmp_path: Path, stop: str):
    """SIGKILL to the study's process group mid-cell (``kill``), or SIGTERM to the study alone,
    which stops its cell with a checkpoint (``term``); the same command then completes it."""
    overrides = {**TINY, "pretrain.epochs": 4}
    path = write_study(tmp_path, name="killed", overrides=overrides, axes={"method": ["supcon"]})
    folder = tmp_path / "runs" / "killed" / "method-supcon"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dscl.cli", "study", "--config", str(path)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (folder / "pretrain.pt").is_file():
            assert proc.poll() is None, "the study ended before the cell wrote pretrain.pt"
            assert time.monotonic() < deadline, "no pretrain.pt after 60 s"
            time.sleep(0.02)
        if stop == "term":
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=60) == 75
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    interrupted = not (folder / "metrics.json").is_file()
    assert interrupted or stop == "kill"  # a stopped study (exit 75) left its cell unfinished
    assert not (folder / "cell.json").is_file()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    if interrupted:
        assert "(resuming)" in done.stderr
        record = json.loads((folder / "cell.json").read_text())
        assert record["resumed"] is True and "--resume" in record["command"]
        assert (folder / "stdout.log").read_text().count("==== dscl study killed") == 2
        page = (tmp_path / "results" / "killed" / "RESULTS.md").read_text()
        assert record["attempts"] == 2
        if stop == "kill":  # the killed attempt left no time: the total is a floor, said so
            assert record["attempts_timed"] == 1
            assert record["attempts_wall_s"] == record["wall_s"]
            assert f"at least {record['wall_s']:.1f} s in 2 attempts (1 timed)" in page
        else:  # both attempts timed: the total is their sum
            attempts = (folder / "attempts.jsonl").read_text().splitlines()
            first = json.loads(attempts[0])
            assert record["attempts_timed"] == 2 and first["returncode"] != 0
            total = record["attempts_wall_s"]
            assert total == pytest.approx(first["wall_s"] + record["wall_s"], abs=0.11)
            assert f"| {total:.1f} s in 2 attempts |" in page
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["per_class"]) == 10
    results = json.loads((tmp_path / "results" / "killed" / "results.json").read_text())
    assert results["finished"] == 1 and results["missing"] == []


# ---------------------------------------------------------------- committed results, claims, jobs


def test_committed_results_alone_aggregate_and_a_changed_one_is_refused(tmp_path: Path, capsys):
    axes = {"method": ["ce", "dscl"], "seed": [0, 1]}
    path = write_study(tmp_path, axes=axes, baseline={"method": "ce"})
    study = load_study(path)
    for i, cell in enumerate(study.cells):
        fabricate(study, cell, 50.0 + i, 60.0, 40.0, 20.0 + i)
        (study.study_dir / cell.name / "pretrain.pt").write_bytes(b"checkpoint")
    assert run_study(str(path), report_only=True) == 0
    assert "collected" in capsys.readouterr().err
    committed = study.results_dir
    page = (committed / "RESULTS.md").read_bytes()
    for cell in study.cells:  # the small files only, byte for byte; never a checkpoint
        assert not (committed / cell.name / "pretrain.pt").exists()
        for name in ("metrics.json", "config.yaml", "cell.json"):
            copy = (committed / cell.name / name).read_bytes()
            assert copy == (study.study_dir / cell.name / name).read_bytes()
    # another machine: only the committed folder (as a clone of the repository has it)
    shutil.rmtree(tmp_path / "runs")
    assert [cell_state(study, c) for c in study.cells] == ["finished"] * 4
    ran: list[str] = []
    assert run_study(str(path), runner=lambda s, c: ran.append(c.name)) == 0
    assert ran == [] and (committed / "RESULTS.md").read_bytes() == page
    # a committed cell whose config no longer matches what the study resolves is refused
    write_study(tmp_path, axes=axes, baseline={"method": "ce"}, overrides={"pretrain.epochs": 7})
    with pytest.raises(ConfigError) as caught:
        run_study(str(path), report_only=True)
    message = str(caught.value)
    assert message.startswith(f"{committed / 'method-ce_seed-0'}: committed results"), message
    assert "pretrain.epochs=25" in message and "pretrain.epochs=7" in message
    assert main(["study", "--config", str(path), "--report-only"]) == 2
    # a committed metrics.json without its config is an error too, not a finished cell
    write_study(tmp_path, axes=axes, baseline={"method": "ce"})
    (committed / "method-ce_seed-0" / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="lack a readable config.yaml") as caught:
        run_study(str(path), report_only=True)
    assert str(caught.value).startswith(f"{committed / 'method-ce_seed-0'}: committed results")


def test_results_given_to_one_run_is_not_written_into_the_study_file(tmp_path: Path):
    # --results redirects one invocation; the study.yaml it writes (committed with the results)
    # keeps the study file's own folder, so it does not change with the checkout that ran it
    path = write_study(tmp_path, axes={"method": ["ce"]}, results="results/s")
    study = load_study(path)
    fabricate(study, study.cells[0], 50.0)
    elsewhere = tmp_path / "elsewhere"
    assert run_study(str(path), results=elsewhere, report_only=True) == 0
    written = yaml.safe_load((elsewhere / "study.yaml").read_text())
    assert written["results"] == "results/s"
    page = (elsewhere / "RESULTS.md").read_text()
    assert "dscl study --config results/s/study.yaml" in page and str(elsewhere) not in page
    assert (elsewhere / "method-ce" / "metrics.json").is_file()  # collected where it was told


def test_findings_written_by_hand_are_kept_in_results_md(tmp_path: Path):
    path = write_study(tmp_path, axes={"method": ["ce"]})
    study = load_study(path)
    fabricate(study, study.cells[0], 50.0)
    assert run_study(str(path), report_only=True) == 0
    page = (study.results_dir / "RESULTS.md").read_text()
    assert "What it shows" not in page
    text = "`ce` alone: nothing to compare.\n\n- one cell, one seed.\n"
    (study.results_dir / "FINDINGS.md").write_text(text)
    assert run_study(str(path), report_only=True) == 0  # regenerating keeps them
    page = (study.results_dir / "RESULTS.md").read_text()
    head, rest = page.split("## What it shows (FINDINGS.md, written by hand)\n\n")
    assert "Finished: 1 of 1 cells." in head
    assert rest.startswith(text) and rest.index(text) < rest.index("## Test accuracy")
    before = (study.results_dir / "results.json").read_bytes()
    (study.results_dir / "FINDINGS.md").write_bytes(b"\xff\xfe not text")
    with pytest.raises(RunFolderError, match="FINDINGS.md: cannot read it"):
        run_study(str(path), report_only=True)
    assert main(["study", "--config", str(path), "--report-only"]) == 2
    assert (study.results_dir / "RESULTS.md").read_text() == page  # nothing half-written
    assert (study.results_dir / "results.json").read_bytes() == before


def test_report_only_without_any_folder_is_refused(tmp_path: Path):
    path = write_study(tmp_path, axes={"method": ["ce"]})
    with pytest.raises(RunFolderError, match="no results folder"):
        run_study(str(path), report_only=True)


def test_study_threads_fixed_whatever_jobs(tmp_path: Path):
    study = load_study(write_study(tmp_path, axes={"method": ["ce", "dscl"]}))
    assert {cell.config.threads for cell in study.cells} == {1}
    assert study.overrides["threads"] == 1 and "threads=1" in study.override_texts
    study = load_study(write_study(tmp_path, axes={"method": ["ce"]}, overrides={"threads": 3}))
    assert study.cells[0].config.threads == 3
    study = load_study(write_study(tmp_path, axes={"threads": [1, 2]}))
    assert [cell.config.threads for cell in study.cells] == [1, 2]


def test_jobs_run_cells_side_by_side(tmp_path: Path, capsys):
    path = write_study(tmp_path, axes={"method": ["ce", "dscl", "supcon"], "seed": [0, 1]})
    lock = threading.Lock()
    running: list[str] = []
    peak = [0]
    seen_threads: set = set()

    def slow_runner(study, cell):
        with lock:
            running.append(cell.name)
            peak[0] = max(peak[0], len(running))
            seen_threads.add(cell.config.threads)
            # while it runs, the cell is claimed by this process
            claim = json.loads((study.study_dir / "claims" / f"{cell.name}.json").read_text())
            assert claim["pid"] == os.getpid() and claim["host"]
        time.sleep(0.3)
        fabricate(study, cell, 50.0)
        with lock:
            running.remove(cell.name)
        return {}

    assert run_study(str(path), jobs=3, runner=slow_runner) == 0
    assert peak[0] == 3 and seen_threads == {1}
    assert not list((tmp_path / "runs" / "s" / "claims").iterdir())  # every claim released
    results = json.loads((tmp_path / "results" / "s" / "results.json").read_text())
    assert results["finished"] == 6
    with pytest.raises(ConfigError, match="--jobs 0"):
        run_study(str(path), jobs=0)


def test_jobs_get_their_own_gpu_round_robin(tmp_path: Path, monkeypatch):
    # On a machine with two GPUs, three job slots: slot i's cells run on GPU i mod 2, and the
    # cell subprocess sees that GPU alone (CUDA_VISIBLE_DEVICES, in the parent's numbering).
    from dscl.study import runner as study_runner

    monkeypatch.setattr(study_runner, "gpu_slots", lambda: ["2", "5"])
    path = write_study(tmp_path, axes={"method": ["ce", "dscl", "supcon"], "seed": [0, 1]})
    placed: dict[str, set] = {}
    lock = threading.Lock()

    def placed_runner(study, cell, gpu=None):
        with lock:
            placed.setdefault(threading.current_thread().name, set()).add(gpu)
        time.sleep(0.2)
        fabricate(study, cell, 50.0)
        return {}

    assert run_study(str(path), jobs=3, runner=placed_runner) == 0
    assert placed == {f"study-job-{i}": {i % 2} for i in range(3)}
    cell = load_study(path).cells[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert study_runner.cell_env(cell, "5")["CUDA_VISIBLE_DEVICES"] == "5"
    assert study_runner.cell_env(cell)["CUDA_VISIBLE_DEVICES"] == "2,5"  # not placed: as given
    # cell.json's machine names the model of the GPU the cell was given
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"GPU model {i}")
    assert study_runner.machine_info(1)["gpu"] == "GPU model 1"
    assert study_runner.machine_info()["gpu"] == "GPU model 0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert study_runner.machine_info(1)["gpu"] is None


def test_a_failed_job_lets_the_others_finish_then_reports(tmp_path: Path, capsys):
    path = write_study(tmp_path, axes={"method": ["ce", "dscl", "supcon"]})
    other_started = threading.Event()

    def runner(study, cell):
        if cell.name == "method-ce":
            # fail while the other job runs its cell (on a loaded machine the second job's
            # thread may otherwise start only after the failure, and rightly start nothing)
            assert other_started.wait(30)
            log = study.study_dir / cell.name / "stdout.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("boom\n")
            raise CellFailed(cell, 3, log)
        other_started.set()
        time.sleep(0.3)
        fabricate(study, cell, 50.0)
        return {}

    assert run_study(str(path), jobs=2, runner=runner) == 1
    err = capsys.readouterr().err
    assert "cell method-ce failed with exit code 3" in err and "boom" in err
    study = load_study(path)
    # the job that was running went on to the end; no new cell started after the failure
    assert cell_state(study, study.cells[1]) == "finished"
    assert cell_state(study, study.cells[2]) == "fresh"


# Two study processes on one grid: each cell is trained once (a fake runner records it).
_CLAIM_WORKER = """
import json, os, sys, time
from pathlib import Path
from dscl.study import run_study
from dscl.config import config_to_yaml

log = Path(sys.argv[2])

def wait_for_both(folder):
    folder.mkdir(exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)

def runner(study, cell):
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()} {cell.name}\\n")
    # each holds its first cell until the other has one too, so neither can claim them all
    # before the other gets going, however slow its start on a loaded machine
    wait_for_both(log.parent / "training")
    time.sleep(0.4)
    folder = study.study_dir / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_to_yaml(cell.config))
    metrics = {"top1": 50.0, "many": 50.0, "medium": 50.0, "few": 50.0, "split": "test",
               "per_class": [50.0, 50.0], "class_counts": [100, 5]}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return {}

wait_for_both(log.parent / "ready")  # both start the study together
sys.exit(run_study(sys.argv[1], runner=runner))
"""


def test_two_study_processes_never_train_one_cell_twice(tmp_path: Path):
    path = write_study(tmp_path, axes={"method": ["ce", "dscl", "supcon"], "seed": [0, 1]})
    log = tmp_path / "trained.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _CLAIM_WORKER, str(path), str(log)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    lines = log.read_text().split()
    trained = lines[1::2]
    assert sorted(trained) == sorted(c.name for c in load_study(path).cells)  # each once
    assert len(set(lines[0::2])) == 2  # both processes trained some
    assert any("claimed by process" in err for _, err in outputs)


def test_a_claim_whose_process_is_gone_is_taken_over(tmp_path: Path, capsys):
    path = write_study(tmp_path, axes={"method": ["ce", "dscl"]})
    study = load_study(path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    claims = study.study_dir / "claims"
    claims.mkdir(parents=True)
    stale = {"pid": gone.pid, "host": socket.gethostname(), "started": "then", "token": "x"}
    (claims / "method-ce.json").write_text(json.dumps(stale))
    alive = {"pid": os.getppid(), "host": socket.gethostname(), "started": "now", "token": "y"}
    (claims / "method-dscl.json").write_text(json.dumps(alive))
    ran: list[str] = []

    def runner(study, cell):
        ran.append(cell.name)
        fabricate(study, cell, 50.0)
        return {}

    assert run_study(str(path), runner=runner) == 0
    err = capsys.readouterr().err
    assert ran == ["method-ce"]
    assert f"taking over cell method-ce: its claim by process {gone.pid}" in err
    assert "method-dscl: claimed by process" in err and "held by another study process" in err
    assert not (claims / "method-ce.json").exists()
    assert (claims / "method-dscl.json").exists()  # another live process's claim is left
    # a claim of another host is respected (nothing here can tell whether it runs)
    other = {"pid": gone.pid, "host": "elsewhere", "started": "then", "token": "z"}
    (claims / "method-dscl.json").write_text(json.dumps(other))
    assert not Claims(study).take(study.cells[1])


def test_study_files_go_through_the_one_atomic_writer(tmp_path: Path, monkeypatch):
    import dscl.study.cells as cells_module
    import dscl.study.claims as claims_module
    import dscl.study.results as results_module
    import dscl.study.runner as runner_module

    written: list[str] = []
    real = runner_module.atomic_write

    def recording(path, content, **kwargs):
        written.append(Path(path).name)
        return real(path, content, **kwargs)

    for module in (cells_module, claims_module, results_module, runner_module):
        monkeypatch.setattr(module, "atomic_write", recording)
    path = write_study(tmp_path, axes={"method": ["ce"]})
    study = load_study(path)
    fabricate(study, study.cells[0], 50.0)
    assert run_study(str(path), report_only=True) == 0
    for name in ("study.yaml", "results.json", "study.png", "RESULTS.md", "metrics.json"):
        assert name in written, name


def test_a_study_is_compared_with_other_budgets(tmp_path: Path):
    axes = {"method": ["ce", "dscl"], "seed": [0, 1]}
    short = write_study(
        tmp_path, name="short", filename="short.yaml", axes=axes, overrides={"pretrain.epochs": 3}
    )
    long = write_study(
        tmp_path,
        name="long",
        filename="long.yaml",
        axes=axes,
        overrides={"pretrain.epochs": 7},
        compare=[str(short), "nowhere_study"],
    )
    top1 = {("short", "ce"): [60.0, 62.0], ("short", "dscl"): [50.0, 54.0]}
    top1 |= {("long", "ce"): [64.0, 66.0], ("long", "dscl"): [70.0, 74.0]}
    for path, name in ((short, "short"), (long, "long")):
        study = load_study(path)
        for cell in study.cells:
            value = top1[(name, cell.settings["method"])][cell.settings["seed"]]
            fabricate(study, cell, value, few=value / 2)
    assert run_study(str(short), report_only=True) == 0
    assert run_study(str(long), report_only=True) == 0
    page = (tmp_path / "results" / "long" / "RESULTS.md").read_text()
    assert "## Against other stage-1 budgets" in page
    assert "- `short`: 3 stage-1 epochs, 4 of 4 cells finished" in page
    assert "- `nowhere_study`: cannot read the study file" in page
    assert "| dscl | 3 | 2 | 52.00 ± 2.83 | 26.00 ± 1.41 |" in page
    assert "| dscl | 7 | 2 | 72.00 ± 2.83 | 36.00 ± 1.41 |" in page
    assert (tmp_path / "results" / "long" / "budget.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "results" / "short" / "budget.png").exists()  # it compares nothing


def test_progress_line_says_what_its_estimate_covers():
    """The estimate is the grid's remaining cells (the starting one included) at the mean time
    of the cells finished so far, divided among the jobs."""
    import io
    from types import SimpleNamespace

    from dscl.study.progress import Progress

    out = io.StringIO()
    progress = Progress(total=5, done=0, label="s", stream=out)
    cells = [SimpleNamespace(name=f"c{i}") for i in range(3)]
    progress.start(cells[0])
    progress.finish(cells[0], 60.0)
    progress.start(cells[1])
    progress.finish(cells[1], 120.0)
    progress.start(cells[2], jobs=2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "study s: [1/5] c0: running"  # nothing measured yet: no estimate
    eta = "3 cells left at 1 min 30 s each: about 2 min 15 s"  # 3 x 90 s over 2 jobs
    assert lines[-1] == f"study s: [3/5] c2: running; {eta}"


def test_progress_estimates_each_cell_left_from_its_setting():
    """A study resumed in a new session: the cells finished before (with their recorded wall
    times) give each remaining cell its setting's mean; a setting with none yet takes the mean
    of all; cells finished or skipped since drop out of the estimate."""
    import io
    from types import SimpleNamespace

    from dscl.study.progress import Progress

    cell = {
        n: SimpleNamespace(name=n, method=n.split("-")[0])
        for n in ("ce-0", "bcl-0", "bcl-1", "paco-0", "paco-1", "new-0", "new-1")
    }
    out = io.StringIO()
    todo = [cell[n] for n in ("bcl-1", "paco-1", "new-0", "new-1")]
    known = [(cell["ce-0"], 1000.0), (cell["bcl-0"], 3000.0), (cell["paco-0"], 2000.0)]
    progress = Progress(7, 3, "s", out, todo=todo, known=known, setting=lambda c: c.method)
    progress.start(cell["bcl-1"])
    # bcl 3000 + paco 2000 + two of the new setting at the mean of all (2000 each)
    assert out.getvalue().splitlines()[-1] == (
        "study s: [4/7] bcl-1: running; 4 cells left, each at its setting's mean wall time so "
        "far: about 2 h 30 min"
    )
    progress.finish(cell["bcl-1"], 5000.0)  # bcl's mean is now 4000 s
    progress.skip(cell["new-0"], "claimed by process 1")
    progress.start(cell["paco-1"], jobs=2)
    # paco 2000 + new at the mean of all (11000 / 4 = 2750), over two jobs: 2375 s
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith("2 cells left, each at its setting's mean wall time so far: about 39 min 35 s")
    )


def test_a_1000_class_cell_is_committed_small(tmp_path: Path):
    """At ImageNet-LT's scale (1,000 classes, 50 test images each) the run folder's metrics.json
    is about 6 MB, nearly all confusion matrix; the committed copy keeps what the aggregate and
    the figures read and puts the matrix, compressed, beside it."""
    import torch

    from dscl.engine.evaluate import classification_metrics
    from dscl.runfiles import write_json
    from dscl.study.committed import read_confusion

    path = write_study(tmp_path, axes={"method": ["ce"]})
    study = load_study(path)
    cell = study.cells[0]
    classes, per_class = 1000, 50
    gen = torch.Generator().manual_seed(0)
    targets = torch.arange(classes).repeat_interleave(per_class)
    logits = torch.randn(classes * per_class, classes, generator=gen)
    right = torch.rand(classes * per_class, generator=gen) < 0.6  # about 60% top-1
    logits[right, targets[right]] += 10.0
    counts = [max(5, int(1280 * (5 / 1280) ** (i / (classes - 1)))) for i in range(classes)]
    metrics = classification_metrics(logits, targets, counts, many_threshold=100, few_threshold=20)
    metrics |= {
        "split": "test",
        "method": "ce",
        "class_names": [f"n{i:08d}" for i in range(classes)],
    }
    folder = study.study_dir / cell.name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_to_yaml(cell.config))
    write_json(folder / "metrics.json", metrics)
    values = torch.rand(4520, 5, generator=gen, dtype=torch.float64).tolist()
    log = "".join(
        json.dumps(
            {"stage": "pretrain", "epoch": s // 452, "step": s}
            | dict(zip(("loss", "loss_con", "loss_pbsd", "lr", "images_per_sec"), v, strict=True))
        )
        + "\n"
        for s, v in zip(range(0, 90400, 20), values, strict=True)
    )  # 200 epochs of 452 steps, logged every 20 steps (log_every's default)
    (folder / "train_log.jsonl").write_text(log)
    summary = {"num_classes": classes, "class_names": metrics["class_names"]}
    summary |= {"train": {"total": sum(counts), "counts": counts}}
    summary |= {
        split: {"total": classes * n, "counts": [n] * classes}
        for split, n in [("val", 20), ("test", 50)]
    }
    write_json(folder / "data_summary.json", summary)
    fabricate_record = {"cell": cell.name, "wall_s": 1.0, "resumed": False, "machine": {}}
    (folder / "cell.json").write_text(json.dumps(fabricate_record))
    assert run_study(str(path), report_only=True) == 0
    committed = study.results_dir / cell.name
    sizes = {p.name: p.stat().st_size for p in committed.iterdir()}
    run_size = (folder / "metrics.json").stat().st_size
    print(f"run folder metrics.json {run_size} bytes; committed {sizes}")
    assert run_size > 5_000_000
    assert set(sizes) == {
        "metrics.json",
        "confusion.json.gz",
        "config.yaml",
        "train_log.jsonl.gz",
        "data_summary.json",
        "cell.json",
    }
    assert sizes["metrics.json"] < 80_000 and sum(sizes.values()) < 600_000
    kept = json.loads((committed / "metrics.json").read_text())
    assert kept["confusion"] is None and kept["confusion_file"] == "confusion.json.gz"
    assert {k: v for k, v in kept.items() if not k.startswith("confusion")} == {
        k: v for k, v in metrics.items() if k != "confusion"
    }
    assert read_confusion(committed) == metrics["confusion"] == read_confusion(folder)
    import gzip

    assert gzip.decompress((committed / "train_log.jsonl.gz").read_bytes()).decode() == log
    # the aggregate from the committed copy alone is the one from the run folder
    results = json.loads((study.results_dir / "results.json").read_text())
    shutil.rmtree(study.study_dir)
    assert run_study(str(path), report_only=True) == 0
    assert json.loads((study.results_dir / "results.json").read_text()) == results
    assert results["settings"][0]["per_class"]["accuracy"] == metrics["per_class"]
