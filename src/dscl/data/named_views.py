"""Views a method names itself, each with its own augmentation (``Method.extra_views``).

The feed's stage-1 inputs are the query, the key and the patches (``dscl.data.views``); a method
that needs other views (BCL's RandAugment view for its classifier, PaCo's RandAugment query)
declares them as ``{name: ViewSpec}`` and finds each under its name in ``batch.inputs``. Every
path of the feed makes them the same way:

1. **Draw** (``dscl.data.draws``, the plan every path runs): after the standard views'
   parameters, for each named view in the order the method declares them: the crop boxes, the
   flips, the colour uniforms (when colour augmentation is on) and one RandAugment seed per image
   (when the view has RandAugment), all from the feed's generator, so a resumed epoch gets the
   same views.
2. **Crop** from the source image (random resized crop + flip): batched on the device for
   in-memory data (``crop_ops.resample_boxes``), per image in the workers otherwise
   (``crop_ops.crop_resize``, or uint8 crops on the fast file path).
3. **Finish** (``finish_named``, shared by every path): the colour ops of ``color_ops`` on the
   whole batch, then RandAugment on the whole batch, then normalisation.

RandAugment is ``dscl.data.randaugment``: torchvision's ``transforms.v2.RandAugment`` (its ops,
magnitudes and signs) batched on the images' device, each image's ops chosen by its drawn seed
alone, so the result depends only on the feed's generator, never on the path, the worker, the
batch or the resume point, and nothing is read back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dscl.data.color_ops import ColorParams, apply_color, blur_kernel_size, color_params
from dscl.data.crop_ops import CROP_RATIO, check_interval, normalise
from dscl.data.draws import draw_batch, named_plan
from dscl.data.randaugment import randaugment


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation of one named view.

    Attributes:
        crop_scale: area fraction range of the random resized crop of the source image.
        crop_ratio: its aspect-ratio range (log-uniform).
        hue: hue jitter strength (brightness, contrast and saturation jitter are 0.4 as for
            every view; 0 turns hue jitter off).
        p_jitter: probability of the colour jitter.
        p_gray: probability of grayscale.
        p_blur: probability of Gaussian blur (never below ``ViewConfig.blur_min_size``).
        randaugment: (number of ops, magnitude) of RandAugment (torchvision's, batched:
            ``dscl.data.randaugment``) after the colour ops, or None for none.
        size: the view's side in pixels; None: the run's view size (``data.view_size``).
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = CROP_RATIO
    hue: float = 0.0
    p_jitter: float = 1.0
    p_gray: float = 0.0
    p_blur: float = 0.0
    randaugment: tuple[int, int] | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_scale", check_interval("crop_scale", self.crop_scale, 1.0))
        object.__setattr__(self, "crop_ratio", check_interval("crop_ratio", self.crop_ratio, None))
        for name in ("p_jitter", "p_gray", "p_blur"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue!r}")
        if self.randaugment is not None:
            ops, magnitude = self.randaugment
            if int(ops) != ops or ops < 0 or int(magnitude) != magnitude or not 0 <= magnitude < 31:
                raise ValueError(
                    "randaugment must be (ops >= 0, 0 <= magnitude <= 30), integers, got "
                    f"{self.randaugment!r}"
                )
            object.__setattr__(self, "randaugment", (int(ops), int(magnitude)))
        if self.size is not None and (int(self.size) != self.size or self.size < 1):
            raise ValueError(f"size must be a positive integer, got {self.size!r}")

    def side(self, view_size: int) -> int:
        """The view's side in pixels for a run whose views are ``view_size``."""
        return self.size if self.size is not None else view_size


def randaugment_view(ops: int = 2, magnitude: int = 10) -> ViewSpec:
    """The classifier view of BCL and PaCo (their ``augmentation_randncls``): random resized crop
    (0.08-1), flip, colour jitter (0.4, 0.4, 0.4, 0) always, RandAugment(ops, magnitude)."""
    return ViewSpec(hue=0.0, p_jitter=1.0, randaugment=(ops, magnitude) if ops > 0 else None)


@dataclass
class NamedParams:
    """The random parameters of one named view for N images (see ``draw_named``)."""

    boxes: Tensor  # (N, 4) crop of the source image
    flips: Tensor  # (N,) bool
    color: Tensor | None  # (N, 12) colour uniforms (draw_color's u then v), None: colour off
    seeds: Tensor | None  # (N,) int64 RandAugment seeds, None: no RandAugment

    def to(self, device: torch.device) -> NamedParams:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return NamedParams(
            self.boxes.to(device), self.flips.to(device), move(self.color), move(self.seeds)
        )


def draw_named(
    spec: ViewSpec,
    n: int,
    height: int,
    width: int,
    color_augment: bool,
    generator: torch.Generator | None,
) -> NamedParams:
    """Every random parameter of view ``spec`` for ``n`` images of height×width: its plan
    (``draws.named_plan``: boxes, flips, colour uniforms if ``color_augment``, RandAugment seeds
    if the view has RandAugment) on the generator's device (torch's global CPU RNG when None)."""
    plan = named_plan("view", spec, color_augment)
    return named_params(draw_batch(plan, n, height, width, generator)["view"])


def named_params(drawn: dict[str, Tensor]) -> NamedParams:
    """A named view's ``NamedParams`` from ``draws.draw_batch``'s values of its plan."""
    return NamedParams(drawn["box"], drawn["flip"], drawn.get("color"), drawn.get("seed"))


def named_colors(spec: ViewSpec, color: Tensor) -> ColorParams:
    """The colour parameters of a batch of the view's images from their uniforms (N, 12)."""
    return color_params(
        color[:, :8], color[:, 8:], spec.hue, spec.p_jitter, spec.p_gray, spec.p_blur
    )


def finish_named(
    crops: Tensor,
    spec: ViewSpec,
    color: Tensor | None,
    seeds: Tensor | None,
    blur_min_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Tensor:
    """Colour, RandAugment and normalisation of cropped views: every path's last step.

    Args:
        crops: (N, 3, S, S) float in [0, 1], cropped, resized and flipped.
        spec: the view's augmentation.
        color: (N, 12) colour uniforms of the N images (``NamedParams.color``), None: no colour.
        seeds: (N,) int64 RandAugment seeds (each picks its image's ops), None: no RandAugment.
        blur_min_size, mean, std: the run's view settings.

    Returns:
        (N, 3, S, S) normalised views.
    """
    x = crops
    if color is not None:
        kernel = blur_kernel_size(x.shape[-1], blur_min_size)
        x = apply_color(x, named_colors(spec, color), kernel)
    if spec.randaugment is not None and seeds is not None:
        x = randaugment(x, seeds, *spec.randaugment)
    return normalise(x, mean, std)


def check_names(extra: dict[str, ViewSpec], taken: tuple[str, ...]) -> None:
    """Raise ValueError if a named view's name is not an identifier, is one of the feed's own
    input names ``taken``, or its spec is not a ``ViewSpec``."""
    for name, spec in extra.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"extra view name {name!r} must be an identifier")
        if name in taken:
            raise ValueError(
                f"extra view {name!r}: the name is the feed's own ({', '.join(taken)})"
            )
        if not isinstance(spec, ViewSpec):
            raise ValueError(f"extra view {name!r} must be a ViewSpec, got {type(spec).__name__}")
