"""What Linux's /proc/cpuinfo says about this CPU (nothing on other systems); no torch import."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


def cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name`` line of /proc/cpuinfo (e.g. "model name", "flags")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is absent)."""
    return set((cpuinfo_field("flags") or "").split())


@functools.cache
def processor_name() -> str | None:
    """The CPU's model name ("AMD EPYC 7763 64-Core Processor"): /proc/cpuinfo's, since
    platform.processor() is often empty or just "x86_64" on Linux; None where neither knows.
    Read once per process (the answer never changes while it runs)."""
    return cpuinfo_field("model name") or platform.processor() or None
