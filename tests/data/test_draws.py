"""The plan of draws (``dscl.data.draws``): its order, and its two executors against each other.

The order is written out here once more, as plain generator calls, on purpose: a change of the
plan changes every run's numbers, so it must fail a test.
"""

from __future__ import annotations

import pytest
import torch

from dscl.data.crop_ops import CROP_RATIO, boxes_of, draw_boxes, draw_flips
from dscl.data.draws import (
    SEED_LIMIT,
    STANDARD,
    classifier_plan,
    draw_batch,
    draw_image,
    named_plan,
    request_plan,
    view_plan,
)
from dscl.data.named_views import randaugment_view
from dscl.data.views import ViewConfig, ViewRequest
from dscl.methods.bcl import SIMCLR_VIEW
from dscl.methods.paco import MOCO_VIEW

CPU = torch.device("cpu")
EXTRA = {"strong": randaugment_view(2, 10), "sim": SIMCLR_VIEW, "moco": MOCO_VIEW}


def _uniforms(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=g, dtype=dtype)


def test_request_plan_order():
    """Standard views (query, patches, key, then their colour), then each named view in the
    request's order (box, flip, colour, RandAugment seed)."""
    cfg = ViewConfig(view_size=16, num_patches=3)
    plan = request_plan(cfg, ViewRequest.make(("key",), EXTRA))
    standard = [
        "query_box",
        "query_flip",
        "patch_boxes",
        "patch_flips",
        "key_box",
        "key_flip",
        "query_color",
        "patch_color",
        "key_color",
    ]
    expected = [(STANDARD, name) for name in standard]
    expected += [("strong", name) for name in ("box", "flip", "color", "seed")]
    expected += [(view, name) for view in ("sim", "moco") for name in ("box", "flip", "color")]
    assert [(draw.group, draw.name) for draw in plan] == expected
    # colour off: no colour step anywhere; no standard view read: none of theirs
    plain = ViewConfig(view_size=16, num_patches=3, color_augment=False)
    names = [(d.group, d.name) for d in request_plan(plain, ViewRequest.make((), EXTRA))]
    assert names == [("strong", "box"), ("strong", "flip"), ("strong", "seed")] + [
        (view, name) for view in ("sim", "moco") for name in ("box", "flip")
    ]


@pytest.mark.parametrize("color", [True, False])
def test_view_plan_draws_the_standard_sequence(color):
    """draw_batch of view_plan = these generator calls, in this order, for N images."""
    cfg = ViewConfig(view_size=16, num_patches=3, color_augment=color)
    n, height, width, crop = 4, 20, 30, (cfg.crop_scale, cfg.crop_ratio)
    g = torch.Generator().manual_seed(5)
    drawn = draw_batch(view_plan(cfg), n, height, width, g)[STANDARD]
    ref = torch.Generator().manual_seed(5)
    f64, rows = torch.float64, n * cfg.num_patches
    query = boxes_of(_uniforms(ref, n, 22, dtype=f64), height, width, *crop)
    query_flip = _uniforms(ref, n) < 0.5
    patches = boxes_of(_uniforms(ref, rows, 22, dtype=f64), 16, 16, (0.05, 0.6), CROP_RATIO)
    patch_flips = _uniforms(ref, rows) < 0.5
    key = boxes_of(_uniforms(ref, n, 22, dtype=f64), height, width, *crop)
    key_flip = _uniforms(ref, n) < 0.5
    assert torch.equal(drawn["query_box"], query)
    assert torch.equal(drawn["query_flip"], query_flip)
    assert torch.equal(drawn["patch_boxes"], patches.view(n, 3, 4))
    assert torch.equal(drawn["patch_flips"], patch_flips.view(n, 3))
    assert torch.equal(drawn["key_box"], key)
    assert torch.equal(drawn["key_flip"], key_flip)
    if color:
        for name, count in (("query_color", n), ("patch_color", rows), ("key_color", n)):
            uniforms = torch.cat([_uniforms(ref, count, 8), _uniforms(ref, count, 4)], dim=1)
            assert torch.equal(drawn[name].reshape(-1, 12), uniforms), name
    else:
        assert not any(name.endswith("color") for name in drawn)
    assert torch.equal(g.get_state(), ref.get_state())


def test_named_plan_draws_box_flip_colour_seed():
    spec, n = randaugment_view(2, 9), 3
    g = torch.Generator().manual_seed(9)
    drawn = draw_batch(named_plan("v", spec, True), n, 12, 40, g)["v"]
    ref = torch.Generator().manual_seed(9)
    u = _uniforms(ref, n, 22, dtype=torch.float64)
    assert torch.equal(drawn["box"], boxes_of(u, 12, 40, spec.crop_scale, spec.crop_ratio))
    assert torch.equal(drawn["flip"], _uniforms(ref, n) < 0.5)
    colour = torch.cat([_uniforms(ref, n, 8), _uniforms(ref, n, 4)], dim=1)
    assert torch.equal(drawn["color"], colour)
    assert torch.equal(drawn["seed"], torch.randint(0, SEED_LIMIT, (n,), generator=ref))
    assert torch.equal(g.get_state(), ref.get_state())


def test_classifier_plan_draws_what_the_stage_2_transforms_draw():
    """Stage 2's transforms draw a box, then a flip (``classifier_views``)."""
    scale = (0.35, 1.0)
    g = torch.Generator().manual_seed(3)
    drawn = draw_batch(classifier_plan(scale), 5, 30, 20, g)[STANDARD]
    ref = torch.Generator().manual_seed(3)
    assert torch.equal(drawn["box"], draw_boxes(5, 30, 20, scale, CROP_RATIO, ref, CPU))
    assert torch.equal(drawn["flip"], draw_flips(5, ref, CPU))
    assert torch.equal(g.get_state(), ref.get_state())


def _assert_same(one: dict, batch: dict) -> None:
    """draw_image's values of one image = draw_batch's for a batch of that one image."""
    assert one.keys() == batch.keys()
    for name, value in one.items():
        ref = batch[name][0]
        if isinstance(value, torch.Tensor):  # colour uniforms, seeds
            assert torch.equal(value, ref.reshape(value.shape)), name
        elif name.endswith("box"):
            assert torch.equal(torch.tensor(value, dtype=torch.float32), ref), name
        elif name.endswith("boxes"):
            assert torch.equal(torch.tensor(value, dtype=torch.float32).view(-1, 4), ref), name
        else:  # flips
            assert torch.equal(torch.tensor(value, dtype=torch.bool), ref), name


@pytest.mark.parametrize("color", [True, False])
@pytest.mark.parametrize("num_patches", [0, 3])
def test_draw_image_equals_draw_batch_of_one(color, num_patches):
    """The workers' executor = the batched one for N = 1, bit for bit, and leaves the generator
    in the same state; fallback boxes (5×300, 1×1) included."""
    cfg = ViewConfig(view_size=24, num_patches=num_patches, color_augment=color)
    plans = [
        request_plan(cfg, ViewRequest.make(extra=EXTRA)),
        request_plan(cfg, ViewRequest.make((), EXTRA)),
        classifier_plan((0.08, 1.0)),
    ]
    for seed in range(20):
        for height, width in ((40, 52), (5, 300), (1, 1), (224, 224)):
            for plan in plans:
                g, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
                one = draw_image(plan, height, width, g)
                batch = draw_batch(plan, 1, height, width, g2)
                assert one.keys() == batch.keys()
                for group in one:
                    _assert_same(one[group], batch[group])
                assert torch.equal(g.get_state(), g2.get_state())
