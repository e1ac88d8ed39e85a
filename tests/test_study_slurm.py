"""``dscl study --launcher slurm`` against a real one-node SLURM cluster (``slurm_cluster.py``).

The cluster's daemons are started by the session fixture ``slurm_cluster`` (``conftest.py``) and
stopped at the end; every test cancels its jobs. Without SLURM, munge or root the tests are
skipped with the reason.
"""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.slurm


def test_the_cluster_answers(slurm):
    assert slurm.run("srun", "hostname").strip() == slurm.node
    assert set(slurm.jobs().values()) <= {"COMPLETED"}
    names = {p.args[0] for p in slurm.procs.values()}
    assert names == {"munged", "slurmctld", "slurmd"}
    assert all(p.poll() is None for p in slurm.procs.values())
    assert subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
