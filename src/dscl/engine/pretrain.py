"""Stage 1: representation learning.

Contrastive methods (``supcon``, ``dscl``, optionally ``+pbsd``) train the query encoder with
L = L_con + λ·L_pbsd (DESIGN.md §2) while the momentum encoder follows by EMA and the queue is fed
with every rank's keys after the losses. The ``ce`` baseline trains backbone + linear layer with
cross-entropy on the same schedule. Schedules are precomputed arrays indexed by the global step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dscl import dist
from dscl.checkpoint import (
    check_kind,
    check_matches,
    git_commit,
    load_checkpoint,
    save_checkpoint,
)
from dscl.config import RunConfig, config_to_dict
from dscl.engine import runtime
from dscl.engine.feed import CLASSIFY, VIEWS, TrainFeed
from dscl.losses import DSCLLoss, PBSDLoss, SupConLoss
from dscl.models import Classifier, ContrastiveModel, build_backbone

PRETRAIN_CHECKPOINT = "pretrain.pt"


@dataclass
class StageContext:
    """Where and how a stage runs, decided once by the command line."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    amp: torch.dtype | None
    splits: object  # dscl.data.DataSplits
    view_cfg: object  # dscl.data.views.ViewConfig
    logger: runtime.RunLogger


def build_stage1_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    backbone = build_backbone(cfg.model.backbone, pretrained=cfg.model.pretrained)
    if cfg.method == "ce":
        return Classifier(backbone, num_classes)
    return ContrastiveModel(
        backbone, embed_dim=cfg.model.embed_dim, queue_size=cfg.pretrain.queue_size
    )


def stage1_backbone(model: nn.Module) -> nn.Module:
    """The backbone that stage 2 keeps: the query encoder's (or the ce model's)."""
    return model.backbone if isinstance(model, Classifier) else model.query_encoder.backbone


class ContrastiveObjective:
    """L = L_con + λ·L_pbsd over gathered queries/keys (identical on every rank).

    Each rank computes the contrastive loss over the whole gathered batch; gathered queries carry
    gradient back to their own rank (summed over ranks), and DDP's averaging of parameter gradients
    then yields exactly the one-process gradient. PBSD is per sample and stays local.
    """

    def __init__(self, cfg: RunConfig) -> None:
        p = cfg.pretrain
        decoupled = cfg.method.startswith("dscl")
        self.contrast = DSCLLoss(p.temperature, p.beta) if decoupled else SupConLoss(p.temperature)
        self.pbsd = PBSDLoss(p.temperature) if cfg.method.endswith("+pbsd") else None
        self.pbsd_weight = p.pbsd_weight

    def __call__(self, out, labels: torch.Tensor, queue) -> tuple[torch.Tensor, dict]:
        q_all = dist.all_gather_with_grad(out.query)  # (B·W, D)
        k_all = dist.all_gather(out.key)  # (B·W, D)
        y_all = dist.all_gather(labels)  # (B·W,)
        con = self.contrast(q_all, k_all, y_all, queue.features, queue.labels, queue.valid)
        parts = {"loss_con": con.detach()}
        loss = con
        if self.pbsd is not None:
            pbsd = self.pbsd(out.teacher, out.student, out.key, queue.features, queue.valid)
            parts["loss_pbsd"] = pbsd.detach()
            loss = loss + self.pbsd_weight * pbsd
        return loss, parts | {"_keys": k_all, "_labels": y_all}


def _get(cfg: RunConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def read_resume_state(path: Path, cfg: RunConfig) -> dict | None:
    """The stage-1 checkpoint to resume from (None when there is none yet), checked against
    ``cfg`` on every setting the saved state depends on."""
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    check_kind(state, path, "pretrain")
    same = (
        "method",
        "model.backbone",
        "model.embed_dim",
        "pretrain.queue_size",
        "pretrain.epochs",
        "pretrain.batch_size",
    )
    check_matches(state, path, {key: _get(cfg, key) for key in same})
    return state


def pretrain(ctx: StageContext, resume_state: dict | None = None) -> Path:
    """Run stage 1 (from ``resume_state``, see :func:`read_resume_state`, when given) and return
    the path of its checkpoint."""
    cfg, p, device = ctx.cfg, ctx.cfg.pretrain, ctx.device
    world = dist.get_world_size()
    if p.batch_size % world:
        raise ValueError(f"pretrain.batch_size: {p.batch_size} is not divisible by {world} ranks")
    contrastive = cfg.method != "ce"
    feed = TrainFeed(
        ctx.splits.train,
        kind=VIEWS if contrastive else CLASSIFY,
        view_cfg=ctx.view_cfg,
        batch_size=p.batch_size // world,
        balanced=False,
        seed=cfg.seed,
        device=device,
        num_workers=cfg.data.num_workers,
        in_memory=cfg.data.batched_views,
    )
    model = build_stage1_model(cfg, ctx.splits.num_classes).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=p.momentum, weight_decay=p.weight_decay)
    steps = feed.steps_per_epoch
    lr_at = runtime.warmup_cosine(p.base_lr * p.batch_size / 256, p.epochs, steps, p.warmup_epochs)
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device.type, enabled=ctx.amp == torch.float16)
    ckpt_path = ctx.run_dir / PRETRAIN_CHECKPOINT
    start_epoch = 0
    if resume_state is not None:
        state = resume_state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when the run had no loss scaling
            scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1
        ctx.logger.info(f"resuming stage 1 from {ckpt_path} at epoch {start_epoch}")
    elif contrastive:
        model.init_momentum_encoder()
    wrapped = runtime.wrap_ddp(model, device)
    objective = ContrastiveObjective(cfg) if contrastive else None
    for epoch in range(start_epoch, p.epochs):
        model.train()
        t0, seen = time.perf_counter(), 0
        bar = ctx.logger.bar(feed.epoch(epoch), steps, f"stage 1 epoch {epoch + 1}/{p.epochs}")
        for i, batch in enumerate(bar):
            step = epoch * steps + i
            for group in optimizer.param_groups:
                group["lr"] = float(lr_at[step])
            inputs = {
                k: v.contiguous(memory_format=memory_format) if v.dim() == 4 else v
                for k, v in batch.inputs.items()
            }
            with runtime.autocast(device, ctx.amp):
                if contrastive:
                    out = wrapped(
                        inputs["query"],
                        inputs["key"],
                        inputs["patches"] if objective.pbsd else None,
                        inputs["boxes"] if objective.pbsd else None,
                    )
                    loss, parts = objective(out, batch.labels, model.queue)
                else:
                    logits = wrapped(inputs["image"])
                    loss = F.cross_entropy(
                        logits.float(), batch.labels, label_smoothing=p.label_smoothing
                    )
                    parts = {}
            keys, key_labels = parts.pop("_keys", None), parts.pop("_labels", None)
            values = {"loss": loss.item()} | {k: v.item() for k, v in parts.items()}
            runtime.check_finite(loss, step, values)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if contrastive:
                model.update_momentum_encoder(p.encoder_momentum)
                model.queue.enqueue(keys.detach().float(), key_labels)
            seen += batch.labels.numel() * world
            speed = seen / (time.perf_counter() - t0)
            values |= {"lr": float(lr_at[step]), "images_per_sec": speed}
            last = i == steps - 1
            if step % cfg.log_every == 0 or last:
                ctx.logger.log({"stage": "pretrain", "epoch": epoch, "step": step} | values)
            ctx.logger.postfix(i + 1, steps, values, force=step % cfg.log_every == 0 or last)
        if dist.is_main_process():
            save_checkpoint(
                {
                    "kind": "pretrain",
                    "method": cfg.method,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "backbone": stage1_backbone(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": runtime.rng_state(),
                    "config": config_to_dict(cfg),
                    "git_commit": git_commit(),
                    "finished": epoch == p.epochs - 1,
                },
                ckpt_path,
            )
        dist.barrier()
    return ckpt_path
