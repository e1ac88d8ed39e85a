"""Long-tailed profiles, class orders, LDAM-convention subsampling and held-out draws."""

import numpy as np
import pytest

from dscl.data.longtail import (
    balanced_holdout,
    carve_per_class,
    class_counts,
    exponential_profile,
    order_profile,
    subsample_longtail,
)

FASHION_LT_COUNTS = [1280, 691, 373, 201, 108, 58, 31, 17, 9, 5]
CIFAR10_LT_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_profiles_match_published_totals():
    # Totals of the CIFAR-LT benchmarks as reported by LDAM / PaCo / BCL.
    assert sum(exponential_profile(100, 500, 100)) == 10847
    assert sum(exponential_profile(100, 500, 50)) == 12608
    assert sum(exponential_profile(100, 500, 10)) == 19573
    assert exponential_profile(10, 5000, 100) == CIFAR10_LT_IR100
    assert sum(CIFAR10_LT_IR100) == 12406
    assert exponential_profile(10, 1280, 256) == FASHION_LT_COUNTS
    assert sum(FASHION_LT_COUNTS) == 2773


def test_profile_ends():
    counts = exponential_profile(100, 500, 100)
    assert counts[0] == 500 and counts[-1] == 5
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert exponential_profile(4, 7, 1) == [7, 7, 7, 7]


@pytest.mark.parametrize(
    "args",
    [(1, 10, 10), (10, 0, 10), (10, 100, 0.5), (10, 2.5, 10), (10, 10, 100)],
)
def test_profile_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        exponential_profile(*args)


def _ldam_reference(targets, counts, seed):
    """LDAM's gen_imbalanced_data, written out with the global NumPy RNG as in the original."""
    state = np.random.get_state()  # noqa: NPY002
    np.random.seed(seed)  # noqa: NPY002 (the original code)
    targets_np = np.array(targets, dtype=np.int64)
    kept = []
    for the_class, the_img_num in zip(np.unique(targets_np), counts, strict=True):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)  # noqa: NPY002
        kept.extend(idx[:the_img_num].tolist())
    np.random.set_state(state)  # noqa: NPY002
    return kept


def test_subsample_matches_ldam_convention():
    rng = np.random.default_rng(3)
    targets = rng.permutation(np.repeat(np.arange(10), 60)).tolist()
    counts = exponential_profile(10, 60, 12)
    for seed in (0, 1, 7):
        kept = subsample_longtail(targets, counts, seed)
        assert kept.tolist() == _ldam_reference(targets, counts, seed)
        assert class_counts(np.asarray(targets)[kept], 10) == counts
        assert len(set(kept.tolist())) == len(kept)
    assert (
        subsample_longtail(targets, counts, 0).tolist()
        != subsample_longtail(targets, counts, 1).tolist()
    )


def test_subsample_needs_enough_images():
    with pytest.raises(ValueError, match="class 1 has 2 images"):
        subsample_longtail([0, 0, 0, 1, 1], [3, 3], 0)


def test_balanced_holdout_disjoint_balanced_seeded():
    targets = np.repeat(np.arange(4), 30)
    kept = subsample_longtail(targets, [30, 20, 10, 5], 0)
    val, shortfall = balanced_holdout(targets, kept, 6, seed=0)
    assert not set(val.tolist()) & set(kept.tolist())
    assert class_counts(targets[val], 4) == [0, 6, 6, 6]
    assert shortfall == [6, 0, 0, 0]  # class 0 keeps all 30 images
    again, _ = balanced_holdout(targets, kept, 6, seed=0)
    other, _ = balanced_holdout(targets, kept, 6, seed=1)
    assert val.tolist() == again.tolist() and val.tolist() != other.tolist()


def test_carve_never_empties_a_class():
    targets = [0] * 10 + [1] * 3 + [2]
    keep, carved = carve_per_class(targets, 4, seed=0)
    labels = np.asarray(targets)
    assert class_counts(labels[carved], 3) == [4, 2, 0]
    assert class_counts(labels[keep], 3) == [6, 1, 1]
    assert sorted(keep.tolist() + carved.tolist()) == list(range(14))


def test_order_profile_label_order_is_the_identity():
    counts, permutation = order_profile(FASHION_LT_COUNTS, None)
    assert counts == FASHION_LT_COUNTS and permutation == list(range(10))


def test_order_profile_deals_counts_by_a_seeded_permutation():
    counts, permutation = order_profile(FASHION_LT_COUNTS, 3)
    # counts[permutation[r]] is the r-th largest count; the multiset of counts is unchanged.
    assert [counts[c] for c in permutation] == FASHION_LT_COUNTS
    assert sorted(permutation) == list(range(10)) and sorted(counts) == sorted(FASHION_LT_COUNTS)
    assert permutation == np.random.default_rng(3).permutation(10).tolist()
    assert order_profile(FASHION_LT_COUNTS, 3) == (counts, permutation)
    assert order_profile(FASHION_LT_COUNTS, 4)[1] != permutation
