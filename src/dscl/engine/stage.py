"""A training stage's epochs: resuming, mid-epoch checkpoints and stopping on a signal.

Stage 1 and stage 2 both run :func:`train_stage`; they differ only in their :class:`StageParts`
(the method, the feed, the schedule) and :class:`StagePlan` (epochs, what their checkpoint holds
besides the training state, validation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dscl import dist
from dscl.checkpoint import save_checkpoint
from dscl.device_path import sync_free
from dscl.engine import runtime
from dscl.engine.feed import TrainFeed
from dscl.engine.loop import EpochLog, EpochSpan, Optimization, run_epoch
from dscl.engine.preemption import SaveSchedule
from dscl.errors import CheckpointError, TrainingInterrupted
from dscl.methods import Method


def check_interval(ctx) -> int:
    """Steps between agreements on stop requests: every step on a CPU, where it costs nothing;
    at the logging cadence where the host must not wait for the device
    (:func:`dscl.device_path.sync_free`, the switch the step loop's finite check follows)."""
    return ctx.cfg.log_every if sync_free(ctx.device) else 1


def rank_states(feed: TrainFeed) -> list[dict]:
    """Every process's RNG state and augmentation position, for rank 0 to save, each with the
    type of device it was made on ("cpu", "cuda"): a position is a generator state of that
    device type and fits no other; and the hardware it trained on (:func:`runtime.hardware`)."""
    return dist.gather_objects(
        {
            "rng": runtime.rng_state(feed.device),
            "feed": feed.position(),
            "device": feed.device.type,
            "hardware": runtime.hardware(feed.device),
        }
    )


def restore_rank_state(
    state: dict, path: Path, device: torch.device, *, mid_epoch: bool
) -> torch.Tensor | None:
    """Set this process's RNG from a checkpoint; return its saved augmentation position when
    the run goes on in the middle of an epoch (None otherwise: the next epoch starts its own).

    Raises:
        CheckpointError: the checkpoint was written by another number of processes, or in the
            middle of an epoch with an augmentation position made on another device type.
    """
    ranks, world = state.get("ranks"), dist.get_world_size()
    if ranks is None:  # an epoch-end checkpoint of an older version: one RNG state
        runtime.set_rng_state(state["rng"], device)
        return None
    if len(ranks) != world:
        raise CheckpointError(
            f"{path}: written by {len(ranks)} process(es), resumed with {world}; resume with "
            f"the same number of processes"
        )
    mine = ranks[dist.get_rank()]
    position = mine["feed"] if mid_epoch else None
    saved = mine.get("device", device.type)  # older checkpoints do not say: assume this one
    if position is not None and saved != device.type:
        # a CPU generator's state (5056 bytes) and a CUDA one's (16) do not load into each other,
        # and no other generator would give the rest of the epoch its uninterrupted augmentations
        raise CheckpointError(
            f"{path}: saved in the middle of an epoch on {saved}, resumed on {device.type}; "
            f"the epoch's augmentation state cannot move between device types: resume with "
            f"device={saved}, or start the stage over (stage 1: --overwrite; stage 2: dscl "
            f"classify without --resume)"
        )
    runtime.set_rng_state(mine["rng"], device)
    return position


def resume_position(state: dict, steps_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batch)`` where a checkpoint's run goes on."""
    epoch, next_batch = state["epoch"], state.get("next_batch", steps_per_epoch)
    return (epoch + 1, 0) if next_batch >= steps_per_epoch else (epoch, next_batch)


@dataclass(frozen=True)
class StageParts:
    """What a stage trains and with what: the method (its model on the device already), its
    training batches and its optimization (optimizer, schedule, scaler, device, precision,
    memory format)."""

    method: Method
    feed: TrainFeed
    opt: Optimization


@dataclass(frozen=True)
class StagePlan:
    """How long a stage trains and what it keeps.

    Attributes:
        label: "stage 1" or "stage 2", for messages and the progress bar.
        epochs: the stage's epochs.
        checkpoint: the file the training state goes to.
        save_every_steps: mid-epoch checkpoint cadence (0: none).
        make_state: ``make_state(epoch, val)``, the checkpoint's content besides the training
            state.
        end_of_epoch: called after each whole epoch (validation); its result is passed to
            ``make_state``.
    """

    label: str
    epochs: int
    checkpoint: Path
    save_every_steps: int
    make_state: Callable[[int, dict | None], dict[str, Any]]
    end_of_epoch: Callable[[int], dict | None] | None = None

    @property
    def log_stage(self) -> str:
        """The ``stage`` field of the stage's log records."""
        return "pretrain" if self.label == "stage 1" else "classifier"


def resume_stage(
    ctx, parts: StageParts, plan: StagePlan, state: dict[str, Any]
) -> tuple[int, int, torch.Tensor | None]:
    """Load a checkpoint of this stage into the model, optimizer, scaler and RNG; return where
    the stage goes on: ``(epoch, batch, augmentation position or None)``."""
    parts.method.model.load_state_dict(state["model"])
    parts.opt.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # empty when the run had no loss scaling
        parts.opt.scaler.load_state_dict(state["scaler"])
    epoch, batch = resume_position(state, parts.feed.steps_per_epoch)
    position = restore_rank_state(state, plan.checkpoint, parts.feed.device, mid_epoch=batch > 0)
    ctx.logger.info(
        f"resuming {plan.label} from {plan.checkpoint} at epoch {epoch + 1}, step {batch + 1}"
    )
    step = epoch * parts.feed.steps_per_epoch + batch
    say_moved_hardware(ctx, state, parts.feed.device, stage=plan.log_stage, epoch=epoch, step=step)
    return epoch, batch, position


def say_moved_hardware(
    ctx, state: dict[str, Any], device: torch.device, *, stage: str, epoch: int, step: int
) -> None:
    """Tell, on the terminal and for good in the run's log, of every process that goes on from
    ``state`` on other hardware than its rank wrote it on (:func:`moved_hardware`). Every
    process must call it (the check is gathered to rank 0, which alone logs)."""
    moves = dist.gather_objects(moved_hardware(state, device))
    for rank, moved in enumerate(moves):
        if moved is None:
            continue
        saved, now = moved
        who = f"process {rank}: " if len(moves) > 1 else ""
        ctx.logger.info(
            f"warning: {who}this checkpoint was written on {runtime.hardware_text(saved)} and "
            f"the run resumes on {runtime.hardware_text(now)}: it goes on, but its numbers will "
            f"not equal an uninterrupted run's on either"
        )
        record = {"stage": stage, "epoch": epoch, "step": step, "rank": rank}
        ctx.logger.log(record | {"written_on": saved, "resumed_on": now})


def moved_hardware(state: dict[str, Any], device: torch.device) -> tuple[dict, dict] | None:
    """``(saved, now)`` when this process resumes a checkpoint its rank wrote on other hardware
    (another CPU or GPU model, or on a CPU another thread count: :func:`runtime.hardware`), else
    None. The run goes on, but its digits from there are not those of an uninterrupted run on
    either. On a GPU the host's thread count is left out: the arithmetic runs on the GPU, and a
    job requeued on a node with other cores would be told of a move that changes nothing."""
    ranks = state.get("ranks") or []
    rank = dist.get_rank()
    saved = ranks[rank].get("hardware") if rank < len(ranks) else None
    if saved is None:  # older checkpoints do not say
        return None
    now = runtime.hardware(device)
    keys = ("processor",) if device.type == "cuda" else ("processor", "threads")
    return None if all(saved.get(k) == now.get(k) for k in keys) else (saved, now)


def train_stage(
    ctx, parts: StageParts, plan: StagePlan, resume_state: dict[str, Any] | None = None
) -> None:
    """Train ``parts.method`` for ``plan.epochs`` epochs, from ``resume_state`` (a checkpoint of
    this stage) when given.

    The stage's ``plan.checkpoint`` is written (rank 0, previous copy kept) at the end of every
    epoch, every ``plan.save_every_steps`` steps, every ``cfg.save_every_minutes`` and when a
    stop is requested: ``plan.make_state(epoch, val)`` plus the training state (epoch, next
    batch, optimizer, scaler, every rank's RNG and augmentation position, finished).

    Args:
        ctx: the :class:`~dscl.engine.context.StageContext`.
        parts: the method, its feed and its optimization.
        plan: label, epochs, checkpoint and what it holds, validation.
        resume_state: a checkpoint of this stage to continue, or None.

    Raises:
        TrainingInterrupted: a stop was requested; the checkpoint is written.
    """
    method, feed, opt = parts.method, parts.feed, parts.opt
    label, epochs, checkpoint = plan.label, plan.epochs, plan.checkpoint
    steps = feed.steps_per_epoch
    start_epoch, start_batch, position = 0, 0, None
    if resume_state is not None:
        start_epoch, start_batch, position = resume_stage(ctx, parts, plan, resume_state)
    else:
        method.start_training()
    method.wrap(lambda module: runtime.wrap_ddp(module, ctx.device))
    every_minutes = ctx.cfg.save_every_minutes
    schedule = SaveSchedule(plan.save_every_steps, every_minutes, ctx.stop, check_interval(ctx))

    def save(epoch: int, next_batch: int, val: dict | None = None) -> None:
        ranks = rank_states(feed)
        if dist.is_main_process():
            state = plan.make_state(epoch, val) | {
                "epoch": epoch,
                "next_batch": next_batch,
                "optimizer": opt.optimizer.state_dict(),
                "scaler": opt.scaler.state_dict(),
                "ranks": ranks,
                "finished": epoch == epochs - 1 and next_batch == steps,
            }
            save_checkpoint(state, checkpoint, keep_previous=True)
        schedule.saved()
        dist.barrier()

    for epoch in range(start_epoch, epochs):
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
            EpochSpan(epoch, steps, first),
            EpochLog(
                ctx.logger, plan.log_stage, f"{label} epoch {epoch + 1}/{epochs}", ctx.cfg.log_every
            ),
            after_step=after_step,
        )
        done = first + result.steps
        if done == steps:
            end = plan.end_of_epoch
            save(epoch, steps, end(epoch) if end is not None else None)
        if result.stopped:
            step = epoch * steps + done
            raise TrainingInterrupted(schedule.signal_name, label, checkpoint, step)
