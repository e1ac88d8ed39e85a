"""Stage 1: representation learning with the configured method (docs/DESIGN.md §2).

The method (``dscl+pbsd``, ``supcon``, ``ce``, ...) comes from the registry in
:mod:`dscl.methods`; :func:`build_stage1` assembles it with its feed, the optimizer and the
warm-up + cosine schedule (for ``dscl pretrain`` and the benchmarks alike), and :func:`pretrain`
trains it with :func:`~dscl.engine.stage.train_stage`, writing ``pretrain.pt`` after each epoch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dscl import runfiles
from dscl.config import RunConfig, config_to_dict
from dscl.data import DataSplits
from dscl.data.views import ALL_VIEWS
from dscl.engine import runtime
from dscl.engine.context import StageContext, data_info, memory_format
from dscl.engine.knn import KnnMonitor
from dscl.engine.stage import StageParts, StagePlan, train_stage
from dscl.methods import Method, build_method
from dscl.plugins import file_digests
from dscl.runfiles import git_commit


def own_classifier(method: Method) -> dict:
    """``{"classifier": state_dict}`` of the method's own classifier, if it has one."""
    model = method.classifier()
    return {} if model is None else {"classifier": model.state_dict()}


def build_stage1(ctx: StageContext, *, all_views: bool = False) -> StageParts:
    """Stage 1 as ``dscl pretrain`` trains it: the configured method built for the training
    data, on the device in the run's memory format (compiled with ``compile=true``), its feed
    with the views it reads, SGD with the warm-up + cosine schedule of ``cfg.pretrain``.

    ``all_views`` makes every standard view, also those the method does not read (a benchmark's
    comparison), besides the method's own views. The method is not yet started
    (:meth:`Method.start_training`): a resumed stage loads its state instead.
    """
    cfg, p, device = ctx.cfg, ctx.cfg.pretrain, ctx.device
    method = build_method(cfg, data_info(ctx))
    method.to(device, memory_format(cfg))
    if cfg.compile:
        runtime.compile_for_training(method.compile_targets(), device)
    request = method.view_request()
    if all_views:  # every standard view, and the method's own views still
        request = dataclasses.replace(request, standard=ALL_VIEWS.standard)
    feed = ctx.train_feed(
        method.feed_kind, p.batch_size, "pretrain.batch_size", False, cfg.seed, request
    )
    steps = feed.steps_per_epoch
    lr_at = runtime.warmup_cosine(p.base_lr * p.batch_size / 256, p.epochs, steps, p.warmup_epochs)
    opt = ctx.optimization(method, lr_at, p.momentum, p.weight_decay)
    return StageParts(method, feed, opt)


def pretrain(ctx: StageContext, resume_state: dict | None = None) -> Path:
    """Run stage 1 (from ``resume_state``, see :func:`dscl.checkpoint.read_stage1`, when given)
    and return the path of its checkpoint."""
    cfg, p = ctx.cfg, ctx.cfg.pretrain
    if cfg.compile:
        ctx.logger.info("compile=true: the first steps compile the encoders (a minute or more)")
    parts = build_stage1(ctx)
    method, steps = parts.method, parts.feed.steps_per_epoch
    ckpt_path = ctx.run_dir / runfiles.PRETRAIN

    def state(epoch: int, val: dict | None) -> dict:
        return {
            "kind": "pretrain",
            "method": cfg.method,
            "model": method.model.state_dict(),
            "backbone": method.backbone().state_dict(),
            **own_classifier(method),
            "config": config_to_dict(cfg),
            "git_commit": git_commit(),
            "plugin_sha256": file_digests(cfg.plugins),
        }

    monitor = knn_monitor(ctx) if p.knn_every > 0 else None

    def end_of_epoch(epoch: int) -> None:
        """The kNN monitor, every ``knn_every`` epochs and after the last (every rank computes its
        share, rank 0 logs)."""
        if monitor is None:
            return None
        if (epoch + 1) % p.knn_every and epoch != p.epochs - 1:
            return None
        values = monitor(method.backbone())
        step = (epoch + 1) * steps - 1
        ctx.logger.log({"stage": "pretrain", "epoch": epoch, "step": step} | values)
        ctx.logger.info(
            f"stage 1 epoch {epoch + 1}: kNN validation top-1 {values['val_knn_top1']:.2f} "
            f"({values['knn_seconds']:.1f} s)"
        )
        return None

    plan = StagePlan(
        label="stage 1",
        epochs=p.epochs,
        checkpoint=ckpt_path,
        save_every_steps=p.save_every_steps,
        make_state=state,
        end_of_epoch=end_of_epoch,
    )
    train_stage(ctx, parts, plan, resume_state)
    return ckpt_path


def training_only_context(
    cfg: RunConfig, train, view_cfg, device: torch.device, amp: torch.dtype | None
) -> StageContext:
    """A :class:`StageContext` over the training set ``train`` alone, for
    :func:`build_stage1` outside a run (the benchmarks): empty validation and test splits, no run
    folder, no logger, no stop signals."""
    counts = list(train.class_counts)
    splits = DataSplits(
        train=train,
        val=train.subset([]),
        test=train.subset([]),
        num_classes=len(counts),
        class_names=list(train.class_names),
        class_counts=counts,
    )
    return StageContext(
        cfg, None, device, amp, splits, view_cfg, cfg.data.feed_settings(), logger=None
    )


def knn_monitor(ctx: StageContext) -> KnnMonitor | None:
    """The kNN monitor over this run's training set (bank) and validation split, each rank with
    its share of both."""
    splits = ctx.splits
    if len(splits.val) == 0:
        ctx.logger.info("kNN monitor off: the validation split is empty")
        return None
    bank = ctx.eval_batches(splits.train, shard=True)
    val = ctx.eval_batches(splits.val, shard=True)
    return KnnMonitor(bank, val, splits.num_classes, ctx.metrics, ctx.device, ctx.amp)
