"""``bcl``: Balanced Contrastive Learning (Zhu et al., CVPR 2022), trained in one stage.

The backbone feeds a linear classifier, a contrastive head and (through a prototype head) the
class prototypes made from the classifier's weights; the loss is
``ce_weight · L_ce(logits + τ_la·log π) + scl_weight · L_bcl`` (docs/DESIGN.md §2.14,
:class:`~dscl.losses.BCLLoss`). The classifier is the method's own: ``classifier.mode=auto``
keeps it (stage 2 trains nothing), as the authors evaluate it.

Views (``bcl.augment``): ``authors`` (the default) asks the feed for the authors' three views
(their ``main.py``, ``--cl_views sim-sim``): a RandAugment view whose logits train the
classifier and two SimCLR views for the contrastive loss, all three through the backbone in one
batch as theirs; ``stage1`` uses this project's query and key views for the contrastive loss and
the query's logits for the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dscl.data.named_views import ViewSpec, randaugment_view
from dscl.errors import ConfigError
from dscl.losses import BCLLoss
from dscl.methods.base import (
    BEFORE_OWN_VIEWS,
    VIEWS,
    Method,
    StepOutput,
    check_augment,
    method_backbone,
)
from dscl.methods.registry import register_method
from dscl.models import Classifier, ProjectionHead

# SimCLR's views as BCL's authors use them (``augmentation_sim``): jitter (0.4, 0.4, 0.4, 0.1)
# with p 0.8, grayscale p 0.2, no blur.
SIMCLR_VIEW = ViewSpec(hue=0.1, p_jitter=0.8, p_gray=0.2)


@dataclass
class BCLSettings:
    """Section ``bcl`` (defaults: the authors' ``main.py``)."""

    temperature: float = 0.07  # τ of the balanced contrastive loss (--temp)
    logit_adjust_tau: float = 1.0  # τ_la of the logit-compensated cross-entropy
    ce_weight: float = 1.0  # weight of the cross-entropy term (their --alpha)
    scl_weight: float = 0.35  # weight of the contrastive term (their --beta)
    # "authors": RandAugment view for the logits + two SimCLR views; "stage1": query and key
    augment: str = "authors"
    randaugment_ops: int = 2  # RandAugment's number of ops (their --randaug_n)
    randaugment_magnitude: int = 10  # RandAugment's magnitude (their --randaug_m)

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be positive, got {self.temperature}")
        for key in ("logit_adjust_tau", "ce_weight", "scl_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must not be negative, got {getattr(self, key)}")
        check_augment(self)


class BCLModel(nn.Module):
    """Classifier (backbone + linear layer), contrastive head g and prototype head h.

    Args:
        backbone: the backbone (``out_channels`` C_f).
        num_classes: C.
        embed_dim: D of the contrastive embeddings and prototypes.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.classifier = Classifier(backbone, num_classes)
        self.head = ProjectionHead(backbone.out_channels, embed_dim)
        self.prototype_head = ProjectionHead(backbone.out_channels, embed_dim)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, class_view=None):
        """Logits (B, C) of ``class_view`` (of ``view1`` when None), the two views' embeddings
        (B, D) each and the class prototypes normalize(h(W)) (C, D), W the classifier's (C, C_f)
        weights. The views go through the backbone as one batch."""
        batch = view1.shape[0]
        views = [view1, view2] if class_view is None else [class_view, view1, view2]
        features = self.classifier.features(torch.cat(views))  # (2B or 3B, C_f)
        logits = self.classifier.fc(features[:batch])  # (B, C)
        features = features[-2 * batch :]  # (2B, C_f): the contrastive views
        z = F.normalize(self.head(features), dim=1)  # (2B, D)
        prototypes = F.normalize(self.prototype_head(self.classifier.fc.fc.weight), dim=1)
        return logits, z[:batch], z[batch:], prototypes


class BalancedContrastive(Method):
    """BCL: one stage, the classifier trained jointly with the balanced contrastive loss."""

    feed_kind = VIEWS
    views = ("query", "key")

    def __init__(
        self, model: BCLModel, loss: BCLLoss, augment: str = "stage1", randaugment=(2, 10)
    ):
        super().__init__(model)
        self.loss = loss
        self.names = ("query", "key", None)
        if augment == "authors":  # the feed makes these three views and no standard one
            self.views = ()
            self.extra_views = {
                "bcl_class": randaugment_view(*randaugment),
                "bcl_view1": SIMCLR_VIEW,
                "bcl_view2": SIMCLR_VIEW,
            }
            self.names = ("bcl_view1", "bcl_view2", "bcl_class")

    def step(self, batch) -> StepOutput:
        x = batch.inputs
        first, second, cls = self.names
        logits, view1, view2, prototypes = self.net(
            x[first], x[second], x[cls] if cls is not None else None
        )
        terms = self.loss(logits.float(), view1, view2, batch.labels, prototypes)
        return StepOutput(
            terms.loss, {"loss_ce": terms.ce.detach(), "loss_bcl": terms.scl.detach()}
        )

    def backbone(self) -> nn.Module:
        return self.model.classifier.backbone

    def classifier(self) -> nn.Module:
        return self.model.classifier


@register_method(
    "bcl",
    settings=BCLSettings,
    classifier="keep",
    added=BEFORE_OWN_VIEWS,
    checkpoint_keys=("model.embed_dim",),  # its two projection heads
    order=2,
)
def build_bcl(cfg, data) -> BalancedContrastive:
    s = cfg.section("bcl")
    backbone = method_backbone(cfg)
    model = BCLModel(backbone, data.num_classes, cfg.model.embed_dim)
    loss = BCLLoss(
        data.counts("bcl"),
        temperature=s.temperature,
        tau=s.logit_adjust_tau,
        ce_weight=s.ce_weight,
        scl_weight=s.scl_weight,
    )
    return BalancedContrastive(model, loss, s.augment, (s.randaugment_ops, s.randaugment_magnitude))
