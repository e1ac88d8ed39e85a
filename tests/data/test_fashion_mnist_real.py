"""The real Fashion-MNIST files of the Debian package dataset-fashion-mnist, when installed."""

import os

import pytest

from dscl.data import build_splits, shot_groups
from dscl.data.arrayfiles import FASHION_MNIST_SYSTEM_DIR, read_fashion_mnist

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_SYSTEM_DIR),
    reason=f"Fashion-MNIST not installed at {FASHION_MNIST_SYSTEM_DIR} "
    "(apt install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def full():
    return read_fashion_mnist(FASHION_MNIST_SYSTEM_DIR)


def test_full_sets(full):
    train, test = full
    assert train.images.shape == (60_000, 28, 28) and test.images.shape == (10_000, 28, 28)
    assert train.class_counts == [6000] * 10 and test.class_counts == [1000] * 10
    assert min(train.targets) == 0 and max(train.targets) == 9
    # First labels of the published files (Ankle boot, T-shirt/top, ...).
    assert train.targets[:5] == [9, 0, 0, 3, 0] and test.targets[:3] == [9, 2, 1]
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 9


def test_default_long_tailed_config(full):
    splits = build_splits("fashion_mnist_lt", FASHION_MNIST_SYSTEM_DIR)
    assert splits.class_counts == [1280, 691, 373, 201, 108, 58, 31, 17, 9, 5]
    assert len(splits.train) == 2773 and len(splits.test) == 10_000
    assert splits.val.class_counts == [20] * 10
    assert not set(splits.val.source_indices) & set(splits.train.source_indices)
    assert shot_groups(splits.class_counts) == {
        "many": [0, 1, 2, 3, 4],
        "medium": [5, 6],
        "few": [7, 8, 9],
    }
    # The subset holds the real images of the full set, with their labels.
    train, _ = full
    i = splits.train.source_indices[100]
    assert splits.train.targets[100] == train.targets[i]
    assert (splits.train.images[100] == train.images[i]).all()
