"""Views of one training image (docs/DESIGN.md §2.4): query x_q, key x_k, L patches and their boxes.

Conventions shared by every function here:

- **Pixels, boxes and resizing** follow ``dscl.data.crop_ops``: a box (x1, y1, x2, y2) with
  integer corners covers the pixels x1 ≤ x < x2, y1 ≤ y < y2 (``roi_align(..., aligned=True)``'s
  convention), and a crop is resized exactly as ``F.interpolate(crop, mode="bilinear",
  antialias=True)``, per crop on the per-sample path and as batched row and column matrices
  (which also flip) on the batched path.
- **Randomness.** Both paths draw every parameter with ``draw_view_params`` on the generator's
  device (CPU and torch's global RNG when no generator is given, so DataLoader worker seeding
  makes the per-sample path reproducible). The per-sample result for an image therefore equals
  the batched result for a batch of that one image under the same seed, up to float rounding.
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
from dscl.data.color_ops import ColorParams, apply_color, blur_kernel_size, draw_color
from dscl.data.crop_ops import (
    CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_batch,
    check_int,
    check_interval,
    check_stats,
    crop_resize,
    draw_boxes,
    draw_flips,
    image_tensor,
    normalise,
    resample_boxes,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchedMultiView",
    "ClassifierTrainTransform",
    "EvalTransform",
    "MultiViewTransform",
    "ViewConfig",
    "batched_classifier_train",
    "batched_eval",
    "classifier_train_transform",
    "eval_transform",
]

QUERY_HUE, P_JITTER, P_GRAY, P_BLUR = 0.1, 0.8, 0.2, 0.5  # query and patches (key: hue 0, p 1)


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

    @property
    def patch_px(self) -> int:
        """Resolved patch side P in pixels."""
        if self.patch_size is not None:
            return self.patch_size
        return max(1, round(self.view_size * 64 / 224))


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


def _to_device(params, device: torch.device):
    """Recursively move the tensors of a parameter dataclass to ``device``."""
    if isinstance(params, Tensor):
        return params.to(device)
    if is_dataclass(params):
        return type(params)(
            **{f.name: _to_device(getattr(params, f.name), device) for f in fields(params)}
        )
    return params


def draw_view_params(
    cfg: ViewConfig, n: int, height: int, width: int, generator: torch.Generator | None
) -> ViewParams:
    """All random parameters of the views of ``n`` images of height×width.

    Both view paths draw through this function, in this order, so the per-sample and batched
    paths see the same numbers under the same generator state.

    Args:
        cfg: view settings.
        n: number of images N.
        height, width: source image size in pixels.
        generator: drawn on its device; None uses torch's global CPU RNG.

    Returns:
        ``ViewParams`` with query/key boxes (N, 4) and flips (N,), patch boxes (N, L, 4) in the
        flipped S×S query frame and flips (N, L), and colour parameters for N, N·L and N images.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    size, num_patches = cfg.view_size, cfg.num_patches
    query_boxes = draw_boxes(n, height, width, cfg.crop_scale, cfg.crop_ratio, generator, device)
    query_flips = draw_flips(n, generator, device)
    patch_boxes = draw_boxes(
        n * num_patches, size, size, cfg.patch_scale, cfg.patch_ratio, generator, device
    ).view(n, num_patches, 4)
    patch_flips = draw_flips(n * num_patches, generator, device).view(n, num_patches)
    key_boxes = draw_boxes(n, height, width, cfg.crop_scale, cfg.crop_ratio, generator, device)
    key_flips = draw_flips(n, generator, device)
    colors: list[ColorParams | None] = [None, None, None]
    if cfg.color_augment:
        colors = [
            draw_color(n, QUERY_HUE, P_JITTER, P_GRAY, P_BLUR, generator, device),
            draw_color(n * num_patches, QUERY_HUE, P_JITTER, P_GRAY, P_BLUR, generator, device),
            draw_color(n, 0.0, 1.0, 0.0, 0.0, generator, device),  # key: jitter always, no hue
        ]
    return ViewParams(
        query_boxes, query_flips, patch_boxes, patch_flips, key_boxes, key_flips, *colors
    )


# ------------------------------------------------------------- colour + normalisation (both paths)


def _finish(
    query: Tensor, key: Tensor, patches: Tensor | None, params: ViewParams, cfg: ViewConfig
) -> dict[str, Tensor]:
    """Colour + normalisation shared by both paths; views (N, 3, S, S), patches (N, L, 3, P, P)."""
    colors = (params.query_color, params.patch_color, params.key_color)
    return finish_views(query, key, patches, params.patch_boxes, params.patch_flips, colors, cfg)


def finish_views(
    query: Tensor,
    key: Tensor,
    patches: Tensor | None,
    boxes: Tensor,
    patch_flips: Tensor,
    colors: tuple[ColorParams | None, ColorParams | None, ColorParams | None],
    cfg: ViewConfig,
) -> dict[str, Tensor]:
    """Colour + normalisation of cropped views: every path's last step (the fast file path too).

    Args:
        query, key: (N, 3, S, S) float in [0, 1], cropped, resized and flipped.
        patches: (N, L, 3, P, P) float in [0, 1], or None (no patch pixels: a method without
            PBSD); the result then has no ``patches``.
        boxes, patch_flips: (N, L, 4) and (N, L), passed through.
        colors: colour parameters of the N queries, N·L patches and N keys (None: no colour).
        cfg: view settings (blur sizes, mean, std).

    Returns:
        The dict of ``BatchedMultiView``.
    """
    query_color, patch_color, key_color = colors
    if query_color is not None:
        query = apply_color(query, query_color, blur_kernel_size(cfg.view_size, cfg.blur_min_size))
        key = apply_color(key, key_color, 0)
        if patches is not None:
            flat = apply_color(
                patches.flatten(0, 1),
                patch_color,
                blur_kernel_size(cfg.patch_px, cfg.blur_min_size),
            )  # (N·L, 3, P, P)
            patches = flat.view_as(patches)
    out = {
        "query": normalise(query, cfg.mean, cfg.std),
        "key": normalise(key, cfg.mean, cfg.std),
        "boxes": boxes,
        "patch_flips": patch_flips,
    }
    if patches is not None:
        out["patches"] = normalise(patches, cfg.mean, cfg.std)
    return out


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
        image = image_tensor(img)  # (3, H, W)
        params = draw_view_params(cfg, 1, image.shape[1], image.shape[2], generator)
        params = _to_device(params, image.device)
        query = crop_resize(image, params.query_boxes[0], size, bool(params.query_flips[0]))
        patches = [
            crop_resize(query, box, patch, bool(flip))
            for box, flip in zip(params.patch_boxes[0], params.patch_flips[0], strict=True)
        ]
        stacked = torch.stack(patches) if patches else query.new_zeros(0, 3, patch, patch)
        key = crop_resize(image, params.key_boxes[0], size, bool(params.key_flips[0]))
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
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        with_patches: bool = True,
    ) -> dict[str, Tensor]:
        """With ``with_patches=False`` no patch pixels are made (no ``patches`` in the result),
        but every random parameter is drawn as with them, so query, key and the generator's
        state are exactly those of a call with patches."""
        # B batch, L patches, S view size, P patch size
        cfg = self.cfg
        x = check_batch(images)  # (B, 3, H, W) in [0, 1]
        params = draw_view_params(cfg, x.shape[0], x.shape[2], x.shape[3], generator)
        params = _to_device(params, x.device)
        query = resample_boxes(
            x, params.query_boxes[:, None], params.query_flips[:, None], cfg.view_size
        )[:, 0]  # (B, 3, S, S)
        patches = None
        if with_patches:
            patches = resample_boxes(
                query, params.patch_boxes, params.patch_flips, cfg.patch_px
            )  # (B, L, 3, P, P)
        key = resample_boxes(
            x, params.key_boxes[:, None], params.key_flips[:, None], cfg.view_size
        )[:, 0]  # (B, 3, S, S)
        return _finish(query, key, patches, params, cfg)
