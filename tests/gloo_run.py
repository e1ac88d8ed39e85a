"""Two-process CPU tests: a worker module of ``dist_support/`` run on every rank of a gloo group."""

from __future__ import annotations

import importlib
import socket
import time
from pathlib import Path

import pytest
import torch.distributed as tdist
import torch.multiprocessing as mp

SUPPORT_DIR = Path(__file__).resolve().parent / "dist_support"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_gloo_workers(module: str, out_dir: Path, timeout: float = 120.0):
    """Import ``dist_support/<module>`` and run its ``run(rank, port, out_dir)`` on each of its
    ``WORLD_SIZE`` ranks (spawned processes, gloo); return the module once every rank is done.
    Skips without gloo; fails the test if a rank raises or they take over ``timeout`` s."""
    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SUPPORT_DIR))  # spawned children inherit sys.path
        worker = importlib.import_module(module)
        context = mp.start_processes(
            worker.run,
            args=(free_port(), str(out_dir)),
            nprocs=worker.WORLD_SIZE,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):  # raises if a worker raised
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.terminate()
                pytest.fail(f"two-process gloo workers ({module}) did not finish in {timeout} s")
    return worker
