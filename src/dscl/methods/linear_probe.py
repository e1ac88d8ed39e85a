"""Stage 2: a linear classifier trained on a frozen backbone (class-balanced feed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dscl.methods.base import CLASSIFY, Method, StepOutput
from dscl.models import Classifier


class LinearProbe(Method):
    """A new linear layer on a frozen backbone, trained with cross-entropy.

    The backbone's weights never change. Its batch-norm statistics are re-estimated on the
    training stream with ``bn_mode="train"`` (as the authors' code does) and kept with ``"eval"``.

    Args:
        backbone: the stage-1 backbone (its parameters are frozen here).
        num_classes: number of classes.
        bn_mode: ``"train"`` or ``"eval"``, the backbone's batch-norm mode while training.
    """

    feed_kind = CLASSIFY

    def __init__(self, backbone: nn.Module, num_classes: int, bn_mode: str = "train") -> None:
        super().__init__(Classifier(backbone, num_classes))
        self.bn_mode = bn_mode
        for param in self.model.backbone.parameters():
            param.requires_grad_(False)

    def wrap(self, wrapper) -> None:
        self.net = wrapper(self.model.fc)  # only the head has gradients to synchronise

    def train(self) -> None:
        self.model.fc.train()
        self.model.backbone.train(self.bn_mode == "train")

    def step(self, batch) -> StepOutput:
        with torch.no_grad():  # frozen: BN statistics may still update in train mode
            features = self.model.features(batch.inputs["image"])  # (B, C)
        logits = self.net(features.float())  # (B, classes)
        return StepOutput(F.cross_entropy(logits.float(), batch.labels))
