"""The plan of draws: which random values the training views take from the generator, in order.

Every path of the feed draws the views' parameters from one generator, and every path must draw
the same numbers: the in-memory path for a batch at once (``views.BatchedMultiView``), the
per-sample path for one image (``views.MultiViewTransform``), the fast file path and the JPEG
path in the workers, one image at a time from the item's seed (``fileviews``, ``device_decode``).
The order of the draws is written here once, as a **plan**: a tuple of ``Draw`` steps, each a
named value of one kind (crop boxes, flips, colour uniforms or RandAugment seeds) with its count
per image. The plans:

- ``view_plan``: the query, patches and key of stage 1 (``views.ViewConfig``): query box and
  flip, the L patch boxes (in the S×S query view) and flips, key box and flip, then, when colour
  augmentation is on, the colour uniforms of the query, the L patches and the key.
- ``named_plan``: a view a method names itself (``named_views.ViewSpec``): box, flip, colour
  uniforms (colour on), one RandAugment seed (a view with RandAugment).
- ``request_plan``: a request's views: ``view_plan`` when it reads any standard view, then each
  named view's ``named_plan`` in the request's order.
- ``classifier_plan``: stage 2's one view: box, flip.

Two executors run a plan, and they make the same generator calls in the same order:

- ``draw_batch`` draws for N images at once on the generator's device, one call per step for all
  N images (so the N query boxes come before the N query flips), as tensors.
- ``draw_image`` draws for one image on a CPU generator (a worker's, seeded per item) and gives
  the geometry as Python numbers, computed with ``draw_batch``'s arithmetic in Python floats
  (``boxes_from_uniforms``), which is much cheaper than tensor ops for one image.

So ``draw_image(plan, ...)`` equals ``draw_batch(plan, 1, ...)`` for the same generator state, bit
for bit (``tests/data/test_draws.py``), and a path that draws per image from a per-image seed
differs from the batched path only in where each image's generator comes from.

Each step's uniforms are drawn whatever their outcome (a flip that is not taken, colour that is
not jittered), so the generator's state after a plan depends only on the plan and N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dscl.data.color_ops import ColorParams, color_params
from dscl.data.crop_ops import CROP_ATTEMPTS, CROP_RATIO, P_FLIP, box_uniforms, boxes_of

SEED_LIMIT = 2**62  # RandAugment seeds are drawn uniformly in [0, SEED_LIMIT)
COLOR_COLUMNS = 12  # the colour uniforms of one image: u (8) then v (4) of ``color_params``

# colour settings (hue, p_jitter, p_gray, p_blur) of the standard views
QUERY_HUE, P_JITTER, P_GRAY, P_BLUR = 0.1, 0.8, 0.2, 0.5  # query and patches
QUERY_COLOR = (QUERY_HUE, P_JITTER, P_GRAY, P_BLUR)
KEY_COLOR = (0.0, 1.0, 0.0, 0.0)  # key: jitter always, no hue

# the kinds of draw
BOXES, FLIPS, COLOR, SEEDS = "boxes", "flips", "color", "seeds"
STANDARD = ""  # the group of the standard views' draws (no named view has this name)


@dataclass(frozen=True)
class Draw:
    """One step of a plan: one value per image (or ``count`` of them) drawn from the generator.

    Attributes:
        group: the view the value belongs to: ``STANDARD`` for the query, patches and key, else
            the named view's name.
        name: the value's name within its group.
        kind: ``BOXES`` (``crop_ops.box_uniforms`` rows: random resized crops), ``FLIPS``
            (one uniform each, flipped below ``P_FLIP``), ``COLOR`` (``COLOR_COLUMNS``
            uniforms each: ``color_params``' u then v) or ``SEEDS`` (RandAugment seeds, int64
            in [0, ``SEED_LIMIT``)).
        count: values per image, or None for one (the value then has no per-image dimension).
        frame: boxes only: the side of the square frame they lie in (the patches' S×S query
            view), or None for the source image.
        scale, ratio: boxes only: area fraction and aspect-ratio ranges.
        color: colour only: (hue, p_jitter, p_gray, p_blur) of ``color_params``.
    """

    group: str
    name: str
    kind: str
    count: int | None = None
    frame: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = CROP_RATIO
    color: tuple[float, float, float, float] = KEY_COLOR

    @property
    def per_image(self) -> int:
        return 1 if self.count is None else self.count

    def frame_of(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) its boxes lie in, for an image of height×width."""
        return (height, width) if self.frame is None else (self.frame, self.frame)


Plan = tuple[Draw, ...]


# ---------------------------------------------------------------------------------- the plans


# The geometric values of the standard views, in the order ViewParams and Draws hold them.
GEOMETRY = ("query_box", "query_flip", "patch_boxes", "patch_flips", "key_box", "key_flip")


def view_plan(cfg) -> Plan:
    """The draws of the standard views of ``cfg`` (a ``views.ViewConfig``), in order."""
    crop = {"scale": cfg.crop_scale, "ratio": cfg.crop_ratio}
    patches, patch_side = cfg.num_patches, cfg.view_size
    plan = (
        Draw(STANDARD, "query_box", BOXES, **crop),
        Draw(STANDARD, "query_flip", FLIPS),
        Draw(STANDARD, "patch_boxes", BOXES, patches, patch_side, cfg.patch_scale, cfg.patch_ratio),
        Draw(STANDARD, "patch_flips", FLIPS, patches),
        Draw(STANDARD, "key_box", BOXES, **crop),
        Draw(STANDARD, "key_flip", FLIPS),
    )
    if cfg.color_augment:
        plan += (
            Draw(STANDARD, "query_color", COLOR, color=QUERY_COLOR),
            Draw(STANDARD, "patch_color", COLOR, patches, color=QUERY_COLOR),
            Draw(STANDARD, "key_color", COLOR, color=KEY_COLOR),
        )
    return plan


def named_plan(name: str, spec, color_augment: bool) -> Plan:
    """The draws of the named view ``name`` with augmentation ``spec`` (a
    ``named_views.ViewSpec``), in order; colour only if ``color_augment``."""
    plan = (
        Draw(name, "box", BOXES, scale=spec.crop_scale, ratio=spec.crop_ratio),
        Draw(name, "flip", FLIPS),
    )
    if color_augment:
        color = (spec.hue, spec.p_jitter, spec.p_gray, spec.p_blur)
        plan += (Draw(name, "color", COLOR, color=color),)
    if spec.randaugment is not None:
        plan += (Draw(name, "seed", SEEDS),)
    return plan


def request_plan(cfg, request) -> Plan:
    """The draws of ``request`` (a ``views.ViewRequest``) under ``cfg``: the standard views'
    (all of them while the request reads any, none otherwise), then each named view's."""
    plan = view_plan(cfg) if request.standard else ()
    for name, spec in request.extra:
        plan += named_plan(name, spec, cfg.color_augment)
    return plan


def classifier_plan(scale: tuple[float, float]) -> Plan:
    """The draws of stage 2's training view: a box of area fraction ``scale``, then a flip."""
    return (Draw(STANDARD, "box", BOXES, scale=scale), Draw(STANDARD, "flip", FLIPS))


# ------------------------------------------------------------------------------ the executors


def _uniforms(
    draw: Draw, rows: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """The generator calls of ``draw`` for ``rows`` values: every path's only source of them."""
    if draw.kind == BOXES:
        return box_uniforms(rows, generator, device)  # (rows, 2A + 2)
    if draw.kind == FLIPS:
        return torch.rand(rows, generator=generator, device=device)  # (rows,)
    if draw.kind == COLOR:
        u = torch.rand(rows, 8, generator=generator, device=device)
        v = torch.rand(rows, 4, generator=generator, device=device)
        return torch.cat([u, v], dim=1)  # (rows, 12)
    return torch.randint(0, SEED_LIMIT, (rows,), generator=generator, device=device)


def draw_batch(
    plan: Plan, n: int, height: int, width: int, generator: torch.Generator | None
) -> dict[str, dict[str, Tensor]]:
    """Run ``plan`` for ``n`` images of height×width, on the generator's device (torch's global
    CPU RNG when None).

    Returns:
        ``{group: {name: value}}``, each value with a first dimension N (and a second, its
        count, where the step has one): boxes (N, 4) float32 (``crop_ops.boxes_of``), flips
        (N,) bool, colour uniforms (N, 12) float32, seeds (N,) int64.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    out: dict[str, dict[str, Tensor]] = {}
    for draw in plan:
        value = _uniforms(draw, n * draw.per_image, generator, device)
        if draw.kind == BOXES:
            value = boxes_of(value, *draw.frame_of(height, width), draw.scale, draw.ratio)
        elif draw.kind == FLIPS:
            value = value < P_FLIP
        if draw.count is not None:
            value = value.view(n, draw.count, *value.shape[1:])
        out.setdefault(draw.group, {})[draw.name] = value
    return out


def draw_image(plan: Plan, height: int, width: int, generator: torch.Generator) -> dict[str, dict]:
    """Run ``plan`` for one image of height×width on a CPU generator: ``draw_batch(plan, 1,
    ...)``'s values, the geometry as Python numbers.

    Returns:
        ``{group: {name: value}}``: boxes as (x1, y1, x2, y2) int tuples, flips as bools (a
        list of ``count`` of each where the step has a count, else one); colour uniforms
        (count or 1, 12) and seeds (count or 1,) as tensors.
    """
    cpu = torch.device("cpu")
    drawn = [(draw, _uniforms(draw, draw.per_image, generator, cpu)) for draw in plan]
    boxes = _image_boxes([(draw, u) for draw, u in drawn if draw.kind == BOXES], height, width)
    out: dict[str, dict] = {}
    for draw, value in drawn:
        if draw.kind == BOXES:
            value = boxes[draw.group, draw.name]
        elif draw.kind == FLIPS:
            value = (value < P_FLIP).tolist()
        if draw.count is None and draw.kind in (BOXES, FLIPS):
            value = value[0]
        out.setdefault(draw.group, {})[draw.name] = value
    return out


def _image_boxes(
    drawn: list[tuple[Draw, Tensor]], height: int, width: int
) -> dict[tuple[str, str], list[tuple[int, int, int, int]]]:
    """The boxes of one image's box draws from their uniforms, by (group, name); the aspect
    ratios of a group's draws come from one ``torch.exp`` call."""
    out = {}
    groups = list(dict.fromkeys(draw.group for draw, _ in drawn))
    for group in groups:
        mine = [(draw, u.tolist()) for draw, u in drawn if draw.group == group]
        aspects = _aspects([(rows, draw.ratio) for draw, rows in mine])
        for (draw, rows), aspect in zip(mine, aspects, strict=True):
            frame = draw.frame_of(height, width)
            out[group, draw.name] = _boxes(rows, aspect, *frame, draw.scale, draw.ratio)
    return out


def colors_of(draw: Draw, uniforms: Tensor) -> ColorParams:
    """The colour parameters of a colour step's uniforms (..., 12), flattened to rows."""
    rows = uniforms.reshape(-1, COLOR_COLUMNS)
    return color_params(rows[:, :8], rows[:, 8:], *draw.color)


# -------------------------------------------------------------- one image's boxes in Python floats


def boxes_from_uniforms(
    u: Tensor, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> list[tuple[int, int, int, int]]:
    """``crop_ops.boxes_of`` for a float64 CPU ``u`` of its (n, 2A + 2) uniforms, as integers.

    The same arithmetic in the same order in Python floats (IEEE double, as torch's float64 CPU
    ops; ``round`` is half-to-even like ``torch.round``), except the exponential, which is
    torch's (``math.exp`` differs from it in the last bit now and then), so the boxes are equal to
    ``boxes_of``' bit for bit at a fraction of its cost for one image (it runs some 35 tensor
    ops).
    """
    rows = u.tolist()
    return _boxes(rows, _aspects([(rows, ratio)])[0], height, width, scale, ratio)


def _aspects(
    groups: list[tuple[list[list[float]], tuple[float, float]]],
) -> list[list[list[float]]]:
    """The attempts' aspect ratios exp(log r0 + (log r1 - log r0) · u) of every row of every
    (rows, ratio) group, in one ``torch.exp`` call: torch's float64 exponential gives every
    element the same value whatever the tensor it is part of (vectorised, tails included)."""
    tries = CROP_ATTEMPTS
    args, shape = [], []
    for rows, ratio in groups:
        log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
        span = log_high - log_low
        for row in rows:
            args.extend(log_low + span * value for value in row[tries : 2 * tries])
        shape.append(len(rows))
    flat = torch.exp(torch.tensor(args, dtype=torch.float64)).tolist()
    out, at = [], 0
    for count in shape:
        out.append([flat[at + tries * r : at + tries * (r + 1)] for r in range(count)])
        at += tries * count
    return out


def _boxes(
    rows: list[list[float]],
    aspects: list[list[float]],
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> list[tuple[int, int, int, int]]:
    """``boxes_of``' rule for rows of uniforms and their attempts' aspect ratios."""
    tries = CROP_ATTEMPTS
    if width / height < ratio[0]:  # central fallback: whole frame, aspect clamped into ratio
        fallback = (width, round(width / ratio[0]))
    elif width / height > ratio[1]:
        fallback = (round(height * ratio[1]), height)
    else:
        fallback = (width, height)
    frame, low, span = height * width, scale[0], scale[1] - scale[0]
    boxes = []
    for row, aspect in zip(rows, aspects, strict=True):
        for k in range(tries):
            area = frame * (low + span * row[k])
            w = round(math.sqrt(area * aspect[k]))
            h = round(math.sqrt(area / aspect[k]))
            if 1 <= w <= width and 1 <= h <= height:
                x1 = min(math.floor(row[-2] * (width - w + 1)), width - w)
                y1 = min(math.floor(row[-1] * (height - h + 1)), height - h)
                break
        else:
            w, h = fallback
            x1, y1 = (width - w) // 2, (height - h) // 2
        boxes.append((x1, y1, x1 + w, y1 + h))
    return boxes
