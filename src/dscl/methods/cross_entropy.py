"""``ce``: the cross-entropy baseline of stage 1 (backbone + linear layer on one augmented view)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from dscl.errors import ConfigError
from dscl.methods.base import CLASSIFY, Method, StepOutput, method_backbone
from dscl.methods.registry import register_method
from dscl.models import Classifier


@dataclass
class CESettings:
    """Section ``ce``: the cross-entropy baseline."""

    label_smoothing: float = 0.0  # epsilon of label smoothing (0: plain cross-entropy)

    def check(self) -> None:
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ConfigError(f"label_smoothing: must be in [0, 1], got {self.label_smoothing}")


class CrossEntropy(Method):
    """Backbone + global pool + linear layer trained with (optionally smoothed) cross-entropy.

    Args:
        backbone: the backbone to train.
        num_classes: number of classes.
        label_smoothing: ε of label smoothing (0 = plain cross-entropy).
    """

    feed_kind = CLASSIFY

    def __init__(self, backbone, num_classes: int, label_smoothing: float = 0.0) -> None:
        super().__init__(Classifier(backbone, num_classes))
        self.label_smoothing = label_smoothing

    def step(self, batch) -> StepOutput:
        logits = self.net(batch.inputs["image"])  # (B, classes)
        loss = F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.label_smoothing)
        return StepOutput(loss)

    def classifier(self):
        return self.model


@register_method("ce", settings=CESettings, classifier="probe", order=0)
def build_cross_entropy(cfg, data) -> CrossEntropy:
    backbone = method_backbone(cfg)
    return CrossEntropy(backbone, data.num_classes, cfg.section("ce").label_smoothing)
