"""``compile=true``: torch.compile of the stage-1 encoders' training forward.

A two-layer backbone keeps the compiles to seconds; what is checked is the mechanism: training
steps give the eager weights (to a stated tolerance), evaluation passes stay eager (no compile of
their own), checkpoints keep their keys, and the setting is a runtime one for ``--resume auto``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from dscl.config import RunConfig
from dscl.engine import runtime
from dscl.engine.loop import EpochSpan, Optimization, run_epoch
from dscl.errors import SetupError
from dscl.methods import build_method
from dscl.models.backbones import _REGISTRY, Backbone, register_backbone
from tiny_run import tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# torch.compile on a CPU builds C++ (inductor); without a compiler only the error is tested
needs_cxx = pytest.mark.skipif(
    not (os.environ.get("CXX") or shutil.which("g++")), reason="torch.compile needs g++ on a CPU"
)


class TwoLayer(Backbone):
    out_channels, stride = 8, 2

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


@pytest.fixture
def two_layer():
    register_backbone("two_layer_test")(lambda *, in_channels=3, pretrained=False: TwoLayer())
    yield "two_layer_test"
    _REGISTRY.remove("two_layer_test")


class Views:
    def __init__(self, g: torch.Generator, batch: int = 8, patches: int = 2) -> None:
        self.labels = torch.arange(batch) % 3
        self.inputs = {
            "query": torch.randn(batch, 3, 8, 8, generator=g),
            "key": torch.randn(batch, 3, 8, 8, generator=g),
            "patches": torch.randn(batch, patches, 3, 4, 4, generator=g),
            "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [4.0, 4.0, 8.0, 8.0]]).expand(
                batch, patches, 4
            ),
        }


def train(method, steps: int = 3):
    cpu = torch.device("cpu")
    sgd = torch.optim.SGD(method.trainable_parameters(), lr=0.1, momentum=0.9)
    opt = Optimization(sgd, np.full(steps, 0.1), runtime.grad_scaler(cpu, None), cpu)
    g = torch.Generator().manual_seed(0)
    run_epoch(method, [Views(g) for _ in range(steps)], opt, EpochSpan(0, steps))


@needs_cxx
def test_compiled_training_matches_eager_and_evaluation_stays_eager(two_layer):
    torch.manual_seed(0)
    cfg = RunConfig(method="dscl+pbsd")
    cfg.model.backbone = two_layer
    cfg.model.embed_dim = 4
    cfg.pretrain.queue_size = 16
    eager = build_method(cfg, 3)
    eager.start_training()
    compiled = copy.deepcopy(eager)
    keys = list(compiled.model.state_dict())
    torch._dynamo.reset()
    runtime.compile_for_training(compiled.compile_targets(), torch.device("cpu"))
    train(eager)
    train(compiled)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    assert frames >= 2  # the query/patch backbone and the momentum backbone were compiled

    assert list(compiled.model.state_dict()) == keys
    trained = compiled.model.state_dict()
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(trained[name], value, atol=1e-5, rtol=1e-4, msg=name)

    x = torch.randn(5, 3, 8, 8)  # a new batch size: a compiled forward would compile again
    with torch.no_grad():
        out = compiled.backbone().eval()(x)
        reference = eager.backbone().eval()(x)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)


def test_compile_without_a_cxx_compiler_is_a_setup_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    with pytest.raises(SetupError, match="compile: .*C\\+\\+ compiler"):
        runtime.compile_for_training([nn.Linear(2, 2)], torch.device("cpu"))


@needs_cxx
def test_run_with_compile_and_resume_auto_without_it(two_layer, tmp_path):
    """A run trained with compile=true finishes; asking for the same run without compile is
    the same config (compile is a runtime key): --resume auto finds it finished."""
    from dscl.cli import main

    torch._dynamo.reset()
    args = tiny(tmp_path, f"model.backbone={two_layer}", "threads=1", "progress=false")
    assert main(["run", "--name", "c", *args, "compile=true"]) == 0
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert 0.0 <= metrics["top1"] <= 100.0
    before = (tmp_path / "c" / "metrics.json").stat().st_mtime_ns
    assert main(["run", "--name", "c", *args, "compile=false", "--resume", "auto"]) == 0
    assert (tmp_path / "c" / "metrics.json").stat().st_mtime_ns == before
