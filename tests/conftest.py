"""Puts this folder on sys.path so that end-to-end tests share ``tiny_run``, and pins the tests
to the CPU unless they are marked ``cuda`` (see ``device_pin``)."""

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from device_pin import CUDA_HERE, pin_device  # noqa: E402 (needs the path above)

# The CPU pin holds for the whole session from before collection: test modules copy the
# environment for their subprocesses when they are imported (test_fault_tolerance.ENV), and
# module-scoped fixtures train before any function-scoped fixture runs.
_SESSION_PIN = pytest.MonkeyPatch()


def pytest_configure(config):
    pin_device(_SESSION_PIN, cuda_test=False)


def pytest_unconfigure(config):
    _SESSION_PIN.undo()


def pytest_collection_modifyitems(config, items):
    if CUDA_HERE:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _device_pin(request):
    """A test marked ``cuda`` sees the machine's GPUs (and deterministic cuDNN) while it runs;
    every other test keeps the session's CPU pin."""
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        pin_device(patch, cuda_test=True)
        yield


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster (``tests/slurm_cluster.py``) for the whole session, started on
    first use and stopped, by its daemons' process ids, at the end; the test is skipped with the
    reason where it cannot be started. ``SLURM_CONF`` points at it while it runs."""
    from slurm_cluster import ClusterUnavailable, start_cluster

    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as why:
        pytest.skip(f"no SLURM cluster: {why}")
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(cluster.conf))
    try:
        yield cluster
    finally:
        patch.undo()
        cluster.stop()


@pytest.fixture
def slurm(slurm_cluster):
    """The session's SLURM cluster, with every job cancelled (and ended) after the test."""
    yield slurm_cluster
    slurm_cluster.cancel_all()
