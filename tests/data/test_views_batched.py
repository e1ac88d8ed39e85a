"""Batched views: shapes, geometry, box statistics, agreement with the per-sample path."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dscl.data import views as V

ATOL = 1e-5  # float32 rounding of a few multiply-adds on values of order 1 (see test_views.py)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("size, batch", [(28, 4), (32, 4), (224, 2)])
def test_batched_shapes_and_dtypes(size, batch):
    cfg = V.ViewConfig(view_size=size)
    out = V.BatchedMultiView(cfg)(_images(batch, 30, 26), _gen(0))
    p = cfg.patch_px
    assert out["query"].shape == out["key"].shape == (batch, 3, size, size)
    assert out["patches"].shape == (batch, 5, 3, p, p)
    assert out["boxes"].shape == (batch, 5, 4) and out["boxes"].dtype == torch.float32
    assert out["patch_flips"].shape == (batch, 5) and out["patch_flips"].dtype == torch.bool
    for name in ("query", "key", "patches"):
        assert out[name].dtype == torch.float32 and torch.isfinite(out[name]).all()


def test_batched_rejects_bad_input_and_handles_no_patches():
    multiview = V.BatchedMultiView(V.ViewConfig(view_size=16, num_patches=0))
    out = multiview(_images(3, 16, 16))
    assert out["patches"].shape == (3, 0, 3, 5, 5) and out["boxes"].shape == (3, 0, 4)
    with pytest.raises(ValueError, match="images"):
        multiview(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images"):
        multiview(torch.zeros(2, 3, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="cfg"):
        V.BatchedMultiView({"view_size": 16})


def test_batched_boxes_inside_query_view():
    multiview = V.BatchedMultiView(V.ViewConfig(view_size=28, color_augment=False))
    g = _gen(1)
    for _ in range(4):
        boxes = multiview(_images(256, 28, 28), g)["boxes"]  # (256, 5, 4)
        assert (boxes >= 0).all() and (boxes <= 28).all()
        assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
        assert torch.equal(boxes, boxes.round())


def test_batched_patch_is_crop_of_query_without_color():
    cfg = V.ViewConfig(view_size=32, num_patches=5, color_augment=False)
    out = V.BatchedMultiView(cfg)(_images(16, 27, 35), _gen(2))
    assert out["patch_flips"].any() and not out["patch_flips"].all()
    for n in range(16):
        for j in range(5):
            x1, y1, x2, y2 = (int(v) for v in out["boxes"][n, j])
            crop = out["query"][n : n + 1, :, y1:y2, x1:x2]
            # Reference is F.interpolate on the crop, not the matrices used inside; normalisation
            # commutes with the filter (weights sum to one), so only float rounding remains.
            ref = F.interpolate(crop, (9, 9), mode="bilinear", align_corners=False, antialias=True)
            ref = ref[0].flip(-1) if out["patch_flips"][n, j] else ref[0]
            torch.testing.assert_close(out["patches"][n, j], ref, atol=ATOL, rtol=0)


def test_batched_box_area_and_ratio_statistics():
    cfg = V.ViewConfig(view_size=64, color_augment=False)
    boxes = V.BatchedMultiView(cfg)(_images(400, 8, 8), _gen(3))["boxes"].view(-1, 4).double()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # w and h are sqrt(area·ratio), sqrt(area/ratio) rounded to integers, so each is within 0.5
    # px of a box whose area fraction is in [0.05, 0.6] and ratio in [3/4, 4/3].
    side = 64.0
    assert ((w + 0.5) * (h + 0.5) >= 0.05 * side**2).all()
    assert ((w - 0.5) * (h - 0.5) <= 0.6 * side**2).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    area, log_ratio = w * h / side**2, torch.log(w / h)
    n, bound = len(area), math.log(4 / 3)
    # Uniform laws: log ratio mean 0, sd bound/sqrt(3); area mean 0.325, sd 0.55/sqrt(12).
    # Tolerances are 4 standard errors plus a rounding allowance.
    assert abs(log_ratio.mean()) < 4 * bound / math.sqrt(3 * n) + 0.005
    assert abs(log_ratio.std() - bound / math.sqrt(3)) < 0.015
    assert abs(area.mean() - 0.325) < 4 * 0.55 / math.sqrt(12 * n) + 0.005
    assert area.min() < 0.07 and area.max() > 0.57  # spread over the whole range
    counts = torch.histc(area.float(), bins=5, min=0.05, max=0.6)
    assert (counts > 0.15 * n).all()  # each fifth of the range near its 20% share


def test_batched_reproducible_and_seed_dependent():
    multiview = V.BatchedMultiView(V.ViewConfig(view_size=28))
    images = _images(8, 28, 28)
    a, b, c = multiview(images, _gen(5)), multiview(images, _gen(5)), multiview(images, _gen(6))
    for name in a:
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["query"], c["query"]) and not torch.equal(a["boxes"], c["boxes"])
    torch.manual_seed(3)
    d = multiview(images)
    torch.manual_seed(3)
    assert torch.equal(d["key"], multiview(images)["key"])


def test_batched_of_one_equals_per_sample_with_same_seed():
    # Both paths draw the same parameters from the same generator state; only the resampling
    # code differs (matrices vs F.interpolate), which agrees to float rounding.
    cfg = V.ViewConfig(view_size=32, num_patches=4)
    for seed in range(6):
        image = _images(1, 23, 40, seed=seed)
        batched = V.BatchedMultiView(cfg)(image, _gen(seed))
        single = V.MultiViewTransform(cfg)(image[0], _gen(seed))
        for name in single:
            torch.testing.assert_close(batched[name][0], single[name], atol=1e-4, rtol=0)
    image = _images(1, 40, 30, seed=9)
    torch.testing.assert_close(
        V.batched_classifier_train(image, 24, generator=_gen(1))[0],
        V.classifier_train_transform(24)(image[0], _gen(1)),
        atol=ATOL,
        rtol=0,
    )


def _two_sample_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Means of two independent samples agree within 5 standard errors (|z| < 5)."""
    se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
    return abs(a.mean().item() - b.mean().item()) < 5 * se


def test_per_sample_and_batched_agree_in_distribution():
    cfg = V.ViewConfig(view_size=28)
    n = 120
    images = _images(n, 28, 28, seed=10)
    # A smooth image family (ramps) so crop position and colour ops change pixel statistics.
    ramp = torch.linspace(0, 255, 28).view(1, 1, 1, 28)
    images = ((images.float() * 0.3 + ramp * 0.7).round()).to(torch.uint8)
    batched = V.BatchedMultiView(cfg)(images, _gen(11))
    transform, g = V.MultiViewTransform(cfg), _gen(12)
    singles = [transform(Image.fromarray(img.permute(1, 2, 0).numpy()), g) for img in images]
    single = {k: torch.stack([s[k] for s in singles]) for k in singles[0]}
    for name in ("boxes",):
        w = single[name][..., 2] - single[name][..., 0]
        h = single[name][..., 3] - single[name][..., 1]
        wb = batched[name][..., 2] - batched[name][..., 0]
        hb = batched[name][..., 3] - batched[name][..., 1]
        assert _two_sample_close((w * h).flatten(), (wb * hb).flatten())
        assert _two_sample_close(torch.log(w / h).flatten(), torch.log(wb / hb).flatten())
    for name in ("query", "key", "patches"):
        per_image_a = single[name].flatten(1)
        per_image_b = batched[name].flatten(1)
        assert _two_sample_close(per_image_a.mean(1), per_image_b.mean(1)), name
        assert _two_sample_close(per_image_a.std(1), per_image_b.std(1)), name


def test_batched_eval_matches_per_sample_eval():
    images = _images(3, 70, 90)
    out = V.batched_eval(images, 64, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    for img, got in zip(images, out, strict=True):
        torch.testing.assert_close(
            got, V.eval_transform(64, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))(img), atol=ATOL, rtol=0
        )
    assert out.shape == (3, 3, 64, 64)


def test_color_parameters_follow_configured_probabilities():
    n = 4000
    params = V.draw_view_params(V.ViewConfig(view_size=32, num_patches=2), n, 32, 32, _gen(20))
    # Binomial rates within 5 standard errors (sd <= 0.5/sqrt(n) = 0.008).
    for color, total in ((params.query_color, n), (params.patch_color, 2 * n)):
        tol = 5 * 0.5 / math.sqrt(total)
        assert abs(color.jitter.float().mean() - 0.8) < tol
        assert abs(color.gray.float().mean() - 0.2) < tol
        assert abs(color.blur.float().mean() - 0.5) < tol
        assert color.factors[:, :3].min() >= 0.6 and color.factors[:, :3].max() <= 1.4
        assert color.factors[:, 3].abs().max() <= 0.1 and color.use_hue
        assert color.sigma.min() >= 0.1 and color.sigma.max() <= 2.0
        # All 24 jitter orders occur, each near 1/24 of the draws.
        codes = (color.order * torch.tensor([64, 16, 4, 1])).sum(1)
        counts = torch.unique(codes, return_counts=True)[1]
        assert len(counts) == 24 and counts.min() > 0.5 * total / 24
    key = params.key_color
    assert key.jitter.all() and not key.gray.any() and not key.blur.any() and not key.use_hue
    assert (key.factors[:, 3] == 0).all()
    # The patches of one image have their own draws, not copies of the query's.
    assert not torch.equal(params.patch_color.factors[:n], params.query_color.factors)


def test_color_ops_are_applied_exactly_where_drawn():
    # Same seed with colour on and off: identical geometry (drawn first); an output differs from
    # its colour-free version exactly when one of its colour ops was drawn. Patches of 9 px are
    # never blurred (below blur_min_size), so blur alone leaves them unchanged.
    images, seed, b = _images(64, 30, 30, seed=21), 22, 64
    on = V.BatchedMultiView(V.ViewConfig(view_size=32))(images, _gen(seed))
    off = V.BatchedMultiView(V.ViewConfig(view_size=32, color_augment=False))(images, _gen(seed))
    params = V.draw_view_params(V.ViewConfig(view_size=32), b, 30, 30, _gen(seed))
    assert torch.equal(on["boxes"], off["boxes"])
    qc, pc = params.query_color, params.patch_color
    changed = (on["query"] - off["query"]).flatten(1).abs().amax(1) > 1e-3
    assert torch.equal(changed, qc.jitter | qc.gray | qc.blur)
    changed = (on["patches"] - off["patches"]).flatten(2).abs().amax(2).flatten() > 1e-3
    assert torch.equal(changed, pc.jitter | pc.gray)
    assert ((on["key"] - off["key"]).flatten(1).abs().amax(1) > 1e-3).all()


def test_without_patch_pixels_the_views_and_the_generator_are_unchanged():
    """A method without PBSD gets no patch pixels, but the same query, key and boxes, and the
    generator ends where it ends with patches, so every later batch is the same too."""
    cfg = V.ViewConfig(view_size=16, num_patches=3)
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    with_patches, without = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):  # two batches in a row
        a = V.BatchedMultiView(cfg)(images, generator=with_patches)
        request = V.ViewRequest(("query", "key"))
        b = V.BatchedMultiView(cfg, request)(images, generator=without)
        assert "patches" in a and "patches" not in b and "boxes" not in b
        for key in ("query", "key"):
            assert torch.equal(a[key], b[key]), key
    assert torch.equal(with_patches.get_state(), without.get_state())
