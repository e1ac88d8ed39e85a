"""Checkpoints: atomic save, safe load, and the metadata every checkpoint carries."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the requested run."""


@functools.cache
def git_commit() -> str | None:
    """The commit of the source tree this package runs from, or None outside a git checkout.

    Asked once per process: every checkpoint of a run carries the same answer."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    A crash mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code from pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated, or not a torch file
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict) or "kind" not in state:
        raise CheckpointError(f"{path}: not a dscl checkpoint (no 'kind' entry)")
    return state


def check_kind(state: dict[str, Any], path: str | Path, *kinds: str) -> None:
    if state.get("kind") not in kinds:
        raise CheckpointError(
            f"{path}: a {state.get('kind')!r} checkpoint, but this needs one of {', '.join(kinds)}"
        )


def check_matches(state: dict[str, Any], path: str | Path, expected: dict[str, Any]) -> None:
    """Raise CheckpointError when the checkpoint's config differs on any of ``expected``'s keys.

    ``expected`` maps dotted config keys (``model.backbone``) to the values the run uses.
    """
    saved = state.get("config", {})
    for dotted, want in expected.items():
        node: Any = saved
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != want:
            raise CheckpointError(
                f"{path}: checkpoint has {dotted}={node!r} but this run uses {dotted}={want!r}"
            )
