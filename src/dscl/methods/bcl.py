"""``bcl``: Balanced Contrastive Learning (Zhu et al., CVPR 2022), trained in one stage.

The backbone feeds a linear classifier, a contrastive head and (through a prototype head) the
class prototypes made from the classifier's weights; the loss is
``ce_weight · L_ce(logits + τ_la·log π) + scl_weight · L_bcl`` (docs/DESIGN.md §2.14,
:class:`~dscl.losses.BCLLoss`). The classifier is the method's own: ``classifier.mode=auto``
keeps it (stage 2 trains nothing), as the authors evaluate it.

The two views are the feed's query and key views (this project's stage-1 augmentation); the
classification logits are those of the query view. The authors use a third view with
RandAugment for the logits (docs/DESIGN.md §2.14 lists this difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dscl.errors import ConfigError
from dscl.losses import BCLLoss
from dscl.methods.base import VIEWS, Method, StepOutput, method_backbone
from dscl.methods.registry import register_method
from dscl.models import Classifier, ProjectionHead


@dataclass
class BCLSettings:
    """Section ``bcl`` (defaults: the authors' ``main.py``)."""

    temperature: float = 0.07  # τ of the balanced contrastive loss (--temp)
    logit_adjust_tau: float = 1.0  # τ_la of the logit-compensated cross-entropy
    ce_weight: float = 1.0  # weight of the cross-entropy term (their --alpha)
    scl_weight: float = 0.35  # weight of the contrastive term (their --beta)

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be positive, got {self.temperature}")
        for key in ("logit_adjust_tau", "ce_weight", "scl_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must not be negative, got {getattr(self, key)}")


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

    def forward(self, view1: torch.Tensor, view2: torch.Tensor):
        """Logits of ``view1`` (B, C), the two views' embeddings (B, D) each and the class
        prototypes normalize(h(W)) (C, D), W the classifier's (C, C_f) weights."""
        batch = view1.shape[0]
        features = self.classifier.features(torch.cat([view1, view2]))  # (2B, C_f)
        logits = self.classifier.fc(features[:batch])  # (B, C)
        z = F.normalize(self.head(features), dim=1)  # (2B, D)
        prototypes = F.normalize(self.prototype_head(self.classifier.fc.fc.weight), dim=1)
        return logits, z[:batch], z[batch:], prototypes


class BalancedContrastive(Method):
    """BCL: one stage, the classifier trained jointly with the balanced contrastive loss."""

    feed_kind = VIEWS
    uses_patches = False

    def __init__(self, model: BCLModel, loss: BCLLoss) -> None:
        super().__init__(model)
        self.loss = loss

    def step(self, batch) -> StepOutput:
        x = batch.inputs
        logits, view1, view2, prototypes = self.net(x["query"], x["key"])
        terms = self.loss(logits.float(), view1, view2, batch.labels, prototypes)
        return StepOutput(
            terms.loss, {"loss_ce": terms.ce.detach(), "loss_bcl": terms.scl.detach()}
        )

    def backbone(self) -> nn.Module:
        return self.model.classifier.backbone

    def classifier(self) -> nn.Module:
        return self.model.classifier


@register_method("bcl", settings=BCLSettings, classifier="keep")
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
    return BalancedContrastive(model, loss)
