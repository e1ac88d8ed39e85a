"""RandAugment on a whole batch at once, on the images' device, with no value read to the host.

torchvision's ``transforms.v2.RandAugment(num_ops, magnitude)`` with its default settings (31
magnitude bins, nearest interpolation, fill 0): the same 14 ops in the same order (``OPS``),
the same magnitudes and signs, and for float images in [0, 1] the same formulas as torchvision's
functional ops, vectorised over images that each draw their own ops.

- **Draws** (``draw_ops``): each image's ops come from its RandAugment seed, the one int64 that
  ``named_views.draw_named`` draws per image from the feed's generator. Op j of an image is
  SplitMix64's j-th output for that seed: its high 32 bits pick one of the 14 ops (uniform to
  14 / 2**32, as torchvision's ``randint(14)``), its bit 31 the sign (minus with probability 1/2,
  as torchvision's ``rand() <= 0.5``; unsigned ops ignore it). This is integer arithmetic on the
  seeds' device, the same on every device and path, and the draw of the seeds is unchanged, so
  the feed's generator advances exactly as before and every other view stays as it was.
- **Apply** (``apply_ops``): for each of the ``num_ops`` steps every op is computed for the
  whole batch and each image keeps its own op's result, picked by index; the geometric ops are
  one ``grid_sample`` with a per-image matrix. Every per-op constant is looked up in small
  tables made once per (magnitude, size, device, dtype), so a call never reads a value back to
  the host nor copies one from it: a training step does not wait for the device.

Equality with torchvision, op by op (``tests/data/test_randaugment.py``): posterize, solarize,
autocontrast, equalize and the geometric ops give torchvision's pixels exactly (the geometric
ops sample through torchvision's float32 matrices and grid, computed as it computes them);
brightness, colour, contrast and sharpness blend per image with tensors where torchvision
multiplies by Python floats, equal to two float32 roundings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

# torchvision's RandAugment op space, in its order (``RandAugment._AUGMENTATION_SPACE``)
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
SIGNED = frozenset(
    ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    + ("Brightness", "Color", "Contrast", "Sharpness")
)
NUM_BINS = 31  # torchvision's default num_magnitude_bins
# each op's candidate in _one_step (0: the blends, which leave other images unchanged) and its
# degenerate image in _blend (3, the sharpness one, for the rest: their factor is 1)
_RESULT = {"ShearX": 1, "ShearY": 1, "TranslateX": 1, "TranslateY": 1, "Rotate": 1}
_RESULT |= {"Posterize": 2, "Solarize": 3, "AutoContrast": 4, "Equalize": 5}
_DEGENERATE = {"Brightness": 0, "Color": 1, "Contrast": 2}
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights

# SplitMix64 (Steele, Lea & Flood 2014) in int64 arithmetic: products and sums wrap modulo 2**64
# on every device torch runs on, so these are the unsigned constants as signed int64.
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _signed(value: int) -> int:
    """``value`` modulo 2**64 as a signed int64."""
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 ``z`` (torch's ``>>`` is arithmetic: it copies the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(seeds: Tensor, j: int) -> Tensor:
    """SplitMix64's output ``j`` (from 0) for generator states ``seeds``, int64 of any shape."""
    z = seeds + _signed((j + 1) * _GAMMA)
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def draw_ops(seeds: Tensor, num_ops: int) -> tuple[Tensor, Tensor]:
    """Each image's RandAugment ops and signs from its seed.

    Args:
        seeds: (N,) int64, one per image (``named_views.draw_named``).
        num_ops: ops per image.

    Returns:
        ops (N, num_ops) int64 indices into ``OPS``, and negative (N, num_ops) bool: the op's
        magnitude is negated (only signed ops use it), both on the seeds' device.
    """
    ops, negative = [], []
    for j in range(num_ops):
        h = splitmix64(seeds, j)
        ops.append((_shift_right(h, 32) * len(OPS)) >> 32)  # high 32 bits → 0..13
        negative.append(((h >> 31) & 1) == 1)
    if not ops:
        empty = seeds.new_zeros(seeds.shape[0], 0)
        return empty, empty.bool()
    return torch.stack(ops, dim=1), torch.stack(negative, dim=1)


# ----------------------------------------------------------------------------- constants


@lru_cache(maxsize=64)
def magnitudes(magnitude: int, height: int, width: int) -> Mapping[str, float]:
    """Each op's unsigned magnitude at bin ``magnitude`` for height×width images, as torchvision
    computes it (float32 ``linspace`` read back as a Python float); ops without one are left
    out. A CPU computation, made once."""

    def bin_of(start: float, end: float) -> float:
        return float(torch.linspace(start, end, NUM_BINS)[magnitude])

    posterize = (8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4))).round().int()
    values = {
        "ShearX": bin_of(0.0, 0.3),
        "ShearY": bin_of(0.0, 0.3),
        "TranslateX": bin_of(0.0, 150.0 / 331.0 * width),
        "TranslateY": bin_of(0.0, 150.0 / 331.0 * height),
        "Rotate": bin_of(0.0, 30.0),
        "Brightness": bin_of(0.0, 0.9),
        "Color": bin_of(0.0, 0.9),
        "Contrast": bin_of(0.0, 0.9),
        "Sharpness": bin_of(0.0, 0.9),
        "Posterize": float(posterize[magnitude]),
        "Solarize": bin_of(1.0, 0.0),
    }
    return MappingProxyType(values)  # cached: read-only


def _inverse_affine(
    center: tuple[float, float],
    angle: float,
    translate: tuple[float, float],
    shear: tuple[float, float],
) -> list[float]:
    """torchvision v2's ``_get_inverse_affine_matrix`` at scale 1 (the same float64 steps, so
    the same float32 matrix): the output→input pixel map about ``center`` (pixels from the
    image centre), as a row-major 2×3 list."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    cos_sy = math.cos(sy)
    tan_sx = math.tan(sx)
    a = math.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot - sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


def op_constants(op: str, value: float, height: int, width: int) -> tuple[list[float], float]:
    """The inverse affine matrix (2×3, row-major) and blend factor of ``op`` at signed magnitude
    ``value``, the arguments torchvision's RandAugment passes to ``F.affine``/``F.rotate`` and
    to the ``adjust_*`` ops; the identity matrix and factor 1 where the op has none."""
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    corner = (-0.5 * width, -0.5 * height)  # the shears' center=[0, 0]: the top-left corner
    if op == "ShearX":
        return _inverse_affine(corner, 0.0, (0.0, 0.0), (math.degrees(math.atan(value)), 0.0)), 1.0
    if op == "ShearY":
        return _inverse_affine(corner, 0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(value)))), 1.0
    if op == "TranslateX":
        return _inverse_affine((0.0, 0.0), 0.0, (float(int(value)), 0.0), (0.0, 0.0)), 1.0
    if op == "TranslateY":
        return _inverse_affine((0.0, 0.0), 0.0, (0.0, float(int(value))), (0.0, 0.0)), 1.0
    if op == "Rotate":
        angle = value % 360  # F.rotate's own step; 0 there is a copy, identity here
        if angle == 0:
            return identity, 1.0
        # F.rotate negates the angle for the affine matrix (its and affine's directions differ)
        return _inverse_affine((0.0, 0.0), -angle, (0.0, 0.0), (0.0, 0.0)), 1.0
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return identity, 1.0 + value
    return identity, 1.0


class _Tables:
    """Per-(op, sign) constants on one device, row ``2 * op + negative``: ``theta`` (28, 3, 2)
    inverse affine matrices, transposed and scaled to grid_sample's normalised coordinates as
    torchvision's ``_affine_grid`` does, and ``factor`` (28,) blend factors; ``base``
    (1, H·W, 3) the pixel centres from the image centre (x, y, 1); ``result`` and
    ``degenerate`` (14,) each op's candidate; posterize's ``levels`` and solarize's
    ``threshold`` (unsigned: Python scalars)."""

    def __init__(
        self, magnitude: int, height: int, width: int, device: torch.device, dtype: torch.dtype
    ):
        values = magnitudes(magnitude, height, width)
        thetas, factors = [], []
        for op in OPS:
            for negative in (False, True):
                value = values.get(op, 0.0)
                if negative and op in SIGNED:
                    value = -value
                theta, factor = op_constants(op, value, height, width)
                thetas.append(theta)
                factors.append(factor)
        theta = torch.tensor(thetas, dtype=dtype).view(-1, 2, 3)
        # torchvision's _affine_grid: theta scaled to normalised coordinates, applied to pixel
        # centres measured from the image centre
        half = torch.tensor([0.5 * width, 0.5 * height], dtype=dtype)
        self.theta = (theta.transpose(1, 2) / half).to(device)  # (28, 3, 2)
        self.factor = torch.tensor(factors, dtype=dtype, device=device)
        base = torch.empty(height, width, 3, dtype=dtype)
        base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width))
        base[..., 1].copy_(
            torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height).unsqueeze(-1)
        )
        base[..., 2].fill_(1)
        self.base = base.view(1, height * width, 3).to(device)
        # which of _one_step's candidates and of _blend's degenerate images each op takes
        result = [_RESULT.get(op, 0) for op in OPS]
        self.result = torch.tensor(result, device=device)
        self.degenerate = torch.tensor([_DEGENERATE.get(op, 3) for op in OPS], device=device)
        self.levels = 1 << int(values["Posterize"])
        self.threshold = 1.0 * values["Solarize"]  # torchvision: the float bound (1) × magnitude


@lru_cache(maxsize=64)
def _tables(
    magnitude: int, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> _Tables:
    return _Tables(magnitude, height, width, device, dtype)


# ----------------------------------------------------------------------------- the ops


def _geometric(x: Tensor, rows: Tensor, t: _Tables) -> Tensor:
    """Each image resampled through its own inverse affine matrix (nearest, zero fill), as
    torchvision's ``_affine_grid`` + ``grid_sample`` do for one image. rows: (N,) table rows.

    The grid is torchvision's float32 ``bmm``, not an element-wise equivalent: that differs in
    the last bit of some coordinates, enough to move a few nearest samples that sit half-way
    between pixels (6 of 1,200 for a 20 px shear at magnitude 12). Like torchvision's, it
    follows the matmul precision setting: TF32 (``torch.set_float32_matmul_precision("high")``
    on a GPU) moves samples near half-way by a pixel."""
    n, _, h, w = x.shape
    theta = t.theta.index_select(0, rows)  # (N, 3, 2)
    grid = t.base.expand(n, -1, -1).bmm(theta).view(n, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _pick(candidates: tuple[Tensor, ...], which: Tensor, shape: torch.Size) -> Tensor:
    """Image i of candidate ``which[i]``, for each i: the candidates (each broadcastable to
    ``shape``, (N, ...)) stacked and N images picked by index. One copy of each candidate and
    one gather: a CPU's ``torch.where`` with a per-image condition runs an unvectorised loop
    several times slower, and a boolean mask would need its count on the host."""
    n = shape[0]
    stacked = candidates[-1].new_empty((len(candidates), *shape))
    for slot, c in zip(stacked, candidates, strict=True):
        slot.copy_(c)  # copy_ broadcasts fast; torch.stack of expanded views does not
    stacked = stacked.view(-1, *shape[1:])
    return stacked.index_select(0, which * n + torch.arange(n, device=which.device))


def _blend(x: Tensor, op: Tensor, factor: Tensor, t: _Tables) -> Tensor:
    """Brightness, colour (saturation), contrast and sharpness: each image blended with its op's
    degenerate image by its factor, ``x + (1 - f)(degenerate - x)`` clamped to [0, 1]
    (torchvision's ``_blend`` and ``adjust_sharpness``). The other images have factor 1 and
    come back unchanged. factor: (N, 1, 1, 1)."""
    r, g, b = x.unbind(dim=1)
    gray = r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    sharp = x  # images of 2 px or less: torchvision leaves them as they are
    if x.shape[-1] > 2 and x.shape[-2] > 2:
        # torchvision's smoothing kernel (1s around a 5, over 13) on the interior, the border
        # keeping its pixels: the 3×3 box sum (separable: two shifted sums) over 13 plus 4/13
        # of the centre, several times faster on a CPU than a depthwise conv2d
        rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]
        box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
        sharp = x.clone()
        sharp[..., 1:-1, 1:-1] = box.mul_(1.0 / 13.0).add_(x[..., 1:-1, 1:-1], alpha=4.0 / 13.0)
    black = x.new_zeros(())  # brightness blends with black
    degenerate = _pick((black, gray, mean, sharp), t.degenerate.index_select(0, op), x.shape)
    return (x + (1.0 - factor) * (degenerate - x)).clamp_(0.0, 1.0)


def _posterize(x: Tensor, levels: int) -> Tensor:
    """torchvision's posterize for float images: ``levels`` = 2**bits levels."""
    return x.mul(levels).floor_().clamp_(0, levels - 1).mul_(1.0 / levels)


def _autocontrast(x: Tensor) -> Tensor:
    """Each channel of each image stretched to [0, 1] (flat channels unchanged)."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, high - low)
    low = torch.where(flat, 0.0, low)
    return (x - low).div_(scale).clamp_(0.0, 1.0)


def _equalize(x: Tensor) -> Tensor:
    """torchvision's equalize for float images, every channel of every image at once: to uint8
    levels, a 256-bin histogram per channel, PIL's lookup table, back to float (so the result
    is on the 1/255 grid even where a channel is left as it was)."""
    q = x.mul(255 + 1.0 - 1e-3).to(torch.uint8)  # torchvision's float → uint8 conversion
    flat = q.flatten(start_dim=-2).long()  # (N, C, H·W)
    hist = flat.new_zeros(flat.shape[:-1] + (256,), dtype=torch.int32)
    hist.scatter_add_(-1, flat, hist.new_ones(1).expand_as(flat))
    cum = hist.cumsum(dim=-1)
    last = cum.argmax(dim=-1, keepdim=True)  # the highest level present
    step = (flat.shape[-1] - hist.gather(-1, last)).div_(255, rounding_mode="floor")
    lut = (
        cum[..., :-1]
        .add(step // 2)
        .div_(step.clamp(min=1), rounding_mode="floor")
        .clamp_(0, 255)
        .to(torch.uint8)
    )
    lut = torch.cat([lut.new_zeros(lut.shape[:-1] + (1,)), lut], dim=-1)
    equalized = lut.gather(-1, flat).view_as(q)
    out = torch.where(step.ne(0).unsqueeze(-1), equalized, q)  # step 0: one level, kept
    return out.to(x.dtype).mul_(1.0 / 255)


def _one_step(x: Tensor, op: Tensor, negative: Tensor, t: _Tables) -> Tensor:
    """One RandAugment step: image i gets op ``op[i]`` (sign ``negative[i]``). (N,) each."""
    rows = op * 2 + negative.long()
    factor = t.factor.index_select(0, rows).view(-1, 1, 1, 1)
    candidates = (
        _blend(x, op, factor, t),  # Identity too: its factor is 1
        _geometric(x, rows, t),
        _posterize(x, t.levels),
        torch.where(x >= t.threshold, 1.0 - x, x),  # solarize
        _autocontrast(x),
        _equalize(x),
    )
    return _pick(candidates, t.result.index_select(0, op), x.shape)


def apply_ops(images: Tensor, ops: Tensor, negative: Tensor, magnitude: int) -> Tensor:
    """RandAugment's ops at ``magnitude``, chosen per image, on a batch.

    Args:
        images: (N, C, H, W) float in [0, 1] (C = 3 for colour, contrast and sharpness).
        ops: (N, K) int64 indices into ``OPS``, applied in order along K.
        negative: (N, K) bool, the sign of each op's magnitude (ignored by unsigned ops).
        magnitude: the magnitude bin, 0..30.

    Returns:
        (N, C, H, W) float in [0, 1], on the images' device.
    """
    height, width = images.shape[-2:]
    t = _tables(magnitude, height, width, images.device, images.dtype)
    x = images
    for j in range(ops.shape[1]):
        x = _one_step(x, ops[:, j], negative[:, j], t)
    return x


def randaugment(images: Tensor, seeds: Tensor, num_ops: int, magnitude: int) -> Tensor:
    """torchvision's RandAugment(num_ops, magnitude) on each of a batch of images, image i with
    the ops its seed draws (``draw_ops``); no RNG is used, so the caller's is left alone.

    Args:
        images: (N, 3, S, S) float in [0, 1].
        seeds: (N,) int64 RandAugment seeds (``NamedParams.seeds``).
        num_ops: ops per image.
        magnitude: the magnitude bin, 0..30.

    Returns:
        (N, 3, S, S) float in [0, 1], on the images' device.
    """
    ops, negative = draw_ops(seeds.to(images.device), num_ops)
    return apply_ops(images, ops, negative, magnitude)
