"""The tests run on the CPU unless marked ``cuda``, on a machine with a GPU too (conftest)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import device_pin
from dscl.engine import runtime

CPU = torch.device("cpu")
# the environment as test modules see it when they are imported (and copy it for subprocesses)
AT_IMPORT = os.environ.get(device_pin.VISIBLE)


def test_unmarked_tests_and_their_processes_see_no_gpu():
    assert AT_IMPORT == ""
    assert not torch.cuda.is_available() and runtime.select_device("auto") == CPU
    code = "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "''"


def test_pin_device_hides_a_gpu_unless_the_test_is_marked(monkeypatch):
    """On a machine with two GPUs (faked): a cuda-marked test gets them, with cuDNN
    deterministic and not benchmarking; any other test gets the CPU, in and out of process."""
    monkeypatch.setattr(device_pin, "cuda_is_available", lambda: True)
    monkeypatch.setattr(device_pin, "VISIBLE_HERE", "0,1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark)
    with pytest.MonkeyPatch.context() as marked:
        assert device_pin.pin_device(marked, cuda_test=True) == "cuda"
        assert torch.cuda.is_available() and runtime.select_device("auto").type == "cuda"
        assert os.environ[device_pin.VISIBLE] == "0,1"
        assert cudnn.deterministic and not cudnn.benchmark
        with pytest.MonkeyPatch.context() as unmarked:
            assert device_pin.pin_device(unmarked, cuda_test=False) == "cpu"
            assert not torch.cuda.is_available() and runtime.select_device("auto") == CPU
            assert os.environ[device_pin.VISIBLE] == ""
    assert (cudnn.deterministic, cudnn.benchmark) == before
    assert not torch.cuda.is_available() and os.environ[device_pin.VISIBLE] == ""


@pytest.mark.cuda
def test_cuda_marked_tests_see_the_gpu_with_deterministic_cudnn():
    assert torch.cuda.is_available() and runtime.select_device("auto").type == "cuda"
    assert os.environ.get(device_pin.VISIBLE) != ""
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
