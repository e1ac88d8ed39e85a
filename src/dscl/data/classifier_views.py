"""Single views for the classifier: stage-2 training and evaluation transforms.

Stage 2 trains the classifier on one random resized crop + flip per image; evaluation resizes the
shorter side and takes a centre crop. Each comes as a per-sample transform (PIL image or (3, H, W)
tensor, for DataLoader workers) and a batched function ((B, 3, H, W) on the batch's device); the
two agree up to float rounding (the random one for B = 1 under the same generator state). Crop
conventions are those of ``dscl.data.crop_ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dscl.data import crop_ops
from dscl.data.crop_ops import IMAGENET_MEAN, IMAGENET_STD
from dscl.data.draws import STANDARD, classifier_plan, draw_batch


def _classifier_scale(view_size: int, scale: tuple[float, float] | None) -> tuple[float, float]:
    # Small images (<= 64 px) lose their object under an 8% crop; keep at least 35% of the area.
    if scale is None:
        scale = (0.08, 1.0) if view_size > 64 else (0.35, 1.0)
    return crop_ops.check_interval("scale", scale, 1.0)


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
        crop_ops.check_int("view_size", view_size, 1)
        self.view_size, self.scale = view_size, _classifier_scale(view_size, scale)
        self.mean, self.std = crop_ops.check_stats(mean, std)

    def __call__(
        self, img: Image.Image | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        image = crop_ops.image_tensor(img)  # (3, H, W)
        drawn = draw_batch(classifier_plan(self.scale), 1, *image.shape[1:], generator)[STANDARD]
        box, flip = drawn["box"][0], bool(drawn["flip"][0])
        return crop_ops.normalise(
            crop_ops.crop_resize(image, box, self.view_size, flip), self.mean, self.std
        )


classifier_train_transform = ClassifierTrainTransform  # the function-style name callers use


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
    settings = ClassifierTrainTransform(view_size, mean, std, scale)  # checked, defaults filled
    x = crop_ops.check_batch(images)  # (B, 3, H, W)
    drawn = draw_batch(classifier_plan(settings.scale), x.shape[0], *x.shape[2:], generator)
    boxes, flips = drawn[STANDARD]["box"], drawn[STANDARD]["flip"]
    views = crop_ops.resample_boxes(
        x, boxes[:, None].to(x.device), flips[:, None].to(x.device), view_size
    )[:, 0]  # (B, 3, S, S)
    return crop_ops.normalise(views, settings.mean, settings.std)


def _default_resize_ratio(view_size: int, resize_ratio: float | None) -> float:
    if resize_ratio is None:
        return 0.875 if view_size >= 64 else 1.0
    if not 0 < float(resize_ratio) <= 1:
        raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio!r}")
    return float(resize_ratio)


def centre_geometry(
    height: int, width: int, view_size: int, resize_ratio: float
) -> tuple[int, int, int, int]:
    """The evaluation view's geometry for a height×width image: the resized size (new_h, new_w)
    with the shorter side round(S / ratio), and the (top, left) corner of the centred S×S."""
    short = round(view_size / resize_ratio)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    top, left = int(round((new_h - view_size) / 2)), int(round((new_w - view_size) / 2))
    return new_h, new_w, top, left


def _resize_centre_crop(x: Tensor, view_size: int, resize_ratio: float) -> Tensor:
    """Resize the shorter side of (N, 3, H, W) to round(S / ratio), then centre-crop S×S."""
    height, width = x.shape[-2:]
    new_h, new_w, top, left = centre_geometry(height, width, view_size, resize_ratio)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
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
        crop_ops.check_int("view_size", view_size, 1)
        self.view_size = view_size
        self.resize_ratio = _default_resize_ratio(view_size, resize_ratio)
        self.mean, self.std = crop_ops.check_stats(mean, std)

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        x = crop_ops.to_unit(crop_ops.image_tensor(img))[None]  # (1, 3, H, W)
        view = _resize_centre_crop(x, self.view_size, self.resize_ratio)[0]
        return crop_ops.normalise(view, self.mean, self.std)


eval_transform = EvalTransform  # the function-style name callers use


def batched_eval(
    images: Tensor,
    view_size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    resize_ratio: float | None = None,
) -> Tensor:
    """Batched ``EvalTransform``: (B, 3, H, W) uint8 → (B, 3, S, S) normalised, same device."""
    settings = EvalTransform(view_size, mean, std, resize_ratio)  # checked, defaults filled
    views = _resize_centre_crop(crop_ops.check_batch(images), view_size, settings.resize_ratio)
    return crop_ops.normalise(views, settings.mean, settings.std)  # (B, 3, S, S)
