"""A method whose own classifier is not a linear layer (here a cosine classifier): its
MethodSpec says how to build it, so stage 2 keeps it, retrains its head on the frozen backbone,
and ``dscl evaluate`` / ``predict`` rebuild it from the stage-2 checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dscl.checkpoint import load_checkpoint, read_classifier
from dscl.cli import main
from dscl.errors import CheckpointError
from dscl.methods import (
    CLASSIFY,
    ClassifierSpec,
    Method,
    StepOutput,
    method_backbone,
    register_method,
    unregister_method,
)
from tiny_run import tiny


class CosineHead(nn.Module):
    """s · cos(v, w_c): logits from the angle between features and class weights."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_dim) * 0.01)
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x.float(), dim=1) @ F.normalize(self.weight, dim=1).T


class CosineClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = CosineHead(backbone.out_channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Cosy(Method):
    """Cross-entropy through a cosine classifier, which stage 2 keeps."""

    feed_kind = CLASSIFY

    def step(self, batch) -> StepOutput:
        return StepOutput(F.cross_entropy(self.net(batch.inputs["image"]), batch.labels))

    def classifier(self) -> nn.Module:
        return self.model


@pytest.fixture
def cosy():
    own = ClassifierSpec(auto="keep", build=CosineClassifier, head="head")

    @register_method("cosy", classifier=own)
    def build_cosy(cfg, data):
        return Cosy(CosineClassifier(method_backbone(cfg), data.num_classes))

    yield
    unregister_method("cosy")


def _run(tmp_path: Path, command: list[str], *settings: str) -> None:
    assert main([*command, "threads=1", "progress=false", *tiny(tmp_path, *settings)]) == 0


def test_a_cosine_classifier_is_kept_retrained_evaluated_and_predicted(cosy, tmp_path, capsys):
    _run(tmp_path, ["run", "--name", "keep"], "method=cosy")
    run = tmp_path / "keep"
    stage1, best = load_checkpoint(run / "pretrain.pt"), load_checkpoint(run / "best.pt")
    assert best["classifier_mode"] == "keep" and "head.scale" in stage1["classifier"]
    assert best["model"].keys() == stage1["classifier"].keys()
    for key, value in stage1["classifier"].items():  # kept as stage 1 left it
        assert torch.equal(best["model"][key], value), key
    model, _ = read_classifier(run / "best.pt")
    assert isinstance(model, CosineClassifier)
    top1 = json.loads((run / "metrics.json").read_text())["top1"]
    assert main(["evaluate", "--name", "keep", f"output_dir={tmp_path}", "threads=1"]) == 0
    assert json.loads((run / "metrics.json").read_text())["top1"] == top1

    images = []
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        images.append(tmp_path / f"image{i}.png")
        Image.fromarray(pixels).save(images[-1])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run / "best.pt"), *map(str, images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(str(tmp_path)) for line in lines)

    # retrain: the same kind of classifier, its head trained again (lr 0: left as it was)
    pretrained = ["--pretrained", str(run / "pretrain.pt")]
    zero_lr = ["classifier.mode=retrain", "classifier.base_lr=0", "classifier.epochs=1"]
    _run(tmp_path, ["classify", "--name", "re", *pretrained], "method=cosy", *zero_lr)
    again = load_checkpoint(tmp_path / "re" / "best.pt")
    assert again["classifier_mode"] == "retrain"
    for key in ("head.weight", "head.scale"):
        assert torch.equal(again["model"][key], stage1["classifier"][key]), key
    _run(tmp_path, ["evaluate", "--name", "re"], "method=cosy")  # classify wrote no config.yaml
    model, _ = read_classifier(tmp_path / "re" / "best.pt")
    assert isinstance(model, CosineClassifier)
    # without the method registered, the checkpoint's weights fit no model this program knows
    unregister_method("cosy")
    with pytest.raises(CheckpointError, match="classifier weights do not fit its model"):
        read_classifier(run / "best.pt")
