"""Checkpoints: save (through :func:`dscl.runfiles.atomic_write`) and safe load, and reading a
checkpoint for each purpose (resume stage 1, stage 2 on a stage-1 model, evaluate or predict
with a classifier, export a backbone), each checked against the run's config before any work
starts."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from dscl.errors import CheckpointError, ConfigError
from dscl.runfiles import atomic_write, previous_path


def verify_readable(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a whole torch file: every member of its zip
    archive is read back and its CRC checked (a truncated or corrupted write fails)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: written checkpoint cannot be read back ({err})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: written checkpoint is corrupt (member {bad})")


def save_checkpoint(
    state: dict[str, Any], path: str | Path, *, keep_previous: bool = False
) -> None:
    """Write ``state`` to ``path`` atomically (see :func:`atomic_write`), checked readable before
    it replaces the old file; with ``keep_previous`` the old file is kept as a fallback."""
    atomic_write(
        path,
        lambda handle: torch.save(state, handle),
        verify=verify_readable,
        keep_previous=keep_previous,
    )


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


def check_matches(state: dict[str, Any], path: str | Path, cfg: Any, keys: tuple[str, ...]) -> None:
    """Raise CheckpointError when the checkpoint's config differs from the RunConfig ``cfg`` on
    any of the dotted ``keys`` (``model.backbone``), compared as ``--resume auto`` compares
    configs (:func:`dscl.config.first_difference`: a checkpoint saved before a setting existed
    has the value it ran with)."""
    from dscl.config import config_to_dict, first_difference

    difference = first_difference(state.get("config", {}), config_to_dict(cfg), set(), keys=keys)
    if difference is not None:
        key, saved, now = difference
        raise CheckpointError(
            f"{path}: checkpoint has {key}={saved!r} but this run uses {key}={now!r}"
        )


# Settings every stage-1 checkpoint must share with the run that resumes it (its saved state has
# the backbone's shapes and its schedule their lengths): before the schedule's, the method's own
# (its MethodSpec's checkpoint_keys). A stage 2 trained on it, or a classifier checkpoint read
# for a run, must share STAGE2_KEYS.
RESUME_KEYS = ("method", "model.backbone", "pretrain.epochs", "pretrain.batch_size")
STAGE2_KEYS = ("model.backbone", "method")


def resume_keys(method: str) -> tuple[str, ...]:
    """What a stage-1 checkpoint of ``method`` must share with the run that resumes it."""
    from dscl.methods import method_spec

    own = method_spec(method).checkpoint_keys
    return (*RESUME_KEYS[:2], *own, *RESUME_KEYS[2:])


def read_checkpoint(
    path: str | Path,
    kinds: tuple[str, ...],
    cfg: Any | None = None,
    keys: tuple[str, ...] = STAGE2_KEYS,
    *,
    fallback: bool = False,
) -> dict[str, Any]:
    """Load ``path`` (on the CPU), check its kind and, with a RunConfig ``cfg``, that its config
    has ``cfg``'s values of the dotted ``keys`` (:func:`check_matches`).

    With ``fallback``, a ``path`` that cannot be read is reported on stderr and the previous
    checkpoint (:func:`previous_path`) is used instead, if there is one.
    """
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        previous = previous_path(path)
        if not (fallback and previous.is_file()):
            raise
        print(f"dscl: warning: {err}; using the previous checkpoint {previous}", file=sys.stderr)
        path, state = previous, load_checkpoint(previous)
    check_kind(state, path, *kinds)
    if cfg is not None:
        check_matches(state, path, cfg, keys)
    return state


def read_stage1(path: str | Path, cfg: Any, *, resume: bool = False) -> dict[str, Any]:
    """A stage-1 checkpoint for stage 2 on its backbone, or (``resume``) to continue it."""
    keys = resume_keys(cfg.method) if resume else STAGE2_KEYS
    return read_checkpoint(path, ("pretrain",), cfg, keys, fallback=resume)


def import_plugins(state: dict[str, Any], path: str | Path) -> None:
    """Import the plugins the checkpoint's run named (its backbone may come from one), for the
    commands that read a checkpoint without a config of their own (predict, export).

    A plugin that cannot be imported (its file moved since) stops the command only where the
    checkpoint needs it: when its method and backbone are registered without it, the failure is
    a warning on stderr and the command goes on.
    """
    from dscl.methods import method_names
    from dscl.models import list_backbones
    from dscl.plugins import load

    saved = state.get("config", {})
    try:
        load(saved.get("plugins") or [], key=f"{path}: plugins")
    except ConfigError as err:
        backbone = saved.get("model", {}).get("backbone")
        if state.get("method") not in method_names() or backbone not in list_backbones():
            raise
        print(f"dscl: warning: {err}; its method and backbone need none", file=sys.stderr)


def read_classifier(path: str | Path, cfg: Any | None = None):
    """A stage-2 checkpoint as ``(classifier model, state)``; with ``cfg``, checked against it.

    The model is the one stage 2 trained: a :class:`~dscl.models.Classifier` for a new probe,
    the method's own kind of classifier (its MethodSpec's) where stage 2 kept or retrained it.
    """
    from dscl.methods import method_names, stage2_classifier
    from dscl.models import Classifier, build_backbone

    state = read_checkpoint(path, ("classifier",), cfg)
    if cfg is None:
        import_plugins(state, path)
    name, method = state["config"]["model"]["backbone"], state.get("method")
    mode = state.get("classifier_mode", "probe")  # older checkpoints name none: they hold a probe
    build = Classifier  # also for a method not registered here (its module not imported)
    if method in method_names():
        try:
            build = stage2_classifier(method, mode)
        except ConfigError as err:
            raise CheckpointError(f"{path}: {err}") from None
    model = build(build_backbone(name), state["num_classes"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: classifier weights do not fit its model: {err}") from None
    return model, state


def read_backbone(path: str | Path):
    """The backbone of a stage-1 or stage-2 checkpoint, built and loaded (for export)."""
    from dscl.models import build_backbone

    state = read_checkpoint(path, ("pretrain", "classifier"))
    import_plugins(state, path)
    name = state["config"]["model"]["backbone"]
    if state["kind"] == "pretrain":
        weights = state["backbone"]
    else:
        prefix = "backbone."
        weights = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    backbone = build_backbone(name)
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: backbone weights do not fit {name}: {err}") from None
    return backbone
