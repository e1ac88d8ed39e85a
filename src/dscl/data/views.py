"""Views of one training image (docs/DESIGN.md §2.4): query x_q, key x_k, L patches and their boxes.

Conventions shared by every function here:

- **Pixels, boxes and resizing** follow ``dscl.data.crop_ops``: a box (x1, y1, x2, y2) with
  integer corners covers the pixels x1 ≤ x < x2, y1 ≤ y < y2 (``roi_align(..., aligned=True)``'s
  convention), and a crop is resized exactly as ``F.interpolate(crop, mode="bilinear",
  antialias=True)``, per crop on the per-sample path and as batched row and column matrices
  (which also flip) on the batched path.
- **Randomness.** Both paths draw every parameter by the plan of ``dscl.data.draws``
  (``draw_params``) on the generator's device (CPU and torch's global RNG when no generator is
  given, so DataLoader worker seeding makes the per-sample path reproducible). The per-sample
  result for an image therefore equals the batched result for a batch of that one image under
  the same seed, up to float rounding.
- **Colour.** Colour ops (``dscl.data.color_ops``) act on float images in [0, 1] with per-image
  factors (torchvision's formulas): jitter in a random order per image, then grayscale, then
  Gaussian blur; normalisation comes last. Blur uses a kernel of about 10% of the image side (odd,
  at least 3) and is skipped for images smaller than ``blur_min_size`` (default 16): there a 3-tap
  kernel already spans a fifth of the image or more and erases it rather than blurs it (the 8-9 px
  patches of 28-32 px views). Flips are drawn before colour; colour ops commute with a horizontal
  flip, so this matches MoCo v2's order in distribution while the boxes live in the flipped frame.

The stage-2 and evaluation transforms live in ``dscl.data.classifier_views`` and are re-exported
here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from dscl.data.classifier_views import (
    ClassifierTrainTransform,
    EvalTransform,
    batched_classifier_train,
    batched_eval,
    classifier_train_transform,
    eval_transform,
)
from dscl.data.color_ops import ColorParams, apply_color, blur_kernel_size
from dscl.data.crop_ops import (
    CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_batch,
    check_int,
    check_interval,
    check_stats,
    crop_resize,
    image_tensor,
    normalise,
    resample_boxes,
)
from dscl.data.draws import (
    COLOR,
    GEOMETRY,
    STANDARD,
    colors_of,
    draw_batch,
    request_plan,
    view_plan,
)
from dscl.data.named_views import NamedParams, ViewSpec, check_names, finish_named, named_params

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchedMultiView",
    "ClassifierTrainTransform",
    "EvalTransform",
    "MultiViewTransform",
    "ViewConfig",
    "ViewRequest",
    "batched_classifier_train",
    "batched_eval",
    "classifier_train_transform",
    "eval_transform",
]


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
        check_int("view_size", self.view_size, 1)
        if self.patch_size is not None:
            check_int("patch_size", self.patch_size, 1)
        check_int("num_patches", self.num_patches, 0)
        check_int("blur_min_size", self.blur_min_size, 3)
        if not isinstance(self.color_augment, bool):
            raise ValueError(f"color_augment must be a bool, got {self.color_augment!r}")
        coerced = {
            "crop_scale": check_interval("crop_scale", self.crop_scale, 1.0),
            "crop_ratio": check_interval("crop_ratio", self.crop_ratio, None),
            "patch_scale": check_interval("patch_scale", self.patch_scale, 1.0),
            "patch_ratio": check_interval("patch_ratio", self.patch_ratio, None),
        }
        coerced["mean"], coerced["std"] = check_stats(self.mean, self.std)
        for name, value in coerced.items():  # lists from YAML become tuples
            object.__setattr__(self, name, value)

    @classmethod
    def from_data(cls, data: Any) -> ViewConfig:
        """The views of a run's data settings (a ``dscl.config.DataConfig``, read by attribute;
        the other fields keep their defaults). Here and not in the config, which stays free of
        torch and sits above the data layer (it checks method names against their registry)."""
        return cls(
            view_size=data.image_size,
            patch_size=data.patch_size,
            num_patches=data.num_patches,
            crop_scale=tuple(data.crop_scale),
            patch_scale=tuple(data.patch_scale),
            color_augment=data.color_augment,
            mean=tuple(data.mean),
            std=tuple(data.std),
        )

    @property
    def patch_px(self) -> int:
        """Resolved patch side P in pixels."""
        if self.patch_size is not None:
            return self.patch_size
        return max(1, round(self.view_size * 64 / 224))


STANDARD_VIEWS = ("query", "key", "patches")  # the feed's own stage-1 views
# names a method's own views cannot take: the standard views and what travels with them
RESERVED_NAMES = (*STANDARD_VIEWS, "boxes", "patch_flips", "color", "image")


# What a feed's batches hold (``Method.feed_kind``): the views a method names (``Method.views``,
# ``Method.extra_views``), or one augmented "image" (cross-entropy, stage 2)
VIEWS, CLASSIFY = "views", "classify"


@dataclass(frozen=True)
class ViewRequest:
    """The stage-1 inputs a method's batches need, which the feed makes and nothing else.

    Attributes:
        standard: which of the standard views the method reads (``query``, ``key``,
            ``patches``; with patches come their ``boxes`` and ``patch_flips``). While any is
            named, the parameters of all three are drawn, so the views made and the generator's
            state do not depend on which are read; with none named, none are drawn.
        extra: ``(name, ViewSpec)`` pairs of the method's own views (``dscl.data.named_views``),
            drawn after the standard ones in this order.
    """

    standard: tuple[str, ...] = STANDARD_VIEWS
    extra: tuple[tuple[str, ViewSpec], ...] = ()

    def __post_init__(self) -> None:
        standard = tuple(self.standard)
        unknown = [name for name in standard if name not in STANDARD_VIEWS]
        if unknown:
            raise ValueError(f"standard views {unknown} are not among {', '.join(STANDARD_VIEWS)}")
        extra = tuple((name, spec) for name, spec in dict(self.extra).items())
        check_names(dict(extra), RESERVED_NAMES)
        object.__setattr__(self, "standard", standard)
        object.__setattr__(self, "extra", extra)

    @classmethod
    def make(cls, standard=STANDARD_VIEWS, extra=None) -> ViewRequest:
        """A request from the standard names and a ``{name: ViewSpec}`` mapping."""
        return cls(tuple(standard), tuple((extra or {}).items()))

    @property
    def patches(self) -> bool:
        return "patches" in self.standard

    @property
    def query(self) -> bool:
        """Whether the query view's pixels are made (the patches are cut from it)."""
        return "query" in self.standard or self.patches

    @property
    def key(self) -> bool:
        return "key" in self.standard


ALL_VIEWS = ViewRequest()


# ---------------------------------------------------------------- parameter drawing (both paths)


@dataclass
class ViewParams:
    """Every random parameter of the views of N images (L patches each); see ``draw_view_params``.

    Colour parameters are None when colour augmentation is off.
    """

    query_boxes: Tensor  # (N, 4) crop of the source image
    query_flips: Tensor  # (N,) bool
    patch_boxes: Tensor  # (N, L, 4) in the flipped query frame
    patch_flips: Tensor  # (N, L) bool
    key_boxes: Tensor  # (N, 4)
    key_flips: Tensor  # (N,) bool
    query_color: ColorParams | None
    patch_color: ColorParams | None
    key_color: ColorParams | None


def to_device(value, device: torch.device, non_blocking: bool = False):
    """``value`` with every tensor on ``device``: a tensor, or a dict or dataclass holding
    them (recursively); anything else as it is."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    if is_dataclass(value):
        return type(value)(
            **{
                f.name: to_device(getattr(value, f.name), device, non_blocking)
                for f in fields(value)
            }
        )
    return value


def draw_view_params(
    cfg: ViewConfig, n: int, height: int, width: int, generator: torch.Generator | None
) -> ViewParams:
    """All random parameters of the standard views of ``n`` images of height×width: their plan
    (``draws.view_plan``) run for the batch.

    Args:
        cfg: view settings.
        n: number of images N.
        height, width: source image size in pixels.
        generator: drawn on its device; None uses torch's global CPU RNG.

    Returns:
        ``ViewParams`` with query/key boxes (N, 4) and flips (N,), patch boxes (N, L, 4) in the
        flipped S×S query frame and flips (N, L), and colour parameters for N, N·L and N images.
    """
    return view_params(draw_batch(view_plan(cfg), n, height, width, generator)[STANDARD], cfg)


def view_params(drawn: dict[str, Tensor], cfg: ViewConfig) -> ViewParams:
    """``ViewParams`` from ``draws.draw_batch``'s values of ``view_plan(cfg)``."""
    colors = [colors_of(draw, drawn[draw.name]) for draw in view_plan(cfg) if draw.kind == COLOR]
    return ViewParams(*(drawn[name] for name in GEOMETRY), *(colors or (None, None, None)))


def draw_params(
    cfg: ViewConfig,
    request: ViewRequest,
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None,
) -> tuple[ViewParams | None, dict[str, NamedParams]]:
    """Every random parameter of ``request``'s views of ``n`` images of height×width: its plan
    (``draws.request_plan``) run for the batch. Returns the standard views' ``ViewParams`` (None
    when the request reads none) and each named view's ``NamedParams``, by name."""
    drawn = draw_batch(request_plan(cfg, request), n, height, width, generator)
    params = view_params(drawn[STANDARD], cfg) if request.standard else None
    return params, {name: named_params(drawn[name]) for name, _ in request.extra}


# ------------------------------------------------------------- colour + normalisation (both paths)


def _finish(
    query: Tensor | None,
    key: Tensor | None,
    patches: Tensor | None,
    params: ViewParams,
    cfg: ViewConfig,
) -> dict[str, Tensor]:
    """Colour + normalisation shared by both paths; views (N, 3, S, S), patches (N, L, 3, P, P)."""
    colors = (params.query_color, params.patch_color, params.key_color)
    return finish_views(query, key, patches, params.patch_boxes, params.patch_flips, colors, cfg)


def finish_views(
    query: Tensor | None,
    key: Tensor | None,
    patches: Tensor | None,
    boxes: Tensor,
    patch_flips: Tensor,
    colors: tuple[ColorParams | None, ColorParams | None, ColorParams | None],
    cfg: ViewConfig,
) -> dict[str, Tensor]:
    """Colour + normalisation of cropped views: every path's last step (the fast file path too).

    Args:
        query, key: (N, 3, S, S) float in [0, 1], cropped, resized and flipped, or None (a view
            the method does not read; the result then has no such entry).
        patches: (N, L, 3, P, P) float in [0, 1], or None (no patch pixels: a method without
            PBSD); the result then has no ``patches``, ``boxes`` or ``patch_flips``.
        boxes, patch_flips: (N, L, 4) and (N, L), passed through with the patches.
        colors: colour parameters of the N queries, N·L patches and N keys (None: no colour).
        cfg: view settings (blur sizes, mean, std).

    Returns:
        The dict of ``BatchedMultiView``.
    """
    query_color, patch_color, key_color = colors
    out = {}
    if query is not None:
        if query_color is not None:
            kernel = blur_kernel_size(cfg.view_size, cfg.blur_min_size)
            query = apply_color(query, query_color, kernel)
        out["query"] = normalise(query, cfg.mean, cfg.std)
    if key is not None:
        if key_color is not None:
            key = apply_color(key, key_color, 0)
        out["key"] = normalise(key, cfg.mean, cfg.std)
    if patches is not None:
        if patch_color is not None:
            flat = apply_color(
                patches.flatten(0, 1),
                patch_color,
                blur_kernel_size(cfg.patch_px, cfg.blur_min_size),
            )  # (N·L, 3, P, P)
            patches = flat.view_as(patches)
        out["boxes"], out["patch_flips"] = boxes, patch_flips
        out["patches"] = normalise(patches, cfg.mean, cfg.std)
    return out


def _check_cfg(cfg: ViewConfig | None) -> ViewConfig:
    cfg = cfg if cfg is not None else ViewConfig()
    if not isinstance(cfg, ViewConfig):
        raise ValueError(f"cfg must be a ViewConfig, got {type(cfg).__name__}")
    return cfg


def _check_request(request: ViewRequest | None) -> ViewRequest:
    request = request if request is not None else ALL_VIEWS
    if not isinstance(request, ViewRequest):
        raise ValueError(f"request must be a ViewRequest, got {type(request).__name__}")
    return request


# ---------------------------------------------------------------- stage-1 views


class MultiViewTransform:
    """Per-sample views of one image (for DataLoader workers); any input size.

    Args:
        cfg: view settings (defaults: 224 px views, five 64 px patches).
        request: which views to make (default: the query, the key and the patches).

    Call with ``img`` (a PIL image, or a (3, H, W) uint8 / [0, 1] float tensor) and an optional
    ``generator`` (default: torch's global RNG). Returns a dict of ``query`` (3, S, S) and ``key``
    (3, S, S) normalised views x_q and x_k, ``patches`` (L, 3, P, P), ``boxes`` (L, 4) float32
    (x1, y1, x2, y2) of each patch in x_q's pixels (see the module docstring), ``patch_flips``
    (L,) bool (whether patch j was flipped after cropping), and each of the request's own views
    under its name; only what the request names.
    """

    def __init__(self, cfg: ViewConfig | None = None, request: ViewRequest | None = None) -> None:
        self.cfg = _check_cfg(cfg)
        self.request = _check_request(request)

    def __call__(
        self, img: Image.Image | Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        # L patches, S view size, P patch size
        cfg, size, patch, request = self.cfg, self.cfg.view_size, self.cfg.patch_px, self.request
        image = image_tensor(img)  # (3, H, W)
        height, width = image.shape[1], image.shape[2]
        out: dict[str, Tensor] = {}
        params, named = draw_params(cfg, request, 1, height, width, generator)
        if params is not None:
            params = to_device(params, image.device)
            query = key = stacked = None
            if request.query:
                query = crop_resize(image, params.query_boxes[0], size, bool(params.query_flips[0]))
            if request.patches:
                patches = [
                    crop_resize(query, box, patch, bool(flip))
                    for box, flip in zip(params.patch_boxes[0], params.patch_flips[0], strict=True)
                ]
                stacked = torch.stack(patches) if patches else query.new_zeros(0, 3, patch, patch)
                stacked = stacked[None]
            if request.key:
                key = crop_resize(image, params.key_boxes[0], size, bool(params.key_flips[0]))
            out = _finish(  # a batch of one
                query[None] if "query" in request.standard else None,
                key[None] if key is not None else None,
                stacked,
                params,
                cfg,
            )
        for name, spec in request.extra:
            mine = named[name].to(image.device)
            crop = crop_resize(image, mine.boxes[0], spec.side(size), bool(mine.flips[0]))
            out[name] = finish_named(
                crop[None], spec, mine.color, mine.seeds, cfg.blur_min_size, cfg.mean, cfg.std
            )
        return {name: value[0] for name, value in out.items()}


class BatchedMultiView:
    """Views of a whole batch in a few batched ops on the batch's device (in-memory datasets).

    Args:
        cfg: view settings.
        request: which views to make (default: the query, the key and the patches).

    Call with ``images`` (B, 3, H, W) uint8 (or float in [0, 1]) and an optional ``generator``
    (parameters are drawn on its device; default torch's global CPU RNG). Returns the dict of
    ``MultiViewTransform`` with a leading batch dim: ``query``/``key`` (B, 3, S, S), ``patches``
    (B, L, 3, P, P), ``boxes`` (B, L, 4), ``patch_flips`` (B, L), and the request's own views.
    Every random parameter of the standard views is drawn whichever of them the request names,
    so the query and key and the generator's state are those of a request for all three.
    """

    def __init__(self, cfg: ViewConfig | None = None, request: ViewRequest | None = None) -> None:
        self.cfg = _check_cfg(cfg)
        self.request = _check_request(request)

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        # B batch, L patches, S view size, P patch size
        cfg, request = self.cfg, self.request
        x = check_batch(images)  # (B, 3, H, W) in [0, 1]
        out: dict[str, Tensor] = {}
        params, named = draw_params(cfg, request, x.shape[0], x.shape[2], x.shape[3], generator)
        if params is not None:
            params = to_device(params, x.device)
            query = patches = key = None
            if request.query:
                query = resample_boxes(
                    x, params.query_boxes[:, None], params.query_flips[:, None], cfg.view_size
                )[:, 0]  # (B, 3, S, S)
            if request.patches:
                patches = resample_boxes(
                    query, params.patch_boxes, params.patch_flips, cfg.patch_px
                )  # (B, L, 3, P, P)
            if request.key:
                key = resample_boxes(
                    x, params.key_boxes[:, None], params.key_flips[:, None], cfg.view_size
                )[:, 0]  # (B, 3, S, S)
            query = query if "query" in request.standard else None
            out = _finish(query, key, patches, params, cfg)
        out.update(batched_named(x, request, cfg, named))
        return out


def batched_named(
    x: Tensor, request: ViewRequest, cfg: ViewConfig, named: dict[str, NamedParams]
) -> dict[str, Tensor]:
    """The request's own views of a batch (B, 3, H, W) in [0, 1], each (B, 3, S', S'), with
    their drawn parameters ``named`` (``draw_params``)."""
    out = {}
    for name, spec in request.extra:
        params = named[name].to(x.device)
        crops = resample_boxes(
            x, params.boxes[:, None], params.flips[:, None], spec.side(cfg.view_size)
        )[:, 0]
        out[name] = finish_named(
            crops, spec, params.color, params.seeds, cfg.blur_min_size, cfg.mean, cfg.std
        )
    return out
