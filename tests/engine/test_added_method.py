"""A method added from outside the package, using every extension point at once: a settings
section of its own, the training class counts, a view of its own with its own augmentation,
and its own classifier, which stage 2 keeps. It runs end to end through ``dscl run`` and
``dscl evaluate`` as a shipped method does."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from dscl.checkpoint import load_checkpoint
from dscl.cli import main
from dscl.config import build_config
from dscl.data.named_views import ViewSpec
from dscl.errors import ConfigError
from dscl.methods import VIEWS, Method, StepOutput, method_backbone, register_method
from dscl.methods.registry import unregister_method
from dscl.models import Classifier
from tiny_run import tiny

SEEN: list[dict] = []  # what the toy method's steps received


@dataclass
class ToySettings:  # section "toy"
    weight: float = 0.5  # weight of the third view's cross-entropy

    def check(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must not be negative, got {self.weight}")


class Toy(Method):
    """Cross-entropy on the standard query view plus ``weight`` × cross-entropy on a view of its
    own (grayscale always, 12 px), with the log prior added to the logits (counts needed)."""

    feed_kind = VIEWS
    views = ("query",)
    extra_views = {"toy_gray": ViewSpec(p_jitter=0.0, p_gray=1.0, size=12)}  # noqa: RUF012

    def __init__(self, model: Classifier, weight: float, counts: list[int]) -> None:
        super().__init__(model)
        self.weight = weight
        prior = torch.tensor(counts, dtype=torch.float32)
        self.log_prior = (prior / prior.sum()).log()

    def step(self, batch) -> StepOutput:
        x = batch.inputs
        SEEN.append({name: tuple(value.shape) for name, value in x.items()})
        first = F.cross_entropy(self.net(x["query"]) + self.log_prior, batch.labels)
        third = F.cross_entropy(self.net(x["toy_gray"]) + self.log_prior, batch.labels)
        return StepOutput(first + self.weight * third, {"loss_third": third.detach()})

    def classifier(self) -> Classifier:
        return self.model


@pytest.fixture
def toy():
    @register_method("toy", settings=ToySettings, classifier="keep")
    def build_toy(cfg, data):
        model = Classifier(method_backbone(cfg), data.num_classes)
        return Toy(model, cfg.section("toy").weight, data.counts("toy"))

    SEEN.clear()
    yield
    unregister_method("toy")


def test_an_added_method_runs_end_to_end_with_its_setting_view_and_classifier(toy, tmp_path):
    args = ["run", "--name", "toy", "threads=1", "progress=false", "method=toy", "toy.weight=2"]
    assert main([*args, *tiny(tmp_path)]) == 0
    run = tmp_path / "toy"
    # its own view reached every step, at its own size; no standard view it does not read
    assert SEEN and all(set(s) == {"query", "toy_gray"} for s in SEEN)
    assert all(s["toy_gray"][1:] == (3, 12, 12) and s["query"][1:] == (3, 16, 16) for s in SEEN)
    # its setting is recorded under its section
    saved = (run / "config.yaml").read_text()
    assert "\ntoy:\n  weight: 2.0\n" in saved
    # stage 2 kept its classifier: best.pt holds exactly stage 1's
    stage1, best = load_checkpoint(run / "pretrain.pt"), load_checkpoint(run / "best.pt")
    assert best["classifier_mode"] == "keep"
    for key, value in stage1["classifier"].items():
        assert torch.equal(best["model"][key], value), key
    metrics = json.loads((run / "metrics.json").read_text())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert any("loss_third" in record for record in log)
    # evaluation reads the same classifier
    assert main(["evaluate", "--name", "toy", f"output_dir={tmp_path}", "threads=1"]) == 0
    assert json.loads((run / "metrics.json").read_text())["top1"] == metrics["top1"]


def test_an_added_methods_setting_is_validated_naming_the_key(toy):
    with pytest.raises(ConfigError, match="toy.weight: must not be negative"):
        build_config(None, ["method=toy", "toy.weight=-1"])
    with pytest.raises(ConfigError, match="toy.wieght"):
        build_config(None, ["method=toy", "toy.wieght=1"])
