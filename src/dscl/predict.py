"""Using a trained model: top-k predictions for image files, and backbone export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from dscl.checkpoint import read_backbone, read_classifier, save_checkpoint
from dscl.data.imagesets import load_rgb
from dscl.data.views import eval_transform
from dscl.errors import DataError, UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def image_files(paths: list[Path]) -> list[Path]:
    """Files as given, and the image files inside folders (recursively, sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError(f"no image files found in {', '.join(map(str, paths))}")
    return files


def predict_paths(
    checkpoint: Path, paths: list[Path], topk: int = 5, batch_size: int = 64
) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """Yield (file, [(class name, probability), ...]) with the ``topk`` most likely classes."""
    from PIL import UnidentifiedImageError

    if topk <= 0:
        raise UserError(f"--topk: must be positive, got {topk}")
    model, state = read_classifier(checkpoint)
    model.eval()
    data_cfg = state["config"]["data"]
    transform = eval_transform(
        data_cfg["image_size"], tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    )
    names = state["class_names"]
    k = min(topk, len(names))
    files = image_files(paths)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = []
        for path in chunk:
            try:
                # the decode and RGB conversion training uses (16-bit, palette, alpha alike)
                images.append(transform(load_rgb(str(path))))
            except (OSError, UnidentifiedImageError, ValueError) as err:
                raise DataError(f"{path}: cannot read image ({err})") from None
        with torch.no_grad():
            probs = model(torch.stack(images)).softmax(dim=1)  # (N, C)
        values, indices = probs.topk(k, dim=1)
        for path, vals, idxs in zip(chunk, values.tolist(), indices.tolist(), strict=True):
            yield path, [(names[i], v) for i, v in zip(idxs, vals, strict=True)]


def export_backbone(checkpoint: Path, output: Path) -> Path:
    """Write the backbone's weights as a plain state_dict that loads into the torchvision model of
    the same name (the classifier layer ``fc`` excepted)."""
    save_checkpoint(read_backbone(checkpoint).export_state_dict(), output)
    return output
