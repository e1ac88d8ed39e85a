"""The generic list-file dataset ``list_files``: class count, class names, checks, UTF-8."""

import json
import os

import pytest
from PIL import Image

from dscl.data import DataError, build_splits
from dscl.data.listfiles import read_json_annotations, read_list_file

ANIMALS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay"]
TRAIN_COUNTS = [12, 9, 7, 5, 4, 3, 3, 2, 2, 1]  # a 10-class long tail


def png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (3, 3), (value, 2 * value, 0)).save(path)


def write(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def append(path, line):
    with open(path, "a") as handle:
        handle.write(line + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    """Images images/<split>/<animal>/<i>.png (red channel = 10 * label + i) and three lists."""
    root = tmp_path / "data"
    lines = {"train": [], "val": [], "test": []}
    for c, name in enumerate(ANIMALS):
        for split, n in (("train", TRAIN_COUNTS[c]), ("val", 2), ("test", 3)):
            for i in range(n):
                png(root / "images" / split / name / f"{i}.png", 10 * c + i)
                lines[split].append(f"images/{split}/{name}/{i}.png {c}")
    for split, entries in lines.items():
        write(root / f"{split}.txt", entries)
    return root


def build(root, **extra):
    settings = {"train_list": "train.txt", "val_list": "val.txt", "test_list": "test.txt"}
    return build_splits("list_files", str(root), **{**settings, **extra})


def test_ten_class_list_dataset_end_to_end(data):
    splits = build(data)
    assert splits.num_classes == 10
    assert splits.class_counts == TRAIN_COUNTS and len(splits.train) == sum(TRAIN_COUNTS)
    assert splits.val.class_counts == [2] * 10 and splits.test.class_counts == [3] * 10
    assert splits.class_names == ANIMALS  # parent folder names
    assert splits.notes == []
    index = splits.train.paths.index(str(data / "images" / "train" / "dog" / "4.png"))
    image, label = splits.train[index]
    assert label == 3 and image.mode == "RGB" and image.getpixel((0, 0)) == (34, 68, 0)
    summary = splits.summary(many_threshold=6, few_threshold=3)
    assert summary["shot_groups"] == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    assert summary["class_order"] == "label" and summary["class_permutation"] is None
    assert summary["imbalance_ratio"] == 12.0


def test_class_count_inferred_or_given(data):
    assert build(data, num_classes=10).class_counts == build(data).class_counts
    message = r"train.txt: class 10 has no images \(2 empty classes: 10, 11\)"
    with pytest.raises(DataError, match=message):
        build(data, num_classes=12)
    # Given too small: the first line with label 8 is named.
    line = 1 + sum(TRAIN_COUNTS[:8])
    with pytest.raises(DataError, match=rf"train.txt:{line}: label 8 is outside \[0, 8\)"):
        build(data, num_classes=8)
    with pytest.raises(DataError, match="num_classes must be a positive integer"):
        build(data, num_classes=0)


def test_inferred_count_needs_every_class_in_training(data):
    lines = (data / "train.txt").read_text().splitlines()
    keep = [line for line in lines if not line.endswith((" 2", " 5"))]
    write(data / "train.txt", keep)
    message = r"train.txt: class 2 has no images \(2 empty classes: 2, 5\)"
    with pytest.raises(DataError, match=message):
        build(data)


@pytest.mark.parametrize(
    "line, message",
    [
        # Class 9 is the largest training label: label 10 is outside [0, 10).
        ("images/train/ant/0.png 10", r"test.txt:31: label 10 is outside \[0, 10\)"),
        ("images/train/bee/0.png 1", r"test.txt:31: .* also listed at .*train.txt:13"),
    ],
)
def test_test_lines_checked_against_training(data, line, message):
    append(data / "test.txt", line)
    with pytest.raises(DataError, match=message):
        build(data)


def test_names_file(data):
    write(data / "names.txt", [f"{name} (class {c})" for c, name in enumerate(ANIMALS)] + [""])
    assert build(data, class_names="names.txt").class_names[3] == "dog (class 3)"
    write(data / "names.txt", ANIMALS[:9])
    with pytest.raises(DataError, match="names.txt: 9 class names, but the lists have 10 classes"):
        build(data, class_names="names.txt")
    write(data / "names.txt", [*ANIMALS[:4], "", *ANIMALS[4:]])
    with pytest.raises(DataError, match="names.txt:5: blank class name"):
        build(data, class_names="names.txt")
    write(data / "names.txt", [*ANIMALS[:9], "bee"])
    with pytest.raises(DataError, match="names.txt:10: class name 'bee' repeats line 2"):
        build(data, class_names="names.txt")
    with pytest.raises(DataError, match="nope.txt: class names file does not exist"):
        build(data, class_names="nope.txt")


def test_names_from_paths_fall_back_to_class_index(data):
    lines = (data / "train.txt").read_text().splitlines()
    for name in ("ant/0.png", "bee2/0.png", "cat/8a.png", "cat/8b.png"):
        png(data / "images" / "extra" / name, 1)
    png(data / "loose.png", 1)
    extra = [
        "images/extra/ant/0.png 0",  # class 0 in two folders named "ant": still "ant"
        "images/extra/bee2/0.png 1",  # class 1 in "bee" and "bee2"
        "images/extra/cat/8a.png 8",  # class 8 only in a folder named "cat", like class 2
        "images/extra/cat/8b.png 8",
        "loose.png 9",  # directly in the root: no parent folder
    ]
    kept = [line for line in lines if not line.endswith((" 8", " 9"))]
    names = build(data, train_list=str(write(data / "t2.txt", kept + extra)))
    assert names.class_names == [
        "ant", "class_1", "class_2", "dog", "eel", "fox", "gnu", "hen", "class_8", "class_9"
    ]  # fmt: skip


def test_val_list_optional_carves_from_training(data):
    splits = build_splits(
        "list_files", str(data), train_list="train.txt", test_list="test.txt", val_per_class=2
    )
    # Every class keeps at least one image: class 9 (1 image) gives none, class 7 (2) gives 1.
    assert splits.val.class_counts == [2, 2, 2, 2, 2, 2, 2, 1, 1, 0]
    assert splits.class_counts == [10, 7, 5, 3, 2, 1, 1, 1, 1, 1]
    assert not set(splits.val.paths) & set(splits.train.paths)
    assert any("carved out of the training set" in note for note in splits.notes)


def test_list_paths_relative_to_root_or_absolute(data, tmp_path):
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    os.replace(data / "test.txt", elsewhere / "test.txt")
    splits = build(data, test_list=str(elsewhere / "test.txt"))
    assert len(splits.test) == 30
    moved = build(
        data,
        list_dir=str(elsewhere),  # relative names now start here
        train_list=str(data / "train.txt"),
        val_list=str(data / "val.txt"),
    )
    assert len(moved.test) == 30 and moved.test.paths == splits.test.paths


@pytest.mark.parametrize(
    "line, message",
    [
        ("images/train/ant/99.png 0", "listed images do not exist"),
        ("images/train/ant/0.png", "malformed line"),
        ("images/train/ant/1.png 0", "duplicate entry 'images/train/ant/1.png', already listed"),
        ("../outside.png 0", "escapes the image root"),
        ("images/train/ant/0.png -2", "label -2 is negative"),
        ("images/train/ant/0.png two", "label 'two' is not an integer"),
    ],
)
def test_bad_training_lines_name_file_and_line(data, line, message):
    path = append(data / "train.txt", line)
    with pytest.raises(DataError, match=message) as info:
        build(data)
    assert f"{path}:{sum(TRAIN_COUNTS) + 1}" in str(info.value)


def test_missing_and_required_lists(data):
    with pytest.raises(DataError, match="nope.txt: list file does not exist"):
        build(data, val_list="nope.txt")
    with pytest.raises(DataError, match="test_list: list_files needs the test list file"):
        build_splits("list_files", str(data), train_list="train.txt")
    with pytest.raises(DataError, match="train_list must be a file or folder path, got 3"):
        build(data, train_list=3)


# ---------------------------------------------------------------- files that are not UTF-8


def test_non_utf8_list_names_file_and_line(data):
    path = data / "train.txt"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"images/train/ant/2\xff.png 0\n"
    path.write_bytes(b"".join(lines))
    message = rf"{path}:3: list file is not UTF-8 text \(byte 0xff at column 19\)"
    with pytest.raises(DataError, match=message):
        read_list_file(str(path), str(data), 10)
    with pytest.raises(DataError, match=message):
        build(data)


def test_non_utf8_names_and_json_files(data, tmp_path):
    write(data / "names.txt", ANIMALS)
    path = data / "names.txt"
    path.write_bytes(path.read_bytes().replace(b"cat", b"c\xe4t"))  # Latin-1 "ä"
    with pytest.raises(DataError, match=rf"{path}:3: class names file is not UTF-8 text"):
        build(data, class_names="names.txt")
    annotations = tmp_path / "train.json"
    text = json.dumps({"annotations": [{"fpath": "x.png", "category_id": 0}], "num_classes": 1})
    annotations.write_bytes(b"\n" + text.replace("x.png", "\xe9.png").encode("latin-1"))
    with pytest.raises(DataError, match=rf"{annotations}:2: annotation file is not UTF-8 text"):
        read_json_annotations(str(annotations), str(data))


# ---------------------------------------------------------------- the benchmark presets


def test_presets_keep_their_fixed_class_count(data):
    # A 10-class list under a preset name still needs all 1000 ImageNet-LT classes.
    for split in ("train", "val", "test"):
        os.replace(data / f"{split}.txt", data / f"ImageNet_LT_{split}.txt")
    with pytest.raises(DataError, match=r"class 10 has no images \(990 empty classes: 10, 11,"):
        build_splits("imagenet_lt", str(data))
    with pytest.raises(DataError, match="unknown setting.*num_classes"):
        build_splits("imagenet_lt", str(data), num_classes=10)


def test_presets_accept_a_names_file(tmp_path):
    lines = [f"train/n{c:05d}/{c}.JPEG {c}" for c in range(365)]
    write(tmp_path / "Places_LT_train.txt", lines)
    write(tmp_path / "Places_LT_val.txt", [f"val/{c}.jpg {c}" for c in range(365)])
    write(tmp_path / "Places_LT_test.txt", [f"test/{c}.jpg {c}" for c in range(365)])
    splits = build_splits("places_lt", str(tmp_path), check_files=False)
    assert splits.class_names[:2] == ["n00000", "n00001"]  # the preset's naming rule
    write(tmp_path / "names.txt", [f"place {c}" for c in range(365)])
    named = build_splits("places_lt", str(tmp_path), check_files=False, class_names="names.txt")
    assert named.class_names[364] == "place 364" and named.class_counts == splits.class_counts
