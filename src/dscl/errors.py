"""Errors a user can fix, kept apart from bugs.

Every condition that the person running ``dscl`` can put right (a bad config key, unreadable data,
a checkpoint of another run, a run folder in the way, a device that is not there) raises a subclass
of :class:`UserError`. The command line prints those as one line and exits with code 2; any other
exception is a bug in dscl (or torch) and keeps its traceback (exit code 1).

Each subclass also derives from ``ValueError`` so that library callers who caught ``ValueError``
before this module existed keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; its message names the file, key or setting at fault."""


class ConfigError(UserError):
    """A configuration problem (unknown key, wrong type, bad value)."""


class DataError(UserError):
    """Data that cannot be used: a missing file, a malformed line, a bad image or label."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or does not fit the requested run."""


class RunFolderError(UserError):
    """The run folder cannot be used (unwritable, or holds a run that would be clobbered)."""


class SetupError(UserError):
    """The run cannot start as asked: a device that is not available, a batch size that the
    number of processes does not divide, and similar conditions of the environment."""


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: a stage stopped on a signal with a checkpoint; resume it


class TrainingInterrupted(Exception):
    """A training stage stopped on SIGTERM/SIGINT after writing ``checkpoint``; the command
    exits with :data:`EXIT_INTERRUPTED` and says how to resume. Not an error of anyone's."""

    def __init__(self, signal_name: str, stage: str, checkpoint, step: int) -> None:
        super().__init__(f"{signal_name} received: stopped {stage} after step {step}")
        self.signal_name, self.stage, self.checkpoint, self.step = (
            signal_name,
            stage,
            checkpoint,
            step,
        )
