"""Dataset builders on files laid out like the real ones (tiny images), and RGB conversion."""

import gzip
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dscl.config import DataConfig
from dscl.data import (
    DATASETS,
    DataError,
    ImageFileDataset,
    build_splits,
    build_splits_for,
    exponential_profile,
    subsample_longtail,
)
from dscl.data.arrayfiles import read_cifar, read_fashion_mnist

FASHION_LT_COUNTS = [1280, 691, 373, 201, 108, 58, 31, 17, 9, 5]


# ---------------------------------------------------------------- writers of the real formats
def write_cifar(root, num_classes, per_class, side=1, test_per_class=2, protocol=4):
    """A cifar-10-batches-py / cifar-100-python folder; pixel value = label (mod 256)."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    data = np.repeat((labels % 256).astype(np.uint8)[:, None], 3 * side * side, axis=1)
    test_labels = np.repeat(np.arange(num_classes), test_per_class)
    test = np.zeros((len(test_labels), 3 * side * side), dtype=np.uint8)
    names = [f"c{i}" for i in range(num_classes)]

    def dump(path, obj):
        with open(path, "wb") as handle:
            pickle.dump(obj, handle, protocol=protocol)

    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for b, chunk in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
            dump(
                folder / f"data_batch_{b}", {"data": data[chunk], "labels": labels[chunk].tolist()}
            )
        dump(folder / "test_batch", {"data": test, "labels": test_labels.tolist()})
        dump(folder / "batches.meta", {"label_names": names})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", {"data": data, "fine_labels": labels.tolist()})
        dump(folder / "test", {"data": test, "fine_labels": test_labels.tolist()})
        dump(folder / "meta", {"fine_label_names": names})
    return labels


def write_idx(path, array, gz=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_fashion(folder, per_class=6000, side=2):
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class), ("t10k", 3)):
        labels = np.tile(np.arange(10), n)
        images = np.broadcast_to(labels[:, None, None], (len(labels), side, side))
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images, gz=True)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz=False)


def save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ---------------------------------------------------------------- CIFAR-LT
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, 100, 500)
    write_cifar(root, 10, 5000, protocol=2)  # protocol 2, like the original python 2 pickles
    return root


@pytest.mark.parametrize("ratio, total", [(100, 10847), (50, 12608), (10, 19573)])
def test_cifar100_lt_counts(cifar_root, ratio, total):
    splits = build_splits("cifar100_lt", str(cifar_root), imbalance_ratio=ratio)
    assert len(splits.train) == sum(splits.class_counts) == total
    assert splits.class_counts == exponential_profile(100, 500, ratio)
    assert splits.train.class_counts == splits.class_counts
    assert splits.test.class_counts == [2] * 100  # test set untouched
    # Every pixel was written equal to its label: the kept images really are of their class.
    images = splits.train.tensor_images()
    assert images.shape == (total, 3, 1, 1)
    assert images[:, 0, 0, 0].tolist() == splits.train.targets


def test_cifar10_lt_counts(cifar_root):
    splits = build_splits("cifar10_lt", str(cifar_root))
    assert splits.class_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(splits.train) == 12406
    assert splits.class_names == [f"c{i}" for i in range(10)]


def test_cifar_validation_shortfall_modes(cifar_root):
    # CIFAR-100-LT keeps all 500 images of class 0: no unused image is left for validation.
    partial = build_splits("cifar100_lt", str(cifar_root))
    assert partial.val.class_counts == [0] + [20] * 99
    assert len(partial.train) == 10847
    assert any("class 0 has 0 of 20" in note for note in partial.notes)
    carve = build_splits("cifar100_lt", str(cifar_root), val_shortfall="carve")
    assert carve.val.class_counts == [20] * 100
    assert carve.class_counts[0] == 480 and carve.class_counts[1:] == partial.class_counts[1:]
    assert not set(carve.val.source_indices) & set(carve.train.source_indices)
    with pytest.raises(ValueError, match="class 0"):
        build_splits("cifar100_lt", str(cifar_root), val_shortfall="error")


def test_cifar_rows_are_channel_planar(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    plane = np.arange(1024, dtype=np.uint8).reshape(32, 32)  # pixel (y, x) -> 32y + x mod 256
    row = np.concatenate([plane.ravel(), plane.ravel() // 2, np.full(1024, 7, np.uint8)])
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": row[None, :], "labels": [3]}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, handle)
    train, test = read_cifar(str(tmp_path), 10)
    image, label = train[0]
    assert label == 3 and image.mode == "RGB" and image.size == (32, 32)
    assert image.getpixel((5, 2)) == (69, 34, 7)  # x=5, y=2: 32*2+5 = 69
    assert train.tensor_images()[0, :, 2, 5].tolist() == [69, 34, 7]
    assert len(train) == 5 and len(test) == 1


# ---------------------------------------------------------------- Fashion-MNIST-LT (fake IDX)
@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    write_fashion(root)
    return root


def test_fashion_lt_default_config(fashion_root):
    splits = build_splits("fashion_mnist_lt", str(fashion_root))
    assert splits.class_counts == FASHION_LT_COUNTS
    assert len(splits.train) == 2773
    assert splits.class_names[0] == "T-shirt/top" and splits.class_names[9] == "Ankle boot"
    assert len(splits.test) == 30
    summary = splits.summary()
    assert summary["shot_groups"] == {"many": [0, 1, 2, 3, 4], "medium": [5, 6], "few": [7, 8, 9]}
    assert summary["imbalance_ratio"] == 256.0
    assert summary["train"]["total"] == 2773 and summary["val"]["total"] == 200


def test_validation_disjoint_balanced_seeded(fashion_root):
    a = build_splits("fashion_mnist_lt", str(fashion_root), seed=0)
    b = build_splits("fashion_mnist_lt", str(fashion_root), seed=0)
    c = build_splits("fashion_mnist_lt", str(fashion_root), seed=1, val_per_class=7)
    assert a.val.class_counts == [20] * 10 and c.val.class_counts == [7] * 10
    assert not set(a.val.source_indices) & set(a.train.source_indices)
    assert not set(c.val.source_indices) & set(c.train.source_indices)
    assert a.val.source_indices == b.val.source_indices
    assert a.train.source_indices == b.train.source_indices
    assert a.train.source_indices != c.train.source_indices
    # Labels of the held-out images agree with the source arrays (pixel value = label).
    assert a.val.tensor_images()[:, 0, 0, 0].tolist() == a.val.targets


def test_in_memory_item_and_transform(fashion_root):
    splits = build_splits("fashion_mnist_lt", str(fashion_root), n_max=40, imbalance_ratio=4)
    image, label = splits.train[0]
    assert image.mode == "RGB" and image.size == (2, 2) and image.getpixel((0, 0)) == (label,) * 3
    splits.train.transform = lambda im: torch.tensor(im.getpixel((1, 1)))
    value, label = splits.train[0]
    assert value.tolist() == [label] * 3
    images = splits.train.tensor_images()
    assert images.dtype == torch.uint8 and images.shape == (len(splits.train), 3, 2, 2)


# ---------------------------------------------------------------- class order
def test_class_order_label_keeps_the_benchmark_subset(fashion_root):
    full, _ = read_fashion_mnist(str(fashion_root))
    expected = subsample_longtail(full.targets, FASHION_LT_COUNTS, 0).tolist()
    default = build_splits("fashion_mnist_lt", str(fashion_root))
    label = build_splits("fashion_mnist_lt", str(fashion_root), class_order="label")
    assert default.train.source_indices == label.train.source_indices == expected
    assert default.val.source_indices == label.val.source_indices
    summary = label.summary()
    assert summary["class_order"] == "label" and summary["class_permutation"] == list(range(10))


def test_class_order_seed_permutes_which_class_gets_which_count(fashion_root):
    a = build_splits("fashion_mnist_lt", str(fashion_root), class_order=5)
    again = build_splits("fashion_mnist_lt", str(fashion_root), class_order=5)
    other = build_splits("fashion_mnist_lt", str(fashion_root), class_order=6)
    permutation = [7, 6, 1, 3, 2, 4, 0, 9, 5, 8]  # np.random.default_rng(5).permutation(10)
    assert a.class_permutation == permutation
    # Class permutation[r] has the r-th largest count: the same profile, dealt out differently.
    assert [a.class_counts[c] for c in permutation] == FASHION_LT_COUNTS
    assert a.class_counts == [31, 373, 108, 201, 58, 9, 691, 1280, 5, 17]
    assert a.class_counts == a.train.class_counts and len(a.train) == 2773
    assert a.train.source_indices == again.train.source_indices
    assert a.val.source_indices == again.val.source_indices
    assert other.class_permutation != permutation
    assert sorted(other.class_counts) == sorted(FASHION_LT_COUNTS) != other.class_counts
    assert not set(a.val.source_indices) & set(a.train.source_indices)
    assert a.val.class_counts == [20] * 10
    # The kept images are of their class (pixel value = label).
    assert a.train.tensor_images()[:, 0, 0, 0].tolist() == a.train.targets
    summary = a.summary()
    assert summary["class_order"] == 5 and summary["class_permutation"] == permutation
    assert summary["shot_groups"]["many"] == sorted(permutation[:5])


def test_class_order_for_image_folders_and_synthetic(tmp_path):
    make_folder_tree(tmp_path, [10, 10, 10])
    make_folder_tree(tmp_path, [1, 1, 1], "test")
    splits = build_splits("image_folder", str(tmp_path), n_max=8, imbalance_ratio=4, class_order=3)
    assert splits.class_permutation == [2, 1, 0]  # np.random.default_rng(3).permutation(3)
    assert splits.class_counts == [2, 4, 8] and splits.val.class_counts == [8, 6, 2]
    synthetic = build_splits("synthetic_lt", n_max=9, imbalance_ratio=3, class_order=0,
                             num_classes=3, image_size=4, test_per_class=1)  # fmt: skip
    assert synthetic.class_permutation == [2, 0, 1] and synthetic.class_counts == [5, 3, 9]


def test_integer_class_order_needs_a_drawn_profile(tmp_path):
    make_folder_tree(tmp_path, [2, 2])
    make_folder_tree(tmp_path, [1, 1], "test")
    with pytest.raises(DataError, match="class_order: an integer order does not apply to image"):
        build_splits("image_folder", str(tmp_path), class_order=1)
    with pytest.raises(DataError, match="class_order: an integer order does not apply to imagenet"):
        build_splits("imagenet_lt", str(tmp_path), class_order=1)
    with pytest.raises(DataError, match="does not apply to list_files"):
        build_splits("list_files", str(tmp_path), class_order=0, train_list="t", test_list="t")
    for bad in ("random", -1, True, 2.0):
        with pytest.raises(DataError, match="class_order must be 'label' or a non-negative"):
            build_splits("synthetic_lt", class_order=bad)


# ---------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_learnable():
    a, b = build_splits("synthetic_lt", seed=3), build_splits("synthetic_lt", seed=3)
    assert torch.equal(a.train.tensor_images(), b.train.tensor_images())
    assert a.class_counts == [200, 143, 102, 73, 52, 37, 27, 19, 13, 10]
    assert a.val.class_counts == [20] * 10 and a.test.class_counts == [50] * 10
    other = build_splits("synthetic_lt", seed=4)
    assert not torch.equal(a.test.tensor_images(), other.test.tensor_images())
    # Nearest class mean on raw pixels: a learnable task must be far above chance (0.1).
    train = a.train.tensor_images().flatten(1).float()
    means = torch.stack([train[torch.tensor(a.train.targets) == c].mean(0) for c in range(10)])
    test = a.test.tensor_images().flatten(1).float()
    predicted = torch.cdist(test, means).argmin(1)
    accuracy = (predicted == torch.tensor(a.test.targets)).float().mean().item()
    assert accuracy > 0.9
    small = build_splits(
        "synthetic_lt", num_classes=3, image_size=8, test_per_class=2, n_max=9, imbalance_ratio=3
    )
    assert small.train.tensor_images().shape[1:] == (3, 8, 8) and len(small.test) == 6


# ---------------------------------------------------------------- image folders, lists, JSON
def make_folder_tree(root, counts, split="train"):
    for c, n in enumerate(counts):
        for i in range(n):
            save(root / split / f"class{c}" / f"{i}.png", Image.new("RGB", (4, 4), (c, i, 0)))


def test_splits_of_the_data_settings_are_those_of_the_keyword_call(tmp_path):
    settings = {"n_max": 30, "imbalance_ratio": 6.0, "seed": 2, "class_order": 5}
    settings |= {"val_per_class": 3, "val_shortfall": "error"}
    extra = {"num_classes": 4, "image_size": 8, "test_per_class": 2}
    data = DataConfig(name="synthetic_lt", image_size=8, extra=extra, **settings)
    ours, theirs = build_splits_for(data), build_splits("synthetic_lt", **settings, **extra)
    assert ours.summary() == theirs.summary()
    assert ours.class_permutation == theirs.class_permutation != [0, 1, 2, 3]
    for split in ("train", "val", "test"):
        a, b = getattr(ours, split), getattr(theirs, split)
        assert list(a.targets) == list(b.targets)
        assert torch.equal(a.tensor_images(), b.tensor_images())
    # a head class short of validation images: the shortfall setting and the root reach it
    make_folder_tree(tmp_path, [10, 10, 10])
    make_folder_tree(tmp_path, [1, 1, 1], "test")
    data = DataConfig(name="image_folder", root=str(tmp_path), n_max=8, imbalance_ratio=4)
    data.val_per_class, data.val_shortfall = 3, "carve"
    splits = build_splits_for(data)
    assert splits.class_counts == [7, 4, 2] and splits.val.class_counts == [3, 3, 3]


def test_image_folder_carved_validation(tmp_path):
    make_folder_tree(tmp_path, [8, 4, 1])
    make_folder_tree(tmp_path, [2, 2, 2], "test")
    splits = build_splits("image_folder", str(tmp_path), val_per_class=3)
    assert splits.class_names == ["class0", "class1", "class2"]
    assert splits.class_counts == [5, 1, 1] and splits.val.class_counts == [3, 3, 0]
    assert not set(splits.val.paths) & set(splits.train.paths)
    image, label = splits.train[0]
    assert image.mode == "RGB" and image.getpixel((0, 0))[0] == label


def test_image_folder_long_tailed_profile_and_val_folder(tmp_path):
    make_folder_tree(tmp_path, [10, 10, 10])
    make_folder_tree(tmp_path, [1, 1, 1], "test")
    splits = build_splits("image_folder", str(tmp_path), n_max=8, imbalance_ratio=4)
    assert splits.class_counts == [8, 4, 2] and splits.val.class_counts == [2, 6, 8]
    make_folder_tree(tmp_path, [1, 2, 1], "val")
    splits = build_splits("image_folder", str(tmp_path), n_max=8, imbalance_ratio=4)
    assert splits.class_counts == [8, 4, 2] and splits.val.class_counts == [1, 2, 1]


def write_lists(root, prefix, num_classes, splits=("train", "val", "test")):
    """1 + (c % 3) training lines per class, one line per class for val/test; no images."""
    for split in splits:
        lines = []
        for c in range(num_classes):
            n = 1 + c % 3 if split == "train" else 1
            folder = "train" if split != "test" else "val"
            lines += [f"{folder}/n{c:05d}/{split}_{c}_{i}.JPEG {c}" for i in range(n)]
        (root / f"{prefix}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_imagenet_lt_list_files(tmp_path):
    write_lists(tmp_path, "ImageNet_LT", 1000)
    splits = build_splits("imagenet_lt", str(tmp_path), check_files=False)
    assert splits.num_classes == 1000 and splits.class_counts[:4] == [1, 2, 3, 1]
    assert splits.class_names[2] == "n00002"
    assert len(splits.val) == len(splits.test) == 1000
    assert splits.train.paths[0] == os.path.join(str(tmp_path), "train/n00000/train_0_0.JPEG")
    assert not hasattr(splits.train, "tensor_images")


def test_inat_without_val_list_carves(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    write_lists(lists, "iNaturalist18", 8142, splits=("train", "val"))
    splits = build_splits(
        "inat2018", str(tmp_path), list_dir=str(lists), check_files=False, val_per_class=1
    )
    # classes with 1 image keep it; classes with 2 or 3 give one to validation
    assert splits.class_counts[:3] == [1, 1, 2] and splits.val.class_counts[:3] == [0, 1, 1]
    assert len(splits.test) == 8142


def test_json_annotations_with_absolute_paths_inside_root(tmp_path):
    images = tmp_path / "images"
    entries = {}
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        entries[split] = [
            {"fpath": str(save(images / split / f"{c}_{i}.png", Image.new("L", (3, 3), c))),
             "category_id": c}
            for c in range(2)
            for i in range(n)
        ]  # fmt: skip
        path = tmp_path / f"{split}.json"
        path.write_text(json.dumps({"annotations": entries[split], "num_classes": 2}))
    splits = build_splits(
        "json", str(images), train_json=str(tmp_path / "train.json"),
        val_json=str(tmp_path / "val.json"), test_json=str(tmp_path / "test.json"),
    )  # fmt: skip
    assert splits.class_counts == [3, 3] and len(splits.val) == 2 and len(splits.test) == 2
    assert splits.class_names == ["0", "1"]  # both classes share a folder: names are indices
    image, label = splits.test[1]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (label,) * 3


def test_registry_and_argument_errors(tmp_path):
    assert set(DATASETS) >= {
        "fashion_mnist_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt", "places_lt",
        "inat2018", "json", "image_folder", "synthetic_lt",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown dataset"):
        build_splits("mnist_lt")
    with pytest.raises(ValueError, match="unknown setting"):
        build_splits("synthetic_lt", colour="red")
    with pytest.raises(ValueError, match="fixed profile"):
        build_splits("imagenet_lt", str(tmp_path), n_max=10)
    with pytest.raises(ValueError, match="together"):
        build_splits("image_folder", str(tmp_path), n_max=10)
    with pytest.raises(ValueError, match="val_shortfall"):
        build_splits("synthetic_lt", val_shortfall="maybe")


# ---------------------------------------------------------------- image modes
def test_image_modes_load_as_rgb(tmp_path):
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    deep = Image.fromarray(np.array([[65535, 25700], [0, 257]], dtype=np.uint16))
    assert deep.mode == "I;16"
    wide = Image.fromarray(np.array([[65535, 514]], dtype=np.int32))
    cases = {
        "gray.png": (Image.new("L", (2, 2), 77), (77, 77, 77)),
        "rgba.png": (Image.new("RGBA", (2, 2), (1, 2, 3, 0)), (1, 2, 3)),
        "palette.png": (palette, (10, 20, 30)),
        "palette_t.png": (transparent, (10, 20, 30)),
        "deep.png": (deep, (255, 255, 255)),
        "wide.tif": (wide, (255, 255, 255)),
        "bits.png": (Image.new("1", (2, 2), 1), (255, 255, 255)),
        "cmyk.jpg": (Image.new("CMYK", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),
        "la.png": (Image.new("LA", (2, 2), (50, 0)), (50, 50, 50)),
    }
    paths = [str(save(tmp_path / name, image)) for name, (image, _) in cases.items()]
    dataset = ImageFileDataset(paths, [0] * len(paths), ["only"])
    for i, (name, (_, pixel)) in enumerate(cases.items()):
        image, _ = dataset[i]
        assert image.mode == "RGB", name
        assert image.getpixel((0, 0)) == pixel, name
    deep_rgb = dataset[4][0]
    assert [deep_rgb.getpixel(xy)[0] for xy in ((1, 0), (0, 1), (1, 1))] == [100, 0, 1]
    wide_rgb = dataset[5][0]
    assert wide_rgb.getpixel((1, 0)) == (2, 2, 2)  # int32 data beyond 255 is read as 16-bit
