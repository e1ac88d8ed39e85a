"""Where a study's cells run: the ``launcher`` section of a study file.

    launcher:
      kind: slurm              # local (the default: cells run here, --jobs at a time) or slurm
      partition: gpu           # optional; the cluster's default partition without it
      gpus_per_cell: 8         # GPUs on each node of a cell (0: a CPU cell); default 0
      nodes: 1                 # nodes per cell; default 1
      cpus_per_cell: 80        # CPUs on each node of a cell; default: the cells' threads
      time: "48:00:00"         # required with slurm: a SLURM duration, in quotes
      account: my_account      # optional
      qos: normal              # optional
      extra: {mem: 400G}       # optional; more sbatch options (name without --: value)

``dscl study --launcher slurm`` (or ``local``) overrides ``kind``. Every key is checked when the
study file is read, before anything runs or is submitted; :mod:`dscl.study.slurm` then checks
the settings against the cluster (the partition exists, ``sbatch --test-only`` accepts them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dscl.errors import ConfigError

KINDS = ("local", "slurm")
LAUNCHER_KEYS = (
    "kind",
    "partition",
    "gpus_per_cell",
    "nodes",
    "cpus_per_cell",
    "time",
    "account",
    "qos",
    "extra",
)
# sbatch options the launcher sets itself; ``extra`` may not set them
OWN_OPTIONS = {
    "partition",
    "p",
    "time",
    "t",
    "nodes",
    "N",
    "ntasks-per-node",
    "ntasks",
    "n",
    "cpus-per-task",
    "c",
    "gpus-per-node",
    "gres",
    "account",
    "A",
    "qos",
    "q",
    "job-name",
    "J",
    "output",
    "o",
    "error",
    "e",
    "signal",
    "array",
    "open-mode",
    "requeue",
    "no-requeue",
}
_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# minutes | minutes:seconds | hours:minutes:seconds | days-hours[:minutes[:seconds]]
_DURATION = re.compile(
    r"^(?:(?P<m>\d+)(?::(?P<s>\d+))?"
    r"|(?P<h3>\d+):(?P<m3>\d+):(?P<s3>\d+)"
    r"|(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?)$"
)


@dataclass(frozen=True)
class Launcher:
    """The launcher settings of a study (the defaults: cells run on this machine)."""

    kind: str = "local"
    partition: str | None = None
    gpus_per_cell: int = 0
    nodes: int = 1
    cpus_per_cell: int | None = None  # None: the cells' threads
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def time_minutes(self) -> int | None:
        """``time`` in whole minutes (rounded up), as submitit takes it."""
        return None if self.time is None else duration_minutes(self.time)


def duration_seconds(text: str) -> int | None:
    """The seconds of a SLURM duration (``"90"``, ``"1:30:00"``, ``"2-12"``), None if ``text``
    is not one."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        return None
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "m" in g:
        return g["m"] * 60 + g.get("s", 0)
    if "h3" in g:
        return g["h3"] * 3600 + g["m3"] * 60 + g["s3"]
    return g["d"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)


def duration_minutes(text: str) -> int:
    """A valid SLURM duration in whole minutes, rounded up (at least 1)."""
    seconds = duration_seconds(text)
    if seconds is None:
        raise ValueError(f"not a SLURM duration: {text!r}")
    return max(1, math.ceil(seconds / 60))


def _fail(path: Path, key: str, text: str) -> ConfigError:
    return ConfigError(f"{path}: launcher.{key}: {text}")


def _int_setting(path: Path, raw: dict, key: str, default: int | None, low: int) -> int | None:
    value = raw.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(path, key, f"need a whole number >= {low}, got {value!r}")
    return value


def _text_setting(path: Path, raw: dict, key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise _fail(path, key, f"need a name without spaces, got {value!r}")
    return value


def _time_setting(path: Path, raw: dict, kind: str) -> str | None:
    value = raw.get("time")
    if value is None:
        if kind == "slurm":
            raise _fail(
                path,
                "time",
                "required with kind slurm: the cells' time limit as a SLURM duration in quotes, "
                'e.g. "48:00:00" (a cell that runs out of time is requeued and continues)',
            )
        return None
    if not isinstance(value, str):
        raise _fail(
            path,
            "time",
            f'need a SLURM duration in quotes, like "48:00:00" or "2-00:00:00", got {value!r} '
            "(YAML reads an unquoted 48:00:00 as a number)",
        )
    if duration_seconds(value) is None:
        raise _fail(
            path,
            "time",
            f"{value!r} is not a SLURM duration (minutes, minutes:seconds, hours:minutes:seconds, "
            "days-hours, days-hours:minutes or days-hours:minutes:seconds)",
        )
    return value.strip()


def _extra_setting(path: Path, raw: dict) -> dict[str, Any]:
    extra = raw.get("extra", {})
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise _fail(path, "extra", f"need a mapping of sbatch options to values, got {extra!r}")
    for key, value in extra.items():
        if not isinstance(key, str) or not _OPTION.match(key):
            raise _fail(path, "extra", f"{key!r} is not an sbatch option name (like mem)")
        if key in OWN_OPTIONS or key.replace("_", "-") in OWN_OPTIONS:
            raise _fail(path, f"extra.{key}", "the launcher sets this option; use its own key")
        if value is False or value is None or isinstance(value, (list, dict)):
            raise _fail(path, f"extra.{key}", f"need text, a number or true, got {value!r}")
    return dict(extra)


def read_launcher(path: Path, raw: Any) -> Launcher | None:
    """The ``launcher`` section of the study file at ``path`` (None when it has none).

    Raises:
        ConfigError: one line naming the file and the key at fault.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: launcher: expected a mapping (kind, partition, ...)")
    unknown = [str(k) for k in raw if k not in LAUNCHER_KEYS]
    if unknown:
        raise _fail(path, unknown[0], f"unknown key (known keys: {', '.join(LAUNCHER_KEYS)})")
    kind = raw.get("kind", "local")
    if kind not in KINDS:
        raise _fail(path, "kind", f"{kind!r} is not a launcher ({', '.join(KINDS)})")
    return Launcher(
        kind=kind,
        partition=_text_setting(path, raw, "partition"),
        gpus_per_cell=_int_setting(path, raw, "gpus_per_cell", 0, 0),
        nodes=_int_setting(path, raw, "nodes", 1, 1),
        cpus_per_cell=_int_setting(path, raw, "cpus_per_cell", None, 1),
        time=_time_setting(path, raw, kind),
        account=_text_setting(path, raw, "account"),
        qos=_text_setting(path, raw, "qos"),
        extra=_extra_setting(path, raw),
    )


def launcher_for(path: Path, raw: Any, kind: str | None) -> Launcher:
    """The launcher a run uses: the study file's section with ``kind`` (``--launcher``) instead
    of its own kind when given; local without either.

    Raises:
        ConfigError: the section is invalid for the kind that runs (e.g. slurm without time).
    """
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"--launcher {kind}: expected one of {', '.join(KINDS)}")
    if raw is None:
        raw = {}
    elif not isinstance(raw, dict):
        return read_launcher(path, raw)  # raises
    if kind is not None:
        raw = {**raw, "kind": kind}
    return read_launcher(path, raw) or Launcher()
