"""Stopping and saving mid-stage: signals, the checkpoint cadence, and what a stopped run reports.

SIGTERM (a cluster reclaiming the node) and SIGINT (Ctrl-C) do not kill a training stage: the
first one is noted and the loop stops at the next step boundary, every process at the same step,
after rank 0 has written the stage's checkpoint; the command then exits with
:data:`EXIT_INTERRUPTED`. A second signal ends the process at once.
"""

from __future__ import annotations

import os
import signal
import time

from dscl import dist
from dscl.errors import EXIT_INTERRUPTED, TrainingInterrupted

__all__ = ["EXIT_INTERRUPTED", "SaveSchedule", "StopSignals", "TrainingInterrupted"]

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager that turns the first SIGTERM/SIGINT into a stop request.

    ``received`` holds the first signal's name (None before); a second signal restores the
    default handler and re-sends itself, so the process ends at once.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # the second one: go now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name


class SaveSchedule:
    """When to write a mid-epoch checkpoint and when to stop, decided after each step.

    Every ``every_steps`` global steps and every ``every_minutes`` of wall time (rank 0's clock),
    and at once when a stop was requested on any rank. The decision is the same on every rank:
    step counts are, and the time and signal flags are agreed through :func:`dist.any_rank` every
    ``check_interval`` steps (1 on a CPU; on a GPU the logging cadence, to spare a device sync).

    Args:
        every_steps: step cadence (0: none).
        every_minutes: time cadence (0: none).
        signals: the stop requests, or None.
        check_interval: steps between agreements on the time and signal flags.
    """

    def __init__(
        self,
        every_steps: int,
        every_minutes: float,
        signals: StopSignals | None,
        check_interval: int = 1,
    ) -> None:
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.signals, self.check_interval = signals, max(1, check_interval)
        self.saved()

    def saved(self) -> None:
        self._last = time.monotonic()

    def decide(self, step: int) -> tuple[bool, bool]:
        """``(save, stop)`` after global step ``step``."""
        stop = timed = False
        if step % self.check_interval == 0:
            requested = self.signals is not None and self.signals.received is not None
            stop = dist.any_rank(requested)
            due = (
                self.every_minutes > 0 and time.monotonic() - self._last >= 60 * self.every_minutes
            )
            timed = dist.any_rank(dist.is_main_process() and due)
        stepped = self.every_steps > 0 and (step + 1) % self.every_steps == 0
        return stop or timed or stepped, stop

    @property
    def signal_name(self) -> str:
        received = self.signals.received if self.signals is not None else None
        return received or "a stop request on another process"
