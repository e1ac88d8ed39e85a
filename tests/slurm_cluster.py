"""A one-node SLURM cluster on this machine, for the launcher tests: munged, slurmctld, slurmd.

The Debian packages ``slurm-wlm`` and ``munge`` provide the daemons (``make test`` installs them
when it runs as root). :func:`start_cluster` writes its own munge key, ``slurm.conf`` and
``cgroup.conf`` into a folder, starts the three daemons in the foreground as child processes of
the tests (so they are stopped by their process ids), and waits until ``srun hostname`` answers.
Where that cannot be done (not root, a package missing, a daemon that does not start) it raises
:class:`ClusterUnavailable` with the reason, and the tests that need the cluster are skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("srun", "sbatch", "squeue", "scontrol", "scancel")
START_TIMEOUT_S = 30.0
KILL_WAIT_S = 5  # slurm.conf KillWait: SIGTERM to a job, SIGKILL this long after
PARTITION = "debug"


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be started here; the message says why (a test skip reason)."""


@dataclass
class SlurmCluster:
    """A running one-node cluster.

    Attributes:
        folder: its configuration, state, spool, logs and munge socket.
        conf: the ``slurm.conf`` that every SLURM command must read (``SLURM_CONF``).
        node: the node's name (this host's name).
        procs: the daemons, started by the tests (munged, slurmctld, slurmd).
    """

    folder: Path
    conf: Path
    node: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at the cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM command against this cluster; its stdout."""
        done = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def jobs(self) -> dict[str, str]:
        """Job id -> state of every job the controller knows (finished ones included)."""
        out = self.run("squeue", "-h", "-t", "all", "-o", "%i|%T")
        return dict(line.split("|", 1) for line in out.split())

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job and wait until none runs any more (their processes have ended)."""
        active = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED"}
        if not any(state in active for state in self.jobs().values()):
            return
        self.run("scancel", "--user", _user(), check=False)
        deadline = time.monotonic() + timeout
        while any(state in active for state in self.jobs().values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs still active after scancel: {self.jobs()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the daemons' logs (for a failed test's message)."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.folder / name
            text = path.read_text(errors="replace") if path.is_file() else ""
            parts.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the jobs, then stop slurmd, slurmctld and munged by their process ids."""
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self.procs.pop(name, None)
                if proc is not None:
                    _stop(proc)
            _reap_steps()
            _become_subreaper(False)


def _child_steps() -> list[int]:
    """The slurmstepd processes whose parent is this process (see :func:`_become_subreaper`)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.find("(") + 1 : text.rfind(")")], text[text.rfind(")") + 2 :]
        if name == "slurmstepd" and int(rest.split()[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


def _reap_steps(timeout: float = 15) -> None:
    """Wait for the cluster's job-step daemons to end (SIGKILL after ``timeout``) and reap them,
    so that none is left behind, not even as a zombie."""
    deadline = time.monotonic() + timeout
    while steps := _child_steps():
        for pid in steps:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.1)


def _become_subreaper(on: bool = True) -> None:
    """Make this process the parent of the daemons' orphans (Linux ``PR_SET_CHILD_SUBREAPER``):
    slurmd starts each job step's slurmstepd detached, and :func:`_reap_steps` collects them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, int(on), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def slurm_conf(folder: Path, node: str, cpus: int, memory_mb: int) -> str:
    """The cluster's ``slurm.conf``: one node, one partition, state and logs under ``folder``."""
    ports = (_free_port(), _free_port())
    lines = [
        "ClusterName=dscltest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmUser={_user()}",
        f"SlurmdUser={_user()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={folder / 'munge.socket'}",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        f"KillWait={KILL_WAIT_S}",
        "MinJobAge=3600",  # finished jobs stay visible to squeue during the tests
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ClusterUnavailable("the test cluster's daemons run as root; this is not root")
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        raise ClusterUnavailable(
            f"{', '.join(missing)} not found: install the Debian packages slurm-wlm and munge "
            "(make test does, as root)"
        )
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ClusterUnavailable("submitit is not installed (pip install -e '.[slurm]')") from None


def _spawn(cluster: SlurmCluster, name: str, args: list[str]) -> None:
    out = open(cluster.folder / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
    cluster.procs[name] = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=cluster.env
    )
    out.close()


def _start_munge(cluster: SlurmCluster) -> None:
    folder = cluster.folder
    key = folder / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    _spawn(
        cluster,
        "munged",
        [
            "munged",
            "--foreground",
            "--force",  # as root, and with its socket in a folder others cannot enter
            f"--socket={folder / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={folder / 'munged.pid'}",
            f"--seed-file={folder / 'munged.seed'}",
            f"--log-file={folder / 'munged.log'}",
        ],
    )
    _wait_for(lambda: (folder / "munge.socket").exists(), cluster, "munged", 10)


def _wait_for(ready, cluster: SlurmCluster, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                out = (cluster.folder / f"{name}.out").read_text(errors="replace")[-2000:]
                raise ClusterUnavailable(f"{name} exited with {proc.returncode}: {out.strip()}")
        if time.monotonic() > deadline:
            tail = cluster.log_tail()
            raise ClusterUnavailable(f"{what} not ready after {timeout:.0f} s\n{tail}")
        time.sleep(0.2)


def _answers(cluster: SlurmCluster) -> bool:
    try:
        done = subprocess.run(
            ["srun", "--immediate=5", "hostname"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def start_cluster(folder: Path) -> SlurmCluster:
    """Start a one-node cluster with its files in ``folder``; stopped by :meth:`stop`.

    Raises:
        ClusterUnavailable: it cannot be started here (the reason says why).
    """
    _check_prerequisites()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    node = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, node, os.cpu_count() or 1, _memory_mb() // 2))
    (folder / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
    cluster = SlurmCluster(folder=folder, conf=conf, node=node)
    _become_subreaper()
    try:
        _start_munge(cluster)
        _spawn(cluster, "slurmctld", ["slurmctld", "-D", "-c", "-f", str(conf)])
        _spawn(cluster, "slurmd", ["slurmd", "-D", "-f", str(conf)])
        _wait_for(lambda: _answers(cluster), cluster, "srun hostname", START_TIMEOUT_S)
    except BaseException:
        cluster.stop()
        raise
    return cluster
