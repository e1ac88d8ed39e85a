"""ClassBalancedSampler: uniform classes, uniform images within a class, rank-disjoint streams."""

import math
from collections import Counter

import pytest

from dscl.data.samplers import ClassBalancedSampler

# 5 classes of very different sizes: 1000, 100, 10, 5, 1 images, interleaved.
TARGETS = [0] * 1000 + [1] * 100 + [2] * 10 + [3] * 5 + [4]
TARGETS = TARGETS[::2] + TARGETS[1::2]


def test_classes_equally_likely():
    n = 20_000
    draws = list(ClassBalancedSampler(TARGETS, num_samples=n, seed=0))
    assert len(draws) == n
    per_class = Counter(TARGETS[i] for i in draws)
    # Each class count is Binomial(n, 1/5): sd = sqrt(n * 0.2 * 0.8) = 56.6. A 5-sd band fails
    # with probability < 6e-7 per class for a correct sampler; a size-proportional sampler
    # would give class 4 about 18 draws, far outside it.
    sd = math.sqrt(n * 0.2 * 0.8)
    for c in range(5):
        assert abs(per_class[c] - n / 5) < 5 * sd, per_class


def test_images_uniform_within_class():
    n = 20_000
    draws = list(ClassBalancedSampler(TARGETS, num_samples=n, seed=1))
    members = [i for i, t in enumerate(TARGETS) if t == 3]
    hits = Counter(i for i in draws if TARGETS[i] == 3)
    total = sum(hits.values())
    # Given `total` draws of class 3, each of its 5 images is Binomial(total, 1/5); 5-sd band.
    sd = math.sqrt(total * 0.2 * 0.8)
    assert set(hits) == set(members)
    for i in members:
        assert abs(hits[i] - total / 5) < 5 * sd, hits


def test_reproducible_for_seed_and_epoch():
    a, b = ClassBalancedSampler(TARGETS, seed=5), ClassBalancedSampler(TARGETS, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert first == list(b) == list(a)
    b.set_epoch(4)
    assert list(b) != first
    assert list(ClassBalancedSampler(TARGETS, seed=6)) != list(ClassBalancedSampler(TARGETS))


def test_ranks_take_disjoint_positions_of_one_stream():
    world = 3
    samplers = [
        ClassBalancedSampler(TARGETS, num_samples=10, seed=2, rank=r, world_size=world)
        for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(7)
    # 10 is padded up to 12 draws so that every rank gets 4.
    assert [len(s) for s in samplers] == [4, 4, 4]
    parts = [list(s) for s in samplers]
    stream = [parts[p % world][p // world] for p in range(12)]
    single = ClassBalancedSampler(TARGETS, num_samples=12, seed=2)
    single.set_epoch(7)
    assert stream == list(single)
    assert stream == single.global_stream().tolist()


def test_default_length_and_empty_classes_never_drawn():
    targets = [0, 0, 0, 5, 5, 9]
    sampler = ClassBalancedSampler(targets, seed=0)
    assert len(sampler) == 6
    drawn = {targets[i] for i in ClassBalancedSampler(targets, num_samples=300)}
    assert drawn == {0, 5, 9}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"targets": []},
        {"targets": [0, -1]},
        {"targets": [0.5, 1.0]},
        {"targets": [0, 1], "num_samples": 0},
        {"targets": [0, 1], "rank": 2, "world_size": 2},
        {"targets": [0, 1], "world_size": 0},
        {"targets": [0, 1], "seed": -1},
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ClassBalancedSampler(**kwargs)


def test_rejects_bad_epoch():
    with pytest.raises(ValueError):
        ClassBalancedSampler([0, 1]).set_epoch(-1)
