"""Views of one training image (DESIGN.md §2): query x_q, key x_k, L patches and their boxes.

Conventions shared by every function here:

- **Pixels and boxes.** Pixel (row y, column x) covers [x, x+1) × [y, y+1). A box (x1, y1, x2, y2)
  with integer corners covers the pixels x1 ≤ x < x2, y1 ≤ y < y2. This is the convention of
  ``torchvision.ops.roi_align(..., aligned=True)``: [0, 0, S, S] is the whole S×S view, and RoIAlign
  of a stride-s feature map at ``spatial_scale=1/s`` samples the region a patch was cropped from.
- **Resizing.** A crop is resized with the bilinear (triangle) filter, antialiased when shrinking,
  using only the pixels inside the box: exactly ``F.interpolate(crop, mode="bilinear",
  antialias=True)``. The per-sample path calls that on each crop; the batched path writes the same
  filter as per-image row and column matrices, so two batched matmuls crop, resize and (by
  reversing the column matrix) flip a whole batch with a different box per image.
- **Randomness.** Both paths draw every parameter with ``_draw_params`` on the generator's device
  (CPU and torch's global RNG when no generator is given, so DataLoader worker seeding makes the
  per-sample path reproducible). The per-sample result for an image therefore equals the batched
  result for a batch of that one image under the same seed, up to float rounding.
- **Colour.** Colour ops act on float images in [0, 1] with per-image factors (torchvision's
  formulas): jitter in a random order per image, then grayscale, then Gaussian blur; normalisation
  comes last. Blur uses a kernel of about 10% of the image side (odd, at least 3) and is skipped
  for images smaller than ``blur_min_size`` (default 16): there a 3-tap kernel already spans a
  fifth of the image or more and erases it rather than blurs it (the 8-9 px patches of 28-32 px
  views). Flips are drawn before colour; colour ops commute with a horizontal flip, so this
  matches MoCo v2's order in distribution while the boxes live in the flipped frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the query/key/classifier crops
P_FLIP = 0.5
CROP_ATTEMPTS = 10  # random-resized-crop tries before the central fallback
JITTER_STRENGTH = 0.4  # brightness, contrast and saturation factors are drawn from [0.6, 1.4]
QUERY_HUE, P_JITTER, P_GRAY, P_BLUR = 0.1, 0.8, 0.2, 0.5  # query and patches (key: hue 0, p 1)
BLUR_SIGMA = (0.1, 2.0)
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2 weights, as torchvision's rgb_to_grayscale


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_interval(name: str, value: object, upper: float | None) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not 0 < low <= high or (upper is not None and high > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must satisfy 0 < low <= high{bound}, got {value!r}")
    return low, high


def _check_stats(mean: object, std: object) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


@dataclass(frozen=True)
class ViewConfig:
    """Settings of the stage-1 views; shared by ``MultiViewTransform`` and ``BatchedMultiView``.

    Attributes:
        view_size: side S of the query and key views in pixels.
        patch_size: side P of the patches; None means round(S · 64 / 224) (64 for 224, 9 for 32).
        num_patches: patches L per image (0 turns patches off).
        crop_scale: area fraction range of the query/key random resized crops.
        crop_ratio: aspect-ratio (w/h) range of the query/key crops, drawn log-uniformly.
        patch_scale: area fraction range of a patch box within the S×S query view.
        patch_ratio: aspect-ratio range of a patch box, drawn log-uniformly.
        color_augment: False turns every colour op (jitter, grayscale, blur) off for the query,
            the key and the patches; geometry stays random.
        blur_min_size: images with a side below this are never blurred.
        mean: per-channel mean subtracted at the end.
        std: per-channel standard deviation divided by at the end.
    """

    view_size: int = 224
    patch_size: int | None = None
    num_patches: int = 5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = CROP_RATIO
    patch_scale: tuple[float, float] = (0.05, 0.6)
    patch_ratio: tuple[float, float] = CROP_RATIO
    color_augment: bool = True
    blur_min_size: int = 16
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        _check_int("view_size", self.view_size, 1)
        if self.patch_size is not None:
            _check_int("patch_size", self.patch_size, 1)
        _check_int("num_patches", self.num_patches, 0)
        _check_int("blur_min_size", self.blur_min_size, 3)
        if not isinstance(self.color_augment, bool):
            raise ValueError(f"color_augment must be a bool, got {self.color_augment!r}")
        coerced = {
            "crop_scale": _check_interval("crop_scale", self.crop_scale, 1.0),
            "crop_ratio": _check_interval("crop_ratio", self.crop_ratio, None),
            "patch_scale": _check_interval("patch_scale", self.patch_scale, 1.0),
            "patch_ratio": _check_interval("patch_ratio", self.patch_ratio, None),
        }
        coerced["mean"], coerced["std"] = _check_stats(self.mean, self.std)
        for name, value in coerced.items():  # lists from YAML become tuples
            object.__setattr__(self, name, value)

    @property
    def patch_px(self) -> int:
        """Resolved patch side P in pixels."""
        if self.patch_size is not None:
            return self.patch_size
        return max(1, round(self.view_size * 64 / 224))


# ---------------------------------------------------------------- parameter drawing (both paths)


@dataclass
class _ColorParams:
    jitter: Tensor  # (N,) bool, jitter applied
    factors: Tensor  # (N, 4) brightness, contrast, saturation factors and hue shift
    order: Tensor  # (N, 4) long, order of the four jitter ops
    gray: Tensor  # (N,) bool
    blur: Tensor  # (N,) bool
    sigma: Tensor  # (N,) blur sigma
    use_hue: bool


@dataclass
class _ViewParams:
    query_boxes: Tensor  # (N, 4) crop of the source image
    query_flips: Tensor  # (N,) bool
    patch_boxes: Tensor  # (N, L, 4) in the flipped query frame
    patch_flips: Tensor  # (N, L) bool
    key_boxes: Tensor  # (N, 4)
    key_flips: Tensor  # (N,) bool
    query_color: _ColorParams | None
    patch_color: _ColorParams | None
    key_color: _ColorParams | None


def _to_device(params, device: torch.device):
    """Recursively move the tensors of a parameter dataclass to ``device``."""
    if isinstance(params, Tensor):
        return params.to(device)
    if is_dataclass(params):
        return type(params)(
            **{f.name: _to_device(getattr(params, f.name), device) for f in fields(params)}
        )
    return params


def _draw_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """Random-resized-crop boxes, vectorised over ``n`` draws.

    Each draw tries ``CROP_ATTEMPTS`` (area fraction ~ U(scale), log aspect ~ U(log ratio)) pairs,
    rounds w = √(area·aspect), h = √(area/aspect) to integers and keeps the first that fits; if none
    fits it takes the largest central box whose aspect ratio is within ``ratio``.

    Returns:
        (n, 4) float32 integer-valued boxes (x1, y1, x2, y2) inside the height×width frame.
    """
    # n draws, A attempts
    tries = CROP_ATTEMPTS
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    u = torch.rand(n, 2 * tries + 2, generator=generator, device=device, dtype=dtype)
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


def _draw_flips(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) < P_FLIP  # (n,) bool


def _draw_color(
    n: int,
    hue: float,
    p_jitter: float,
    p_gray: float,
    p_blur: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> _ColorParams:
    """Colour-op parameters of ``n`` images; draws the same numbers whatever the outcomes."""
    u = torch.rand(n, 8, generator=generator, device=device)
    order = torch.argsort(torch.rand(n, 4, generator=generator, device=device), dim=1)
    low = 1.0 - JITTER_STRENGTH
    factors = torch.cat([low + 2 * JITTER_STRENGTH * u[:, 1:4], hue * (2 * u[:, 4:5] - 1)], 1)
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 7]
    return _ColorParams(
        u[:, 0] < p_jitter, factors, order, u[:, 5] < p_gray, u[:, 6] < p_blur, sigma, hue > 0
    )


def _draw_params(
    cfg: ViewConfig, n: int, height: int, width: int, generator: torch.Generator | None
) -> _ViewParams:
    """All random parameters of ``n`` images of height×width, drawn on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    size, num_patches = cfg.view_size, cfg.num_patches
    query_boxes = _draw_boxes(n, height, width, cfg.crop_scale, cfg.crop_ratio, generator, device)
    query_flips = _draw_flips(n, generator, device)
    patch_boxes = _draw_boxes(
        n * num_patches, size, size, cfg.patch_scale, cfg.patch_ratio, generator, device
    ).view(n, num_patches, 4)
    patch_flips = _draw_flips(n * num_patches, generator, device).view(n, num_patches)
    key_boxes = _draw_boxes(n, height, width, cfg.crop_scale, cfg.crop_ratio, generator, device)
    key_flips = _draw_flips(n, generator, device)
    colors: list[_ColorParams | None] = [None, None, None]
    if cfg.color_augment:
        colors = [
            _draw_color(n, QUERY_HUE, P_JITTER, P_GRAY, P_BLUR, generator, device),
            _draw_color(n * num_patches, QUERY_HUE, P_JITTER, P_GRAY, P_BLUR, generator, device),
            _draw_color(n, 0.0, 1.0, 0.0, 0.0, generator, device),  # key: jitter always, no hue
        ]
    return _ViewParams(
        query_boxes, query_flips, patch_boxes, patch_flips, key_boxes, key_flips, *colors
    )


# ---------------------------------------------------------------- crop + resize


def _to_unit(images: Tensor) -> Tensor:
    """uint8 in [0, 255] or float in [0, 1] → float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if images.is_floating_point():
        return images.float()
    raise ValueError(f"images must be uint8 or floating point, got dtype {images.dtype}")


def _image_tensor(img: Image.Image | Tensor) -> Tensor:
    """A PIL image or a (3, H, W) tensor → (3, H, W) tensor (uint8 for PIL)."""
    if isinstance(img, Image.Image):
        array = np.array(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(array).permute(2, 0, 1)
    if isinstance(img, Tensor) and img.ndim == 3 and img.shape[0] == 3:
        return img
    shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
    raise ValueError(f"img must be a PIL image or a (3, H, W) tensor, got {shape}")


def _check_batch(images: object) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    return _to_unit(images)


def _crop_resize(image: Tensor, box: Tensor, size: int, flip: bool = False) -> Tensor:
    """Crop (3, H, W) ``image`` at integer ``box`` (x1, y1, x2, y2), resize to (3, size, size)."""
    x1, y1, x2, y2 = (int(v) for v in box.tolist())
    crop = _to_unit(image[None, :, y1:y2, x1:x2])  # (1, 3, h, w)
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


def _resample_boxes(images: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Batched crop + resize (+ flip): (N, C, H, W), (N, M, 4), (N, M) → (N, M, C, s, s)."""
    # N images, M boxes per image, C channels
    height, width = images.shape[-2:]
    no_flip = torch.zeros_like(flips)
    rows = _resample_weights(boxes[..., 1], boxes[..., 3] - boxes[..., 1], no_flip, height, size)
    cols = _resample_weights(boxes[..., 0], boxes[..., 2] - boxes[..., 0], flips, width, size)
    tmp = torch.einsum("nmyh,nchw->nmcyw", rows, images)  # (N, M, C, s, W)
    return torch.einsum("nmcyw,nmxw->nmcyx", tmp, cols)  # (N, M, C, s, s)


# ---------------------------------------------------------------- colour ops on (N, 3, H, W)


def _gray(x: Tensor) -> Tensor:
    return (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)  # (N, 1, H, W)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x), factor)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
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
    k = torch.remainder(x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + hue6, 6)  # (N, 3, H, W)
    return value[:, None] * (1 - sat[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
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


def _blur_kernel(size: int, min_size: int) -> int:
    """Odd kernel of about 10% of ``size``, at least 3; 0 (no blur) below ``min_size``."""
    if size < min_size:
        return 0
    k = int(0.1 * size)
    return max(3, k + 1 - k % 2)


def _apply_color(x: Tensor, params: _ColorParams, blur_kernel: int) -> Tensor:
    """Jitter (per-image random op order), grayscale, blur of (N, 3, H, W) images in [0, 1]."""
    x = x.clone()
    for step in range(4):
        for op in range(4 if params.use_hue else 3):
            idx = (params.jitter & (params.order[:, step] == op)).nonzero()[:, 0]
            if idx.numel():
                x[idx] = _JITTER_OPS[op](x[idx], params.factors[idx, op])
    idx = params.gray.nonzero()[:, 0]
    if idx.numel():
        x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
    idx = params.blur.nonzero()[:, 0]
    if blur_kernel and idx.numel():
        x[idx] = _gaussian_blur(x[idx], params.sigma[idx], blur_kernel)
    return x


def _normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    return (x - x.new_tensor(mean).view(3, 1, 1)) / x.new_tensor(std).view(3, 1, 1)


def _finish(
    query: Tensor, key: Tensor, patches: Tensor, params: _ViewParams, cfg: ViewConfig
) -> dict[str, Tensor]:
    """Colour + normalisation shared by both paths; views (N, 3, S, S), patches (N, L, 3, P, P)."""
    if params.query_color is not None:
        query = _apply_color(
            query, params.query_color, _blur_kernel(cfg.view_size, cfg.blur_min_size)
        )
        key = _apply_color(key, params.key_color, 0)
        flat = _apply_color(
            patches.flatten(0, 1), params.patch_color, _blur_kernel(cfg.patch_px, cfg.blur_min_size)
        )  # (N·L, 3, P, P)
        patches = flat.view_as(patches)
    return {
        "query": _normalise(query, cfg.mean, cfg.std),
        "key": _normalise(key, cfg.mean, cfg.std),
        "patches": _normalise(patches, cfg.mean, cfg.std),
        "boxes": params.patch_boxes,
        "patch_flips": params.patch_flips,
    }


# ---------------------------------------------------------------- stage-1 views


class MultiViewTransform:
    """Per-sample views of one image (for DataLoader workers); any input size.

    Args:
        cfg: view settings (defaults: 224 px views, five 64 px patches).

    Call with ``img`` (a PIL image, or a (3, H, W) uint8 / [0, 1] float tensor) and an optional
    ``generator`` (default: torch's global RNG). Returns a dict of ``query`` (3, S, S) and ``key``
    (3, S, S) normalised views x_q and x_k, ``patches`` (L, 3, P, P), ``boxes`` (L, 4) float32
    (x1, y1, x2, y2) of each patch in x_q's pixels (see the module docstring), and ``patch_flips``
    (L,) bool (whether patch j was flipped after cropping).
    """

    def __init__(self, cfg: ViewConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else ViewConfig()
        if not isinstance(self.cfg, ViewConfig):
            raise ValueError(f"cfg must be a ViewConfig, got {type(cfg).__name__}")

    def __call__(
        self, img: Image.Image | Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        # L patches, S view size, P patch size
        cfg, size, patch = self.cfg, self.cfg.view_size, self.cfg.patch_px
        image = _image_tensor(img)  # (3, H, W)
        params = _draw_params(cfg, 1, image.shape[1], image.shape[2], generator)
        params = _to_device(params, image.device)
        query = _crop_resize(image, params.query_boxes[0], size, bool(params.query_flips[0]))
        patches = [
            _crop_resize(query, box, patch, bool(flip))
            for box, flip in zip(params.patch_boxes[0], params.patch_flips[0], strict=True)
        ]
        stacked = torch.stack(patches) if patches else query.new_zeros(0, 3, patch, patch)
        key = _crop_resize(image, params.key_boxes[0], size, bool(params.key_flips[0]))
        out = _finish(query[None], key[None], stacked[None], params, cfg)  # batch of one
        return {name: value[0] for name, value in out.items()}


class BatchedMultiView:
    """Views of a whole batch in a few batched ops on the batch's device (in-memory datasets).

    Args:
        cfg: view settings.

    Call with ``images`` (B, 3, H, W) uint8 (or float in [0, 1]) and an optional ``generator``
    (parameters are drawn on its device; default torch's global CPU RNG). Returns the dict of
    ``MultiViewTransform`` with a leading batch dim: ``query``/``key`` (B, 3, S, S), ``patches``
    (B, L, 3, P, P), ``boxes`` (B, L, 4), ``patch_flips`` (B, L).
    """

    def __init__(self, cfg: ViewConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else ViewConfig()
        if not isinstance(self.cfg, ViewConfig):
            raise ValueError(f"cfg must be a ViewConfig, got {type(cfg).__name__}")

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        # B batch, L patches, S view size, P patch size
        cfg = self.cfg
        x = _check_batch(images)  # (B, 3, H, W) in [0, 1]
        params = _draw_params(cfg, x.shape[0], x.shape[2], x.shape[3], generator)
        params = _to_device(params, x.device)
        query = _resample_boxes(
            x, params.query_boxes[:, None], params.query_flips[:, None], cfg.view_size
        )[:, 0]  # (B, 3, S, S)
        patches = _resample_boxes(
            query, params.patch_boxes, params.patch_flips, cfg.patch_px
        )  # (B, L, 3, P, P)
        key = _resample_boxes(
            x, params.key_boxes[:, None], params.key_flips[:, None], cfg.view_size
        )[:, 0]  # (B, 3, S, S)
        return _finish(query, key, patches, params, cfg)


# ---------------------------------------------------------------- stage 2 and evaluation


def _classifier_scale(view_size: int, scale: tuple[float, float] | None) -> tuple[float, float]:
    # Small images (<= 64 px) lose their object under an 8% crop; keep at least 35% of the area.
    if scale is None:
        scale = (0.08, 1.0) if view_size > 64 else (0.35, 1.0)
    return _check_interval("scale", scale, 1.0)


class ClassifierTrainTransform:
    """Per-sample stage-2 training transform: random resized crop, flip, normalise.

    Args:
        view_size: output side S.
        mean, std: per-channel normalisation.
        scale: crop area range; None means (0.08, 1) above 64 px and (0.35, 1) up to 64 px.

    Call with a PIL image or (3, H, W) tensor (and an optional generator); returns (3, S, S).
    """

    def __init__(
        self,
        view_size: int,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        scale: tuple[float, float] | None = None,
    ) -> None:
        _check_int("view_size", view_size, 1)
        self.view_size, self.scale = view_size, _classifier_scale(view_size, scale)
        self.mean, self.std = _check_stats(mean, std)

    def __call__(
        self, img: Image.Image | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        image = _image_tensor(img)  # (3, H, W)
        device = generator.device if generator is not None else torch.device("cpu")
        box = _draw_boxes(
            1, image.shape[1], image.shape[2], self.scale, CROP_RATIO, generator, device
        )[0]
        flip = bool(_draw_flips(1, generator, device)[0])
        return _normalise(_crop_resize(image, box, self.view_size, flip), self.mean, self.std)


def classifier_train_transform(
    view_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale: tuple[float, float] | None = None
) -> ClassifierTrainTransform:
    """Stage-2 per-sample training transform (see ``ClassifierTrainTransform``)."""
    return ClassifierTrainTransform(view_size, mean, std, scale)


def batched_classifier_train(
    images: Tensor,
    view_size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] | None = None,
) -> Tensor:
    """Batched ``ClassifierTrainTransform``: (B, 3, H, W) uint8 → (B, 3, S, S) on its device.

    With the same generator state it equals the per-sample transform applied image by image for
    B = 1 (up to float rounding).
    """
    _check_int("view_size", view_size, 1)
    scale = _classifier_scale(view_size, scale)
    mean, std = _check_stats(mean, std)
    x = _check_batch(images)  # (B, 3, H, W)
    device = generator.device if generator is not None else torch.device("cpu")
    boxes = _draw_boxes(x.shape[0], x.shape[2], x.shape[3], scale, CROP_RATIO, generator, device)
    flips = _draw_flips(x.shape[0], generator, device)
    views = _resample_boxes(x, boxes[:, None].to(x.device), flips[:, None].to(x.device), view_size)[
        :, 0
    ]  # (B, 3, S, S)
    return _normalise(views, mean, std)


def _default_resize_ratio(view_size: int, resize_ratio: float | None) -> float:
    if resize_ratio is None:
        return 0.875 if view_size >= 64 else 1.0
    if not 0 < float(resize_ratio) <= 1:
        raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio!r}")
    return float(resize_ratio)


def _resize_centre_crop(x: Tensor, view_size: int, resize_ratio: float) -> Tensor:
    """Resize the shorter side of (N, 3, H, W) to round(S / ratio), then centre-crop S×S."""
    height, width = x.shape[-2:]
    short = round(view_size / resize_ratio)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    if (new_h, new_w) != (height, width):
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
    top, left = int(round((new_h - view_size) / 2)), int(round((new_w - view_size) / 2))
    return x[..., top : top + view_size, left : left + view_size]


class EvalTransform:
    """Per-sample evaluation transform: resize, centre crop, normalise (PIL or (3, H, W) tensor).

    Args:
        view_size: output side S.
        mean, std: per-channel normalisation.
        resize_ratio: the shorter side is resized to S / resize_ratio before the centre crop;
            None means 0.875 (256 → 224) from 64 px up and 1.0 (no margin) below.
    """

    def __init__(
        self,
        view_size: int,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize_ratio: float | None = None,
    ) -> None:
        _check_int("view_size", view_size, 1)
        self.view_size = view_size
        self.resize_ratio = _default_resize_ratio(view_size, resize_ratio)
        self.mean, self.std = _check_stats(mean, std)

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        x = _to_unit(_image_tensor(img))[None]  # (1, 3, H, W)
        view = _resize_centre_crop(x, self.view_size, self.resize_ratio)[0]
        return _normalise(view, self.mean, self.std)


def eval_transform(
    view_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_ratio: float | None = None
) -> EvalTransform:
    """Per-sample evaluation transform (see ``EvalTransform``)."""
    return EvalTransform(view_size, mean, std, resize_ratio)


def batched_eval(
    images: Tensor,
    view_size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    resize_ratio: float | None = None,
) -> Tensor:
    """Batched ``EvalTransform``: (B, 3, H, W) uint8 → (B, 3, S, S) normalised, same device."""
    _check_int("view_size", view_size, 1)
    ratio = _default_resize_ratio(view_size, resize_ratio)
    mean, std = _check_stats(mean, std)
    return _normalise(_resize_centre_crop(_check_batch(images), view_size, ratio), mean, std)
