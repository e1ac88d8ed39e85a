"""Contrastive stage 1: ``supcon`` and ``dscl``, each with an optional PBSD term (``+pbsd``).

L = L_con + λ·L_pbsd (docs/DESIGN.md §2), where L_con is :class:`~dscl.losses.DSCLLoss` or
:class:`~dscl.losses.SupConLoss` over the queries and keys gathered from every process. After the
optimizer step the momentum encoder follows by EMA and the gathered keys enter the queue, so the
queue never holds the keys of the batch being scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dscl import dist
from dscl.errors import ConfigError
from dscl.losses import DSCLLoss, PBSDLoss, SupConLoss
from dscl.methods.base import VIEWS, StepOutput, method_backbone
from dscl.methods.momentum import MOMENTUM_KEYS, MomentumMethod
from dscl.methods.registry import register_method, register_settings
from dscl.models import ContrastiveModel


@dataclass
class DSCLSettings:
    """Section ``dscl``: the decoupling of DSCL (docs/DESIGN.md §2.6)."""

    beta: float = 8.0  # weight of the same-class positives (the paper's alpha = 1 / (1 + beta))

    def check(self) -> None:
        if self.beta < 0:
            raise ConfigError(f"beta: must not be negative, got {self.beta}")


@dataclass
class PBSDSettings:
    """Section ``pbsd``: patch-based self distillation (docs/DESIGN.md §2.8)."""

    weight: float = 1.5  # lambda, the weight of the PBSD term

    def check(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must not be negative, got {self.weight}")


register_settings("dscl", DSCLSettings)
register_settings("pbsd", PBSDSettings)


class Contrastive(MomentumMethod):
    """Query encoder, momentum encoder and queue trained with a contrastive loss (+ PBSD).

    Each process computes the contrastive loss over the whole gathered batch; gathered queries
    carry gradient back to their own process (summed over processes), and DDP's averaging of
    parameter gradients then gives exactly the one-process gradient. PBSD is per sample and stays
    local.

    Args:
        model: the :class:`~dscl.models.ContrastiveModel`.
        contrast: the contrastive loss (``DSCLLoss`` or ``SupConLoss``).
        pbsd: the PBSD loss, or None for a method without it.
        pbsd_weight: λ, the weight of the PBSD term.
        encoder_momentum: m of the key encoder's EMA, θ_m ← m·θ_m + (1 − m)·θ_q.
    """

    feed_kind = VIEWS

    def __init__(
        self,
        model: ContrastiveModel,
        contrast: nn.Module,
        pbsd: nn.Module | None,
        pbsd_weight: float,
        encoder_momentum: float,
    ) -> None:
        super().__init__(model, encoder_momentum)
        self.contrast, self.pbsd = contrast, pbsd
        if pbsd is None:  # the patches feed PBSD alone
            self.views = ("query", "key")
        self.pbsd_weight = pbsd_weight

    def step(self, batch) -> StepOutput:
        # B batch, W processes, D dim, K queue, L patches
        x = batch.inputs
        with_patches = self.pbsd is not None
        out = self.net(
            x["query"],
            x["key"],
            x["patches"] if with_patches else None,
            x["boxes"] if with_patches else None,
        )
        queue = self.model.queue
        q_all = dist.all_gather_with_grad(out.query)  # (B·W, D)
        k_all = dist.all_gather(out.key)  # (B·W, D)
        y_all = dist.all_gather(batch.labels)  # (B·W,)
        con = self.contrast(q_all, k_all, y_all, queue.features, queue.labels, queue.valid)
        logs = {"loss_con": con.detach()}
        loss = con
        if with_patches:
            pbsd = self.pbsd(out.teacher, out.student, out.key, queue.features, queue.valid)
            logs["loss_pbsd"] = pbsd.detach()
            loss = loss + self.pbsd_weight * pbsd
        self.hold_keys(k_all, y_all)
        return StepOutput(loss, logs)

    def backbone(self) -> nn.Module:
        return self.model.query_encoder.backbone


def _builder(decoupled: bool, with_pbsd: bool):
    def build(cfg, data) -> Contrastive:
        p = cfg.pretrain
        backbone = method_backbone(cfg)
        model = ContrastiveModel(backbone, embed_dim=cfg.model.embed_dim, queue_size=p.queue_size)
        if decoupled:
            contrast = DSCLLoss(p.temperature, cfg.section("dscl").beta)
        else:
            contrast = SupConLoss(p.temperature)
        pbsd = PBSDLoss(p.temperature) if with_pbsd else None
        weight = cfg.section("pbsd").weight if with_pbsd else 0.0
        return Contrastive(model, contrast, pbsd, weight, p.encoder_momentum)

    return build


for _name, _decoupled, _with_pbsd in (
    ("supcon", False, False),
    ("dscl", True, False),
    ("supcon+pbsd", False, True),
    ("dscl+pbsd", True, True),
):
    _uses = (("dscl",) if _decoupled else ()) + (("pbsd",) if _with_pbsd else ())
    register_method(_name, sections=_uses, checkpoint_keys=MOMENTUM_KEYS, order=1)(
        _builder(_decoupled, _with_pbsd)
    )
