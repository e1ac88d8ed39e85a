"""Per-process state in checkpoints: RNG states and the augmentation position, and the device
type they were made on (a CUDA generator's state does not load into a CPU generator)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dscl.engine import runtime, stage
from dscl.engine.stage import moved_hardware, rank_states, restore_rank_state, say_moved_hardware
from dscl.errors import CheckpointError

CPU = torch.device("cpu")
PATH = Path("run/pretrain.pt")


def _fake_gpus(monkeypatch, count: int) -> tuple[list, list]:
    """``count`` visible GPUs whose generators' states are ``[index] * 16``; returns the lists
    of devices read and of (state, device) written. Asking for every GPU's state fails."""
    read, written = [], []

    def get_rng_state(device="cuda"):
        read.append(torch.device(device))
        return torch.full((16,), torch.device(device).index, dtype=torch.uint8)

    def every_gpu(*args):
        raise AssertionError("the state of every visible GPU was asked for")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d="cuda": written.append((s, d)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)
    return read, written


def test_rng_state_keeps_only_this_processs_gpu(monkeypatch):
    """Saved and restored: the training GPU's generator, not those of all visible GPUs (which
    would not load where another number of GPUs is visible)."""
    read, written = _fake_gpus(monkeypatch, 2)
    gpu = torch.device("cuda", 1)
    state = runtime.rng_state(gpu)
    assert read == [gpu] and torch.equal(state["cuda"], torch.full((16,), 1, dtype=torch.uint8))
    runtime.set_rng_state(state, gpu)
    assert len(written) == 1 and written[0][0] is state["cuda"] and written[0][1] == gpu


def test_set_rng_state_takes_this_gpus_entry_of_an_older_checkpoint(monkeypatch):
    """Older checkpoints hold every visible GPU's state: the training GPU's entry is restored,
    and none where that GPU was not visible when it was saved."""
    _, written = _fake_gpus(monkeypatch, 3)
    old = runtime.rng_state(CPU) | {"cuda": [torch.zeros(16), torch.ones(16)]}
    runtime.set_rng_state(old, torch.device("cuda", 1))
    assert len(written) == 1 and written[0][0] is old["cuda"][1]
    runtime.set_rng_state(old, torch.device("cuda", 2))
    assert len(written) == 1


def test_rng_state_on_a_cpu_is_torch_and_python_only(monkeypatch):
    """Training on the CPU (GPUs visible or not) saves what it always did, and a saved GPU state
    is not restored into any GPU."""
    read, written = _fake_gpus(monkeypatch, 1)
    state = runtime.rng_state(CPU)
    assert state.keys() == {"torch", "python"} and not read
    assert torch.equal(state["torch"], torch.get_rng_state())
    assert state["python"] == random.getstate()
    runtime.set_rng_state(state | {"cuda": torch.zeros(16, dtype=torch.uint8)}, CPU)
    assert not written


def test_rank_states_record_the_device_type_and_the_hardware():
    feed = SimpleNamespace(device=CPU, position=lambda: torch.Generator().get_state())
    (mine,) = rank_states(feed)
    assert mine["device"] == "cpu" and mine["rng"].keys() == {"torch", "python"}
    assert mine["hardware"] == runtime.hardware(CPU)
    assert mine["hardware"]["threads"] == torch.get_num_threads()


def test_hardware_names_the_gpu_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    hw = runtime.hardware(torch.device("cuda", 0))
    assert hw["processor"] == "NVIDIA H100"
    assert runtime.hardware_text(hw) == f"NVIDIA H100, {torch.get_num_threads()} thread" + (
        "" if torch.get_num_threads() == 1 else "s"
    )


def test_a_checkpoint_from_other_hardware_is_told_apart():
    """Another processor or another thread count is a move; the same hardware, or a checkpoint
    that does not say (older versions), is not."""
    here = runtime.hardware(CPU)
    assert moved_hardware(_checkpoint(None, hardware=here), CPU) is None
    assert moved_hardware(_checkpoint(None), CPU) is None
    for other in ({"processor": "Another CPU"}, {"threads": here["threads"] + 1}):
        saved = here | other
        assert moved_hardware(_checkpoint(None, hardware=saved), CPU) == (saved, here)


def test_every_process_s_move_is_told_by_rank_0(monkeypatch):
    """Only rank 0 writes to the terminal and the log: a move of another process (a node of a
    multi-node resume that changed) reaches them through the gathered check."""
    said, logged = [], []
    ctx = SimpleNamespace(logger=SimpleNamespace(info=said.append, log=logged.append))
    here = runtime.hardware(CPU)
    other = here | {"processor": "Another CPU"}
    monkeypatch.setattr(stage.dist, "gather_objects", lambda mine: [mine, (other, here)])
    say_moved_hardware(
        ctx, _checkpoint(None, hardware=here), CPU, stage="pretrain", epoch=3, step=40
    )
    assert len(said) == 1 and said[0].startswith("warning: process 1: ")
    assert logged == [
        {"stage": "pretrain", "epoch": 3, "step": 40, "rank": 1}
        | {"written_on": other, "resumed_on": here}
    ]


def test_on_a_gpu_only_the_gpu_model_counts(monkeypatch):
    """A GPU run's arithmetic is the GPU's: resuming on the same model with another number of
    host threads is no move; another GPU model is."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    here = runtime.hardware(gpu)
    fewer = here | {"threads": here["threads"] + 3}
    assert moved_hardware(_checkpoint(None, hardware=fewer), gpu) is None
    other = here | {"processor": "NVIDIA A100"}
    assert moved_hardware(_checkpoint(None, hardware=other), gpu) == (other, here)


def _checkpoint(position: torch.Tensor | None, **device) -> dict:
    return {"ranks": [{"rng": runtime.rng_state(CPU), "feed": position, **device}]}


# what a GPU run saves as its augmentation position: a CUDA generator's state (seed and offset)
CUDA_POSITION = torch.zeros(16, dtype=torch.uint8)


def test_a_mid_epoch_position_of_another_device_type_is_a_checkpoint_error():
    with pytest.raises(CheckpointError) as err:
        restore_rank_state(_checkpoint(CUDA_POSITION, device="cuda"), PATH, CPU, mid_epoch=True)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{PATH}: ")
    assert "on cuda, resumed on cpu" in text and "device=cuda" in text


def test_a_position_that_is_not_used_may_come_from_another_device_type():
    """At an epoch's end the next epoch starts its own generator; the DataLoader paths save no
    position at all: neither stops a resume on another device type."""
    for position, mid_epoch in ((CUDA_POSITION, False), (None, True)):
        state = _checkpoint(position, device="cuda")
        assert restore_rank_state(state, PATH, CPU, mid_epoch=mid_epoch) is None


def test_a_position_of_an_older_checkpoint_is_taken_as_this_device_types():
    position = torch.Generator().get_state()
    assert restore_rank_state(_checkpoint(position), PATH, CPU, mid_epoch=True) is position
    same = _checkpoint(position, device="cpu")
    assert restore_rank_state(same, PATH, CPU, mid_epoch=True) is position
