"""The fast path for image files: decode once, crop in the workers, colour on the device.

The per-sample path (``MultiViewTransform`` / ``ClassifierTrainTransform`` in DataLoader
workers) does everything in float for one image at a time. Here the work is split:

- **Workers** (``FileCrops``, items ``(seed, index)`` as ``engine.feed.PositionSeeded``'s): decode
  the file once (``dscl.data.decode``), draw every random parameter from a generator seeded with
  the item's seed by the plan of every path (``draws.draw_image``: the same boxes, flips and
  colour parameters as the per-sample path for the same position), and crop and resize the
  query, key and patches (or stage 2's one view) to their sizes as **uint8** tensors (torch's
  uint8 antialiased bilinear kernel: the filter of ``crop_ops``, rounded to integers).
  The colour parameters travel as their raw uniforms.
- **The main process** (``finish_batch``) moves the uint8 batch to the training device and runs
  the batched colour ops of the in-memory path (``views.finish_views``: jitter, grayscale, blur,
  normalisation) on the whole batch.

Against the per-sample path the boxes, flips and colour parameters are equal; pixels differ by the
uint8 rounding of the crops (the patches are cut from the rounded query view), at most one level
before the colour ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from dscl.data.classifier_views import _classifier_scale, _default_resize_ratio, centre_geometry
from dscl.data.color_ops import ColorParams
from dscl.data.crop_ops import normalise
from dscl.data.decode import decode_rgb
from dscl.data.draws import (
    COLOR,
    GEOMETRY,
    STANDARD,
    classifier_plan,
    colors_of,
    draw_image,
    request_plan,
    view_plan,
)
from dscl.data.imagesets import ImageFileDataset
from dscl.data.named_views import finish_named
from dscl.data.views import (
    ALL_VIEWS,
    CLASSIFY,
    VIEWS,
    ViewConfig,
    ViewRequest,
    finish_views,
    to_device,
)

COLOR_COLUMNS = 12  # draw_color's uniforms: u (8) then v (4)


# ------------------------------------------------------------------------------ uint8 crops


def crop_u8(image: Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> Tensor:
    """Crop (H, W, 3) uint8 ``image`` at ``box``, resize to (size, size, 3) uint8 (+ flip).

    Pixels stay in (H, W, 3) order throughout, as the decoders give them: torch's uint8
    antialiased bilinear kernel is fast only on that (channels-last) layout, and a change of
    layout per crop would cost as much as the resize. The result is contiguous.
    """
    x1, y1, x2, y2 = box
    crop = image[y1:y2, x1:x2].permute(2, 0, 1)[None]  # (1, 3, h, w), channels-last strides
    crop = crop.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(
        crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0].permute(1, 2, 0)  # (size, size, 3), contiguous
    return out.flip(1) if flip else out


def to_planes(images: Tensor) -> Tensor:
    """(..., H, W, 3) uint8 → (..., 3, H, W) float32 in [0, 1], contiguous (``to_unit``'s
    values, laid out as the in-memory path's crops), in one strided copy."""
    out = torch.empty(
        (*images.shape[:-3], 3, *images.shape[-3:-1]), dtype=torch.float32, device=images.device
    )
    out.copy_(images.movedim(-1, -3))
    return out.div_(255)


@dataclass
class Draws:
    """Every random parameter of one image's stage-1 views, as ``view_crops`` draws them."""

    query_box: tuple[int, int, int, int]
    query_flip: bool
    patch_boxes: list[tuple[int, int, int, int]]
    patch_flips: list[bool]
    key_box: tuple[int, int, int, int]
    key_flip: bool
    color: Tensor | None  # (2 + L, 12) uniforms of the query, the patches, the key

    def tensors(self) -> dict[str, Tensor]:
        """The parameters a batch carries: boxes (L, 4) float32, patch_flips (L,), color."""
        out = {
            "boxes": torch.tensor(self.patch_boxes, dtype=torch.float32).view(-1, 4),
            "patch_flips": torch.tensor(self.patch_flips, dtype=torch.bool),
        }
        if self.color is not None:
            out["color"] = self.color
        return out


def view_draws(drawn: dict, cfg: ViewConfig) -> Draws:
    """One image's standard-view parameters from ``draws.draw_image``'s values of its
    ``view_plan(cfg)``, the uniforms of the plan's colour steps stacked in plan order."""
    colors = [drawn[draw.name] for draw in view_plan(cfg) if draw.kind == COLOR]
    return Draws(*(drawn[name] for name in GEOMETRY), torch.cat(colors) if colors else None)


def named_tensors(draw: dict) -> dict[str, Tensor]:
    """What a batch carries of a named view's parameters: colour uniforms (12,), seed ()."""
    out = {}
    if "color" in draw:
        out["color"] = draw["color"][0]
    if "seed" in draw:
        out["seed"] = draw["seed"][0]
    return out


def draw_request(
    height: int, width: int, cfg: ViewConfig, request: ViewRequest, g: torch.Generator
) -> tuple[Draws | None, dict[str, dict]]:
    """Every parameter of one image's stage-1 views as ``request`` needs them: its plan
    (``draws.request_plan``) run for one image. Returns the standard views' ``Draws`` (None when
    the request reads none) and for each named view its ``box`` (4 ints), ``flip`` and where
    drawn ``color`` (1, 12) uniforms and ``seed`` (1,) int64."""
    drawn = draw_image(request_plan(cfg, request), height, width, g)
    draws = view_draws(drawn[STANDARD], cfg) if request.standard else None
    return draws, {name: drawn[name] for name, _ in request.extra}


def assemble_crops(
    image: Tensor,
    draws: Draws | None,
    named: dict[str, dict],
    request: ViewRequest,
    cfg: ViewConfig,
    crop,
    cut_patches,
) -> dict:
    """One image's crops for ``request`` from its drawn parameters, the shape of ``view_crops``'
    result; ``crop(image, box, size, flip)`` makes a view and ``cut_patches(query, tensors)``
    the patches from the query view and ``draws.tensors()`` (uint8 in the workers, float on the
    device when JPEGs are decoded there)."""
    out: dict = {}
    if draws is not None:
        size = cfg.view_size
        query = crop(image, draws.query_box, size, draws.query_flip)
        if "query" in request.standard:
            out["query"] = query
        if request.key:
            out["key"] = crop(image, draws.key_box, size, draws.key_flip)
        tensors = draws.tensors()
        if request.patches:
            out["patches"] = cut_patches(query, tensors)
        else:
            del tensors["boxes"], tensors["patch_flips"]
        out.update(tensors)
    if request.extra:
        out["named"] = {
            name: {
                "crop": crop(
                    image, named[name]["box"], spec.side(cfg.view_size), named[name]["flip"]
                ),
                **named_tensors(named[name]),
            }
            for name, spec in request.extra
        }
    return out


def view_crops(
    image: Tensor, cfg: ViewConfig, g: torch.Generator, request: ViewRequest = ALL_VIEWS
) -> dict[str, Tensor]:
    """The stage-1 crops of one decoded (H, W, 3) uint8 image: the workers' part of the fast path.

    Returns:
        What ``request`` names: ``query``/``key`` (S, S, 3) uint8, ``patches`` (L, P, P, 3) uint8
        with ``boxes`` (L, 4) float32 in query-view pixels and ``patch_flips`` (L,) bool; with
        colour ``color`` (2 + L, 12) float32: the uniforms of the query, the L patches and the
        key (``draw_views``); and ``named``: for each of the request's own views its crop
        (S', S', 3) uint8 under ``crop`` and its colour uniforms and RandAugment seed.
    """
    # L patches, S view size, P patch size
    draws, named = draw_request(image.shape[0], image.shape[1], cfg, request, g)
    patch = cfg.patch_px

    def cut_patches(query: Tensor, _tensors) -> Tensor:
        crops = [
            crop_u8(query, box, patch, flip)
            for box, flip in zip(draws.patch_boxes, draws.patch_flips, strict=True)
        ]
        return torch.stack(crops) if crops else query.new_zeros(0, patch, patch, 3)

    return assemble_crops(image, draws, named, request, cfg, crop_u8, cut_patches)


def classifier_crop(
    image: Tensor, view_size: int, scale: tuple[float, float], g: torch.Generator
) -> Tensor:
    """Stage 2's training view of (H, W, 3) uint8 ``image`` as (S, S, 3) uint8: the draws of
    ``draws.classifier_plan`` (a box, then a flip), as ``ClassifierTrainTransform`` draws them."""
    drawn = draw_image(classifier_plan(scale), image.shape[0], image.shape[1], g)[STANDARD]
    return crop_u8(image, drawn["box"], view_size, drawn["flip"])


class FileCrops(Dataset):
    """Items ``(seed, index)`` → (crops, label) of an image-file dataset (the workers' part).

    Args:
        dataset: the image files and labels.
        kind: ``"views"`` (stage 1: ``view_crops``) or ``"classify"`` (stage 2).
        cfg: view settings.
        draft_side: 0, or decode JPEGs at a reduced DCT scale (``decode.decode_rgb``).
        request: the stage-1 views to make (``views.ViewRequest``).

    Each item's parameters come from a generator seeded with its ``seed``, which draws the same
    numbers as torch's global RNG seeded with it (the per-sample path's ``PositionSeeded``), so a
    position in the epoch gets the same augmentation on either path, in any worker, resumed or
    not. An unreadable file raises the per-sample path's ``DataError``.
    """

    def __init__(
        self,
        dataset: ImageFileDataset,
        kind: str,
        cfg: ViewConfig,
        draft_side: int = 0,
        request: ViewRequest = ALL_VIEWS,
    ) -> None:
        if kind not in (VIEWS, CLASSIFY):
            raise ValueError(f"kind: {kind!r} is not 'views' or 'classify'")
        self.paths, self.targets = dataset.paths, dataset.targets
        self.kind, self.cfg, self.draft_side, self.request = kind, cfg, draft_side, request
        self.scale = _classifier_scale(cfg.view_size, None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        seed, index = item
        g = torch.Generator().manual_seed(seed)
        image = decode_rgb(self.paths[index], self.draft_side).permute(1, 2, 0)  # (H, W, 3)
        if self.kind == VIEWS:
            return view_crops(image, self.cfg, g, self.request), self.targets[index]
        return classifier_crop(image, self.cfg.view_size, self.scale, g), self.targets[index]


def eval_crop(image: Tensor, view_size: int, resize_ratio: float) -> Tensor:
    """``EvalTransform``'s geometry on (H, W, 3) uint8 ``image``: the shorter side resized to
    round(S / ratio) (torch's uint8 antialiased bilinear kernel), then the centre S×S, as
    (S, S, 3) uint8."""
    height, width = image.shape[:2]
    new_h, new_w, top, left = centre_geometry(height, width, view_size, resize_ratio)
    if (new_h, new_w) != (height, width):
        x = image.permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
        image = x[0].permute(1, 2, 0)
    return image[top : top + view_size, left : left + view_size].contiguous()


class EvalCrops(Dataset):
    """Items ``index`` → (centre view (S, S, 3) uint8, label) of an image-file dataset: the
    workers' part of evaluation on the fast path (decode once, resize and crop in uint8; no
    draft decoding, so evaluation never depends on a speed setting). An unreadable file raises
    the per-sample path's ``DataError``."""

    def __init__(self, dataset: ImageFileDataset, cfg: ViewConfig) -> None:
        self.paths, self.targets = dataset.paths, dataset.targets
        self.view_size = cfg.view_size
        self.resize_ratio = _default_resize_ratio(cfg.view_size, None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = decode_rgb(self.paths[index]).permute(1, 2, 0)  # (H, W, 3)
        return eval_crop(image, self.view_size, self.resize_ratio), self.targets[index]


# ------------------------------------------------------------------------ the main process's part


def batch_colors(color: Tensor, cfg: ViewConfig) -> tuple[ColorParams, ...]:
    """Colour parameters of a batch from its stacked uniforms (B, 2 + L, 12), the columns of
    ``view_plan``'s colour steps side by side: query, patches (B·L, image-major as
    ``finish_views`` flattens them) and key."""
    # B batch, L patches
    out, at = [], 0
    for draw in view_plan(cfg):
        if draw.kind == COLOR:
            out.append(colors_of(draw, color[:, at : at + draw.per_image]))
            at += draw.per_image
    return tuple(out)


def normalised_planes(crops: Tensor, device: torch.device, mean, std) -> Tensor:
    """(B, S, S, 3) uint8 crops → (B, 3, S, S) normalised float on ``device``: the finish of a
    batch of stage 2's or evaluation's one view."""
    return normalise(to_planes(crops.to(device, non_blocking=True)), mean, std)


def finish_batch(
    sample, kind: str, cfg: ViewConfig, device: torch.device, request: ViewRequest = ALL_VIEWS
) -> dict[str, Tensor]:
    """The main process's part: a collated batch of ``FileCrops`` items → model inputs on
    ``device`` (colour ops and normalisation on the whole batch there)."""
    if kind == CLASSIFY:
        return {"image": normalised_planes(sample, device, cfg.mean, cfg.std)}
    return finish_crops(to_device(sample, device, non_blocking=True), cfg, request)


def finish_crops(moved: dict, cfg: ViewConfig, request: ViewRequest) -> dict[str, Tensor]:
    """Model inputs from a batch of stage-1 crops on the device: the uint8 crops (B, S, S, 3)
    of ``view_crops`` (or float (B, 3, S, S) in [0, 1] ones), their parameters and ``named``."""
    out: dict[str, Tensor] = {}

    def planes(x: Tensor | None) -> Tensor | None:
        if x is None or x.is_floating_point():
            return x
        return to_planes(x)

    if request.standard:
        colors = (None, None, None)
        if "color" in moved:
            colors = batch_colors(moved["color"], cfg)
        out = finish_views(
            planes(moved.get("query")),
            planes(moved.get("key")),
            planes(moved.get("patches")),
            moved.get("boxes"),
            moved.get("patch_flips"),
            colors,
            cfg,
        )
    for name, spec in request.extra:
        named = moved["named"][name]
        out[name] = finish_named(
            planes(named["crop"]),
            spec,
            named.get("color"),
            named.get("seed"),
            cfg.blur_min_size,
            cfg.mean,
            cfg.std,
        )
    return out
