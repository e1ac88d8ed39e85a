"""Every kind of bad data raises DataError naming the culprit (file, and line for list files)."""

import gzip
import json
import os
import pickle
import re
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


def test_find_unreadable_reports_index_and_error(tree):
    bad, good = corrupt_tree(tree)
    truncated = tree / "train" / "c0" / "1.png"
    dataset = ImageFileDataset([str(good), str(bad), str(truncated)], [1, 0, 0], ["a", "b"])
    found = dataset.find_unreadable(threads=2)
    assert [i for i, _ in found] == [1, 2]
    assert found[0][1].startswith("UnidentifiedImageError: cannot identify image file")
    assert re.fullmatch(r"\w+: .+", found[1][1])  # "ExceptionType: message"
    kept = dataset.subset([0])
    assert kept.paths == [str(good)] and kept.find_unreadable() == []


def with_test_folder(tree):
    for c in range(3):
        for i in range(2):
            png(tree / "test" / f"c{c}" / f"{i}.png", 100 + c)
    return tree


def test_skip_bad_images_through_build_splits(tree):
    with_test_folder(tree)
    bad_train = tree / "train" / "c2" / "0.png"
    bad_train.write_bytes(b"not an image at all")
    bad_test = tree / "test" / "c1" / "1.png"
    bad_test.write_bytes(bad_test.read_bytes()[:20])
    strict = build_splits("image_folder", str(tree), val_per_class=0)
    assert strict.summary()["bad_images"] == {"train": [], "val": [], "test": []}
    with pytest.raises(DataError, match=rf"{bad_train}: unreadable image"):
        strict.train[strict.train.paths.index(str(bad_train))]

    lenient = build_splits("image_folder", str(tree), val_per_class=0, skip_bad_images=True)
    assert str(bad_train) not in lenient.train.paths and len(lenient.train) == 5
    assert str(bad_test) not in lenient.test.paths and len(lenient.test) == 5
    assert lenient.class_counts == [2, 2, 1] == lenient.train.class_counts
    assert lenient.test.class_counts == [2, 1, 2]
    summary = lenient.summary()
    assert summary["train"]["counts"] == [2, 2, 1] and summary["test"]["total"] == 5
    bad = summary["bad_images"]
    assert [entry["file"] for entry in bad["train"]] == [str(bad_train)]
    assert bad["train"][0]["error"].startswith("UnidentifiedImageError")
    assert [entry["file"] for entry in bad["test"]] == [str(bad_test)] and bad["val"] == []
    skipped = [note for note in summary["notes"] if "unreadable" in note]
    assert len(skipped) == 2
    assert (
        skipped[0].startswith("train: 1 unreadable images skipped") and str(bad_train) in skipped[0]
    )
    assert (
        skipped[1].startswith("test: 1 unreadable images skipped") and str(bad_test) in skipped[1]
    )
    assert json.loads(json.dumps(summary)) == summary
    for i in range(len(lenient.train)):  # every remaining image loads
        assert lenient.train[i][1] == lenient.train.targets[i]


def test_skip_fails_when_whole_class_is_bad(tree):
    with_test_folder(tree)
    bad, _ = corrupt_tree(tree)  # both images of class 0
    with pytest.raises(
        DataError, match=rf"every image of class 0 \(c0\) is unreadable, e.g. {bad}"
    ):
        build_splits("image_folder", str(tree), val_per_class=0, skip_bad_images=True)


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
