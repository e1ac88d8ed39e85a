"""Which device a test runs on: the CPU unless it is marked ``cuda`` (``tests/conftest.py``).

Unmarked tests compare results bit for bit with runs made on the CPU, so on a machine with a GPU
they must not pick it up through ``device=auto``: neither in this process
(``runtime.select_device``) nor in the ``dscl`` processes they start.

A test that needs CUDA is marked ``@pytest.mark.cuda`` (skipped where there is none), never
``skipif(not torch.cuda.is_available())``: under the pin that condition is False at collection
even on a GPU machine, so such a test would never run.
"""

from __future__ import annotations

import os

import pytest
import torch

VISIBLE = "CUDA_VISIBLE_DEVICES"

# This machine's answers, taken when conftest imports this module, before anything is pinned.
# Asking also starts CUDA's driver with the GPUs there are (it reads CUDA_VISIBLE_DEVICES once),
# so the empty CUDA_VISIBLE_DEVICES that hides them from the tests' processes does not hide them
# from cuda-marked tests in this one.
cuda_is_available = torch.cuda.is_available
CUDA_HERE = cuda_is_available()
VISIBLE_HERE = os.environ.get(VISIBLE)


def pin_device(patch: pytest.MonkeyPatch, *, cuda_test: bool) -> str:
    """Pin what a test sees, undone with ``patch``; returns the device type it runs on.

    Args:
        patch: the monkeypatch that holds the pins.
        cuda_test: whether the test is marked ``cuda``.

    Returns:
        ``"cpu"``: CUDA is unavailable here (``torch.cuda.is_available()`` is False) and in the
        processes the test starts (``CUDA_VISIBLE_DEVICES=""``). ``"cuda"``: CUDA as the machine
        has it, with cuDNN's deterministic kernels and no benchmarking (which picks kernels by
        timing), so a bit-for-bit comparison on the GPU compares like with like.
    """
    if not cuda_test:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setenv(VISIBLE, "")
        return "cpu"
    patch.setattr(torch.cuda, "is_available", cuda_is_available)
    if VISIBLE_HERE is None:
        patch.delenv(VISIBLE, raising=False)
    else:
        patch.setenv(VISIBLE, VISIBLE_HERE)
    patch.setattr(torch.backends.cudnn, "deterministic", True)
    patch.setattr(torch.backends.cudnn, "benchmark", False)
    return "cuda"
