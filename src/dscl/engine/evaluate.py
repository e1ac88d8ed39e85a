"""Evaluation: logits from a model, then top-k, Many/Medium/Few and per-class accuracy.

Long-tailed benchmarks report accuracy on a balanced test set, overall and per shot group of the
*training* distribution (DESIGN §2, "Evaluation"): Many (> 100 training images), Medium (20-100)
and Few (< 20), as defined in ``dscl.data.shots``. The thresholds are arguments here so that small
datasets can use their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from dscl.data.shots import SHOT_GROUPS, ShotGroups

MAX_CONFUSION_CLASSES = 1000  # above this, metrics carry no confusion matrix (None)


def classification_metrics(
    logits: Tensor,
    targets: Tensor,
    class_counts: Sequence[int],
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> dict:
    """Top-1/top-5, shot-group, per-class accuracy and the confusion matrix.

    The group accuracies (Many/Medium/Few) are *class-averaged*: the mean of the per-class
    accuracies of the classes in that group. On a balanced test set (the standard long-tailed
    protocol) this equals the sample-averaged accuracy over the group's test images.

    Args:
        logits: (N, C) float class scores for N test samples.
        targets: (N,) integer true labels in ``[0, C)``.
        class_counts: training images per class, length C (defines the shot groups).
        many_threshold: "many" = more than this many training images.
        few_threshold: "few" = fewer than this many training images; in between is "medium".

    Returns:
        A JSON-serialisable dict; accuracies are percentages (floats):
        ``top1``, ``top5`` (top-min(5, C)), ``many``, ``medium``, ``few`` (None for a group
        without classes or without test samples), ``per_class`` (C floats, None for a class with
        no test sample), ``confusion`` (C x C ints, rows true class, columns predicted; None
        above MAX_CONFUSION_CLASSES classes), ``support`` (test samples per class),
        ``class_counts``, ``num_samples``, ``shot_thresholds`` and ``group_sizes`` (classes per
        group).
    """
    # N samples, C classes
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D float tensor (N, C), got {_describe(logits)}")
    num_samples, num_classes = logits.shape
    if num_samples == 0 or num_classes == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")
    if not isinstance(targets, Tensor) or targets.dim() != 1 or not _is_integer(targets):
        raise ValueError(f"targets must be a 1-D integer tensor (N,), got {_describe(targets)}")
    if targets.shape[0] != num_samples:
        raise ValueError(
            f"targets has {targets.shape[0]} entries but logits has {num_samples} rows"
        )
    if len(class_counts) != num_classes:
        raise ValueError(
            f"class_counts has {len(class_counts)} entries but logits has {num_classes} columns"
        )
    counts = _as_counts(class_counts)
    shots = ShotGroups(many_threshold, few_threshold)
    logits = logits.detach().float().cpu()
    targets = targets.detach().long().cpu()
    if not torch.isfinite(logits).all():
        raise ValueError("logits contains non-finite values (NaN or inf)")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(
            f"targets must lie in [0, {num_classes}), got range "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )

    k = min(5, num_classes)
    top_k = logits.topk(k, dim=1).indices  # (N, k)
    predictions = top_k[:, 0]  # (N,)
    top1 = (predictions == targets).double().mean().item() * 100.0
    top5 = (top_k == targets[:, None]).any(dim=1).double().mean().item() * 100.0

    support = torch.bincount(targets, minlength=num_classes)  # (C,) test samples per class
    correct = torch.bincount(targets[predictions == targets], minlength=num_classes)  # (C,)
    confusion = None  # a C x C list would not fit a JSON file for iNaturalist's 8,142 classes
    if num_classes <= MAX_CONFUSION_CLASSES:
        flat = targets * num_classes + predictions  # (N,) index into the flattened C x C matrix
        confusion = torch.bincount(flat, minlength=num_classes * num_classes)
        confusion = confusion.view(num_classes, num_classes).tolist()  # rows true, cols predicted
    per_class: list[float | None] = [
        100.0 * int(c) / int(s) if s > 0 else None
        for c, s in zip(correct.tolist(), support.tolist(), strict=True)
    ]

    groups = shots.labels(counts)
    result: dict = {"top1": top1, "top5": top5}
    for group in SHOT_GROUPS:
        accs = [a for a, g in zip(per_class, groups, strict=True) if g == group and a is not None]
        result[group] = math.fsum(accs) / len(accs) if accs else None
    result.update(
        per_class=per_class,
        confusion=confusion,
        support=support.tolist(),
        class_counts=counts,
        num_samples=int(num_samples),
        shot_thresholds={"many": int(many_threshold), "few": int(few_threshold)},
        group_sizes={g: groups.count(g) for g in SHOT_GROUPS},
    )
    return result


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    *,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` in eval mode over ``loader`` and collect its outputs.

    The train/eval flag of every submodule is restored afterwards, so a model whose frozen
    backbone sits in eval mode inside a training classifier comes back exactly as it was.

    Args:
        model: maps a (B, ...) image batch to (B, C) logits.
        loader: iterable of ``(images, labels)`` batches: images (B, ...), labels (B,) int.
        device: where to run the model (its parameters must already be there).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``); None runs in full precision.

    Returns:
        ``(logits, targets)`` on the CPU: (N, C) float32 and (N,) int64.
    """
    # B batch, C classes, N samples
    device = torch.device(device)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    all_logits, all_targets = [], []
    try:
        for batch in loader:
            images, labels = batch[0], batch[1]
            images = images.to(device, non_blocking=True)
            with torch.autocast(
                device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None
            ):
                logits = model(images)  # (B, C)
            all_logits.append(logits.float().cpu())
            all_targets.append(torch.as_tensor(labels).long().cpu())
    finally:
        for module, training in modes.items():
            module.training = training
    if not all_logits:
        raise ValueError("loader yielded no batches")
    return torch.cat(all_logits), torch.cat(all_targets)  # (N, C), (N,)


def format_metrics_table(metrics: dict) -> str:
    """A small fixed-width text table of the headline numbers, for terminals and logs.

    Args:
        metrics: a dict returned by :func:`classification_metrics`.

    Returns:
        A multi-line string (no trailing newline).
    """
    sizes = metrics.get("group_sizes", {})
    lines = [f"{'metric':<8}{'acc %':>8}  classes", "-" * 25]
    rows = [("Top-1", "top1", None), ("Top-5", "top5", None)]
    rows += [
        (name, key, key) for name, key in zip(("Many", "Medium", "Few"), SHOT_GROUPS, strict=True)
    ]
    for name, key, size_key in rows:
        value = metrics.get(key)
        text = "n/a" if value is None else f"{value:.2f}"
        classes = "" if size_key is None else f"  {sizes.get(size_key, '?')}"
        lines.append(f"{name:<8}{text:>8}{classes}".rstrip())
    return "\n".join(lines)


def _as_counts(class_counts: Sequence[int]) -> list[int]:
    try:
        counts = [int(c) for c in class_counts]
        valid = all(c >= 0 and c == raw for c, raw in zip(counts, class_counts, strict=True))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"class_counts must be non-negative integers, got {list(class_counts)}")
    return counts


def _is_integer(tensor: Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return type(value).__name__
