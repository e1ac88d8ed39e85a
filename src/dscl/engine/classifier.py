"""Stage 2: a class-balanced linear classifier on the frozen stage-1 backbone, and evaluation.

The backbone's weights never change here. Its batch-norm statistics are re-estimated on the
balanced stream in ``bn_mode="train"`` (as the authors' code does) and kept in ``"eval"``.
The best epoch is chosen on the validation split, never on the test set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
from dscl.engine.evaluate import classification_metrics, predict_logits
from dscl.engine.feed import CLASSIFY, TrainFeed, eval_batches
from dscl.engine.pretrain import StageContext
from dscl.models import Classifier, build_backbone

LAST, BEST = "last.pt", "best.pt"


def read_stage1(path: Path, cfg: RunConfig) -> dict[str, Any]:
    """Load a stage-1 checkpoint and check that it fits ``cfg`` (backbone and method)."""
    state = load_checkpoint(path, map_location="cpu")
    check_kind(state, path, "pretrain")
    check_matches(state, path, {"model.backbone": cfg.model.backbone, "method": cfg.method})
    return state


def build_classifier_from_checkpoint(path: Path, expect: dict[str, Any] | None = None):
    """Load a stage-2 checkpoint (``last.pt``/``best.pt``) into a :class:`Classifier`."""
    state = load_checkpoint(path, map_location="cpu")
    check_kind(state, path, "classifier")
    if expect:
        check_matches(state, path, expect)
    cfg = state["config"]
    model = Classifier(build_backbone(cfg["model"]["backbone"]), state["num_classes"])
    model.load_state_dict(state["model"])
    return model, state


def train_classifier(ctx: StageContext, stage1: dict[str, Any]) -> Path:
    """Train the linear classifier on the backbone of ``stage1`` (from :func:`read_stage1`);
    return the path of the best checkpoint (on validation)."""
    cfg, c, device = ctx.cfg, ctx.cfg.classifier, ctx.device
    world = dist.get_world_size()
    if c.batch_size % world:
        raise ValueError(f"classifier.batch_size: {c.batch_size} is not divisible by {world}")
    backbone = build_backbone(cfg.model.backbone)
    backbone.load_state_dict(stage1["backbone"])
    model = Classifier(backbone, ctx.splits.num_classes).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    for param in model.backbone.parameters():
        param.requires_grad_(False)
    feed = TrainFeed(
        ctx.splits.train,
        kind=CLASSIFY,
        view_cfg=ctx.view_cfg,
        batch_size=c.batch_size // world,
        balanced=c.balanced,
        seed=cfg.seed + 1,
        device=device,
        num_workers=cfg.data.num_workers,
        in_memory=cfg.data.batched_views,
    )
    val_batches = eval_batches(
        ctx.splits.val,
        ctx.view_cfg,
        batch_size=256,
        device=device,
        num_workers=cfg.data.num_workers,
        in_memory=cfg.data.batched_views,
    )
    head = runtime.wrap_ddp(model.fc, device)
    optimizer = torch.optim.SGD(
        model.fc.parameters(), lr=0.0, momentum=c.momentum, weight_decay=c.weight_decay
    )
    steps = feed.steps_per_epoch
    lr_at = runtime.multistep(
        c.base_lr * c.batch_size / 2048, c.epochs, steps, c.milestones, c.gamma
    )
    best_top1, best_path, last_path = -1.0, ctx.run_dir / BEST, ctx.run_dir / LAST
    for epoch in range(c.epochs):
        model.fc.train()
        model.backbone.train(c.bn_mode == "train")
        bar = ctx.logger.bar(feed.epoch(epoch), steps, f"stage 2 epoch {epoch + 1}/{c.epochs}")
        for i, batch in enumerate(bar):
            step = epoch * steps + i
            for group in optimizer.param_groups:
                group["lr"] = float(lr_at[step])
            images = batch.inputs["image"].contiguous(memory_format=memory_format)
            with runtime.autocast(device, ctx.amp):
                with torch.no_grad():  # frozen: BN statistics may still update in train mode
                    features = model.features(images)  # (B, C)
                logits = head(features.float())
            loss = F.cross_entropy(logits.float(), batch.labels)
            runtime.check_finite(loss, step, {"loss": loss.item()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            values = {"loss": loss.item(), "lr": float(lr_at[step])}
            last = i == steps - 1
            if step % cfg.log_every == 0 or last:
                ctx.logger.log({"stage": "classifier", "epoch": epoch, "step": step} | values)
            ctx.logger.postfix(i + 1, steps, values, force=step % cfg.log_every == 0 or last)
        final = epoch == c.epochs - 1
        if (epoch + 1) % c.eval_every and not final:
            continue
        metrics = evaluate_model(ctx, model, val_batches)
        val = {f"val_{k}": metrics[k] for k in ("top1", "top5", "many", "medium", "few")}
        ctx.logger.log({"stage": "classifier", "epoch": epoch, "step": step} | val)
        ctx.logger.info(f"stage 2 epoch {epoch + 1}: validation top-1 {metrics['top1']:.2f}")
        if dist.is_main_process():
            state = classifier_state(ctx, model, epoch, metrics)
            save_checkpoint(state, last_path)
            if metrics["top1"] > best_top1:
                best_top1 = metrics["top1"]
                save_checkpoint(state, best_path)
        dist.barrier()
    return best_path


def classifier_state(ctx: StageContext, model: Classifier, epoch: int, val: dict) -> dict:
    return {
        "kind": "classifier",
        "method": ctx.cfg.method,
        "epoch": epoch,
        "num_classes": ctx.splits.num_classes,
        "class_names": list(ctx.splits.class_names),
        "model": model.state_dict(),
        "val_top1": val["top1"],
        "config": config_to_dict(ctx.cfg),
        "git_commit": git_commit(),
    }


def evaluate_model(ctx: StageContext, model: nn.Module, batches) -> dict[str, Any]:
    """Metrics of ``model`` over ``batches`` against the training class counts."""
    d = ctx.cfg.data
    logits, targets = predict_logits(model, batches, ctx.device, amp_dtype=ctx.amp)
    return classification_metrics(
        logits,
        targets,
        ctx.splits.class_counts,
        many_threshold=d.many_threshold,
        few_threshold=d.few_threshold,
    )


def read_classifier(path: Path, cfg: RunConfig) -> tuple[Classifier, dict[str, Any]]:
    """Load a stage-2 checkpoint and check that it fits ``cfg`` (backbone and method)."""
    expect = {"model.backbone": cfg.model.backbone, "method": cfg.method}
    return build_classifier_from_checkpoint(path, expect)


def evaluate_checkpoint(
    ctx: StageContext, path: Path, split: str = "test", loaded=None
) -> dict[str, Any]:
    """Evaluate a stage-2 checkpoint on ``split`` and write ``metrics.json`` (rank 0).

    ``loaded`` is what :func:`read_classifier` returned for ``path``, if it was read already.
    """
    cfg = ctx.cfg
    model, state = loaded if loaded is not None else read_classifier(path, cfg)
    if state["num_classes"] != ctx.splits.num_classes:
        raise ValueError(
            f"{path}: checkpoint has {state['num_classes']} classes, the data has "
            f"{ctx.splits.num_classes}"
        )
    model = model.to(ctx.device)
    dataset = {"test": ctx.splits.test, "val": ctx.splits.val}[split]
    batches = eval_batches(
        dataset,
        ctx.view_cfg,
        batch_size=256,
        device=ctx.device,
        num_workers=cfg.data.num_workers,
        in_memory=cfg.data.batched_views,
    )
    metrics = evaluate_model(ctx, model, batches)
    metrics |= {
        "split": split,
        "epoch": state["epoch"],
        "method": cfg.method,
        "checkpoint": str(path),
        "class_names": list(ctx.splits.class_names),
    }
    if dist.is_main_process():
        write_json(ctx.run_dir / "metrics.json", metrics)
    return metrics


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
