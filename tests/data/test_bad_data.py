"""Every kind of bad data raises DataError naming the culprit (file, and line for list files)."""

import gzip
import json
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from dscl.data import DataError, ImageFileDataset, build_splits
from dscl.data.arrayfiles import read_cifar, read_idx
from dscl.data.listfiles import read_json_annotations, read_list_file


def png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (value, value, value)).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    """An image root with 2 readable images per class for 3 classes."""
    root = tmp_path / "root"
    for c in range(3):
        for i in range(2):
            png(root / "train" / f"c{c}" / f"{i}.png", 10 * c + i)
    return root


def write_list(tmp_path, lines):
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = [f"train/c{c}/{i}.png {c}" for c in range(3) for i in range(2)]


def test_valid_list_reads(tree, tmp_path):
    images = read_list_file(write_list(tmp_path, GOOD + [""]), str(tree), 3)
    assert images.targets == [0, 0, 1, 1, 2, 2] and len(images.paths) == 6


@pytest.mark.parametrize(
    "bad_line, line_no, message",
    [
        ("train/c0/missing.png 0", 7, "do not exist"),
        ("train/c0/0.png 3", 7, "label 3 is outside"),
        ("train/c0/0.png -1", 7, "label -1 is outside"),
        ("train/c0/0.png zero", 7, "is not an integer"),
        ("justonefield", 7, "malformed line"),
        ("../outside.png 0", 7, "escapes the image root"),
        ("/etc/passwd 0", 7, "escapes the image root"),
        ("train/../../root2/x.png 0", 7, "escapes the image root"),
        ("train/c1/1.png 1", 7, "duplicate entry"),
    ],
)
def test_bad_list_lines_name_file_and_line(tree, tmp_path, bad_line, line_no, message):
    path = write_list(tmp_path, GOOD + [bad_line])
    with pytest.raises(DataError, match=message) as info:
        read_list_file(path, str(tree), 3)
    assert f"{path}:{line_no}" in str(info.value)


def test_duplicate_names_both_lines(tree, tmp_path):
    path = write_list(tmp_path, GOOD + ["train/c1/1.png 1"])
    with pytest.raises(DataError, match=rf"{path}:7: duplicate .* already listed at {path}:4"):
        read_list_file(path, str(tree), 3)


def test_missing_list_file_and_empty_class(tree, tmp_path):
    with pytest.raises(DataError, match="nope.txt: list file does not exist"):
        read_list_file(str(tmp_path / "nope.txt"), str(tree), 3)
    lines = [f"train/c0/{i}.png 0" for i in range(2)] + ["train/c2/0.png 2"]  # class 1 empty
    path = tmp_path / "ImageNet_LT_train.txt"
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "ImageNet_LT_test.txt").write_text("train/c2/1.png 2\n")
    with pytest.raises(DataError, match=rf"{path}: class 1 has no images"):
        build_splits("imagenet_lt", str(tree), list_dir=str(tmp_path), check_files=False)


def test_train_and_validation_must_be_disjoint(tree, tmp_path):
    (tmp_path / "Places_LT_train.txt").write_text("\n".join(GOOD) + "\n")
    (tmp_path / "Places_LT_val.txt").write_text("train/c0/0.png 0\n")
    (tmp_path / "Places_LT_test.txt").write_text("train/c0/9.png 0\n")
    # Places-LT has 365 classes: fill the list so that no class is empty (no images needed).
    lines = GOOD + [f"more/{c}.png {c}" for c in range(3, 365)]
    (tmp_path / "Places_LT_train.txt").write_text("\n".join(lines) + "\n")
    val = tmp_path / "Places_LT_val.txt"
    with pytest.raises(DataError, match=rf"{val}:1: .* also listed at .*Places_LT_train.txt:1"):
        build_splits("places_lt", str(tree), list_dir=str(tmp_path), check_files=False)


def test_json_errors_name_file_and_annotation(tree, tmp_path):
    path = tmp_path / "a.json"
    entry = {"fpath": "train/c0/0.png", "category_id": 0}
    path.write_text(
        json.dumps({"annotations": [entry, {**entry, "category_id": 4}], "num_classes": 3})
    )
    with pytest.raises(DataError, match=rf"{path}: annotation #1: label 4 is outside"):
        read_json_annotations(str(path), str(tree))
    path.write_text(json.dumps({"annotations": [{"fpath": "/tmp/x.png", "category_id": 0}],
                                "num_classes": 3}))  # fmt: skip
    with pytest.raises(DataError, match=rf"{path}: annotation #0: path .* escapes"):
        read_json_annotations(str(path), str(tree))
    path.write_text("{not json")
    with pytest.raises(DataError, match=rf"{path}: not valid JSON"):
        read_json_annotations(str(path), str(tree))
    path.write_text(json.dumps({"annotations": [entry]}))
    with pytest.raises(DataError, match=rf"{path}: 'num_classes'"):
        read_json_annotations(str(path), str(tree))


def corrupt_tree(tree):
    """Class 0: one file of random bytes, one truncated PNG. Class 1 fine."""
    good = tree / "train" / "c1" / "0.png"
    bad = tree / "train" / "c0" / "0.png"
    bad.write_bytes(os.urandom(64))
    whole = (tree / "train" / "c0" / "1.png").read_bytes()
    (tree / "train" / "c0" / "1.png").write_bytes(whole[: len(whole) // 2])
    return bad, good


def test_corrupt_image_raises_naming_file(tree):
    bad, good = corrupt_tree(tree)
    dataset = ImageFileDataset([str(bad), str(good)], [0, 1], ["a", "b"])
    assert dataset[1][1] == 1
    with pytest.raises(DataError, match=rf"{bad}: unreadable image"):
        dataset[0]


def test_skip_bad_images_substitutes_same_class(tree):
    bad = tree / "train" / "c2" / "0.png"
    bad.write_bytes(b"not an image at all")
    keep = tree / "train" / "c2" / "1.png"
    other = tree / "train" / "c1" / "0.png"
    dataset = ImageFileDataset(
        [str(other), str(bad), str(keep)], [1, 2, 2], ["a", "b", "c"], skip_bad_images=True
    )
    image, label = dataset[1]
    assert label == 2 and image.getpixel((0, 0)) == (21, 21, 21)  # the other class-2 image
    dataset[1]
    assert dataset.bad_images == [str(bad)]
    assert dataset.report_bad_images() == f"1 unreadable images skipped: {bad}"


def test_skip_fails_when_whole_class_is_bad(tree):
    bad, good = corrupt_tree(tree)
    dataset = ImageFileDataset(
        [str(bad), str(tree / "train" / "c0" / "1.png"), str(good)], [0, 0, 1], ["a", "b"],
        skip_bad_images=True,
    )  # fmt: skip
    with pytest.raises(DataError, match="every image of class 0"):
        dataset[0]
    assert dataset.scan_bad_images() == [str(bad), str(tree / "train" / "c0" / "1.png")]


def test_skip_bad_images_through_build_splits(tree):
    for c in range(3):
        png(tree / "test" / f"c{c}" / "0.png")
    bad, _ = corrupt_tree(tree)
    strict = build_splits("image_folder", str(tree), val_per_class=0)
    index = strict.train.paths.index(str(bad))
    with pytest.raises(DataError, match=str(bad)):
        strict.train[index]
    lenient = build_splits("image_folder", str(tree), val_per_class=0, skip_bad_images=True)
    assert lenient.train.scan_bad_images() == sorted(lenient.train.bad_images)
    assert str(bad) in lenient.train.report_bad_images()


def test_empty_class_folder(tree):
    (tree / "train" / "empty").mkdir()
    (tree / "train" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=rf"{tree / 'train' / 'empty'}: class 'empty' has no"):
        build_splits("image_folder", str(tree))


def test_idx_errors_name_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 2, 2, 2) + b"\0" * 7)
    with pytest.raises(DataError, match=rf"{path}: 7 data bytes but .* need 8"):
        read_idx(str(path))
    path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=rf"{path}: cannot read"):
        read_idx(str(path))
    plain = tmp_path / "labels"
    plain.write_bytes(struct.pack(">BBBB", 0, 0, 0x0D, 1) + struct.pack(">I", 0))
    with pytest.raises(DataError, match=rf"{plain}: IDX type code 0x0d"):
        read_idx(str(plain))
    plain.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DataError, match=rf"{plain}: bad magic number 0x12345678"):
        read_idx(str(plain))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_errors_name_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, handle)
    with open(folder / "train", "wb") as handle:
        pickle.dump({"data": _Exploit(), "fine_labels": []}, handle)
    with pytest.raises(DataError, match=rf"{folder / 'train'}: not a CIFAR pickle .*not allowed"):
        read_cifar(str(tmp_path), 100)
    with open(folder / "train", "wb") as handle:
        pickle.dump({"data": np.zeros((2, 3), np.uint8), "fine_labels": [0, 100]}, handle)
    with pytest.raises(DataError, match=rf"{folder / 'train'}: label 100 is outside"):
        read_cifar(str(tmp_path), 100)
    with open(folder / "train", "wb") as handle:
        pickle.dump({"data": np.zeros((2, 5), np.uint8), "fine_labels": [0, 1]}, handle)
    with pytest.raises(DataError, match=rf"{folder / 'train'}: 'data' must be uint8"):
        read_cifar(str(tmp_path), 100)
