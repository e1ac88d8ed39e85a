"""The one training loop: every stage-1 method, stage 2 and the throughput benchmark run it.

A step: set the learning rate from the precomputed schedule, put 4-D inputs in the model's memory
format, run :meth:`Method.step` under autocast, back-propagate (through the loss scaler, a no-op
unless fp16), step the optimizer, then :meth:`Method.after_step` (EMA, enqueue).

Nothing here waits for the device each step: losses are kept as tensors and read at the logging
cadence (:attr:`EpochLog.log_every`) and at the end of the epoch. The finite check runs every
step on a CPU (where reading a value costs nothing) and at the logging cadence on a GPU, always
before a checkpoint is written, so a non-finite loss never reaches a saved state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from dscl import dist
from dscl.device_path import sync_free
from dscl.engine import runtime
from dscl.methods import Method


@dataclass
class Optimization:
    """What a stage steps with, fixed for the whole stage.

    Attributes:
        optimizer: updates ``method.trainable_parameters()``.
        lr_at: (total steps,) learning rate of every global step.
        scaler: gradient scaler (enabled for fp16 only).
        device: where the model runs.
        amp: autocast dtype, or None for full precision.
        memory_format: layout of 4-D inputs (channels_last or contiguous).
    """

    optimizer: torch.optim.Optimizer
    lr_at: np.ndarray
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format

    @property
    def checks_every_step(self) -> bool:
        """Whether the loss is read on the host after every step to check that it is finite:
        on a CPU, where it costs nothing; at the logging cadence only where the host must not
        wait (:func:`dscl.device_path.sync_free`)."""
        return not sync_free(self.device)


@dataclass
class StepTimes:
    """Wall time per phase of the step (seconds, summed over steps), filled when timing is on.

    Phases: ``data`` (making the batch: sampling and views), ``forward`` (method.step),
    ``backward``, ``update`` (optimizer, scaler and method.after_step). On a GPU each phase ends
    with a device synchronisation, which costs a little throughput: time only for benchmarks.
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def __post_init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


@dataclass
class EpochResult:
    steps: int  # steps run in this call
    images: int  # images seen in this call, over all processes
    seconds: float
    last_values: dict[str, float]  # the last logged values (loss, its terms, lr, images_per_sec)
    stopped: bool = False  # True when ``should_stop`` ended the epoch early


def to_memory_format(inputs: dict[str, torch.Tensor], memory_format) -> dict[str, torch.Tensor]:
    """4-D image batches in ``memory_format``; other inputs as they are."""
    return {
        k: v.contiguous(memory_format=memory_format) if v.dim() == 4 else v
        for k, v in inputs.items()
    }


@dataclass(frozen=True)
class EpochSpan:
    """Which steps one call of :func:`run_epoch` trains: batches ``first_batch`` to
    ``steps_per_epoch - 1`` of epoch ``epoch`` (0-based), whose global steps are
    ``epoch * steps_per_epoch + batch``. ``first_batch`` is above 0 only for an epoch resumed in
    its middle."""

    epoch: int
    steps_per_epoch: int
    first_batch: int = 0


@dataclass(frozen=True)
class EpochLog:
    """How :func:`run_epoch` reports.

    Attributes:
        logger: JSON lines / TensorBoard / progress, or None (benchmarks).
        stage: the ``stage`` field of log records.
        desc: the progress bar's label.
        log_every: global steps between log records (and, where the host must not wait for the
            device, between finite checks of the loss).
    """

    logger: runtime.RunLogger | None = None
    stage: str = "pretrain"
    desc: str = ""
    log_every: int = 20


def run_epoch(
    method: Method,
    batches: Iterable,
    opt: Optimization,
    span: EpochSpan,
    report: EpochLog = EpochLog(),
    *,
    times: StepTimes | None = None,
    after_step: Callable[[int, int, Callable[[], None]], bool] | None = None,
) -> EpochResult:
    """Train ``method`` for one epoch (or what is left of it).

    Args:
        method: the method to train (its ``train()`` flags are set here).
        batches: the epoch's batches from ``span.first_batch`` on (``batch.inputs``,
            ``batch.labels``).
        opt: optimizer, schedule, scaler, device, precision and memory format.
        span: the epoch and the batches of it to train.
        report: the logger, the records' stage, the progress label and the logging cadence.
        times: per-phase timing (benchmarks), or None.
        after_step: called as ``after_step(step_in_epoch, global_step, check_finite)`` after
            each step; it must call ``check_finite()`` before it saves anything (the loss is
            checked every step only on a CPU). Returning True stops the epoch after that step.

    Returns:
        :class:`EpochResult`.
    """
    epoch, steps_per_epoch, first_batch = span.epoch, span.steps_per_epoch, span.first_batch
    logger, log_every = report.logger, report.log_every
    method.train()
    check_every = 1 if opt.checks_every_step else log_every
    world = dist.get_world_size()
    if logger is not None:
        batches = logger.bar(
            batches, steps_per_epoch - first_batch, report.desc, initial=first_batch
        )
    start = time.perf_counter()
    seen, done, values, stopped = 0, 0, {}, False
    nonfinite = None  # (,) bool tensor: a non-finite loss since the last check
    pending: list = []  # (global step, StepOutput) whose loss is not yet checked
    iterator = iter(batches)
    if times is not None:
        times.lap("other")
    for i in range(first_batch, steps_per_epoch):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        step = epoch * steps_per_epoch + i
        lr = float(opt.lr_at[step])
        for group in opt.optimizer.param_groups:
            group["lr"] = lr
        batch.inputs = to_memory_format(batch.inputs, opt.memory_format)
        if times is not None:
            times.lap("data")
        with runtime.autocast(opt.device, opt.amp):
            out = method.step(batch)
        if times is not None:
            times.lap("forward")
        bad = ~torch.isfinite(out.loss.detach())
        nonfinite = bad if nonfinite is None else nonfinite | bad
        pending.append((step, out))
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(out.loss).backward()
        if times is not None:
            times.lap("backward")
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        method.after_step()
        if times is not None:
            times.lap("update")
            times.steps += 1
        seen += batch.labels.numel() * world
        done += 1
        last = i == steps_per_epoch - 1
        log_now = step % log_every == 0 or last
        if log_now or step % check_every == 0:
            _check_finite(nonfinite, pending)
            nonfinite, pending = None, []
        if log_now:
            values = {"loss": out.loss.item()} | {k: v.item() for k, v in out.logs.items()}
            values |= {"lr": lr, "images_per_sec": seen / (time.perf_counter() - start)}
            if logger is not None:
                logger.log({"stage": report.stage, "epoch": epoch, "step": step} | values)
                logger.postfix(values)
        if after_step is not None:

            def check(nonfinite=nonfinite, pending=pending) -> None:  # before anything is saved
                _check_finite(nonfinite, pending)

            if after_step(i, step, check):
                stopped = True
                break
    if pending:
        _check_finite(nonfinite, pending)
    return EpochResult(done, seen, time.perf_counter() - start, values, stopped)


def _check_finite(nonfinite: torch.Tensor | None, pending: list) -> None:
    """Stop at once on a non-finite loss, naming the first bad step and the loss's terms."""
    if nonfinite is None or not bool(nonfinite):
        return
    for step, out in pending:
        if not torch.isfinite(out.loss):
            parts = {"loss": out.loss.item()} | {k: v.item() for k, v in out.logs.items()}
            runtime.check_finite(out.loss, step, parts)
