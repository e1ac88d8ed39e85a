"""benchmarks/gpu_check.sh in its toy mode (no GPU): every step runs and succeeds, and its
tables land where the lent machine's output folder expects them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_gpu_check_runs_every_step_in_its_toy_mode(tmp_path: Path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],  # no argument: the output goes to $OUT
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = (out / "steps.txt").read_text().splitlines()
    names = [line.split(":")[0] for line in steps]
    assert names == ["audit", "correctness", "throughput", "run", "file_loader", "tests"], steps
    assert all(": ok," in line for line in steps), steps
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "audit.md",
        "file_loader.md",
        "gpu.txt",
        "run.txt",
        "steps.txt",
        "tests.txt",
        "throughput.md",
    ]
    assert all(p.is_file() for p in out.iterdir())  # no folders: a lent machine returns files
    audit = (out / "audit.md").read_text()
    assert "| `dscl+pbsd` | memory | 0 | 0 | 0 | 0 |" in audit  # the figures, not just a run
    assert "| demo | resnet32 |" in (out / "throughput.md").read_text()


def test_gpu_check_stops_steps_when_its_budget_is_spent(tmp_path: Path):
    env = dict(os.environ, PYTHON=sys.executable, BUDGET_S="3")
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0  # skipped steps are not a pass
    steps = (tmp_path / "steps.txt").read_text().splitlines()
    assert steps and all("skipped, the 3 s budget is spent" in line for line in steps), steps
