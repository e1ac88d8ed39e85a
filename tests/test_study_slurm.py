"""``dscl study --launcher slurm``: launcher settings, and studies run on a real one-node SLURM
cluster (``slurm_cluster.py``).

The cluster's daemons are started by the session fixture ``slurm_cluster`` (``conftest.py``) and
stopped at the end; every test cancels its jobs. Without SLURM, munge or root the tests that
need the cluster are skipped with the reason; the others run everywhere.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dscl.cli import main
from dscl.errors import ConfigError
from dscl.study import load_study, run_study
from dscl.study.launcher import Launcher, duration_minutes, duration_seconds
from dscl.study.slurm import cell_statuses, format_status
from dscl.study.slurm_jobs import last_logged
from test_study import TINY, write_study

SLURM = {"kind": "slurm", "time": "10:00"}
NAMES = ["method-ce_seed-0", "method-ce_seed-1", "method-dscl_seed-0", "method-dscl_seed-1"]
POLL_S = 0.5


def study_file(tmp_path: Path, name: str, axes: dict, launcher: dict | None = None, **over):
    """A tiny study (synthetic data, seconds per cell) in ``tmp_path``."""
    fields = {"overrides": {**TINY, **over}, "axes": axes}
    if launcher is not None:
        fields["launcher"] = launcher
    return write_study(tmp_path, name=name, filename=f"{name}.yaml", **fields)


def metrics(folder: Path) -> dict:
    """A cell's metrics.json without the checkpoint's path (the one field a folder changes)."""
    data = json.loads((folder / "metrics.json").read_text())
    data.pop("checkpoint")
    return data


# Waits are bounds for a slow, busy machine, not measurements: they are long enough to outlast
# SLURM's two-minute hold of a requeued job should releasing it early not take.
def wait_until(condition, what: str, timeout: float = 300, every: float = 0.05, show=None):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s" + (
            f": {show()}" if show else ""
        )
        time.sleep(every)
    return value


def wait_released(slurm, job: str, condition, what: str, show=None, timeout: float = 300):
    """``wait_until(condition)`` while job ``job`` is let start at once whenever it is pending:
    SLURM holds a requeued job about two minutes before it may run again, and sets that hold
    when the job becomes pending after the requeue, which can come after a single
    ``StartTime=now``; so it is sent again, at most once a second, while the job is pending."""
    last = [0.0]

    def released() -> bool:
        if condition():
            return True
        if time.monotonic() - last[0] > 1.0:
            last[0] = time.monotonic()
            if slurm.jobs().get(job) == "PENDING":
                slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        return False

    return wait_until(released, what, timeout, 0.05, show)


def status_table(path: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["study", "--config", str(path), "--status"]) == 0
    return capsys.readouterr().out


def row(table: str, cell: str) -> list[str]:
    [line] = [line for line in table.splitlines() if line.startswith(cell + " ")]
    return line.split()


# ---------------------------------------------------------------- launcher settings


def test_slurm_durations():
    assert duration_seconds("90") == 5400 and duration_seconds("1:30") == 90
    assert duration_seconds("48:00:00") == 172800 and duration_seconds("2-12") == 216000
    assert duration_seconds("1-00:30") == 88200 and duration_seconds("1-0:0:1") == 86401
    for bad in ("48h", "1:2:3:4", "", "-1", "1-", "1.5", "a:b"):
        assert duration_seconds(bad) is None, bad
    assert duration_minutes("1:30") == 2 and duration_minutes("0") == 1


@pytest.mark.parametrize(
    ("launcher", "key"),
    [
        ({**SLURM, "gpus_per_cell": -1}, "launcher.gpus_per_cell"),
        ({**SLURM, "time": "48h"}, "launcher.time"),
        ({**SLURM, "time": 172800}, "launcher.time"),  # YAML's reading of an unquoted 48:00:00
        ({"kind": "slurm"}, "launcher.time"),
        ({**SLURM, "nodes": 0}, "launcher.nodes"),
        ({**SLURM, "cpus_per_cell": True}, "launcher.cpus_per_cell"),
        ({**SLURM, "partiton": "gpu"}, "launcher.partiton"),
        ({**SLURM, "kind": "pbs"}, "launcher.kind"),
        ({**SLURM, "partition": "a b"}, "launcher.partition"),
        ({**SLURM, "extra": {"time": "1:00"}}, "launcher.extra.time"),
        ({**SLURM, "extra": {"mem": [1]}}, "launcher.extra.mem"),
    ],
)
def test_bad_launcher_settings_are_one_line(tmp_path: Path, capsys, launcher: dict, key: str):
    path = study_file(tmp_path, "s", {"method": ["ce"]}, launcher)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {key}: ")):
        load_study(path)
    assert main(["study", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{key}:" in err
    assert not (tmp_path / "runs").exists()  # nothing was created, nothing submitted


def test_launcher_of_the_file_and_of_the_command_line(tmp_path: Path, capsys):
    path = study_file(tmp_path, "s", {"method": ["ce"]})
    study = load_study(path)
    assert study.launcher is None and "\nlauncher:" not in study.to_yaml()  # as before
    # --launcher slurm needs the time limit, which only the study file can give
    assert main(["study", "--config", str(path), "--launcher", "slurm"]) == 2
    assert "launcher.time: required with kind slurm" in capsys.readouterr().err
    # --wait follows SLURM jobs only
    assert main(["study", "--config", str(path), "--wait"]) == 2
    assert "--wait follows SLURM jobs" in capsys.readouterr().err
    launcher = {**SLURM, "gpus_per_cell": 8, "cpus_per_cell": 80, "extra": {"mem": "400G"}}
    path = study_file(tmp_path, "s", {"method": ["ce"]}, launcher)
    study = load_study(path)
    assert study.launcher == Launcher(
        kind="slurm", gpus_per_cell=8, cpus_per_cell=80, time="10:00", extra={"mem": "400G"}
    )
    assert load_study(path).to_yaml() == study.to_yaml()
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(study.to_yaml())
    assert load_study(resolved).launcher == study.launcher  # study.yaml keeps the section


def test_a_job_runs_torchrun_for_several_gpus_or_nodes():
    pytest.importorskip("submitit")
    from dscl.study.slurm_job import node_command

    cmd = ["/usr/bin/python3", "-m", "dscl.cli", "run", "--name", "x", "--resume", "auto"]
    env = SimpleNamespace(job_id="4711", node=1, hostnames=["gpu01", "gpu02"])
    assert node_command(cmd, Launcher(kind="slurm", gpus_per_cell=1), env) == cmd
    wrapped = node_command(cmd, Launcher(kind="slurm", gpus_per_cell=8, nodes=2), env)
    assert wrapped[1:3] == ["-m", "torch.distributed.run"]
    assert wrapped[3:8] == [
        "--nnodes=2",
        "--node_rank=1",
        "--nproc_per_node=8",
        "--master_addr=gpu01",
        "--master_port=24711",
    ]
    assert wrapped[8:] == cmd[1:]


def test_a_job_requeued_three_times_without_progress_stops(tmp_path: Path):
    pytest.importorskip("submitit")
    from dscl.study.slurm_job import stalled_reason

    run_dir = tmp_path / "cell"
    run_dir.mkdir()

    def attempts(*lines):
        (run_dir / "attempts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    at = ["pretrain", 1, 17]
    moved = {
        "wall_s": 9.0,
        "job_id": "7",
        "returncode": 75,
        "progress_start": None,
        "progress_end": at,
    }
    still = {
        "wall_s": 1.0,
        "job_id": "7",
        "returncode": 75,
        "progress_start": at,
        "progress_end": at,
    }
    attempts(moved, still, still)
    assert stalled_reason(run_dir, "7") is None  # two requeues without progress: go on
    attempts(moved, still, still, still)
    why = stalled_reason(run_dir, "7")
    assert "requeued 3 times in a row without progress" in why
    assert "at pretrain epoch 1 step 17" in why
    assert stalled_reason(run_dir, "8") is None  # a new submission starts counting again
    attempts(still, still, moved)
    assert stalled_reason(run_dir, "7") is None
    attempts(still, still, {**still, "returncode": 0})
    assert stalled_reason(run_dir, "7") is None


# ---------------------------------------------------------------- on the cluster


@pytest.mark.slurm
def test_the_cluster_answers(slurm):
    assert slurm.run("srun", "hostname").strip() == slurm.node
    assert {p.args[0] for p in slurm.procs.values()} == {"munged", "slurmctld", "slurmd"}
    assert all(p.poll() is None for p in slurm.procs.values())


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"partition": "nowhere"}, "launcher.partition: no partition 'nowhere'"),
        ({"gpus_per_cell": -2}, "launcher.gpus_per_cell"),
        ({"time": "two days"}, "launcher.time"),
        ({"gpus_per_cell": 1}, "launcher.gpus_per_cell"),  # no GPU on this cluster
    ],
)
def test_bad_settings_submit_nothing(slurm, tmp_path: Path, capsys, setting: dict, key: str):
    before = slurm.jobs()
    path = study_file(tmp_path, "s", {"method": ["ce", "dscl"]}, {**SLURM, **setting})
    assert main(["study", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err, err
    assert slurm.jobs() == before
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
def test_four_cells_on_slurm_equal_the_study_run_here(slurm, tmp_path: Path, capsys):
    axes = {"method": ["ce", "dscl"], "seed": [0, 1]}
    here = study_file(tmp_path, "here", axes)
    assert main(["study", "--config", str(here), "--jobs", "2"]) == 0
    path = study_file(tmp_path, "there", axes, SLURM)
    capsys.readouterr()
    assert main(["study", "--config", str(path)]) == 0  # returns once every cell is submitted
    err = capsys.readouterr().err
    jobs = re.findall(r"submitted as SLURM job (\d+)", err)
    assert len(jobs) == 4 and "submitted 4 cell(s) to SLURM" in err
    claims = tmp_path / "runs" / "there" / "claims"
    named = {json.loads((claims / f"{n}.json").read_text())["job_id"] for n in NAMES}
    assert named == set(jobs)  # each claim names its job
    queued = slurm.jobs()
    # the same command again submits nothing: every cell's job is pending or running
    assert main(["study", "--config", str(path), "--launcher", "slurm"]) == 0
    err = capsys.readouterr().err
    assert "submitted 0 cell(s) to SLURM, 4 held" in err and "submitted as" not in err
    assert err.count("claimed by SLURM job") == 4
    assert len(slurm.jobs()) == len(queued)  # no job was added
    table = status_table(path, capsys)
    assert {row(table, n)[1] for n in NAMES} <= {"running", "pending", "finished"}

    assert run_study(str(path), wait=True, poll_s=POLL_S) == 0
    table = status_table(path, capsys)
    assert table.splitlines()[0] == "study there: 4 cells: 4 finished"
    assert {row(table, n)[2] for n in NAMES} == set(jobs)  # cell.json names the job
    for name in NAMES:
        ours, theirs = tmp_path / "results" / "there" / name, tmp_path / "results" / "here" / name
        assert metrics(ours) == metrics(theirs), name
        assert json.loads((ours / "cell.json").read_text())["slurm_job"] in jobs
    ours = json.loads((tmp_path / "results" / "there" / "results.json").read_text())
    theirs = json.loads((tmp_path / "results" / "here" / "results.json").read_text())
    assert ours["settings"] == theirs["settings"] and ours["paired"] == theirs["paired"]
    assert not list(claims.iterdir())  # every job released its claim
    wait_until(lambda: {slurm.jobs()[j] for j in jobs} == {"COMPLETED"}, "completed jobs")


def _wait_for_step(run_dir: Path, epoch: int, low: int, high: int, steps: int) -> bool:
    """True once stage 1 logged a step of ``epoch`` between in-epoch positions low and high."""
    try:
        lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    except OSError:
        return False
    for line in reversed(lines[-3:]):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("stage") == "pretrain" and "loss" in record:
            return record["epoch"] == epoch and low <= record["step"] - epoch * steps <= high
    return False


@pytest.mark.slurm
def test_a_requeued_cell_ends_bit_identical(slurm, tmp_path: Path, capsys):
    # 159 images in batches of 8: 19 stage-1 steps an epoch; requeued early in the second epoch
    over = {"pretrain.epochs": 3, "pretrain.batch_size": 8}
    path = study_file(tmp_path, "requeued", {"method": ["dscl"]}, SLURM, **over)
    assert main(["study", "--config", str(path)]) == 0
    [job] = re.findall(r"submitted as SLURM job (\d+)", capsys.readouterr().err)
    run_dir = tmp_path / "runs" / "requeued" / "method-dscl"
    wait_until(lambda: _wait_for_step(run_dir, 1, 2, 8, 19), "step 3..9 of epoch 2", every=0.01)
    slurm.run("scontrol", "requeue", job)
    before = status_table(path, capsys)
    show = lambda: slurm.run("scontrol", "show", "job", job, check=False)  # noqa: E731
    wait_until(lambda: slurm.jobs()[job] in ("PENDING", "REQUEUED"), "requeue", 180, 0.1, show)
    wait_released(slurm, job, lambda: slurm.jobs()[job] == "RUNNING", "restarted job", show)
    wait_until(lambda: "resuming stage 1" in (run_dir / "stdout.log").read_text(), "resume")
    during = status_table(path, capsys)
    assert run_study(str(path), wait=True, poll_s=POLL_S) == 0
    after = status_table(path, capsys)
    with capsys.disabled():
        print(f"{before}\n{during}\n{after}")  # shown with -s
    assert row(before, "method-dscl")[1:4] in (["running", job, slurm.node], ["pending", job])
    assert row(during, "method-dscl")[1:5] == ["running", job, slurm.node, "2"]
    assert row(after, "method-dscl")[1:3] == ["finished", job]

    log = (run_dir / "stdout.log").read_text()
    assert log.count("==== dscl study requeued") == 2
    stopped = re.search(r"SIGTERM received: stopped stage 1 after step (\d+)", log)
    resumed = re.search(r"resuming stage 1 from .* at epoch 2, step (\d+)", log)
    assert stopped and resumed and int(resumed.group(1)) > 1  # in the middle of epoch 2
    assert int(stopped.group(1)) == 19 + int(resumed.group(1)) - 1
    first, second = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert (first["returncode"], second["returncode"]) == (75, 0)
    assert first["job_id"] == second["job_id"] == job
    record = json.loads((run_dir / "cell.json").read_text())
    assert record["attempts"] == record["attempts_timed"] == 2 and record["resumed"] is True

    here = study_file(tmp_path, "here", {"method": ["dscl"]}, **over)
    assert main(["study", "--config", str(here)]) == 0
    assert metrics(run_dir) == metrics(tmp_path / "runs" / "here" / "method-dscl")


@pytest.mark.slurm
def test_a_cancelled_cell_is_failed_then_resubmitted(slurm, tmp_path: Path, capsys):
    path = study_file(tmp_path, "cancelled", {"method": ["ce"]}, SLURM, **{"pretrain.epochs": 3})
    assert main(["study", "--config", str(path)]) == 0
    [job] = re.findall(r"submitted as SLURM job (\d+)", capsys.readouterr().err)
    run_dir = tmp_path / "runs" / "cancelled" / "method-ce"
    wait_until(lambda: last_logged(run_dir) is not None, "a logged step")
    slurm.run("scancel", job)
    wait_until(lambda: slurm.jobs()[job] == "CANCELLED", "cancelled job", every=0.2)
    table = status_table(path, capsys)
    with capsys.disabled():
        print(table)  # shown with -s
    state = row(table, "method-ce")
    assert state[1:3] == ["failed", job] and "job cancelled:" in table
    assert str(run_dir / "stdout.log") in table  # the last line of its log, and where it is
    last = [x for x in (run_dir / "stdout.log").read_text().splitlines() if x.strip()][-1]
    assert last.strip() in table
    assert "SIGTERM received: stopped stage 1" in last  # it saved a checkpoint, then was gone

    assert main(["study", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"taking over cell method-ce: its claim by SLURM job {job}" in err
    assert "is gone (cancelled)" in err
    [again] = re.findall(r"submitted as SLURM job (\d+)", err)
    assert again != job
    assert run_study(str(path), wait=True, poll_s=POLL_S) == 0
    assert row(status_table(path, capsys), "method-ce")[1:3] == ["finished", again]


def test_status_table_of_a_study_never_submitted(tmp_path: Path, capsys):
    path = study_file(tmp_path, "s", {"method": ["ce", "dscl"]})
    study = load_study(path)
    rows = cell_statuses(study, study.cells)
    assert [r.state for r in rows] == ["not started", "not started"]
    table = format_status(study, rows)
    assert table.splitlines()[0] == "study s: 2 cells: 2 not started"
    assert status_table(path, capsys).strip() == table
    assert not (tmp_path / "runs").exists()  # --status writes nothing


def test_without_slurm_here_a_jobs_claim_is_respected(tmp_path: Path, monkeypatch, capsys):
    """Where SLURM's commands are not installed nothing can tell whether a claim's job still
    exists: the claim is respected (as a claim of another host is), never taken over."""
    from dscl.study.claims import Claims

    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    path = study_file(tmp_path, "s", {"method": ["ce"]})
    study = load_study(path)
    claims = tmp_path / "runs" / "s" / "claims"
    claims.mkdir(parents=True)
    holder = {"pid": 1, "host": "login1", "started": "then", "token": "x", "job_id": "99"}
    (claims / "method-ce.json").write_text(json.dumps(holder))
    assert Claims.holder_gone(holder) is None
    assert not Claims(study).take(study.cells[0])
    table = status_table(path, capsys)
    assert row(table, "method-ce")[1:3] == ["unknown", "99"]
    ran: list[str] = []
    assert run_study(str(path), runner=lambda s, c: ran.append(c.name)) == 0
    assert ran == [] and "method-ce: claimed by SLURM job 99" in capsys.readouterr().err


@pytest.mark.slurm
def test_a_cell_that_makes_no_progress_stops_after_three_requeues(slurm, tmp_path: Path, capsys):
    """submitit's protocol: SIGUSR2 (sent ahead of the time limit; here by hand, as soon as each
    attempt starts) makes the job stop its cell and requeue itself. Stopped before its first
    step every time, the cell makes no progress; the fourth start says so and gives up."""
    path = study_file(tmp_path, "stalled", {"method": ["ce"]}, SLURM)
    assert main(["study", "--config", str(path)]) == 0
    [job] = re.findall(r"submitted as SLURM job (\d+)", capsys.readouterr().err)
    log = tmp_path / "runs" / "stalled" / "method-ce" / "stdout.log"

    def attempts() -> int:
        return log.read_text().count("==== dscl study stalled") if log.is_file() else 0

    def show() -> str:  # what SLURM says of the job, should a wait time out
        return slurm.run("scontrol", "show", "job", job, check=False)

    for attempt in (1, 2, 3):
        wait_released(slurm, job, lambda n=attempt: attempts() == n, f"attempt {attempt}", show)
        slurm.run("scancel", "--signal=USR2", job)
        wait_until(lambda: slurm.jobs()[job] in ("PENDING", "REQUEUED"), "requeue", 180, 0.1, show)
    wait_released(slurm, job, lambda: slurm.jobs()[job] == "FAILED", "failed job", show)
    assert attempts() == 3
    lines = [json.loads(x) for x in log.with_name("attempts.jsonl").read_text().splitlines()]
    assert [x["job_id"] for x in lines] == [job] * 3
    assert all(x["returncode"] != 0 and x["progress_end"] == x["progress_start"] for x in lines)
    table = status_table(path, capsys)
    assert row(table, "method-ce")[1:3] == ["failed", job]
    assert f"SLURM job {job} was requeued 3 times in a row without progress" in table
    assert "before its first logged step); stopping" in table
    submitit_log = (tmp_path / "runs" / "stalled" / "slurm" / job / f"{job}_0_log.out").read_text()
    assert submitit_log.count("Calling checkpoint method") == 3


def test_shipped_imagenet_lt_study_for_slurm(tmp_path: Path):
    from dscl.study.slurm import slurm_parameters

    study = load_study("study_imagenet_lt_slurm")
    assert len(study.cells) == 12 and study.baseline == {"method": "ce"}
    assert study.cells[0].config.data.name == "imagenet_lt"
    assert study.cells[0].config.pretrain.epochs == 200
    launcher = study.launcher
    assert (launcher.kind, launcher.gpus_per_cell, launcher.nodes, launcher.time) == (
        "slurm",
        8,
        1,
        "48:00:00",
    )
    assert slurm_parameters(study, launcher) == {
        "time": 2880,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": 96,
        "gpus_per_node": 8,
    }
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CLUSTER.md").read_text()
    example = tmp_path / "imagenet_lt_study.yaml"
    example.write_text(doc.split("```yaml\n")[1].split("```")[0])
    documented = load_study(example)  # the study file docs/CLUSTER.md shows is valid
    assert documented.launcher.partition == "gpu" and documented.launcher.extra == {"mem": "400G"}
    assert len(documented.cells) == 12
