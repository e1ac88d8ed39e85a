"""The host-sync audit: it sees every kind of host round trip, and a training step of every
method, on the path a GPU takes, has none."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dscl.device_path import device_constant, gpu_path, sync_free
from dscl.engine.host_sync import HostSyncAudit
from dscl.losses.bcl import check_label_range

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _sync_audit():
    spec = importlib.util.spec_from_file_location("sync_audit", BENCHMARKS / "sync_audit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("kind", "work"),
    [
        ("readback", lambda x: x.sum().item()),
        ("readback", lambda x: bool(x[0] > 0)),
        ("readback", lambda x: x.tolist()),
        ("readback", lambda x: x.numpy()),
        ("data_dependent", lambda x: x.nonzero()),
        ("data_dependent", lambda x: x[x > 0]),
        ("data_dependent", lambda x: torch.bincount(x.long().abs())),
        ("data_dependent", lambda x: torch.unique(x)),
        ("data_dependent", lambda x: x.repeat_interleave(x.long().abs())),
        ("from_host", lambda x: torch.tensor([1.0, 2.0])),
        ("from_host", lambda x: x.new_tensor([0.5, 0.5])),
    ],
)
def test_the_audit_sees_each_kind_of_round_trip(kind, work):
    x = torch.tensor([3.0, -1.0, 2.0])
    with HostSyncAudit() as audit:
        work(x)
    assert audit.counts[kind] >= 1, audit.counts
    assert sum(audit.counts.values()) == audit.counts[kind], audit.counts


def test_the_audit_passes_work_that_stays_on_the_device():
    x = torch.randn(8, 3, 4, 4)
    original = torch.Tensor.tolist
    with HostSyncAudit() as audit:
        y = torch.where(x > 0, x, 0.0).sum(dim=(1, 2, 3))
        y = y.repeat_interleave(2, 0)
        z = torch.zeros(4, dtype=torch.long).scatter_add_(
            0, torch.arange(8) % 4, torch.ones(8, dtype=torch.long)
        )
        x[:, 0].fill_(1.0)
    assert audit.counts == {"readback": 0, "data_dependent": 0, "from_host": 0}
    assert z.tolist() == [2, 2, 2, 2]  # outside the audit: wrapped methods are restored
    assert torch.Tensor.tolist is original


def test_gpu_path_switches_a_cpu_to_the_accelerators_way():
    cpu = torch.device("cpu")
    assert not sync_free(cpu) and sync_free(torch.device("meta"))
    with gpu_path():
        assert sync_free(cpu)
    assert not sync_free(cpu)
    x = torch.zeros(2)
    assert device_constant((0.5, 0.25), x) is device_constant((0.5, 0.25), x)
    assert device_constant((0.5, 0.25), x.double()).dtype == torch.float64


def test_label_check_on_the_gpu_path_is_queued_on_the_device():
    labels = torch.tensor([0, 2, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        check_label_range("labels", labels, 2)  # a CPU: read on the host, a clear message
    with gpu_path(), HostSyncAudit() as audit:
        check_label_range("labels", labels, 3)
    assert audit.counts["readback"] == 0
    with gpu_path(), pytest.raises(RuntimeError, match=r"labels must lie in \[0, 2\)"):
        check_label_range("labels", labels, 2)  # the device's assertion, with the message


METHODS = ["ce", "supcon", "dscl", "supcon+pbsd", "dscl+pbsd", "bcl", "paco"]
# BCL and PaCo with the standard views too (their default is their authors' views)
CASES = [(m, []) for m in METHODS] + [
    ("bcl", ["bcl.augment=stage1"]),
    ("paco", ["paco.augment=stage1"]),
]


@pytest.mark.parametrize("path", ["memory", "files", "device_decode"])
@pytest.mark.parametrize(
    ("method", "settings"), CASES, ids=lambda v: "-".join(v) if isinstance(v, list) else v
)
def test_a_training_step_never_waits_for_the_host(method, settings, path):
    # One epoch of 3 steps on the GPU's path (in memory, from JPEG files with one worker, or
    # decoded in the main process); the middle one (the main process's part of the batch, step,
    # backward, optimizer, EMA, queue) runs under the audit: no read-back, no data-dependent
    # size, no tensor from host data.
    result = _sync_audit().audit_method(
        method,
        torch.device("cpu"),
        image_size=16,
        batch=16,
        steps=3,
        overrides=["pretrain.queue_size=32", *settings],
        path=path,
    )
    audit = result["audit"]
    assert result["steps"] == 1
    assert sum(audit.counts.values()) == 0, audit.where
