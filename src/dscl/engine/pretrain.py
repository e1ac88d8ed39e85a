"""Stage 1: representation learning with the configured method (docs/DESIGN.md §2).

The method (``dscl+pbsd``, ``supcon``, ``ce``, ...) comes from the registry in
:mod:`dscl.methods`; this module builds the feed, the optimizer and the warm-up + cosine schedule,
runs :func:`~dscl.engine.loop.run_epoch` for each epoch and writes ``pretrain.pt`` after each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dscl import dist
from dscl.checkpoint import git_commit, save_checkpoint
from dscl.config import RunConfig, config_to_dict
from dscl.engine import runtime
from dscl.engine.feed import TrainFeed
from dscl.engine.loop import Optimization, run_epoch
from dscl.errors import SetupError
from dscl.methods import Method, build_method

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


def per_process_batch(batch_size: int, key: str) -> int:
    """The batch of one process for the global ``batch_size`` (setting ``key``)."""
    world = dist.get_world_size()
    if batch_size % world:
        raise SetupError(f"{key}: {batch_size} is not divisible by {world} processes")
    return batch_size // world


def memory_format(cfg: RunConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def sgd(method: Method, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over the method's trainable parameters; the lr is set every step from a schedule."""
    params = method.trainable_parameters()
    return torch.optim.SGD(params, lr=0.0, momentum=momentum, weight_decay=weight_decay)


def pretrain(ctx: StageContext, resume_state: dict | None = None) -> Path:
    """Run stage 1 (from ``resume_state``, see :func:`dscl.checkpoint.read_stage1`, when given)
    and return the path of its checkpoint."""
    cfg, p, device = ctx.cfg, ctx.cfg.pretrain, ctx.device
    method = build_method(cfg, ctx.splits.num_classes)
    fmt = memory_format(cfg)
    method.model.to(device, memory_format=fmt)
    feed = TrainFeed(
        ctx.splits.train,
        kind=method.feed_kind,
        view_cfg=ctx.view_cfg,
        batch_size=per_process_batch(p.batch_size, "pretrain.batch_size"),
        balanced=False,
        seed=cfg.seed,
        device=device,
        num_workers=cfg.data.num_workers,
        in_memory=cfg.data.batched_views,
    )
    optimizer = sgd(method, p.momentum, p.weight_decay)
    steps = feed.steps_per_epoch
    lr_at = runtime.warmup_cosine(p.base_lr * p.batch_size / 256, p.epochs, steps, p.warmup_epochs)
    scaler = runtime.grad_scaler(device, ctx.amp)
    opt = Optimization(optimizer, lr_at, scaler, device, ctx.amp, fmt)
    ckpt_path = ctx.run_dir / PRETRAIN_CHECKPOINT
    start_epoch = 0
    if resume_state is not None:
        state = resume_state
        method.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when the run had no loss scaling
            scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1
        ctx.logger.info(f"resuming stage 1 from {ckpt_path} at epoch {start_epoch}")
    else:
        method.start_training()
    method.wrap(lambda module: runtime.wrap_ddp(module, device))
    for epoch in range(start_epoch, p.epochs):
        run_epoch(
            method,
            feed.epoch(epoch),
            opt,
            epoch=epoch,
            steps_per_epoch=steps,
            logger=ctx.logger,
            stage="pretrain",
            desc=f"stage 1 epoch {epoch + 1}/{p.epochs}",
            log_every=cfg.log_every,
        )
        if dist.is_main_process():
            save_checkpoint(
                {
                    "kind": "pretrain",
                    "method": cfg.method,
                    "epoch": epoch,
                    "model": method.model.state_dict(),
                    "backbone": method.backbone().state_dict(),
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
