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
from dscl.engine.preemption import SaveSchedule, StopSignals, TrainingInterrupted
from dscl.errors import CheckpointError, SetupError
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
    stop: StopSignals | None = None  # stop requests (SIGTERM/SIGINT) while training


def check_interval(ctx: StageContext) -> int:
    """Steps between agreements on stop requests: every step on a CPU, where it costs nothing;
    at the logging cadence on a GPU, where it waits for the device."""
    return 1 if ctx.device.type == "cpu" else ctx.cfg.log_every


def rank_states(feed: TrainFeed) -> list[dict]:
    """Every process's RNG state and augmentation position, for rank 0 to save."""
    return dist.gather_objects({"rng": runtime.rng_state(), "feed": feed.position()})


def restore_rank_state(state: dict, path: Path) -> torch.Tensor | None:
    """Set this process's RNG from a checkpoint; return its saved augmentation position."""
    ranks, world = state.get("ranks"), dist.get_world_size()
    if ranks is None:  # an epoch-end checkpoint of an older version: one RNG state
        runtime.set_rng_state(state["rng"])
        return None
    if len(ranks) != world:
        raise CheckpointError(
            f"{path}: written by {len(ranks)} process(es), resumed with {world}; resume with "
            f"the same number of processes"
        )
    mine = ranks[dist.get_rank()]
    runtime.set_rng_state(mine["rng"])
    return mine["feed"]


def resume_position(state: dict, steps_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batch)`` where a checkpoint's run goes on."""
    epoch, next_batch = state["epoch"], state.get("next_batch", steps_per_epoch)
    return (epoch + 1, 0) if next_batch >= steps_per_epoch else (epoch, next_batch)


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
    start_epoch, start_batch, position = 0, 0, None
    if resume_state is not None:
        state = resume_state
        method.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when the run had no loss scaling
            scaler.load_state_dict(state["scaler"])
        position = restore_rank_state(state, ckpt_path)
        start_epoch, start_batch = resume_position(state, steps)
        if start_batch == 0:  # the epoch ended: the next one starts its own augmentation
            position = None
        ctx.logger.info(
            f"resuming stage 1 from {ckpt_path} at epoch {start_epoch + 1}, step {start_batch + 1}"
        )
    else:
        method.start_training()
    method.wrap(lambda module: runtime.wrap_ddp(module, device))
    schedule = SaveSchedule(
        p.save_every_steps, cfg.save_every_minutes, ctx.stop, check_interval(ctx)
    )

    def save(epoch: int, next_batch: int) -> None:
        ranks = rank_states(feed)
        if dist.is_main_process():
            state = {
                "kind": "pretrain",
                "method": cfg.method,
                "epoch": epoch,
                "next_batch": next_batch,
                "model": method.model.state_dict(),
                "backbone": method.backbone().state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "ranks": ranks,
                "config": config_to_dict(cfg),
                "git_commit": git_commit(),
                "finished": epoch == p.epochs - 1 and next_batch == steps,
            }
            save_checkpoint(state, ckpt_path, keep_previous=True)
        schedule.saved()
        dist.barrier()

    for epoch in range(start_epoch, p.epochs):
        first = start_batch if epoch == start_epoch else 0

        def after_step(i: int, step: int, check_finite, epoch: int = epoch) -> bool:
            save_now, stop = schedule.decide(step)
            if save_now and i + 1 < steps:  # the end of the epoch is saved below
                check_finite()
                save(epoch, i + 1)
            return stop

        result = run_epoch(
            method,
            feed.epoch(epoch, first, position if epoch == start_epoch else None),
            opt,
            epoch=epoch,
            steps_per_epoch=steps,
            logger=ctx.logger,
            stage="pretrain",
            desc=f"stage 1 epoch {epoch + 1}/{p.epochs}",
            log_every=cfg.log_every,
            first_batch=first,
            after_step=after_step,
        )
        done = first + result.steps
        if done == steps:
            save(epoch, steps)
        if result.stopped:
            step = epoch * steps + done - 1
            raise TrainingInterrupted(schedule.signal_name, "stage 1", ckpt_path, step + 1)
    return ckpt_path
