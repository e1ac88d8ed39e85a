"""A deterministic, offline image generator whose classes are learnable, for tests and benchmarks.

Class c of C has its own colour (hue c / C) and its own stripe pattern (orientation pi * c / C,
2 + c mod 3 cycles across the image); every image gets a random stripe phase, a random brightness
and Gaussian pixel noise. Colour alone separates classes, and so does the pattern, so the task
stays learnable under colour jitter and random grayscale.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np

from dscl.data.imagesets import ArrayImageDataset


def synthetic_class_names(num_classes: int) -> list[str]:
    """``class_00``, ``class_01``, ..."""
    width = len(str(num_classes - 1))
    return [f"class_{c:0{width}d}" for c in range(num_classes)]


def make_synthetic(
    counts: Sequence[int], image_size: int, seed: int, stream: int, noise_std: float = 20.0
) -> ArrayImageDataset:
    """Images of ``counts[c]`` per class c, class order, reproducible for (seed, stream).

    Args:
        counts: C images per class.
        image_size: S, the side of the square RGB images.
        seed: base seed.
        stream: sub-stream (different streams give different images, e.g. train vs test).
        noise_std: standard deviation of the pixel noise, in 0-255 units.

    Returns:
        A dataset of sum(counts) images, (S, S, 3) uint8 each.
    """
    if not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size must be an integer >= 4, got {image_size!r}")
    if any(int(n) < 0 for n in counts):
        raise ValueError(f"counts must be non-negative, got {list(counts)}")
    num_classes = len(counts)
    rng = np.random.default_rng([seed, stream])
    # S side, n images of one class
    grid = np.arange(image_size, dtype=np.float64) / image_size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")  # (S, S) each
    images, targets = [], []
    for c, n in enumerate(counts):
        n = int(n)
        colour = np.array(colorsys.hsv_to_rgb(c / num_classes, 0.85, 0.95))  # (3,)
        angle = np.pi * c / num_classes
        cycles = 2 + c % 3
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
        projection = np.cos(angle) * xx + np.sin(angle) * yy  # (S, S)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * projection + phase)  # (n, S, S)
        brightness = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1))
        shade = (0.35 + 0.65 * stripes)[..., None] * colour  # (n, S, S, 3)
        pixels = 255.0 * brightness * shade + rng.normal(0, noise_std, size=shade.shape)
        images.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        targets += [c] * n
    return ArrayImageDataset(np.concatenate(images), targets, synthetic_class_names(num_classes))
