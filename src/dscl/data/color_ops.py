"""Colour ops on batches of float images in [0, 1], (N, 3, H, W), with per-image parameters.

torchvision's formulas, vectorised over images that each have their own factors: colour jitter
(brightness, contrast, saturation, hue) in a random order per image, then grayscale, then a
Gaussian blur. ``draw_color`` draws the parameters, ``apply_color`` applies them. Blur uses a
kernel of about 10% of the image side (odd, at least 3) and is skipped for images smaller than a
minimum size: there a 3-tap kernel already spans a fifth of the image or more and erases it rather
than blurs it (the 8-9 px patches of 28-32 px views).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from dscl.device_path import device_constant, sync_free

JITTER_STRENGTH = 0.4  # brightness, contrast and saturation factors are drawn from [0.6, 1.4]
BLUR_SIGMA = (0.1, 2.0)
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2 weights, as torchvision's rgb_to_grayscale


@dataclass
class ColorParams:
    """Colour-op parameters of N images (``draw_color``; ``apply_color`` uses them)."""

    jitter: Tensor  # (N,) bool, jitter applied
    factors: Tensor  # (N, 4) brightness, contrast, saturation factors and hue shift
    order: Tensor  # (N, 4) long, order of the four jitter ops
    gray: Tensor  # (N,) bool
    blur: Tensor  # (N,) bool
    sigma: Tensor  # (N,) blur sigma
    use_hue: bool


def draw_color(
    n: int,
    hue: float,
    p_jitter: float,
    p_gray: float,
    p_blur: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> ColorParams:
    """Colour-op parameters of ``n`` images; draws the same numbers whatever the outcomes."""
    u = torch.rand(n, 8, generator=generator, device=device)
    v = torch.rand(n, 4, generator=generator, device=device)
    return color_params(u, v, hue, p_jitter, p_gray, p_blur)


def color_params(
    u: Tensor, v: Tensor, hue: float, p_jitter: float, p_gray: float, p_blur: float
) -> ColorParams:
    """The parameters ``draw_color`` makes of its uniforms ``u`` (N, 8) and ``v`` (N, 4).

    Element-wise in the uniforms, so a batch of rows drawn image by image gives each image the
    parameters it would have had alone (the fast file path draws in the workers and builds the
    parameters of the whole batch here).
    """
    order = torch.argsort(v, dim=1)
    low = 1.0 - JITTER_STRENGTH
    factors = torch.cat([low + 2 * JITTER_STRENGTH * u[:, 1:4], hue * (2 * u[:, 4:5] - 1)], 1)
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 7]
    return ColorParams(
        u[:, 0] < p_jitter, factors, order, u[:, 5] < p_gray, u[:, 6] < p_blur, sigma, hue > 0
    )


def grayscale(x: Tensor) -> Tensor:
    """Luma of (N, 3, H, W) images: (N, 1, H, W), torchvision's ``rgb_to_grayscale`` weights."""
    luma = device_constant(tuple(LUMA), x).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)  # (N, 1, H, W)


def _scaled(x: Tensor, factor: Tensor, inplace: bool) -> Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return x.mul_(factor) if inplace else x * factor


def _blend(x: Tensor, other: Tensor, factor: Tensor, inplace: bool) -> Tensor:
    # factor·x + (1 − factor)·other, each product and the sum rounded as written out
    weight = (1 - factor.view(-1, 1, 1, 1)) * other
    return _scaled(x, factor, inplace).add_(weight).clamp_(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor, inplace: bool = False) -> Tensor:
    """Scale image i of (N, 3, H, W) by ``factor[i]`` ((N,)), clamped to [0, 1].

    ``inplace``: write the result into ``x`` (the same numbers, no new image-sized tensor).
    """
    return _scaled(x, factor, inplace).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor, inplace: bool = False) -> Tensor:
    """Blend image i of (N, 3, H, W) with its mean luma by ``factor[i]`` ((N,))."""
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor, inplace)


def adjust_saturation(x: Tensor, factor: Tensor, inplace: bool = False) -> Tensor:
    """Blend image i of (N, 3, H, W) with its grayscale version by ``factor[i]`` ((N,))."""
    return _blend(x, grayscale(x), factor, inplace)


def adjust_hue(x: Tensor, shift: Tensor, inplace: bool = False) -> Tensor:
    """Rotate the HSV hue of every pixel of image i by ``shift[i]`` (a fraction of a turn)."""
    red, green, blue = x.unbind(1)  # (N, H, W) each
    value, low = x.amax(1), x.amin(1)
    chroma = value - low
    sat = chroma / torch.where(value > 0, value, torch.ones_like(value))
    div = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sector = torch.where(  # hue in sixths of a turn
        value == red,
        (green - blue) / div,
        torch.where(value == green, 2 + (blue - red) / div, 4 + (red - green) / div),
    )
    hue6 = torch.remainder(sector + 6 * shift.view(-1, 1, 1), 6)[:, None]  # (N, 1, H, W)
    offsets = device_constant((5.0, 3.0, 1.0), x).view(1, 3, 1, 1)
    k = torch.remainder(offsets + hue6, 6)  # (N, 3, H, W)
    out = value[:, None] * (1 - sat[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))
    return x.copy_(out) if inplace else out


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Separable Gaussian blur of image i with ``sigma[i]``, reflect padding (torchvision's)."""
    n, c, h, w = x.shape
    taps = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)  # (N, k)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N·C, k)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c)
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c)
    return y.view(n, c, h, w)


def blur_kernel_size(size: int, min_size: int) -> int:
    """Odd kernel of about 10% of ``size``, at least 3; 0 (no blur) below ``min_size``."""
    if size < min_size:
        return 0
    k = int(0.1 * size)
    return max(3, k + 1 - k % 2)


PER_IMAGE_BYTES = 3 * 128 * 128 * 4
"""On a CPU, images of at least this many bytes (128 px and up in float32) are coloured one at a
time, in place (``apply_color``): measured faster from 128 px, slower at 112 px and below."""


def apply_color(x: Tensor, params: ColorParams, blur_kernel: int, way: str | None = None) -> Tensor:
    """Jitter (per-image random op order), grayscale, blur of (N, 3, H, W) images in [0, 1].

    Three ways give the same images (``way`` forces one; tests):
    - ``"masked"``, on an accelerator: each op runs on the whole batch and ``torch.where`` keeps
      its result where selected, so the views never wait for the device (``nonzero`` would read
      the device's count back);
    - ``"subset"``, on a CPU for small images: each op runs on the images that draw it
      (``nonzero``, free there), gathered and put back;
    - ``"per_image"``, on a CPU for images of at least ``PER_IMAGE_BYTES``: each image gets its
      own ops in its own order, in place. Large batches of large images are memory-bound on a CPU
      and every batch-sized temporary is a fresh allocation; one image's temporaries stay in the
      cache and are reused (1.4x on a stage-1 batch at 224 px, one thread:
      ``benchmarks/color_speed.py``).
    """
    if way is None:
        if sync_free(x.device):
            way = "masked"
        elif len(x) and x[0].numel() * x.element_size() >= PER_IMAGE_BYTES:
            way = "per_image"
        else:
            way = "subset"
    if way not in ("masked", "subset", "per_image"):
        raise ValueError(f"way must be 'masked', 'subset' or 'per_image', got {way!r}")
    x = x.clone()
    if way == "per_image":
        return _apply_per_image(x, params, blur_kernel)
    apply = _apply_where if way == "masked" else _apply_subset
    for step in range(4):
        for op in range(4 if params.use_hue else 3):
            selected = params.jitter & (params.order[:, step] == op)
            x = apply(x, selected, _JITTER_OPS[op], params.factors[:, op])
    x = apply(x, params.gray, _gray3, None)
    if blur_kernel:
        x = apply(x, params.blur, partial(gaussian_blur, kernel=blur_kernel), params.sigma)
    return x


def _apply_per_image(x: Tensor, params: ColorParams, blur_kernel: int) -> Tensor:
    """``x`` with image i's colour ops applied to it in place, one image at a time."""
    jitter, order = params.jitter.tolist(), params.order.tolist()
    gray, blur = params.gray.tolist(), params.blur.tolist()
    ops = 4 if params.use_hue else 3
    for i, image in enumerate(x.split(1)):  # (1, 3, H, W) views of x
        if jitter[i]:
            for op in order[i]:
                if op < ops:
                    _JITTER_OPS[op](image, params.factors[i : i + 1, op], inplace=True)
        if gray[i]:
            image.copy_(_gray3(image, None))
        if blur_kernel and blur[i]:
            image.copy_(gaussian_blur(image, params.sigma[i : i + 1], blur_kernel))
    return x


def _gray3(x: Tensor, _: Tensor | None) -> Tensor:
    return grayscale(x).expand(-1, 3, -1, -1)


def _apply_subset(x: Tensor, selected: Tensor, op, values: Tensor | None) -> Tensor:
    """x with ``op`` applied in place to the selected images (reads the selection on the host)."""
    idx = selected.nonzero()[:, 0]
    if idx.numel():
        x[idx] = op(x[idx], None if values is None else values[idx])
    return x


def _apply_where(x: Tensor, selected: Tensor, op, values: Tensor | None) -> Tensor:
    """x with ``op`` applied to every image and kept where selected (no host read)."""
    return torch.where(selected.view(-1, 1, 1, 1), op(x, values), x)
