"""Crop primitives shared by the stage-1 views and the stage-2 / evaluation transforms.

Random-resized-crop boxes and flips, crop + resize (per sample and batched), input conversion,
argument checks and the final normalisation. Conventions:

- **Pixels and boxes.** Pixel (row y, column x) covers [x, x+1) × [y, y+1). A box (x1, y1, x2, y2)
  with integer corners covers the pixels x1 ≤ x < x2, y1 ≤ y < y2. This is the convention of
  ``torchvision.ops.roi_align(..., aligned=True)``: [0, 0, S, S] is the whole S×S view, and RoIAlign
  of a stride-s feature map at ``spatial_scale=1/s`` samples the region a patch was cropped from.
- **Resizing.** A crop is resized with the bilinear (triangle) filter, antialiased when shrinking,
  using only the pixels inside the box: exactly ``F.interpolate(crop, mode="bilinear",
  antialias=True)``. The per-sample path (``crop_resize``) calls that on each crop; the batched
  path (``resample_boxes``) writes the same filter as per-image row and column matrices, so two
  batched matmuls crop, resize and (by reversing the column matrix) flip a whole batch with a
  different box per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dscl.device_path import device_constant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the query/key/classifier crops
P_FLIP = 0.5
CROP_ATTEMPTS = 10  # random-resized-crop tries before the central fallback


# ---------------------------------------------------------------- argument checks


def check_int(name: str, value: object, minimum: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_interval(name: str, value: object, upper: float | None) -> tuple[float, float]:
    """``value`` as a float pair (low, high) with 0 < low <= high (<= ``upper`` if given).

    Raises:
        ValueError: naming ``name`` otherwise.
    """
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not 0 < low <= high or (upper is not None and high > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must satisfy 0 < low <= high{bound}, got {value!r}")
    return low, high


def check_stats(mean: object, std: object) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) as two 3-tuples of floats (RGB), every std > 0; ValueError otherwise."""
    out = []
    for name, value in (("mean", mean), ("std", std)):
        try:
            values = tuple(float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            values = ()
        if len(values) != 3 or (name == "std" and min(values) <= 0):
            raise ValueError(
                f"{name} must be 3 floats (RGB){', all > 0' * (name == 'std')}, got {value!r}"
            )
        out.append(values)
    return out[0], out[1]


# ------------------------------------------------------------ random-resized-crop boxes and flips


def draw_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """Random-resized-crop boxes, vectorised over ``n`` draws: ``boxes_of`` the ``n`` rows of
    ``box_uniforms``.

    Returns:
        (n, 4) float32 integer-valued boxes (x1, y1, x2, y2) inside the height×width frame.
    """
    return boxes_of(box_uniforms(n, generator, device), height, width, scale, ratio)


def box_uniforms(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The uniforms of ``n`` box draws: (n, 2A + 2) for A = ``CROP_ATTEMPTS`` (A area fractions,
    A log aspects, then x1 and y1), float64 on ``device`` (float32 on MPS, which has no
    float64)."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.rand(n, 2 * CROP_ATTEMPTS + 2, generator=generator, device=device, dtype=dtype)


def boxes_of(
    u: Tensor, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> Tensor:
    """The boxes of the uniforms ``u`` of ``box_uniforms`` in a height×width frame.

    Each draw tries ``CROP_ATTEMPTS`` (area fraction ~ U(scale), log aspect ~ U(log ratio)) pairs,
    rounds w = √(area·aspect), h = √(area/aspect) to integers and keeps the first that fits; if none
    fits it takes the largest central box whose aspect ratio is within ``ratio``.

    Returns:
        (n, 4) float32 integer-valued boxes (x1, y1, x2, y2) inside the height×width frame.
    """
    # n draws, A attempts
    tries = CROP_ATTEMPTS
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :tries])  # (n, A)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * u[:, tries : 2 * tries])  # (n, A)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)  # (n, A)
    first = fits.int().argmax(dim=1, keepdim=True)  # (n, 1) first fitting attempt
    found = fits.any(dim=1)  # (n,)
    if width / height < ratio[0]:  # central fallback: whole frame, aspect clamped into ratio
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w.gather(1, first)[:, 0], float(fallback_w))  # (n,)
    h = torch.where(found, h.gather(1, first)[:, 0], float(fallback_h))
    x1 = torch.floor(u[:, -2] * (width - w + 1)).clamp(max=width - w)  # uniform in {0..W-w}
    y1 = torch.floor(u[:, -1] * (height - h + 1)).clamp(max=height - h)
    x1 = torch.where(found, x1, torch.div(width - w, 2, rounding_mode="floor"))
    y1 = torch.where(found, y1, torch.div(height - h, 2, rounding_mode="floor"))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1).float()  # (n, 4)


def draw_flips(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n,) bool horizontal flips, each with probability ``P_FLIP``, drawn on ``device``."""
    return torch.rand(n, generator=generator, device=device) < P_FLIP  # (n,) bool


# ---------------------------------------------------------------- crop + resize


def to_unit(images: Tensor) -> Tensor:
    """uint8 in [0, 255] or float in [0, 1] → float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if images.is_floating_point():
        return images.float()
    raise ValueError(f"images must be uint8 or floating point, got dtype {images.dtype}")


def image_tensor(img: Image.Image | Tensor) -> Tensor:
    """A PIL image or a (3, H, W) tensor → (3, H, W) tensor (uint8 for PIL)."""
    if isinstance(img, Image.Image):
        array = np.array(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(array).permute(2, 0, 1)
    if isinstance(img, Tensor) and img.ndim == 3 and img.shape[0] == 3:
        return img
    shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
    raise ValueError(f"img must be a PIL image or a (3, H, W) tensor, got {shape}")


def check_batch(images: object) -> Tensor:
    """A (B, 3, H, W) uint8 or float batch as float32 in [0, 1]; ValueError on another shape."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    return to_unit(images)


def crop_resize(
    image: Tensor, box: Tensor | Sequence[int], size: int, flip: bool = False
) -> Tensor:
    """Crop (3, H, W) ``image`` at integer ``box`` (x1, y1, x2, y2; a CPU tensor or Python
    numbers), resize to (3, size, size)."""
    x1, y1, x2, y2 = (int(v) for v in (box.tolist() if isinstance(box, Tensor) else box))
    crop = to_unit(image[None, :, y1:y2, x1:x2])  # (1, 3, h, w)
    out = F.interpolate(
        crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    return out.flip(-1) if flip else out


def _resample_weights(start: Tensor, length: Tensor, flip: Tensor, src: int, out: int) -> Tensor:
    """Rows of the antialiased bilinear resampling of [start, start+length) to ``out`` samples.

    Args:
        start, length: (...,) crop start and length along one axis, in pixels.
        flip: (...,) bool, reverse the output order (a horizontal flip for the column axis).
        src: length of the source axis; out: number of output samples.

    Returns:
        (..., out, src) weights; each row sums to one and is zero outside the crop.
    """
    scale = (length / out)[..., None, None]  # source pixels per output pixel
    offsets = torch.arange(out, device=start.device, dtype=torch.float32)[:, None] + 0.5
    centre = start[..., None, None] + offsets * scale  # (..., out, 1)
    pixel = torch.arange(src, device=start.device, dtype=torch.float32) + 0.5  # (src,)
    weights = (1 - (pixel - centre).abs() / scale.clamp(min=1)).clamp(min=0)  # (..., out, src)
    inside = (pixel > start[..., None, None]) & (pixel < (start + length)[..., None, None])
    weights = weights * inside
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.where(flip[..., None, None], weights.flip(-2), weights)


def resample_boxes(images: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Batched crop + resize (+ flip): (N, C, H, W), (N, M, 4), (N, M) → (N, M, C, s, s)."""
    # N images, M boxes per image, C channels
    height, width = images.shape[-2:]
    no_flip = torch.zeros_like(flips)
    rows = _resample_weights(boxes[..., 1], boxes[..., 3] - boxes[..., 1], no_flip, height, size)
    cols = _resample_weights(boxes[..., 0], boxes[..., 2] - boxes[..., 0], flips, width, size)
    tmp = torch.einsum("nmyh,nchw->nmcyw", rows, images)  # (N, M, C, s, W)
    return torch.einsum("nmcyw,nmxw->nmcyx", tmp, cols)  # (N, M, C, s, s)


def normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(..., 3, H, W) images minus ``mean``, divided by ``std`` (per channel)."""
    mean_, std_ = device_constant(tuple(mean), x), device_constant(tuple(std), x)
    return (x - mean_.view(3, 1, 1)).div_(std_.view(3, 1, 1))
