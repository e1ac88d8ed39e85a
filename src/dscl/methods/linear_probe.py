"""Stage 2: a linear classifier trained on a frozen backbone (class-balanced feed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dscl.methods.base import CLASSIFY, Method, StepOutput
from dscl.methods.registry import ClassifierSpec
from dscl.models import Classifier


class LinearProbe(Method):
    """A classifier's head trained with cross-entropy on a frozen backbone: a new linear layer
    (a :class:`~dscl.models.Classifier`), or the head of a method's own kind of classifier.

    The backbone's weights never change. Its batch-norm statistics are re-estimated on the
    training stream with ``bn_mode="train"`` (as the authors' code does) and kept with ``"eval"``.

    Args:
        backbone: the stage-1 backbone (its parameters are frozen here).
        num_classes: number of classes.
        bn_mode: ``"train"`` or ``"eval"``, the backbone's batch-norm mode while training.
        own: the method's own classifier (its MethodSpec's) to build instead of a
            :class:`~dscl.models.Classifier`; only its head (``own.head``) is trained.
    """

    feed_kind = CLASSIFY

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        bn_mode: str = "train",
        own: ClassifierSpec | None = None,
    ) -> None:
        build, self.head_name = (Classifier, "fc") if own is None else (own.build, own.head)
        super().__init__(build(backbone, num_classes))
        self.bn_mode = bn_mode
        self.model.requires_grad_(False)
        self.head().requires_grad_(True)

    def head(self) -> nn.Module:
        """The trained module: the features' classifier layer."""
        return getattr(self.model, self.head_name)

    def wrap(self, wrapper) -> None:
        self.net = wrapper(self.head())  # only the head has gradients to synchronise

    def train(self) -> None:
        self.head().train()
        self.model.backbone.train(self.bn_mode == "train")

    def step(self, batch) -> StepOutput:
        with torch.no_grad():  # frozen: BN statistics may still update in train mode
            features = self.model.features(batch.inputs["image"])  # (B, C)
        logits = self.net(features.float())  # (B, classes)
        return StepOutput(F.cross_entropy(logits.float(), batch.labels))
