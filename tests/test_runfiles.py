"""dscl.runfiles.run_state: what a run folder holds and how far its run got, from its files
alone (no checkpoint is opened and torch is not imported)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dscl import runfiles
from dscl.runfiles import ABSENT, FINISHED, STAGE1, STAGE2, STARTED, run_state


def _folder(tmp_path: Path, *names: str, metrics: dict | None = None, name: str = "run") -> Path:
    """A run folder holding ``names`` (empty files; checkpoints are never opened) and, when
    given, ``metrics`` as its metrics.json."""
    folder = tmp_path / name
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"")
    if metrics is not None:
        (folder / runfiles.METRICS).write_text(json.dumps(metrics))
    return folder


@pytest.mark.parametrize(
    ("names", "metrics", "stage"),
    [
        ((runfiles.CONFIG, runfiles.TRAIN_LOG), None, STARTED),
        ((runfiles.PRETRAIN,), None, STAGE1),
        ((runfiles.PRETRAIN_PREV,), None, STAGE1),  # killed between the two renames
        ((runfiles.PRETRAIN, runfiles.LAST), None, STAGE2),
        ((runfiles.PRETRAIN, runfiles.LAST_PREV), None, STAGE2),
        ((runfiles.PRETRAIN, runfiles.BEST), None, STAGE2),  # classifier.mode=keep
        ((runfiles.PRETRAIN, runfiles.LAST), {"split": "val", "top1": 1.0}, STAGE2),
        ((runfiles.PRETRAIN, runfiles.LAST), {"split": "test", "top1": 1.0}, FINISHED),
        ((runfiles.PRETRAIN, runfiles.LAST), {"top1": 1.0}, FINISHED),  # older: no split field
        ((), {"split": "test"}, FINISHED),  # committed results: no checkpoints at all
    ],
)
def test_stage_follows_the_files(tmp_path: Path, names, metrics, stage):
    state = run_state(_folder(tmp_path, *names, metrics=metrics))
    assert state.stage == stage
    assert state.finished == (stage == FINISHED)


def test_an_absent_folder(tmp_path: Path):
    state = run_state(tmp_path / "nowhere")
    assert state.stage == ABSENT
    assert not state.exists and not state.holds_run and not state.finished
    assert state.metrics is None and state.config is None


def test_what_a_new_run_would_replace(tmp_path: Path):
    """holds_run (dscl pretrain/run refuse such a folder without --overwrite or --resume) is any
    checkpoint or metrics.json of any split; finished (dscl study) is the test split's alone."""
    assert not run_state(_folder(tmp_path, runfiles.CONFIG, runfiles.DATA_SUMMARY)).holds_run
    for name in (
        runfiles.PRETRAIN,
        runfiles.PRETRAIN_PREV,
        runfiles.LAST,
        runfiles.LAST_PREV,
        runfiles.BEST,
    ):
        state = run_state(_folder(tmp_path, name, name=name))
        assert state.holds_run and state.checkpointed, name
    evaluated = run_state(_folder(tmp_path, metrics={"split": "val"}, name="evaluated"))
    assert evaluated.holds_run and not evaluated.finished


def test_unreadable_metrics_and_config_read_as_none(tmp_path: Path):
    folder = _folder(tmp_path, runfiles.PRETRAIN)
    (folder / runfiles.METRICS).write_text('{"split": "te')  # cut short
    (folder / runfiles.CONFIG).write_text("seed: [1\n")
    state = run_state(folder)
    assert state.has(runfiles.METRICS) and state.metrics is None
    assert state.has(runfiles.CONFIG) and state.config is None
    assert state.stage == STAGE1 and state.holds_run and not state.finished
    (folder / runfiles.CONFIG).write_bytes(b"\xff\xfe")  # not UTF-8
    assert run_state(folder).config is None
    (folder / runfiles.CONFIG).write_text("seed: 3\n")
    assert run_state(folder).config == {"seed": 3}


def test_run_state_does_not_import_torch(tmp_path: Path):
    folder = _folder(tmp_path, runfiles.PRETRAIN, runfiles.CONFIG, metrics={"split": "test"})
    code = (
        "import sys\n"
        "from dscl.runfiles import run_state\n"
        f"state = run_state({str(folder)!r})\n"
        "assert state.stage == 'finished' and state.config is None, state\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
