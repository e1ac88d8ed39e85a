"""Precision choice: auto never picks bf16 on a CPU; explicit bf16 warns where it is emulated."""

from __future__ import annotations

import pytest
import torch

from dscl.engine import runtime

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_full_precision_on_a_cpu_and_bf16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert runtime.amp_dtype("auto", CPU) is None  # even where bf16 is native
    assert runtime.amp_dtype("auto", GPU) == torch.bfloat16
    assert runtime.amp_dtype("off", GPU) is None
    assert runtime.amp_dtype("fp16", GPU) == torch.float16


def test_auto_is_fp16_with_loss_scaling_on_a_gpu_without_native_bf16(monkeypatch, capsys):
    # A V100 (compute capability 7.0) only emulates bf16: auto must not choose it there, but
    # fp16 with the loss scaler, and say so.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    assert runtime.amp_dtype("auto", GPU) == torch.float16
    err = capsys.readouterr().err
    assert "Tesla V100-SXM2-32GB has no native bf16" in err and "fp16" in err
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert runtime.amp_dtype("auto", GPU) == torch.bfloat16  # A100 and later
    assert capsys.readouterr().err == ""


def test_bf16_on_a_cpu_without_native_support_warns(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    assert runtime.amp_dtype("bf16", CPU) == torch.bfloat16
    err = capsys.readouterr().err
    assert "emulated" in err and "13x slower" in err


def test_bf16_on_a_cpu_with_native_support_is_quiet(monkeypatch, capsys):
    for flags in ({"avx512_bf16"}, {"amx_bf16", "amx_tile"}):
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        assert runtime.amp_dtype("bf16", CPU) == torch.bfloat16
        assert capsys.readouterr().err == ""


def test_device_choice_and_its_errors(monkeypatch):
    """``device`` names a device this machine has, or the run stops with a SetupError (exit 2)
    naming the key; ``auto`` and a bare ``cuda`` give this process's GPU."""
    from dscl.errors import SetupError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.select_device("auto") == CPU and runtime.select_device("cpu") == CPU
    for spec, pattern in [
        ("cuda", r"^device: 'cuda' requested but CUDA is not available here"),
        ("cuda:0", r"^device: 'cuda:0' requested but CUDA is not available here"),
        ("gpu", r"^device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N$"),
    ]:
        with pytest.raises(SetupError, match=pattern):
            runtime.select_device(spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.select_device("auto", local_rank=3) == torch.device("cuda", 1)
    assert runtime.select_device("cuda", local_rank=2) == torch.device("cuda", 0)
    assert runtime.select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SetupError, match=r"^device: 'cuda:2' requested but this machine has 2 GPU"):
        runtime.select_device("cuda:2")
    # under torchrun the local rank picks the GPU: an explicit index would stack every rank on it
    assert runtime.select_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    with pytest.raises(SetupError, match=r"^device: 'cuda:1' names one GPU, but under 2 proc"):
        runtime.select_device("cuda:1", local_rank=0, world_size=2)
