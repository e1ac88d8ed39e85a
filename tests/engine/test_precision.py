"""Precision choice: auto never picks bf16 on a CPU; explicit bf16 warns where it is emulated."""

from __future__ import annotations

import torch

from dscl.engine import runtime

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_full_precision_on_a_cpu_and_bf16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    assert runtime.amp_dtype("auto", CPU) is None  # even where bf16 is native
    assert runtime.amp_dtype("auto", GPU) == torch.bfloat16
    assert runtime.amp_dtype("off", GPU) is None
    assert runtime.amp_dtype("fp16", GPU) == torch.float16


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
