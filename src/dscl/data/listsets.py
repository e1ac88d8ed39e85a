"""List-file datasets: the generic ``list_files`` and its presets ImageNet-LT, Places-LT, iNat 2018.

A list-file dataset is three list files of ``relative/path label`` lines (``dscl.data.listfiles``):
training, validation (optional) and test, under one image root. The settings (``extra`` of
``build_splits``; ``data.extra`` in a config):

- ``train_list``, ``val_list``, ``test_list``: the list files, relative to ``list_dir`` or
  absolute. Without a validation list one is carved out of training (``val_per_class``).
- ``list_dir``: the folder the relative list names are taken from; default the image root.
- ``num_classes``: C (``list_files`` only; the presets fix it). Default: the largest training
  label + 1. Every class in [0, C) must have a training image.
- ``class_names``: a names file (line i names class i), found like the lists. Without one,
  ``list_files`` names a class after the parent folder of its images
  (``listfiles.folder_class_names``) and the presets after the folder below the split folder
  (``listfiles.names_from_paths``).
- ``check_files``: check that every listed image exists (default true).

A preset only fills in the defaults: its list names, its class count and its naming rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from dscl.data.imagesets import DataError, ImageFileDataset
from dscl.data.listfiles import (
    ImageList,
    check_disjoint,
    check_no_empty_class,
    folder_class_names,
    names_from_paths,
    read_class_names,
    read_list_file,
)
from dscl.data.splits import (
    DataSplits,
    SplitRequest,
    carve_split,
    data_root,
    flag_setting,
    make_splits,
)

LIST_KEYS = ("list_dir", "train_list", "val_list", "test_list", "class_names", "check_files")


@dataclass(frozen=True)
class ListLayout:
    """Defaults of one list-file dataset.

    Attributes:
        folder: sub-folder of ``$DSCL_DATA`` used as the image root when no root is given.
        train_list, val_list, test_list: default list file names (None: no default; a missing
            ``val_list`` means a carved validation set).
        num_classes: the fixed class count C; None takes the ``num_classes`` setting or infers C.
        path_names: class names from the training list when no names file is given:
            ``(images, root, C) -> C names``.
    """

    folder: str
    train_list: str | None
    val_list: str | None
    test_list: str | None
    num_classes: int | None
    path_names: Callable[[ImageList, str, int], list[str]]


LIST_FILES = ListLayout("", None, None, None, None, folder_class_names)
IMAGENET_LT = ListLayout(
    "ImageNet_LT",
    "ImageNet_LT_train.txt",
    "ImageNet_LT_val.txt",
    "ImageNet_LT_test.txt",
    1000,
    names_from_paths,
)
PLACES_LT = ListLayout(
    "Places_LT",
    "Places_LT_train.txt",
    "Places_LT_val.txt",
    "Places_LT_test.txt",
    365,
    names_from_paths,
)
INAT2018 = ListLayout(
    "iNaturalist18",
    "iNaturalist18_train.txt",
    None,
    "iNaturalist18_val.txt",
    8142,
    names_from_paths,
)


def list_builder(layout: ListLayout) -> Callable[[SplitRequest], DataSplits]:
    """The ``build_splits`` builder of a list-file dataset with the given defaults."""

    def build(req: SplitRequest) -> DataSplits:
        return _build(req, layout)

    return build


def _build(req: SplitRequest, layout: ListLayout) -> DataSplits:
    if req.download:
        raise DataError(f"download: {req.name} cannot be downloaded; see the layout notes")
    root = data_root(req, layout.folder)
    list_dir = _path_setting(req, "list_dir", root)
    check = flag_setting(req, "check_files")

    def path(key: str, default: str | None) -> str | None:
        value = _path_setting(req, key, default)
        return None if value is None else os.path.join(list_dir, value)

    train_path = path("train_list", layout.train_list)
    test_path = path("test_list", layout.test_list)
    for key, value in (("train_list", train_path), ("test_list", test_path)):
        if value is None:
            raise DataError(f"{key}: {req.name} needs the {key[:-5]} list file (a path)")
    num_classes = layout.num_classes or _class_count_setting(req)
    train_list = read_list_file(train_path, root, num_classes, check)
    if num_classes is None:
        num_classes = max(train_list.targets) + 1
    check_no_empty_class(train_list.targets, num_classes, train_list.source)
    test_list = read_list_file(test_path, root, num_classes, check)
    check_disjoint(train_list, test_list)
    names_path = path("class_names", None)
    if names_path is None:
        names = layout.path_names(train_list, root, num_classes)
    else:
        names = read_class_names(names_path, num_classes)
    train_set = ImageFileDataset(train_list.paths, train_list.targets, names)
    test_set = ImageFileDataset(test_list.paths, test_list.targets, names)
    val_path = path("val_list", layout.val_list)
    if val_path is None:
        train_set, val_set, notes = carve_split(train_set, req)
        return make_splits(train_set, val_set, test_set, notes)
    val_list = read_list_file(val_path, root, num_classes, check)
    check_disjoint(train_list, val_list)
    val_set = ImageFileDataset(val_list.paths, val_list.targets, names)
    return make_splits(train_set, val_set, test_set, [])


def _path_setting(req: SplitRequest, key: str, default: str | None) -> str | None:
    value = req.extra.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise DataError(f"{key} must be a file or folder path, got {value!r}")
    return value


def _class_count_setting(req: SplitRequest) -> int | None:
    value = req.extra.get("num_classes")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise DataError(f"num_classes must be a positive integer, got {value!r}")
    return value
