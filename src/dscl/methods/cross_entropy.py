"""``ce``: the cross-entropy baseline of stage 1 (backbone + linear layer on one augmented view)."""

from __future__ import annotations

import torch.nn.functional as F

from dscl.methods.base import CLASSIFY, Method, StepOutput
from dscl.methods.registry import register_method
from dscl.models import Classifier, build_backbone


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


@register_method("ce")
def build_cross_entropy(cfg, num_classes: int) -> CrossEntropy:
    backbone = build_backbone(cfg.model.backbone, pretrained=cfg.model.pretrained)
    return CrossEntropy(backbone, num_classes, cfg.pretrain.label_smoothing)
