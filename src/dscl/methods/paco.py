"""``paco``: Parametric Contrastive Learning (Cui et al., ICCV 2021), trained in one stage.

A MoCo set-up (query encoder, momentum key encoder, labelled queue: the same
:class:`~dscl.models.ContrastiveModel` as the contrastive methods) plus a linear classifier on
the query's pooled backbone features whose weights are the learnable class centres: the
classifier's logits enter the contrast set of :class:`~dscl.losses.PaCoLoss`
(docs/DESIGN.md §2.15). ``classifier.mode=auto`` keeps that classifier, as the authors
evaluate it.

Views (``paco.augment``): ``authors`` (the default) asks the feed for the authors' two views
(their ImageNet-LT ``paco_lt.py``): a RandAugment query and a MoCo v2 key; ``stage1`` uses this
project's query and key views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dscl import dist
from dscl.data.named_views import ViewSpec, randaugment_view
from dscl.errors import ConfigError
from dscl.losses import PaCoLoss
from dscl.methods.base import (
    BEFORE_OWN_VIEWS,
    VIEWS,
    StepOutput,
    check_augment,
    method_backbone,
)
from dscl.methods.momentum import MOMENTUM_KEYS, MomentumMethod
from dscl.methods.registry import register_method
from dscl.models import Classifier, ContrastiveModel

# MoCo v2's views as PaCo's authors use them for the key: jitter (0.4, 0.4, 0.4, 0) always,
# grayscale p 0.2, blur p 0.5.
MOCO_VIEW = ViewSpec(hue=0.0, p_jitter=1.0, p_gray=0.2, p_blur=0.5)


@dataclass
class PaCoSettings:
    """Section ``paco`` (defaults: the authors' ImageNet-LT ResNet-50 script)."""

    temperature: float = 0.2  # τ of the contrast samples (their CIFAR scripts: 0.05)
    alpha: float = 0.05  # weight of each contrastive positive (their CIFAR scripts: 0.01)
    beta: float = 1.0  # weight of the own-class centre
    gamma: float = 1.0  # weight of the contrast samples in the denominator
    balanced: bool = True  # add log π to the centre logits (their LT loss); false: plain PaCo
    augment: str = "authors"  # "authors": RandAugment query, MoCo v2 key; "stage1": query, key
    randaugment_ops: int = 2  # RandAugment's number of ops (theirs: rand-n2-m10)
    randaugment_magnitude: int = 10  # RandAugment's magnitude

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be positive, got {self.temperature}")
        if self.gamma <= 0:
            raise ConfigError(f"gamma: must be positive, got {self.gamma}")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta <= 0:
            raise ConfigError(
                f"alpha, beta: need alpha >= 0, beta >= 0 and alpha + beta > 0, got "
                f"{self.alpha}, {self.beta}"
            )
        check_augment(self)


class PaCoModel(nn.Module):
    """The MoCo model and a classifier sharing the query backbone."""

    def __init__(self, backbone: nn.Module, num_classes: int, embed_dim: int, queue_size: int):
        super().__init__()
        self.contrastive = ContrastiveModel(backbone, embed_dim=embed_dim, queue_size=queue_size)
        self.classifier = Classifier(self.contrastive.query_encoder.backbone, num_classes)

    def forward(self, query_view: torch.Tensor, key_view: torch.Tensor):
        """q (B, D), k (B, D) without gradient, and the classifier's logits of the query."""
        encoder = self.contrastive.query_encoder
        pooled = encoder.feature_map(query_view).mean(dim=(2, 3))  # (B, C_f)
        query = encoder.embed_pooled(pooled)
        key = self.contrastive.encode_keys(key_view)
        return query, key, self.classifier.fc(pooled)


class ParametricContrastive(MomentumMethod):
    """PaCo: queries against keys, queue and class centres; the centres are the classifier."""

    feed_kind = VIEWS
    views = ("query", "key")

    def __init__(
        self,
        model: PaCoModel,
        loss: PaCoLoss,
        encoder_momentum: float,
        augment: str = "stage1",
        randaugment=(2, 10),
    ) -> None:
        super().__init__(model, encoder_momentum)
        self.loss = loss
        self.names = ("query", "key")
        if augment == "authors":  # the feed makes these two views and no standard one
            self.views = ()
            self.extra_views = {
                "paco_query": randaugment_view(*randaugment),
                "paco_key": MOCO_VIEW,
            }
            self.names = ("paco_query", "paco_key")

    def step(self, batch) -> StepOutput:
        x = batch.inputs
        query, key, logits = self.net(x[self.names[0]], x[self.names[1]])
        queue = self.model.contrastive.queue
        loss = self.loss(
            query, key, batch.labels, queue.features, queue.labels, logits.float(), queue.valid
        )
        # the queue takes every process's keys; the loss stays per process, as the authors'
        self.hold_keys(dist.all_gather(key), dist.all_gather(batch.labels))
        return StepOutput(loss)

    def momentum_model(self) -> nn.Module:
        return self.model.contrastive

    def backbone(self) -> nn.Module:
        return self.model.classifier.backbone

    def classifier(self) -> nn.Module:
        return self.model.classifier


@register_method(
    "paco",
    settings=PaCoSettings,
    classifier="keep",
    added=BEFORE_OWN_VIEWS,
    checkpoint_keys=MOMENTUM_KEYS,
    order=3,
)
def build_paco(cfg, data) -> ParametricContrastive:
    s, p = cfg.section("paco"), cfg.pretrain
    backbone = method_backbone(cfg)
    model = PaCoModel(backbone, data.num_classes, cfg.model.embed_dim, p.queue_size)
    counts = data.counts("paco") if s.balanced else None
    loss = PaCoLoss(counts, temperature=s.temperature, alpha=s.alpha, beta=s.beta, gamma=s.gamma)
    return ParametricContrastive(
        model, loss, p.encoder_momentum, s.augment, (s.randaugment_ops, s.randaugment_magnitude)
    )
