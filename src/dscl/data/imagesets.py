"""The two dataset kinds every dscl split is made of, and RGB image loading.

- ``ArrayImageDataset``: images held in memory as uint8 arrays (Fashion-MNIST, CIFAR, synthetic);
  it also offers ``tensor_images()`` for the batched on-device augmentation path.
- ``ImageFileDataset``: images read lazily from files (list files, JSON, image folders); a corrupt
  file raises ``DataError`` naming it; ``find_unreadable()`` finds every such file up front.

Both return ``(transform(image), label)``, or ``(image, label)`` when ``transform`` is None, where
``image`` is always an RGB PIL image: grayscale, alpha, palette and 16/32-bit images are converted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dscl.errors import DataError

Transform = Callable[[Image.Image], Any]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Alpha is dropped (as torchvision's loader does); palette images with transparency go through
    RGBA; 16-bit images map 0..65535 onto 0..255 (value / 257); 32-bit integer images are read as
    16-bit when their maximum exceeds 255 (8-bit otherwise), beyond 65535 min-max scaled; float
    images in [0, 1] are scaled by 255, others min-max scaled.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        top = float(values.max()) if values.size else 0.0
        low = float(values.min()) if values.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < top <= 65535):
            scaled = values / 257.0
        elif mode == "F" and low >= 0 and top <= 1:
            scaled = values * 255.0
        elif low >= 0 and top <= 255:
            scaled = values
        else:
            scaled = (values - low) * (255.0 / max(top - low, 1e-12))
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open, fully decode and convert one image file to RGB (errors propagate from PIL)."""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()  # decode now, so a corrupt file fails here and not inside a transform
    return to_rgb(image)


class _LabelledImages(Dataset):
    """What both dataset kinds share: labels, class names, counts, length and the transform."""

    def __init__(
        self, targets: Sequence[int], class_names: Sequence[str], transform: Transform | None
    ) -> None:
        self.targets = [int(t) for t in targets]
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        bad = [t for t in self.targets if not 0 <= t < self.num_classes]
        if bad:
            raise ValueError(f"targets: label {bad[0]} is outside [0, {self.num_classes})")
        self.transform = transform

    @property
    def class_counts(self) -> list[int]:
        """(C,) images per class in this dataset."""
        labels = np.asarray(self.targets, dtype=np.int64)
        return np.bincount(labels, minlength=self.num_classes).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def _item(self, image: Image.Image, index: int) -> tuple[Any, int]:
        """(transform(image), label) of entry ``index``, or (image, label) without transform."""
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class ArrayImageDataset(_LabelledImages):
    """An in-memory image dataset.

    Args:
        images: (N, H, W) grayscale or (N, H, W, 3) RGB uint8 array (may be shared, not copied).
        targets: N labels in [0, C).
        class_names: C class names.
        source_indices: N indices of these images in the array they were taken from (kept for
            bookkeeping, e.g. to prove that a validation split is disjoint from training).
        transform: callable applied to the RGB PIL image, or None.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int],
        class_names: Sequence[str],
        *,
        source_indices: Sequence[int] | None = None,
        transform: Transform | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}"
            )
        if images.ndim == 4 and images.shape[3] != 3:
            raise ValueError(f"images must have 3 channels last, got shape {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        super().__init__(targets, class_names, transform)
        self.images = images
        indices = range(len(images)) if source_indices is None else source_indices
        self.source_indices = [int(i) for i in indices]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self._item(to_rgb(Image.fromarray(self.images[index])), index)

    def tensor_images(self) -> torch.Tensor:
        """All images as one uint8 tensor (N, 3, H, W); grayscale is repeated to 3 channels."""
        # N images, H height, W width
        images = torch.from_numpy(np.ascontiguousarray(self.images))
        if images.ndim == 3:  # (N, H, W)
            return images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, H, W)
        return images.permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayImageDataset:
        """A new dataset of the given rows (in that order), same class names, no transform."""
        rows = np.asarray(indices, dtype=np.int64)
        return ArrayImageDataset(
            self.images[rows],
            [self.targets[i] for i in rows],
            self.class_names,
            source_indices=[self.source_indices[i] for i in rows],
        )


class ImageFileDataset(_LabelledImages):
    """Images read lazily from files.

    Args:
        paths: N image file paths (already validated to exist by the builders).
        targets: N labels in [0, C).
        class_names: C class names.
        transform: callable applied to the RGB PIL image, or None.

    An unreadable image raises ``DataError`` naming the file when it is loaded. To skip such
    images instead, find them up front with ``find_unreadable()`` and drop them with ``subset()``
    (``build_splits(..., skip_bad_images=True)`` does so).
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int],
        class_names: Sequence[str],
        *,
        transform: Transform | None = None,
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        super().__init__(targets, class_names, transform)
        self.paths = [str(p) for p in paths]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = self.paths[index]
        try:
            image = load_rgb(path)
        # PIL raises many exception types for corrupt data (OSError, SyntaxError, ValueError,
        # struct.error, DecompressionBombError ...); only decoding is inside this try.
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path}: unreadable image ({_describe(exc)})") from exc
        return self._item(image, index)

    def find_unreadable(self, threads: int | None = None) -> list[tuple[int, str]]:
        """Decode every image once and report the ones that fail.

        Args:
            threads: decoding threads; None uses up to 8 (one per CPU core).

        Returns:
            (index, error) of every unreadable image, in dataset order; error reads
            "ExceptionType: message".
        """
        workers = threads if threads is not None else min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = list(pool.map(_decode_error, self.paths))
        return [(i, error) for i, error in enumerate(errors) if error is not None]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageFileDataset:
        """A new dataset of the given entries (in that order), same class names, no transform."""
        rows = [int(i) for i in indices]
        return ImageFileDataset(
            [self.paths[i] for i in rows], [self.targets[i] for i in rows], self.class_names
        )


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _decode_error(path: str) -> str | None:
    """None if ``path`` decodes as an image, else what went wrong ("ExceptionType: message")."""
    try:
        load_rgb(path)
    except Exception as exc:  # noqa: BLE001 (as in ImageFileDataset.__getitem__)
        return _describe(exc)
    return None
