"""Stage 1: representation learning with the configured method (docs/DESIGN.md §2).

The method (``dscl+pbsd``, ``supcon``, ``ce``, ...) comes from the registry in
:mod:`dscl.methods`; this module builds the feed, the optimizer and the warm-up + cosine schedule,
runs :func:`~dscl.engine.loop.run_epoch` for each epoch and writes ``pretrain.pt`` after each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dscl import dist, runfiles
from dscl.checkpoint import git_commit
from dscl.config import RunConfig, config_to_dict
from dscl.data.views import ALL_VIEWS
from dscl.engine import runtime
from dscl.engine.evaluate import classification_metrics
from dscl.engine.feed import TrainFeed, eval_batches
from dscl.engine.knn import KnnMonitor
from dscl.engine.loop import Optimization
from dscl.engine.preemption import StopSignals
from dscl.engine.stage import train_stage
from dscl.errors import SetupError
from dscl.methods import DataInfo, Method, build_method


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
    stop: StopSignals | None = None  # stop requests (SIGTERM/SIGINT) while training

    def train_feed(
        self, kind: str, batch_size: int, key: str, balanced: bool, seed: int, request=None
    ):
        """Training batches of ``kind`` for the global ``batch_size`` (setting ``key``), with the
        views of ``request`` (a ``ViewRequest``; None: the standard ones)."""
        d = self.cfg.data
        return TrainFeed(
            self.splits.train,
            kind=kind,
            view_cfg=self.view_cfg,
            batch_size=per_process_batch(batch_size, key),
            balanced=balanced,
            seed=seed,
            device=self.device,
            num_workers=d.num_workers,
            in_memory=d.batched_views,
            file_views=d.file_views,
            jpeg_draft=d.jpeg_draft,
            decode_on_device=d.decode_on_device,
            request=request if request is not None else ALL_VIEWS,
        )

    def eval_batches(self, dataset, shard: bool = False):
        """Deterministic evaluation batches over a whole split; with ``shard``, only this rank's
        share of them (every rank a different one, see :func:`~dscl.engine.feed.eval_shard`)."""
        d = self.cfg.data
        return eval_batches(
            dataset,
            self.view_cfg,
            batch_size=256,
            device=self.device,
            num_workers=d.num_workers,
            in_memory=d.batched_views,
            file_views=d.file_views,
            rank=dist.get_rank() if shard else 0,
            world=dist.get_world_size() if shard else 1,
        )

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        """Top-k, Many/Medium/Few and per-class accuracy against the training class counts."""
        d = self.cfg.data
        return classification_metrics(
            logits,
            targets,
            self.splits.class_counts,
            many_threshold=d.many_threshold,
            few_threshold=d.few_threshold,
        )

    def optimization(self, method: Method, lr_at, momentum: float, weight_decay: float):
        """SGD over the method's trainable parameters (lr set every step from ``lr_at``), the
        loss scaler, precision and memory format of this run."""
        params = method.trainable_parameters()
        sgd = torch.optim.SGD(params, lr=0.0, momentum=momentum, weight_decay=weight_decay)
        scaler = runtime.grad_scaler(self.device, self.amp)
        return Optimization(sgd, lr_at, scaler, self.device, self.amp, memory_format(self.cfg))


def data_info(ctx: StageContext) -> DataInfo:
    """What a method's builder is told about the training data."""
    v = ctx.view_cfg
    return DataInfo(
        num_classes=ctx.splits.num_classes,
        class_counts=tuple(int(n) for n in ctx.splits.class_counts),
        image_size=v.view_size,
        patch_size=v.patch_px,
        num_patches=v.num_patches,
    )


def own_classifier(method: Method) -> dict:
    """``{"classifier": state_dict}`` of the method's own classifier, if it has one."""
    model = method.classifier()
    return {} if model is None else {"classifier": model.state_dict()}


def per_process_batch(batch_size: int, key: str) -> int:
    """The batch of one process for the global ``batch_size`` (setting ``key``)."""
    world = dist.get_world_size()
    if batch_size % world:
        raise SetupError(f"{key}: {batch_size} is not divisible by {world} processes")
    return batch_size // world


def memory_format(cfg: RunConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def pretrain(ctx: StageContext, resume_state: dict | None = None) -> Path:
    """Run stage 1 (from ``resume_state``, see :func:`dscl.checkpoint.read_stage1`, when given)
    and return the path of its checkpoint."""
    cfg, p, device = ctx.cfg, ctx.cfg.pretrain, ctx.device
    method = build_method(cfg, data_info(ctx))
    method.to(device, memory_format(cfg))
    if cfg.compile:
        runtime.compile_for_training(method.compile_targets(), device)
        ctx.logger.info("compile=true: the first steps compile the encoders (a minute or more)")
    feed = ctx.train_feed(
        method.feed_kind,
        p.batch_size,
        "pretrain.batch_size",
        False,
        cfg.seed,
        method.view_request(),
    )
    steps = feed.steps_per_epoch
    lr_at = runtime.warmup_cosine(p.base_lr * p.batch_size / 256, p.epochs, steps, p.warmup_epochs)
    opt = ctx.optimization(method, lr_at, p.momentum, p.weight_decay)
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

    train_stage(
        ctx,
        method,
        feed,
        opt,
        label="stage 1",
        epochs=p.epochs,
        save_every_steps=p.save_every_steps,
        checkpoint=ckpt_path,
        resume_state=resume_state,
        make_state=state,
        end_of_epoch=end_of_epoch,
    )
    return ckpt_path


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
