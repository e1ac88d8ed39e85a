"""The two dataset kinds every dscl split is made of, and RGB image loading.

- ``ArrayImageDataset``: images held in memory as uint8 arrays (Fashion-MNIST, CIFAR, synthetic);
  it also offers ``tensor_images()`` for the batched on-device augmentation path.
- ``ImageFileDataset``: images read lazily from files (list files, JSON, image folders); a corrupt
  file raises ``DataError`` naming it, or with ``skip_bad_images`` is replaced by another image of
  the same class and recorded in ``bad_images``.

Both return ``(transform(image), label)``, or ``(image, label)`` when ``transform`` is None, where
``image`` is always an RGB PIL image: grayscale, alpha, palette and 16/32-bit images are converted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

Transform = Callable[[Image.Image], Any]


class DataError(ValueError):
    """Bad dataset content: a missing or corrupt file, a bad label, a malformed list line, ..."""


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


def _counts(targets: Sequence[int], num_classes: int) -> list[int]:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).tolist()


def _check_labels(targets: Sequence[int], class_names: Sequence[str], what: str) -> None:
    bad = [t for t in targets if not 0 <= t < len(class_names)]
    if bad:
        raise ValueError(f"{what}: label {bad[0]} is outside [0, {len(class_names)})")


class ArrayImageDataset(Dataset):
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
        self.images = images
        self.targets = [int(t) for t in targets]
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        _check_labels(self.targets, self.class_names, "targets")
        indices = range(len(images)) if source_indices is None else source_indices
        self.source_indices = [int(i) for i in indices]
        self.transform = transform

    @property
    def class_counts(self) -> list[int]:
        """(C,) images per class in this dataset."""
        return _counts(self.targets, self.num_classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = to_rgb(Image.fromarray(self.images[index]))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

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


class ImageFileDataset(Dataset):
    """Images read lazily from files.

    Args:
        paths: N image file paths (already validated to exist by the builders).
        targets: N labels in [0, C).
        class_names: C class names.
        transform: callable applied to the RGB PIL image, or None.
        skip_bad_images: if False, an unreadable image raises ``DataError`` naming the file; if
            True it is recorded in ``bad_images`` and another image of the same class is returned
            instead (the next readable one in dataset order, wrapping around).

    Note:
        ``bad_images`` is filled in the process that loads the image: with DataLoader workers the
        records stay in the workers. Call ``scan_bad_images()`` in the main process first to find
        every corrupt file up front (it decodes every image once).
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int],
        class_names: Sequence[str],
        *,
        transform: Transform | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self.targets = [int(t) for t in targets]
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        _check_labels(self.targets, self.class_names, "targets")
        self.transform = transform
        self.skip_bad_images = bool(skip_bad_images)
        self.bad_images: list[str] = []
        self._bad: set[int] = set()
        self._by_class: list[list[int]] = [[] for _ in self.class_names]
        for i, t in enumerate(self.targets):
            self._by_class[t].append(i)

    @property
    def class_counts(self) -> list[int]:
        """(C,) images per class in this dataset."""
        return _counts(self.targets, self.num_classes)

    def __len__(self) -> int:
        return len(self.targets)

    def _try_load(self, index: int) -> Image.Image | None:
        """The RGB image at ``index``, or None (recorded as bad) if skipping unreadable files."""
        path = self.paths[index]
        try:
            return load_rgb(path)
        # PIL raises many exception types for corrupt data (OSError, SyntaxError, ValueError,
        # struct.error, DecompressionBombError ...); only decoding is inside this try.
        except Exception as exc:  # noqa: BLE001
            if not self.skip_bad_images:
                raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
            if index not in self._bad:
                self._bad.add(index)
                self.bad_images.append(path)
            return None

    def _load(self, index: int) -> Image.Image:
        image = None if index in self._bad else self._try_load(index)
        if image is not None:
            return image
        members = self._by_class[self.targets[index]]
        start = members.index(index)
        for step in range(1, len(members)):
            other = members[(start + step) % len(members)]
            if other not in self._bad:
                image = self._try_load(other)
                if image is not None:
                    return image
        name = self.class_names[self.targets[index]]
        raise DataError(
            f"every image of class {self.targets[index]} ({name}) is unreadable, "
            f"e.g. {self.paths[index]}"
        )

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self._load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def scan_bad_images(self) -> list[str]:
        """Decode every image once; return (and, with skipping, record) the unreadable ones.

        Raises:
            DataError: on the first unreadable image when ``skip_bad_images`` is False.
        """
        for index in range(len(self)):
            if index not in self._bad:
                self._try_load(index)
        return list(self.bad_images)

    def report_bad_images(self) -> str:
        """ "N unreadable images skipped: path, path, ..." for the images skipped so far."""
        listed = ", ".join(self.bad_images)
        return f"{len(self.bad_images)} unreadable images skipped" + (
            f": {listed}" if listed else ""
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageFileDataset:
        """A new dataset of the given entries (in that order), same settings, no transform."""
        rows = [int(i) for i in indices]
        return ImageFileDataset(
            [self.paths[i] for i in rows],
            [self.targets[i] for i in rows],
            self.class_names,
            skip_bad_images=self.skip_bad_images,
        )
