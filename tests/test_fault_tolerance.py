"""Fault tolerance: preemption-safe training that loses at most a few steps, resumes itself, and
never loses a finished result.

Runs are killed (SIGKILL) or stopped (SIGTERM/SIGINT) at arbitrary steps and resumed; the result
must equal an uninterrupted run bit for bit, whatever step the interruption landed on.

Every run here is a tiny synthetic one (159 training images, 8 per batch: 19 steps per epoch,
2 epochs per stage), one thread per process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from dscl.checkpoint import (
    atomic_write,
    load_checkpoint,
    previous_path,
    read_checkpoint,
    read_stage1,
    save_checkpoint,
    verify_readable,
)
from dscl.cli import main
from dscl.config import config_from_dict
from dscl.engine.feed import TrainFeed
from dscl.errors import EXIT_INTERRUPTED, CheckpointError
from dscl.study.runner import stop_process
from tiny_run import TINY as CLI_TINY

# the tiny synthetic long-tailed dataset of the CLI tests, without progress output
TINY = [*CLI_TINY, "progress=false", "threads=1"]  # one thread in and out of process
# small batches: 19 steps per epoch, 2 epochs per stage; a checkpoint every second step in
# stage 1 (6 MB each) and after every step in stage 2
FT = [
    *TINY,
    "pretrain.epochs=2",
    "pretrain.batch_size=8",
    "classifier.batch_size=8",
    "classifier.base_lr=20",
    "pretrain.save_every_steps=2",
    "classifier.save_every_steps=1",
]
STEPS = 159 // 8  # per epoch, both stages (one process)

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ENV.pop("DSCL_DEBUG", None)

# what a checkpoint holds that an uninterrupted run must reproduce exactly
PRETRAIN_KEYS = (
    "model",
    "backbone",
    "optimizer",
    "scaler",
    "ranks",
    "epoch",
    "next_batch",
    "finished",
)
LAST_KEYS = (*PRETRAIN_KEYS[:1], *PRETRAIN_KEYS[2:], "best_top1", "val_top1")
BEST_KEYS = ("model", "epoch", "val_top1")


def tiny(tmp: Path, *extra: str) -> list[str]:
    return [*TINY, f"output_dir={tmp}", *extra]


def ft(tmp: Path, *extra: str) -> list[str]:
    return [*FT, f"output_dir={tmp}", *extra]


# ---------------------------------------------------------------------------------------------
# helpers


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    """Every leaf of nested dicts/lists/tuples, by path (empty containers kept as leaves)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, object] = {}
        for key, value in obj.items():
            out |= _flatten(value, f"{prefix}{key}/")
        return out
    if isinstance(obj, (list, tuple)) and obj and not all(isinstance(v, int) for v in obj):
        out = {}
        for i, value in enumerate(obj):
            out |= _flatten(value, f"{prefix}{i}/")
        return out
    return {prefix: obj}


def assert_same_state(a: dict, b: dict, keys: tuple[str, ...], what: str = "") -> None:
    """``a`` and ``b`` agree bit for bit on ``keys`` (tensors: same dtype, shape and values)."""
    for key in keys:
        assert (key in a) == (key in b), f"{what}: {key} in one checkpoint only"
        fa, fb = _flatten(a.get(key)), _flatten(b.get(key))
        assert fa.keys() == fb.keys(), f"{what}: {key} has other entries"
        assert fa, f"{what}: {key} is empty"
        for path, va in fa.items():
            vb = fb[path]
            if isinstance(va, torch.Tensor):
                assert isinstance(vb, torch.Tensor), f"{what}: {key}/{path}"
                assert va.dtype == vb.dtype and torch.equal(va, vb), f"{what}: {key}/{path} differs"
            else:
                assert va == vb, f"{what}: {key}/{path}: {va!r} != {vb!r}"


def assert_same_checkpoint(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    assert_same_state(load_checkpoint(a), load_checkpoint(b), keys, f"{a} vs {b}")


def assert_same_metrics(a: Path, b: Path) -> None:
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert ma.pop("checkpoint") != mb.pop("checkpoint")  # each run's own best.pt
    assert ma == mb


def assert_same_run(a: Path, b: Path) -> None:
    """Two ``dscl run`` folders with the same results: both stages, best epoch, test metrics."""
    assert_same_checkpoint(a / "pretrain.pt", b / "pretrain.pt", PRETRAIN_KEYS)
    assert_same_checkpoint(a / "last.pt", b / "last.pt", LAST_KEYS)
    assert_same_checkpoint(a / "best.pt", b / "best.pt", BEST_KEYS)
    assert_same_metrics(a, b)


def log_records(run_dir: Path) -> list[dict]:
    """The complete lines of train_log.jsonl (it may be half-written)."""
    try:
        text = (run_dir / "train_log.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def start(
    tmp: Path, argv: list[str], tag: str, env: dict | None = None
) -> tuple[subprocess.Popen, Path]:
    """``argv`` in a subprocess with stdout/stderr to files; returns it and the stderr file."""
    err = tmp / f"{tag}.stderr"
    with open(tmp / f"{tag}.stdout", "w") as out, open(err, "w") as errf:
        proc = subprocess.Popen(argv, stdout=out, stderr=errf, env=env or ENV)
    return proc, err


@contextlib.contextmanager
def stopped_at_exit(proc: subprocess.Popen):
    """Ends ``proc`` (SIGTERM, then SIGKILL) if a failed assertion leaves it running."""
    try:
        yield proc
    finally:
        stop_process(proc)


def dscl(*argv: str) -> list[str]:
    return [sys.executable, "-m", "dscl.cli", *argv]


def wait_for_step(
    proc: subprocess.Popen,
    run_dir: Path,
    stage: str,
    ok: Callable[[int], bool],
    stderr: Path,
    timeout: float = 120,
) -> int:
    """Poll the training log until a ``stage`` step with ``ok(step)`` is logged; return it.
    Fails when the process ends first (the interruption would not land mid-run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in log_records(run_dir):
            if record.get("stage") == stage and "loss" in record and ok(record["step"]):
                return record["step"]
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (code {proc.returncode}) before the interruption: "
                f"{stderr.read_text()[-2000:]}"
            )
        time.sleep(0.005)
    pytest.fail(f"no {stage} step in {timeout}s: {stderr.read_text()[-2000:]}")


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def newest_state(path: Path, kind: str) -> dict:
    """What a resume reads: ``path``, or its previous copy when ``path`` is unreadable/absent
    (a SIGKILL between the two renames of a save leaves only the previous copy)."""
    return read_checkpoint(path, (kind,), fallback=True)


def interrupt_at(monkeypatch, kind: str, global_step: int, sig=signal.SIGINT) -> None:
    """Deliver ``sig`` to this process just before the step ``global_step`` of the stage whose
    feed is of ``kind`` ("views": stage 1 of dscl+pbsd, "classify": stage 2), so the stage stops
    after that step (StopSignals turns the signal into a stop request)."""
    original = TrainFeed.epoch

    def epoch(self, epoch, start=0, generator_state=None):
        steps = self.steps_per_epoch
        for i, batch in enumerate(original(self, epoch, start, generator_state), start):
            if self.kind == kind and epoch * steps + i == global_step:
                signal.raise_signal(sig)
            yield batch

    monkeypatch.setattr(TrainFeed, "epoch", epoch)


def copy_files(src: Path, dst: Path, *names: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(src / name, dst / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# references: uninterrupted runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted ``dscl run`` of FT (mid-epoch checkpoints in both stages)."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["run", "--name", "ref", *ft(out)]) == 0
    run = out / "ref"
    state = load_checkpoint(run / "pretrain.pt")
    assert (state["epoch"], state["next_batch"], state["finished"]) == (1, STEPS, True)
    last = load_checkpoint(run / "last.pt")
    assert (last["epoch"], last["next_batch"], last["finished"]) == (1, STEPS, True)
    return run


@pytest.fixture(scope="module")
def killed_pretrain(tmp_path_factory) -> Path:
    """A ``dscl pretrain`` of FT killed with SIGKILL in the middle of its first epoch, after
    mid-epoch checkpoints were written."""
    out = tmp_path_factory.mktemp("killed")
    run = out / "k"
    proc, err = start(out, dscl("pretrain", "--name", "k", *ft(out)), "k")
    with stopped_at_exit(proc):
        # step 5 is logged after the checkpoints at steps 2 and 4: pretrain.prev.pt exists
        wait_for_step(proc, run, "pretrain", lambda s: 5 <= s < STEPS - 4, err)
        sigkill(proc)  # usually mid-epoch 1; wherever it lands, resuming must give the same result
    state = newest_state(run / "pretrain.pt", "pretrain")
    assert not state["finished"] and state["epoch"] * STEPS + state["next_batch"] >= 4
    return run


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL mid-epoch in stage 1


def test_sigkill_mid_epoch_then_resume_is_exact(
    reference: Path, killed_pretrain: Path, tmp_path: Path, capsys
):
    run = tmp_path / "k"
    shutil.copytree(killed_pretrain, run)
    assert main(["pretrain", "--name", "k", "--resume", *ft(tmp_path)]) == 0
    assert "resuming stage 1" in capsys.readouterr().err
    # `dscl pretrain` and stage 1 of `dscl run` of the same config: the same checkpoint
    assert_same_checkpoint(reference / "pretrain.pt", run / "pretrain.pt", PRETRAIN_KEYS)
    steps = [r["step"] for r in log_records(run) if r["stage"] == "pretrain"]
    assert steps[-1] == 2 * STEPS - 1 and set(steps) == set(range(2 * STEPS))


def test_mid_epoch_resume_is_exact_on_the_per_sample_path(tmp_path: Path, monkeypatch):
    """File datasets (ImageNet-LT, image folders) go through a DataLoader; data.batched_views=false
    sends the synthetic set the same way."""
    args = tiny(tmp_path, "data.batched_views=false", "pretrain.save_every_steps=1")
    assert main(["pretrain", "--name", "straight", *args]) == 0
    with monkeypatch.context() as patch:
        interrupt_at(patch, "views", 1)  # 4 steps per epoch: stops after the second
        assert main(["pretrain", "--name", "resumed", *args]) == EXIT_INTERRUPTED
    assert load_checkpoint(tmp_path / "resumed" / "pretrain.pt")["next_batch"] == 2
    assert main(["pretrain", "--name", "resumed", "--resume", *args]) == 0
    a, b = tmp_path / "straight" / "pretrain.pt", tmp_path / "resumed" / "pretrain.pt"
    assert_same_checkpoint(a, b, ("model", "backbone", "optimizer", "epoch", "next_batch"))
    assert_same_checkpoint(a, b, ("ranks",))  # fails: ranks/0/rng/torch


def test_a_resume_on_other_hardware_says_so_and_logs_it(tmp_path: Path, monkeypatch, capsys):
    """The run goes on (its numbers cannot be those of an uninterrupted run), with a warning on
    the terminal and a record in train_log.jsonl naming both machines; a resume on the same
    hardware logs nothing of the kind."""
    args = tiny(tmp_path, "pretrain.save_every_steps=1")
    for name in ("same", "moved"):
        with monkeypatch.context() as patch:
            interrupt_at(patch, "views", 1)
            assert main(["pretrain", "--name", name, *args]) == EXIT_INTERRUPTED
    path = tmp_path / "moved" / "pretrain.pt"
    state = load_checkpoint(path)
    here = state["ranks"][0]["hardware"]
    assert here["processor"] and here["threads"] == 1
    state["ranks"][0]["hardware"] = {"processor": "Another CPU", "threads": 7}
    torch.save(state, path)
    capsys.readouterr()
    assert main(["pretrain", "--name", "same", "--resume", *args]) == 0
    assert "warning" not in capsys.readouterr().err
    assert not [r for r in log_records(tmp_path / "same") if "resumed_on" in r]
    assert main(["pretrain", "--name", "moved", "--resume", *args]) == 0
    err = capsys.readouterr().err
    assert "warning: this checkpoint was written on Another CPU, 7 threads" in err
    assert f"resumes on {here['processor']}, 1 thread:" in err
    (record,) = [r for r in log_records(tmp_path / "moved") if "resumed_on" in r]
    assert record["written_on"] == {"processor": "Another CPU", "threads": 7}
    assert record["resumed_on"] == here and (record["epoch"], record["step"]) == (0, 2)
    assert record["rank"] == 0 and record["stage"] == "pretrain"


# ---------------------------------------------------------------------------------------------
# 2. dscl run: SIGKILL in stage 2; resumed between the stages; killed during the test evaluation


def test_sigkill_in_stage2_then_resume_is_exact(reference: Path, tmp_path: Path, capsys):
    run = tmp_path / "r"
    proc, err = start(tmp_path, dscl("run", "--name", "r", *ft(tmp_path)), "r")
    with stopped_at_exit(proc):
        wait_for_step(proc, run, "classifier", lambda s: 2 <= s < STEPS - 5, err)
        sigkill(proc)
    assert load_checkpoint(run / "pretrain.pt")["finished"]
    state = newest_state(run / "last.pt", "classifier")
    assert not state["finished"] and state["epoch"] * STEPS + state["next_batch"] >= 2
    assert not (run / "metrics.json").exists()
    assert main(["run", "--name", "r", "--resume", *ft(tmp_path)]) == 0
    assert "resuming stage 2" in capsys.readouterr().err
    assert_same_run(reference, run)


def test_resume_between_the_stages_is_exact(reference: Path, tmp_path: Path, capsys):
    """Killed right after stage 1 finished, before stage 2 wrote anything."""
    run = tmp_path / "b"
    copy_files(reference, run, "pretrain.pt", "pretrain.prev.pt", "config.yaml")
    assert main(["run", "--name", "b", "--resume", *ft(tmp_path)]) == 0
    assert "stage 1 is finished" in capsys.readouterr().err
    assert_same_run(reference, run)


def test_stage2_started_on_other_hardware_than_stage1_says_so(
    reference: Path, tmp_path: Path, capsys
):
    """Resumed between the stages on another machine: stage 2 starts fresh, yet an
    uninterrupted run would have trained it where stage 1 ran, so the move is told and logged."""
    run = tmp_path / "m"
    copy_files(reference, run, "pretrain.pt", "config.yaml")
    state = load_checkpoint(run / "pretrain.pt")
    here = state["ranks"][0]["hardware"]
    state["ranks"][0]["hardware"] = {"processor": "Another CPU", "threads": 7}
    torch.save(state, run / "pretrain.pt")
    assert main(["run", "--name", "m", "--resume", *ft(tmp_path)]) == 0
    assert "warning: this checkpoint was written on Another CPU, 7 threads" in (
        capsys.readouterr().err
    )
    (record,) = [r for r in log_records(run) if "resumed_on" in r]
    assert record["stage"] == "classifier" and (record["epoch"], record["step"]) == (0, 0)
    assert record["written_on"]["processor"] == "Another CPU" and record["resumed_on"] == here


def test_resume_after_stage2_only_evaluates(reference: Path, tmp_path: Path, capsys):
    """Killed during the test evaluation: both stages are done; nothing is trained again."""
    run = tmp_path / "e"
    names = ("pretrain.pt", "last.pt", "best.pt")
    copy_files(reference, run, *names, "config.yaml")
    before = {n: (run / n).stat().st_mtime_ns for n in names}
    assert main(["run", "--name", "e", "--resume", *ft(tmp_path)]) == 0
    assert "resuming" not in capsys.readouterr().err
    assert before == {n: (run / n).stat().st_mtime_ns for n in names}
    assert_same_metrics(reference, run)
    assert not any(r.get("step") is not None and "loss" in r for r in log_records(run))


def test_resume_removes_the_temporaries_a_kill_left(reference: Path, tmp_path: Path):
    run = tmp_path / "o"
    copy_files(reference, run, "pretrain.pt", "last.pt", "best.pt", "config.yaml")
    (run / ".last.pt.k1ll3d0x.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    assert main(["run", "--name", "o", "--resume", *ft(tmp_path)]) == 0
    assert sorted(p.name for p in run.glob(".*.tmp")) == []


# ---------------------------------------------------------------------------------------------
# 3. SIGTERM mid-stage-1: a clean stop with a checkpoint at the step it stopped, exit 75


def test_sigterm_stops_with_a_checkpoint_then_resume_is_exact(
    reference: Path, tmp_path: Path, capsys
):
    run = tmp_path / "t"
    argv = ["pretrain", "--name", "t", *ft(tmp_path)]
    proc, err = start(tmp_path, dscl(*argv), "t")
    with stopped_at_exit(proc):
        wait_for_step(proc, run, "pretrain", lambda s: s >= 2, err)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    elapsed = time.monotonic() - sent
    stderr = err.read_text()
    assert code == EXIT_INTERRUPTED, stderr[-2000:]
    assert elapsed < 10
    assert "SIGTERM received" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    # the checkpoint is whole (no fallback) and sits exactly where training stopped
    state = load_checkpoint(run / "pretrain.pt")
    assert not state["finished"]
    assert 1 <= state["next_batch"] <= STEPS
    done = state["epoch"] * STEPS + state["next_batch"]  # steps trained
    logged = [r["step"] for r in log_records(run) if r["stage"] == "pretrain" and "loss" in r]
    assert logged[-1] == done - 1, "steps were lost or trained past the checkpoint"
    assert f"after step {done}" in stderr
    assert str(run / "pretrain.pt") in stderr
    assert main([*argv, "--resume"]) == 0
    assert "resuming stage 1" in capsys.readouterr().err
    assert_same_checkpoint(reference / "pretrain.pt", run / "pretrain.pt", PRETRAIN_KEYS)


def test_second_signal_ends_the_process_at_once(tmp_path: Path):
    code = (
        "import time\n"
        "from dscl.engine.preemption import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    print('ready', flush=True)\n"
        "    while stop.received is None: time.sleep(0.01)\n"
        "    print(stop.received, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "SIGTERM"
        assert proc.poll() is None  # the first one only asked to stop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_stop_signals_restore_the_previous_handlers():
    from dscl.engine.preemption import StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
        signal.raise_signal(signal.SIGINT)  # noted, not raised as KeyboardInterrupt
        assert stop.received == "SIGINT"
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_printed_resume_command_can_be_pasted(tmp_path: Path, monkeypatch, capsys):
    argv = ["pretrain", "--name", "p", *tiny(tmp_path)]
    interrupt_at(monkeypatch, "views", 1)
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    command = err.split("Resume with: ", 1)[1].strip()
    assert shlex.split(command) == ["dscl", *argv, "--resume"]


def test_checkpoint_cadence(tmp_path: Path, monkeypatch):
    """Mid-epoch checkpoints come every ``pretrain.save_every_steps`` global steps and every
    ``save_every_minutes``; every epoch end is saved."""
    import dscl.checkpoint

    written: list[tuple[int, int]] = []
    original = dscl.checkpoint.atomic_write

    def recording(path, content, **kwargs):
        result = original(path, content, **kwargs)
        if Path(path).name == "pretrain.pt":
            state = load_checkpoint(path)
            written.append((state["epoch"], state["next_batch"]))
        return result

    monkeypatch.setattr(dscl.checkpoint, "atomic_write", recording)
    cadence = ["save_every_minutes=0", "pretrain.save_every_steps=3"]  # 4 steps per epoch
    assert main(["pretrain", "--name", "s", *tiny(tmp_path, "pretrain.epochs=2", *cadence)]) == 0
    assert written == [(0, 3), (0, 4), (1, 2), (1, 4)]
    written.clear()
    assert main(["pretrain", "--name", "m", *tiny(tmp_path, "save_every_minutes=0.000001")]) == 0
    assert written == [(0, 1), (0, 2), (0, 3), (0, 4)]


# ---------------------------------------------------------------------------------------------
# 4. unreadable newest checkpoint: fall back to the previous one; atomic writes


def test_truncated_newest_checkpoint_falls_back_and_resume_is_exact(
    reference: Path, killed_pretrain: Path, tmp_path: Path, capsys
):
    run = tmp_path / "k"
    shutil.copytree(killed_pretrain, run)
    newest, prev = run / "pretrain.pt", run / "pretrain.prev.pt"
    assert prev.is_file()
    if not newest.is_file():  # the kill landed between the two renames of a save
        shutil.copy2(prev, newest)
    good = load_checkpoint(prev)
    with open(newest, "r+b") as handle:
        handle.truncate(newest.stat().st_size // 2)
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    capsys.readouterr()
    state = read_stage1(newest, cfg, resume=True)
    warning = capsys.readouterr().err
    assert "warning" in warning and str(newest) in warning and str(prev) in warning
    assert_same_state(state, good, PRETRAIN_KEYS, "fallback")
    # only for resuming: stage 2 on a broken pretrain.pt is an error, not a silent fallback
    with pytest.raises(CheckpointError, match="pretrain.pt"):
        read_stage1(newest, cfg)
    # the whole command: one step earlier, and still the uninterrupted result
    assert main(["pretrain", "--name", "k", "--resume", *ft(tmp_path)]) == 0
    assert str(newest) in capsys.readouterr().err
    assert_same_checkpoint(reference / "pretrain.pt", newest, PRETRAIN_KEYS)


def test_no_readable_checkpoint_is_one_error_line(killed_pretrain: Path, tmp_path: Path, capsys):
    run = tmp_path / "k"
    shutil.copytree(killed_pretrain, run)
    for path in (run / "pretrain.pt", run / "pretrain.prev.pt"):
        path.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    capsys.readouterr()
    assert main(["pretrain", "--name", "k", "--resume", *ft(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("dscl: error:") and "pretrain.prev.pt" in lines[-1]
    assert "Traceback" not in "\n".join(lines)


def test_mid_epoch_checkpoint_of_another_device_type_is_one_error_line(
    tmp_path: Path, monkeypatch, capsys
):
    """A checkpoint written in the middle of an epoch on a GPU (its augmentation position is a
    CUDA generator's state, which a CPU generator cannot load) and resumed on the CPU: exit 2,
    one line naming both device types and the setting that resumes it."""
    argv = ["pretrain", "--name", "p", *tiny(tmp_path)]
    with monkeypatch.context() as patch:
        interrupt_at(patch, "views", 1)  # 4 steps per epoch: stops after the second
        assert main(argv) == EXIT_INTERRUPTED
    path = tmp_path / "p" / "pretrain.pt"
    state = load_checkpoint(path)
    assert state["next_batch"] == 2 and state["ranks"][0]["feed"] is not None
    # what a GPU run saves: the state of a CUDA generator is 16 bytes (seed and offset)
    state["ranks"][0] |= {"device": "cuda", "feed": torch.zeros(16, dtype=torch.uint8)}
    save_checkpoint(state, path)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dscl: error: {path}: ") and "on cuda, resumed on cpu" in last
    assert "device=cuda" in last and "Traceback" not in err


@pytest.mark.cuda
def test_a_mid_epoch_gpu_checkpoint_resumes_on_the_gpu_only(tmp_path: Path, monkeypatch, capsys):
    """On a GPU: the checkpoint holds this GPU's RNG state alone and the device type; resumed on
    the CPU it stops with one line, on the GPU it goes on to the end."""
    argv = ["pretrain", "--name", "g", *tiny(tmp_path, "device=cuda")]
    with monkeypatch.context() as patch:
        interrupt_at(patch, "views", 1)  # 4 steps per epoch: stops after the second
        assert main(argv) == EXIT_INTERRUPTED
    state = load_checkpoint(tmp_path / "g" / "pretrain.pt")
    (rank,) = state["ranks"]
    assert state["next_batch"] == 2 and rank["device"] == "cuda"
    assert isinstance(rank["rng"]["cuda"], torch.Tensor)  # not a list of every GPU's state
    capsys.readouterr()
    assert main([*argv[:-1], "device=cpu", "--resume"]) == 2
    assert "on cuda, resumed on cpu" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([*argv, "--resume"]) == 0
    assert load_checkpoint(tmp_path / "g" / "pretrain.pt")["finished"]


def test_missing_newest_checkpoint_uses_the_previous(killed_pretrain: Path, tmp_path: Path):
    run = tmp_path / "k"
    shutil.copytree(killed_pretrain, run)
    (run / "pretrain.pt").unlink(missing_ok=True)
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    state = read_stage1(run / "pretrain.pt", cfg, resume=True)
    assert_same_state(state, load_checkpoint(run / "pretrain.prev.pt"), PRETRAIN_KEYS)


def _leftovers(folder: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_atomic_write_keeps_the_old_file_when_verify_fails(tmp_path: Path):
    target = tmp_path / "file.pt"
    target.write_bytes(b"old")

    def reject(path: Path) -> None:
        assert path != target and path.parent == tmp_path and path.read_bytes() == b"new"
        raise CheckpointError("rejected")

    for keep_previous in (False, True):
        with pytest.raises(CheckpointError, match="rejected"):
            atomic_write(target, b"new", verify=reject, keep_previous=keep_previous)
        assert target.read_bytes() == b"old"
        assert _leftovers(tmp_path, "file.pt") == []  # no temporary, no .prev

    def half_written(handle) -> None:
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_written, keep_previous=True)
    assert target.read_bytes() == b"old" and _leftovers(tmp_path, "file.pt") == []

    assert atomic_write(target, "new text", keep_previous=True) == target
    assert target.read_text() == "new text"
    assert previous_path(target).read_bytes() == b"old"
    assert _leftovers(tmp_path, "file.pt", "file.prev.pt") == []
    assert (target.stat().st_mode & 0o777) == 0o644


def test_verify_readable_rejects_truncated_and_corrupted_files(tmp_path: Path):
    path = tmp_path / "ok.pt"
    torch.save({"kind": "pretrain", "w": torch.arange(200_000, dtype=torch.float32)}, path)
    verify_readable(path)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        verify_readable(truncated)

    flipped = tmp_path / "flipped.pt"
    middle = len(data) // 2  # inside the 800 kB tensor record
    flipped.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    with pytest.raises(CheckpointError, match="flipped.pt"):
        verify_readable(flipped)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        verify_readable(empty)


# ---------------------------------------------------------------------------------------------
# 5. --resume auto


def test_resume_auto(reference: Path, tmp_path: Path, monkeypatch, capsys):
    # an empty folder: a fresh run
    assert main(["pretrain", "--name", "fresh", "--resume", "auto", *tiny(tmp_path)]) == 0
    assert "resuming" not in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "fresh" / "pretrain.pt")["finished"]

    # an unfinished run (stopped by Ctrl-C in its second epoch)
    args = tiny(tmp_path, "pretrain.epochs=2")
    run = tmp_path / "u"
    with monkeypatch.context() as patch:
        interrupt_at(patch, "views", 5)
        assert main(["pretrain", "--name", "u", *args]) == EXIT_INTERRUPTED
    assert "SIGINT received" in capsys.readouterr().err
    stopped = (run / "pretrain.pt").read_bytes()
    assert not load_checkpoint(run / "pretrain.pt")["finished"]

    # another config: one line naming the key; nothing touched
    for changed in ("pretrain.beta=2.5", "data.n_max=30"):
        assert main(["pretrain", "--name", "u", "--resume", "auto", *args, changed]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dscl: error:"), lines
        assert changed.split("=")[0] in lines[0]
    assert (run / "pretrain.pt").read_bytes() == stopped

    # the same config up to runtime settings: resumed
    runtime = [
        "progress=true",
        "log_every=3",
        "device=cpu",
        "data.num_workers=1",
        "save_every_minutes=5",
        "pretrain.save_every_steps=1",
    ]
    assert main(["pretrain", "--name", "u", "--resume", "auto", *args, *runtime]) == 0
    assert "resuming stage 1" in capsys.readouterr().err
    assert load_checkpoint(run / "pretrain.pt")["finished"]

    # a finished stage 1: nothing to do
    mtime = (run / "pretrain.pt").stat().st_mtime_ns
    assert main(["pretrain", "--name", "u", "--resume", "auto", *args]) == 0
    assert "finished" in capsys.readouterr().err
    assert (run / "pretrain.pt").stat().st_mtime_ns == mtime

    # a finished `dscl run`: exit 0, nothing trained or rewritten
    out = reference.parent
    names = ("pretrain.pt", "last.pt", "best.pt", "metrics.json", "train_log.jsonl")
    before = {n: (reference / n).stat().st_mtime_ns for n in names}
    argv = ["run", "--name", "ref", "--resume", "auto", *ft(out), "log_every=4", "progress=true"]
    assert main(argv) == 0
    assert "finished" in capsys.readouterr().err
    assert {n: (reference / n).stat().st_mtime_ns for n in names} == before
    # ... and a finished run of another config is still refused
    assert main([*argv, "classifier.epochs=3"]) == 2
    assert "classifier.epochs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 6. dscl classify --resume


def test_classify_resume_continues_stage2(reference: Path, tmp_path: Path, monkeypatch, capsys):
    run = tmp_path / "c"
    copy_files(reference, run, "pretrain.pt", "config.yaml")
    args = ["classify", "--name", "c", *ft(tmp_path)]
    with monkeypatch.context() as patch:
        interrupt_at(patch, "classify", STEPS + 6)  # mid second epoch, after one validation
        assert main(args) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "stopped stage 2" in err and "--resume" in err
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["next_batch"], state["finished"]) == (1, 7, False)
    assert (run / "best.pt").is_file() and not (run / "metrics.json").exists()
    assert main([*args, "--resume"]) == 0
    assert "resuming stage 2" in capsys.readouterr().err
    assert_same_checkpoint(reference / "last.pt", run / "last.pt", LAST_KEYS)
    assert_same_checkpoint(reference / "best.pt", run / "best.pt", BEST_KEYS)
    assert_same_metrics(reference, run)
    # finished: a second --resume does nothing
    assert main([*args, "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 7. torchrun: a worker killed, torchrun restarts both, they resume


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _torchrun(tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "--monitor-interval=0.1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "-m",
        "dscl.cli",
        "pretrain",
        "--name",
        name,
        "--resume",
        "auto",
        *ft(tmp, "pretrain.epochs=1", "pretrain.batch_size=16"),
        *extra,
    ]


# torch 2.14's torchrun keeps one rendezvous store for all restarts and no longer prefixes the
# workers' keys by attempt, so a restarted rank can read the dead attempt's gloo address and fail
# ("connectFullMesh failed ... Connection refused") whenever it initialises before rank 0 does;
# with the static rendezvous (--master-addr/--master-port) as with c10d. A store of each
# rendezvous round's own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, c10d rendezvous) avoids it.
TORCHRUN_ENV = dict(ENV, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def test_torchrun_restarts_a_killed_worker_and_resumes_exactly(tmp_path: Path):
    steps = 159 // 2 // 8  # one epoch: 79 images and 8 per batch on each process
    straight, err = start(tmp_path, _torchrun(tmp_path, "straight"), "straight", TORCHRUN_ENV)
    with stopped_at_exit(straight):
        assert straight.wait(timeout=300) == 0, err.read_text()[-3000:]

    proc, err = start(tmp_path, _torchrun(tmp_path, "killed"), "killed", TORCHRUN_ENV)
    run = tmp_path / "killed"
    with stopped_at_exit(proc):
        wait_for_step(proc, run, "pretrain", lambda s: 2 <= s < steps - 4, err)
        workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
        assert set(workers) == {0, 1}, workers
        os.kill(workers[0], signal.SIGKILL)  # rank 0: the one that writes
        state = newest_state(run / "pretrain.pt", "pretrain")
        assert not state["finished"] and len(state["ranks"]) == 2
        code = proc.wait(timeout=300)
    stderr = err.read_text()
    assert code == 0, stderr[-3000:]
    assert "resuming stage 1" in stderr
    a, b = tmp_path / "straight" / "pretrain.pt", run / "pretrain.pt"
    assert_same_checkpoint(a, b, PRETRAIN_KEYS)
    assert load_checkpoint(b)["next_batch"] == steps


# ---------------------------------------------------------------------------------------------
# 8. the report fails after stage 2: the results are kept


def test_a_failing_report_keeps_the_results(tmp_path: Path, monkeypatch, capsys):
    import dscl.report

    def broken(run_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dscl.report, "write_report", broken)
    assert main(["run", "--name", "rep", *tiny(tmp_path)]) == 1
    run = tmp_path / "rep"
    err = capsys.readouterr().err
    assert f"dscl report {run}" in err and "No space left" in err
    assert "Traceback" not in err
    assert (run / "best.pt").is_file() and (run / "metrics.json").is_file()
    assert load_checkpoint(run / "last.pt")["finished"]
    assert not (run / "report.html").exists()
    monkeypatch.undo()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
