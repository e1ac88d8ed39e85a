"""Stage 2: a class-balanced linear classifier on the frozen stage-1 backbone, and evaluation.

The step is :class:`dscl.methods.LinearProbe` run by the shared loop (``classifier.mode``: a new
linear layer, or the method's own one retrained, or kept as stage 1 left it). The best epoch is
chosen on the validation split, never on the test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dscl import dist, runfiles
from dscl.checkpoint import read_classifier, save_checkpoint
from dscl.config import config_to_dict
from dscl.engine import runtime
from dscl.engine.context import StageContext, memory_format
from dscl.engine.evaluate import predict_logits
from dscl.engine.stage import StageParts, StagePlan, train_stage
from dscl.errors import CheckpointError
from dscl.methods import LinearProbe, method_spec, stage2_classifier
from dscl.models import build_backbone
from dscl.plugins import file_digests
from dscl.runfiles import git_commit, write_json


def start_from_stage1_rng(stage1: dict[str, Any], device: torch.device) -> None:
    """Continue from the RNG state stage 1 ended with: a no-op right after stage 1 in the same
    process, and what makes stage 2 of a run resumed between the stages (or ``dscl classify``
    on the same checkpoint) identical to an uninterrupted ``dscl run``."""
    ranks = stage1.get("ranks")
    if ranks is not None and len(ranks) == dist.get_world_size():
        runtime.set_rng_state(ranks[dist.get_rank()]["rng"], device)
    elif "rng" in stage1:
        runtime.set_rng_state(stage1["rng"], device)


def train_classifier(
    ctx: StageContext, stage1: dict[str, Any], resume_state: dict[str, Any] | None = None
) -> Path:
    """Train the linear classifier on the backbone of ``stage1`` (from
    :func:`dscl.checkpoint.read_stage1`), from ``resume_state`` (an unfinished ``last.pt``) when
    given; return the path of the best checkpoint (on validation)."""
    cfg, c, device = ctx.cfg, ctx.cfg.classifier, ctx.device
    mode = cfg.stage2_mode()
    if mode == "keep":
        return keep_classifier(ctx, stage1)
    if resume_state is None:
        start_from_stage1_rng(stage1, device)
    backbone = build_backbone(cfg.model.backbone)
    backbone.load_state_dict(stage1["backbone"])
    own = method_spec(cfg.method).classifier if mode == "retrain" else None
    probe = LinearProbe(backbone, ctx.splits.num_classes, c.bn_mode, own)
    if own is not None:  # cRT: the head of the method's own classifier, retrained class-balanced
        probe.head().load_state_dict(own.head_state(_own_classifier_state(stage1)))
    probe.to(device, memory_format(cfg))
    feed = ctx.train_feed(
        probe.feed_kind, c.batch_size, "classifier.batch_size", c.balanced, cfg.seed + 1
    )
    val_batches = ctx.eval_batches(ctx.splits.val)
    steps = feed.steps_per_epoch
    lr_at = runtime.multistep(
        c.base_lr * c.batch_size / 2048, c.epochs, steps, c.milestones, c.gamma
    )
    opt = ctx.optimization(probe, lr_at, c.momentum, c.weight_decay)
    best_path, last_path = ctx.run_dir / runfiles.BEST, ctx.run_dir / runfiles.LAST
    best = {"top1": resume_state["best_top1"] if resume_state is not None else -1.0}

    def validate(epoch: int) -> dict | None:
        """Validation metrics at evaluation epochs; best.pt when they are the best so far."""
        if (epoch + 1) % c.eval_every and epoch != c.epochs - 1:
            return None
        metrics = evaluate_model(ctx, probe.model, val_batches)
        log_validation(ctx, metrics, epoch, (epoch + 1) * steps - 1)
        ctx.logger.info(f"stage 2 epoch {epoch + 1}: validation top-1 {metrics['top1']:.2f}")
        if metrics["top1"] > best["top1"]:
            best["top1"] = metrics["top1"]
            if dist.is_main_process():
                save_checkpoint(classifier_state(ctx, probe.model, epoch, metrics), best_path)
        return metrics

    def state(epoch: int, val: dict | None) -> dict:
        return classifier_state(ctx, probe.model, epoch, val) | {"best_top1": best["top1"]}

    plan = StagePlan(
        label="stage 2",
        epochs=c.epochs,
        checkpoint=last_path,
        save_every_steps=c.save_every_steps,
        make_state=state,
        end_of_epoch=validate,
    )
    train_stage(ctx, StageParts(probe, feed, opt), plan, resume_state)
    return best_path


def log_validation(ctx: StageContext, metrics: dict, epoch: int, step: int, **extra) -> None:
    """The stage-2 validation record of the training log."""
    val = {f"val_{k}": metrics[k] for k in ("top1", "top5", "many", "medium", "few")}
    ctx.logger.log({"stage": "classifier", "epoch": epoch, "step": step, **extra} | val)


def _own_classifier_state(stage1: dict[str, Any]) -> dict:
    own = stage1.get("classifier")
    if own is None:
        raise CheckpointError(
            f"stage-1 checkpoint of method {stage1.get('method')} holds no classifier of its "
            "own (classifier.mode keep/retrain need one; it was trained by an older dscl?)"
        )
    return own


def keep_classifier(ctx: StageContext, stage1: dict[str, Any]) -> Path:
    """``classifier.mode=keep``: the method's own classifier as stage 1 left it becomes
    ``best.pt`` (its validation metrics logged); nothing is trained."""
    cfg = ctx.cfg
    build = stage2_classifier(cfg.method, "keep")
    model = build(build_backbone(cfg.model.backbone), ctx.splits.num_classes)
    model.load_state_dict(_own_classifier_state(stage1))
    model.to(ctx.device, memory_format=memory_format(cfg))
    metrics = evaluate_model(ctx, model, ctx.eval_batches(ctx.splits.val))
    epoch = cfg.pretrain.epochs - 1
    log_validation(ctx, metrics, epoch, 0, mode="keep")
    ctx.logger.info(
        f"stage 2: classifier.mode=keep, the method's own classifier (validation top-1 "
        f"{metrics['top1']:.2f}); nothing to train"
    )
    best_path = ctx.run_dir / runfiles.BEST
    if dist.is_main_process():
        save_checkpoint(classifier_state(ctx, model, epoch, metrics), best_path)
    return best_path


def classifier_state(ctx: StageContext, model: nn.Module, epoch: int, val: dict | None) -> dict:
    return {
        "kind": "classifier",
        "method": ctx.cfg.method,
        "epoch": epoch,
        "num_classes": ctx.splits.num_classes,
        "class_names": list(ctx.splits.class_names),
        "model": model.state_dict(),
        "classifier_mode": ctx.cfg.stage2_mode(),
        "val_top1": val["top1"] if val is not None else None,
        "config": config_to_dict(ctx.cfg),
        "git_commit": git_commit(),
        "plugin_sha256": file_digests(ctx.cfg.plugins),
    }


def evaluate_model(ctx: StageContext, model: nn.Module, batches) -> dict[str, Any]:
    """Metrics of ``model`` over ``batches`` against the training class counts."""
    logits, targets = predict_logits(model, batches, ctx.device, amp_dtype=ctx.amp)
    return ctx.metrics(logits, targets)


def evaluate_checkpoint(
    ctx: StageContext, path: Path, split: str = "test", loaded=None
) -> dict[str, Any]:
    """Evaluate a stage-2 checkpoint on ``split`` and write ``metrics.json`` (rank 0).

    ``loaded`` is what :func:`dscl.checkpoint.read_classifier` returned for ``path``, if it was
    read already.
    """
    cfg = ctx.cfg
    model, state = loaded if loaded is not None else read_classifier(path, cfg)
    if state["num_classes"] != ctx.splits.num_classes:
        raise CheckpointError(
            f"{path}: checkpoint has {state['num_classes']} classes, the data has "
            f"{ctx.splits.num_classes}"
        )
    model = model.to(ctx.device)
    dataset = {"test": ctx.splits.test, "val": ctx.splits.val}[split]
    metrics = evaluate_model(ctx, model, ctx.eval_batches(dataset))
    metrics |= {
        "split": split,
        "epoch": state["epoch"],
        "method": cfg.method,
        "checkpoint": str(path),
        "class_names": list(ctx.splits.class_names),
    }
    if dist.is_main_process():
        write_json(ctx.run_dir / runfiles.METRICS, metrics)
    return metrics
