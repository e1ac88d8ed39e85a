"""Per-sample views, shared primitives (colour ops, resampling, boxes), stage-2 transforms."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.ops import roi_align

from dscl.config import DataConfig
from dscl.data import color_ops, crop_ops
from dscl.data import views as V

# Float32 rounding of a handful of multiply-adds on values of order 1 (normalised pixels reach ~2.6)
# stays below 1e-5; anything wrong in geometry or a formula moves pixels by 1e-2 or more.
ATOL = 1e-5


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _crop_reference(view: torch.Tensor, box: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
    """What a patch must be: pixels x1 <= x < x2, y1 <= y < y2 of ``view``, resized, flipped."""
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = view[None, :, y1:y2, x1:x2]
    out = F.interpolate(crop, (size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].flip(-1) if flip else out[0]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"view_size": 0}, "view_size"),
        ({"patch_size": -1}, "patch_size"),
        ({"num_patches": -1}, "num_patches"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
        ({"patch_scale": (0.05, 1.5)}, "patch_scale"),
        ({"patch_ratio": (0.0, 1.0)}, "patch_ratio"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"color_augment": "yes"}, "color_augment"),
        ({"blur_min_size": 1}, "blur_min_size"),
    ],
)
def test_view_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        V.ViewConfig(**kwargs)


def test_view_config_patch_size_and_coercion():
    assert [V.ViewConfig(view_size=s).patch_px for s in (224, 32, 28)] == [64, 9, 8]
    assert V.ViewConfig(view_size=32, patch_size=12).patch_px == 12
    cfg = V.ViewConfig(crop_scale=[0.2, 1], mean=[0.5, 0.5, 0.5])  # YAML lists
    assert cfg.crop_scale == (0.2, 1.0) and cfg.mean == (0.5, 0.5, 0.5)


def test_view_config_from_the_data_settings():
    data = DataConfig(
        image_size=20,
        patch_size=6,
        num_patches=3,
        crop_scale=[0.2, 0.9],
        patch_scale=[0.1, 0.5],
        color_augment=False,
        mean=[0.1, 0.2, 0.3],
        std=[0.4, 0.5, 0.6],
    )
    assert V.ViewConfig.from_data(data) == V.ViewConfig(
        view_size=20,
        patch_size=6,
        num_patches=3,
        crop_scale=(0.2, 0.9),
        patch_scale=(0.1, 0.5),
        color_augment=False,
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
    )
    assert V.ViewConfig.from_data(DataConfig()) == V.ViewConfig(view_size=28)


def test_blur_kernel_sizes():
    # ~10% of the side, odd, >= 3; none below blur_min_size (16).
    assert [color_ops.blur_kernel_size(s, 16) for s in (224, 64, 32, 28, 16, 9)] == [
        23,
        7,
        3,
        3,
        3,
        0,
    ]


# ---------------------------------------------------------------- colour ops vs torchvision


def test_color_ops_match_torchvision():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 11, 13)
    factors = torch.tensor([0.6, 0.9, 1.2, 1.4])
    for ours, ref in [
        (color_ops.adjust_brightness, TF.adjust_brightness),
        (color_ops.adjust_contrast, TF.adjust_contrast),
        (color_ops.adjust_saturation, TF.adjust_saturation),
    ]:
        expected = torch.stack([ref(img, float(f)) for img, f in zip(x, factors, strict=True)])
        torch.testing.assert_close(ours(x, factors), expected, atol=ATOL, rtol=0)
    shifts = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    expected = torch.stack([TF.adjust_hue(img, float(s)) for img, s in zip(x, shifts, strict=True)])
    # hsv round trip: a few divisions per pixel, float32 error ~1e-6
    torch.testing.assert_close(color_ops.adjust_hue(x, shifts), expected, atol=1e-5, rtol=0)
    gray = TF.rgb_to_grayscale(x, num_output_channels=1)
    torch.testing.assert_close(color_ops.grayscale(x), gray, atol=ATOL, rtol=0)
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    expected = torch.stack(
        [
            TF.gaussian_blur(img, [5, 5], [float(s), float(s)])
            for img, s in zip(x, sigmas, strict=True)
        ]
    )
    torch.testing.assert_close(color_ops.gaussian_blur(x, sigmas, 5), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("way", ["subset", "masked", "per_image"])
def test_apply_color_uses_each_images_own_order_and_masks(way):
    torch.manual_seed(1)
    x = torch.rand(3, 3, 8, 8)
    params = color_ops.ColorParams(
        jitter=torch.tensor([True, True, False]),
        factors=torch.tensor([[1.3, 0.7, 1.2, 0.05], [0.8, 1.3, 0.6, -0.08], [1.4, 1.4, 1.4, 0.1]]),
        order=torch.tensor([[3, 1, 0, 2], [0, 2, 1, 3], [0, 1, 2, 3]]),
        gray=torch.tensor([False, True, False]),
        blur=torch.tensor([True, False, True]),
        sigma=torch.tensor([1.0, 1.0, 0.5]),
        use_hue=True,
    )
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for i in range(3):  # slow reference, one image at a time
        img = x[i]
        if params.jitter[i]:
            for op in params.order[i].tolist():
                img = ops[op](img, float(params.factors[i, op]))
        if params.gray[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if params.blur[i]:
            img = TF.gaussian_blur(img, [3, 3], [float(params.sigma[i])] * 2)
        expected.append(img)
    torch.testing.assert_close(
        color_ops.apply_color(x, params, 3, way=way), torch.stack(expected), atol=1e-5, rtol=0
    )


def test_masked_colour_path_equals_subset_path_without_reading_the_selection(monkeypatch):
    """The accelerator path (whole batch + torch.where) gives the CPU path's images and never
    calls nonzero, which would make the host wait for the device."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 3, 12, 12, generator=gen)
    params = color_ops.draw_color(64, 0.1, 0.8, 0.2, 0.5, gen, torch.device("cpu"))
    subset = color_ops.apply_color(x, params, 3, way="subset")

    def no_nonzero(*args, **kwargs):
        raise AssertionError("nonzero called on the masked path")

    monkeypatch.setattr(torch.Tensor, "nonzero", no_nonzero)
    masked = color_ops.apply_color(x, params, 3, way="masked")
    torch.testing.assert_close(masked, subset, atol=1e-6, rtol=0)


def test_per_image_colour_path_equals_subset_path_on_large_images(monkeypatch):
    """A CPU colours images of PER_IMAGE_BYTES and more one at a time, in place: the same images as
    the batched subset path, and the input is left as it was; smaller images stay batched."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(16, 3, 128, 128, generator=gen)  # 192 KiB an image
    assert x[0].numel() * 4 >= color_ops.PER_IMAGE_BYTES
    before = x.clone()
    for hue in (0.1, 0.0):
        params = color_ops.draw_color(16, hue, 0.8, 0.2, 0.5, gen, torch.device("cpu"))
        assert params.jitter.any() and params.gray.any() and params.blur.any()
        subset = color_ops.apply_color(x, params, 13, way="subset")
        torch.testing.assert_close(color_ops.apply_color(x, params, 13), subset, atol=1e-6, rtol=0)
        assert torch.equal(x, before)
    calls = []
    real = color_ops._apply_per_image
    monkeypatch.setattr(color_ops, "_apply_per_image", lambda *a: calls.append(1) or real(*a))
    color_ops.apply_color(x, params, 13)
    color_ops.apply_color(x[:, :, :32, :32], params, 3)  # 12 KiB images: the subset path
    assert calls == [1]
    with pytest.raises(ValueError, match="way must be"):
        color_ops.apply_color(x, params, 13, way="rows")


# ---------------------------------------------------------------- geometry primitives


def test_batched_resample_matches_crop_then_interpolate():
    torch.manual_seed(2)
    images = torch.rand(3, 3, 20, 17)
    boxes = torch.tensor(
        [
            [[0, 0, 17, 20], [3, 4, 9, 7], [16, 19, 17, 20]],  # whole, small (upsampled), 1 px
            [[1, 2, 16, 14], [5, 0, 12, 20], [0, 10, 4, 20]],
            [[2, 2, 11, 11], [0, 0, 1, 1], [9, 3, 17, 19]],
        ],
        dtype=torch.float32,
    )
    flips = torch.tensor([[False, True, False], [True, False, True], [False, False, True]])
    for size in (6, 9):  # downsampling and upsampling mixes
        out = crop_ops.resample_boxes(images, boxes, flips, size)  # (3, 3, 3, s, s)
        for n in range(3):
            for m in range(3):
                ref = _crop_reference(images[n], boxes[n, m], size, bool(flips[n, m]))
                torch.testing.assert_close(out[n, m], ref, atol=ATOL, rtol=0)


def test_box_convention_matches_roi_align_aligned():
    # An integer box covers pixels x1 <= x < x2: RoIAlign(aligned=True) sampled once per pixel
    # over the box returns exactly those pixels, and [0, 0, S, S] returns the whole view.
    torch.manual_seed(3)
    view = torch.rand(1, 3, 12, 12)
    for box in ([0, 0, 12, 12], [2, 3, 9, 7], [5, 0, 12, 4]):
        x1, y1, x2, y2 = box
        rois = torch.tensor([[0.0, *box]])
        sampled = roi_align(view, rois, (y2 - y1, x2 - x1), 1.0, sampling_ratio=1, aligned=True)
        torch.testing.assert_close(sampled[0], view[0, :, y1:y2, x1:x2], atol=ATOL, rtol=0)


def test_draw_boxes_follow_random_resized_crop_distribution():
    # A 1000x1000 frame makes integer rounding negligible (<0.2% in area and ratio).
    g = torch.Generator().manual_seed(4)
    n = 4000
    boxes = crop_ops.draw_boxes(n, 1000, 1000, (0.05, 0.6), (3 / 4, 4 / 3), g, torch.device("cpu"))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, log_ratio = (w * h / 1e6).double(), torch.log(w / h).double()
    assert boxes.min() >= 0 and boxes[:, 2:].max() <= 1000
    assert area.min() >= 0.05 - 2e-3 and area.max() <= 0.6 + 2e-3
    bound = math.log(4 / 3)
    assert log_ratio.abs().max() <= bound + 2e-3
    # Kolmogorov-Smirnov distance to the uniform laws; 1.63/sqrt(n) = 0.026 is the 1% critical
    # value, plus 0.005 for the rounding of w and h.
    for values, low, high in ((area, 0.05, 0.6), (log_ratio, -bound, bound)):
        sorted_values = values.sort().values
        cdf = ((sorted_values - low) / (high - low)).clamp(0, 1)
        empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
        assert (cdf - empirical).abs().max() < 1.63 / math.sqrt(n) + 0.005


def test_draw_boxes_fall_back_to_central_crop():
    g = torch.Generator().manual_seed(5)
    # Area fraction 1 with ratio fixed at 2 never fits a 10x10 frame: central 10x5 crop.
    boxes = crop_ops.draw_boxes(3, 10, 10, (1.0, 1.0), (2.0, 2.0), g, torch.device("cpu"))
    assert boxes.tolist() == [[0.0, 2.0, 10.0, 7.0]] * 3


# ---------------------------------------------------------------- MultiViewTransform


@pytest.mark.parametrize("size", [28, 32, 224])
def test_multiview_shapes_and_dtypes(size):
    cfg = V.ViewConfig(view_size=size)
    out = V.MultiViewTransform(cfg)(_image(37, 45), torch.Generator().manual_seed(0))
    patch = cfg.patch_px
    assert out["query"].shape == out["key"].shape == (3, size, size)
    assert out["patches"].shape == (5, 3, patch, patch)
    assert out["boxes"].shape == (5, 4) and out["boxes"].dtype == torch.float32
    assert out["patch_flips"].shape == (5,) and out["patch_flips"].dtype == torch.bool
    for name in ("query", "key", "patches"):
        assert out[name].dtype == torch.float32 and torch.isfinite(out[name]).all()


def test_multiview_accepts_grayscale_pil_tensor_and_no_patches():
    transform = V.MultiViewTransform(V.ViewConfig(view_size=16, num_patches=0))
    gray = Image.fromarray(np.full((20, 20), 128, dtype=np.uint8), mode="L")
    out = transform(gray)
    assert out["patches"].shape == (0, 3, 5, 5) and out["boxes"].shape == (0, 4)
    out = transform(torch.randint(0, 256, (3, 9, 30), dtype=torch.uint8))
    assert out["query"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="img"):
        transform(torch.zeros(1, 9, 9))


def test_multiview_boxes_inside_query_view():
    cfg = V.ViewConfig(view_size=32, color_augment=False)
    transform, g = V.MultiViewTransform(cfg), torch.Generator().manual_seed(6)
    for i in range(60):
        boxes = transform(_image(24 + i % 17, 40, seed=i), g)["boxes"]
        assert (boxes >= 0).all() and (boxes <= 32).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert torch.equal(boxes, boxes.round())  # integer corners: whole pixels


def test_multiview_patch_is_crop_of_query_without_color():
    cfg = V.ViewConfig(view_size=32, num_patches=6, color_augment=False, mean=(0.2, 0.5, 0.4))
    transform, g = V.MultiViewTransform(cfg), torch.Generator().manual_seed(7)
    flips_seen = set()
    for i in range(10):
        out = transform(_image(29, 41, seed=i), g)
        for box, flip, patch in zip(out["boxes"], out["patch_flips"], out["patches"], strict=True):
            # Normalisation is affine per channel and the filter weights sum to one, so cropping
            # the normalised query gives the normalised patch up to float rounding.
            torch.testing.assert_close(
                patch,
                _crop_reference(out["query"], box, cfg.patch_px, bool(flip)),
                atol=ATOL,
                rtol=0,
            )
            flips_seen.add(bool(flip))
    assert flips_seen == {True, False}


def test_multiview_reproducible():
    transform, img = V.MultiViewTransform(V.ViewConfig(view_size=32)), _image(30, 30)

    def run(seed):
        return transform(img, torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["query"], c["query"]) and not torch.equal(a["boxes"], c["boxes"])
    torch.manual_seed(11)  # global RNG, as in DataLoader workers
    d = transform(img)
    torch.manual_seed(11)
    assert torch.equal(d["patches"], transform(img)["patches"])


# ---------------------------------------------------------------- stage 2 / evaluation


def test_eval_transform_resize_and_centre_crop():
    img = _image(40, 50)
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    out = V.eval_transform(64, mean, std)(img)  # 0.875: shorter side to 73, centre crop 64
    ref = TF.center_crop(TF.resize(tensor, [73], antialias=True), [64, 64])
    ref = TF.normalize(ref, list(mean), list(std))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    small = _image(32, 32)  # below 64 px the default ratio is 1: just normalise
    expected = TF.normalize(TF.to_dtype(TF.pil_to_tensor(small), scale=True), list(mean), list(std))
    torch.testing.assert_close(V.eval_transform(32, mean, std)(small), expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="resize_ratio"):
        V.eval_transform(32, resize_ratio=1.5)


def test_classifier_train_transform_is_a_random_crop():
    transform = V.classifier_train_transform(32, scale=(1.0, 1.0))
    assert transform.scale == (1.0, 1.0)
    assert V.classifier_train_transform(32).scale == (0.35, 1.0)
    assert V.classifier_train_transform(224).scale == (0.08, 1.0)
    img = _image(32, 32)
    # Area 1 on a square image: the whole image, possibly flipped.
    base = V.eval_transform(32)(img)
    outs = [transform(img, torch.Generator().manual_seed(s)) for s in range(8)]
    for out in outs:
        assert torch.allclose(out, base, atol=ATOL) or torch.allclose(out, base.flip(-1), atol=ATOL)
    assert any(not torch.allclose(out, base, atol=ATOL) for out in outs)
    with pytest.raises(ValueError, match="view_size"):
        V.classifier_train_transform(0)
