"""Long-tailed datasets: the registry and ``build_splits``, the one entry point the engine calls.

Every split is a ``torch.utils.data.Dataset`` with ``num_classes``, ``class_names``, ``targets``,
``class_counts``, a settable ``transform`` and ``__getitem__ -> (transform(rgb_image), label)``;
in-memory datasets also offer ``tensor_images()`` (see ``dscl.data.imagesets``).

Validation: models are never selected on the test set. Where a dataset publishes a validation
list (ImageNet-LT, Places-LT) it is used. Subsampled datasets (Fashion-MNIST-LT, CIFAR-LT, image
folders with a profile, synthetic) take ``val_per_class`` images per class, seeded, from the
training images the long-tailed subset did NOT keep. When a class has fewer unused images (the
head class of CIFAR-LT keeps all of its 500 / 5000), ``val_shortfall`` decides: ``"partial"``
(default) keeps the benchmark training set exact and gives that class fewer validation images,
``"carve"`` moves the missing ones from its training images, ``"error"`` raises. Otherwise
(image folders without a ``val`` folder, iNaturalist or JSON without a validation list) up to
``val_per_class`` images per class are carved out of training (a class always keeps one image).
Test sets are used as published (balanced).

Expected layouts (``root`` defaults to ``$DSCL_DATA/<folder>``):
- ``fashion_mnist_lt``: the four IDX files, see ``dscl.data.arrayfiles`` (needs no root).
- ``cifar10_lt`` / ``cifar100_lt``: ``<root>/cifar-10-batches-py/`` / ``<root>/cifar-100-python/``.
- ``imagenet_lt``: ``<root>/ImageNet_LT_{train,val,test}.txt`` with lines such as
  ``train/n01440764/n01440764_10026.JPEG 0`` and the images under ``<root>/train``, ``<root>/val``.
- ``places_lt``: ``<root>/Places_LT_{train,val,test}.txt`` (lines like
  ``data_256/a/airfield/00000001.jpg 0``) with the images under ``<root>``.
- ``inat2018``: ``<root>/iNaturalist18_train.txt`` and ``iNaturalist18_val.txt`` (the test set;
  lines like ``train_val2018/Plantae/7477/<id>.jpg 7477``), images under ``<root>/train_val2018``.
  A validation list may be given as ``val_list``; without it one is carved from training.
  For the three above, ``extra`` may set ``list_dir`` (folder of the list files, default root),
  ``train_list`` / ``val_list`` / ``test_list`` (file names or paths) and ``check_files``.
- ``json``: ``extra`` gives ``train_json`` and ``test_json`` (``val_json`` optional) in the
  authors' format; ``root`` is the image root the ``fpath`` entries lie in.
- ``image_folder``: ``<root>/train/<class>/...``, ``<root>/test/<class>/...`` and optionally
  ``<root>/val/<class>/...``; with ``n_max`` and ``imbalance_ratio`` the training folder is
  subsampled to the exponential profile (classes in sorted name order, the first the largest).
- ``synthetic_lt``: generated (see ``dscl.data.synthetic``); ``extra``: ``num_classes`` (10),
  ``image_size`` (32), ``test_per_class`` (50). ``root`` is ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dscl.data.arrayfiles import read_cifar, read_fashion_mnist
from dscl.data.imagesets import ArrayImageDataset, DataError, ImageFileDataset
from dscl.data.listfiles import (
    ImageList,
    check_disjoint,
    check_no_empty_class,
    names_from_paths,
    read_json_annotations,
    read_list_file,
    scan_image_folder,
)
from dscl.data.longtail import (
    exponential_profile,
    subsample_longtail,
)
from dscl.data.splits import (
    VAL_SHORTFALL,
    DataSplits,
    SplitRequest,
    carve_split,
    data_root,
    flag_setting,
    lt_indices,
    make_splits,
)
from dscl.data.synthetic import make_synthetic

__all__ = ["DATASETS", "DataError", "DataSplits", "DatasetSpec", "build_splits"]


def _array_lt(full: ArrayImageDataset, test: ArrayImageDataset, req: SplitRequest) -> DataSplits:
    counts = exponential_profile(full.num_classes, req.n_max, req.imbalance_ratio)
    kept, val, notes = lt_indices(full.targets, counts, req)
    return make_splits(full.subset(kept), full.subset(val), test, notes)


def _files(images: ImageList, names: list[str], req: SplitRequest) -> ImageFileDataset:
    return ImageFileDataset(
        images.paths, images.targets, names, skip_bad_images=req.skip_bad_images
    )


def _build_fashion(req: SplitRequest) -> DataSplits:
    full, test = read_fashion_mnist(req.root, req.download)
    return _array_lt(full, test, req)


def _build_cifar(num_classes: int) -> Callable[[SplitRequest], DataSplits]:
    def build(req: SplitRequest) -> DataSplits:
        full, test = read_cifar(data_root(req, ""), num_classes, req.download)
        return _array_lt(full, test, req)

    return build


def _build_synthetic(req: SplitRequest) -> DataSplits:
    num_classes = req.extra.get("num_classes", 10)
    image_size = req.extra.get("image_size", 32)
    test_per_class = req.extra.get("test_per_class", 50)
    for key, value in (("num_classes", num_classes), ("test_per_class", test_per_class)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    # A balanced pool big enough for the head class and a full validation set in every class.
    pool = make_synthetic([req.n_max + req.val_per_class] * num_classes, image_size, req.seed, 0)
    test = make_synthetic([test_per_class] * num_classes, image_size, req.seed, 1)
    return _array_lt(pool, test, req)


def _build_lists(
    num_classes: int, folder: str, train: str, val: str | None, test: str
) -> Callable[[SplitRequest], DataSplits]:
    def build(req: SplitRequest) -> DataSplits:
        if req.download:
            raise ValueError(f"download: {req.name} cannot be downloaded; see the layout notes")
        root = data_root(req, folder)
        list_dir = req.extra.get("list_dir", root)
        check = flag_setting(req, "check_files")

        def path(key: str, default: str | None) -> str | None:
            value = req.extra.get(key, default)
            return None if value is None else os.path.join(list_dir, value)

        train_list = read_list_file(path("train_list", train), root, num_classes, check)
        check_no_empty_class(train_list.targets, num_classes, train_list.source)
        test_list = read_list_file(path("test_list", test), root, num_classes, check)
        check_disjoint(train_list, test_list)
        names = names_from_paths(train_list, root, num_classes)
        train_set, test_set = _files(train_list, names, req), _files(test_list, names, req)
        val_path = path("val_list", val)
        if val_path is None:
            train_set, val_set, notes = carve_split(train_set, req)
            return make_splits(train_set, val_set, test_set, notes)
        val_list = read_list_file(val_path, root, num_classes, check)
        check_disjoint(train_list, val_list)
        return make_splits(train_set, _files(val_list, names, req), test_set, [])

    return build


def _build_json(req: SplitRequest) -> DataSplits:
    for key in ("train_json", "test_json"):
        if not isinstance(req.extra.get(key), str):
            raise ValueError(f"{key}: the json dataset needs the path of the {key[:-5]} file")
    root = data_root(req, "")
    check = flag_setting(req, "check_files")
    train_list, num_classes = read_json_annotations(req.extra["train_json"], root, check)
    check_no_empty_class(train_list.targets, num_classes, train_list.source)
    names = names_from_paths(train_list, root, num_classes)
    others = {}
    for key in ("val_json", "test_json"):
        if req.extra.get(key) is None:
            continue
        images, other_classes = read_json_annotations(req.extra[key], root, check)
        if other_classes != num_classes:
            raise DataError(
                f"{images.source}: num_classes {other_classes} differs from the "
                f"training file's {num_classes}"
            )
        check_disjoint(train_list, images)
        others[key] = _files(images, names, req)
    train_set = _files(train_list, names, req)
    if "val_json" in others:
        return make_splits(train_set, others["val_json"], others["test_json"], [])
    train_set, val_set, notes = carve_split(train_set, req)
    return make_splits(train_set, val_set, others["test_json"], notes)


def _build_image_folder(req: SplitRequest) -> DataSplits:
    root = data_root(req, "")
    train_list, names = scan_image_folder(os.path.join(root, "train"))
    full = _files(train_list, names, req)
    test_set = _files(scan_image_folder(os.path.join(root, "test"), names)[0], names, req)
    val_set = None
    if os.path.isdir(os.path.join(root, "val")):
        val_set = _files(scan_image_folder(os.path.join(root, "val"), names)[0], names, req)
    if req.n_max is None:
        if val_set is not None:
            return make_splits(full, val_set, test_set, [])
        train_set, carved, notes = carve_split(full, req)
        return make_splits(train_set, carved, test_set, notes)
    counts = exponential_profile(len(names), req.n_max, req.imbalance_ratio)
    for c, (have, need) in enumerate(zip(full.class_counts, counts, strict=True)):
        if have < need:
            raise DataError(
                f"{os.path.join(train_list.source, names[c])}: {have} images, the long-tailed "
                f"profile needs {need}; lower n_max"
            )
    if val_set is not None:
        kept = subsample_longtail(full.targets, counts, req.seed)
        return make_splits(full.subset(kept), val_set, test_set, [])
    kept, val, notes = lt_indices(full.targets, counts, req)
    return make_splits(full.subset(kept), full.subset(val), test_set, notes)


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset: its builder, default profile and accepted ``extra`` keys.

    ``profile`` is "required" (defaults below), "optional" (image folders) or "none" (the list
    fixes the profile; passing ``n_max`` / ``imbalance_ratio`` is an error).
    """

    build: Callable[[SplitRequest], DataSplits]
    description: str
    profile: str = "none"
    n_max: int | None = None
    imbalance_ratio: float | None = None
    extra_keys: tuple[str, ...] = ()


_LIST_KEYS = ("list_dir", "train_list", "val_list", "test_list", "check_files")
DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist_lt": DatasetSpec(
        _build_fashion, "Fashion-MNIST-LT", profile="required", n_max=1280, imbalance_ratio=256.0
    ),
    "cifar10_lt": DatasetSpec(
        _build_cifar(10), "CIFAR-10-LT", profile="required", n_max=5000, imbalance_ratio=100.0
    ),
    "cifar100_lt": DatasetSpec(
        _build_cifar(100), "CIFAR-100-LT", profile="required", n_max=500, imbalance_ratio=100.0
    ),
    "imagenet_lt": DatasetSpec(
        _build_lists(
            1000,
            "ImageNet_LT",
            "ImageNet_LT_train.txt",
            "ImageNet_LT_val.txt",
            "ImageNet_LT_test.txt",
        ),
        "ImageNet-LT (list files)",
        extra_keys=_LIST_KEYS,
    ),
    "places_lt": DatasetSpec(
        _build_lists(
            365, "Places_LT", "Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"
        ),
        "Places-LT (list files)",
        extra_keys=_LIST_KEYS,
    ),
    "inat2018": DatasetSpec(
        _build_lists(
            8142, "iNaturalist18", "iNaturalist18_train.txt", None, "iNaturalist18_val.txt"
        ),
        "iNaturalist 2018 (list files)",
        extra_keys=_LIST_KEYS,
    ),
    "json": DatasetSpec(
        _build_json,
        "JSON annotations (authors' format)",
        extra_keys=("train_json", "val_json", "test_json", "check_files"),
    ),
    "image_folder": DatasetSpec(_build_image_folder, "one folder per class", profile="optional"),
    "synthetic_lt": DatasetSpec(
        _build_synthetic,
        "generated learnable images",
        profile="required",
        n_max=200,
        imbalance_ratio=20.0,
        extra_keys=("num_classes", "image_size", "test_per_class"),
    ),
}


def build_splits(
    name: str,
    root: str | None = None,
    *,
    n_max: int | None = None,
    imbalance_ratio: float | None = None,
    seed: int = 0,
    val_per_class: int = 20,
    skip_bad_images: bool = False,
    download: bool = False,
    val_shortfall: str = "partial",
    **extra: Any,
) -> DataSplits:
    """Build the training, validation and test splits of a registered dataset.

    Args:
        name: a key of ``DATASETS``.
        root: data folder (see the module docstring); None uses ``$DSCL_DATA``.
        n_max: images of the largest class; None takes the dataset's default.
        imbalance_ratio: IR = n_max / n_min; None takes the dataset's default.
        seed: seed of the long-tailed subsampling (LDAM convention) and of validation draws.
        val_per_class: validation images per class drawn from unused or carved training images.
        skip_bad_images: replace unreadable image files instead of raising ``DataError``.
        download: allow torchvision's downloader (Fashion-MNIST, CIFAR only).
        val_shortfall: "partial", "carve" or "error" (see the module docstring).
        **extra: dataset-specific settings (see the module docstring); unknown keys are errors.

    Raises:
        ValueError: on a bad argument; ``DataError`` (a ValueError) on bad data.
    """
    if name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    unknown = sorted(set(extra) - set(spec.extra_keys))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for {name}; accepted: {spec.extra_keys}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(val_per_class, int) or isinstance(val_per_class, bool) or val_per_class < 0:
        raise ValueError(f"val_per_class must be a non-negative integer, got {val_per_class!r}")
    if val_shortfall not in VAL_SHORTFALL:
        raise ValueError(f"val_shortfall must be one of {VAL_SHORTFALL}, got {val_shortfall!r}")
    if spec.profile == "none" and (n_max is not None or imbalance_ratio is not None):
        raise ValueError(
            f"n_max / imbalance_ratio: {name} has a fixed profile, got {n_max} / {imbalance_ratio}"
        )
    if spec.profile == "optional" and (n_max is None) != (imbalance_ratio is None):
        raise ValueError(
            f"n_max and imbalance_ratio must be given together for {name}, got "
            f"{n_max} / {imbalance_ratio}"
        )
    if spec.profile == "required":
        n_max = spec.n_max if n_max is None else n_max
        imbalance_ratio = spec.imbalance_ratio if imbalance_ratio is None else imbalance_ratio
    req = SplitRequest(
        name,
        root,
        n_max,
        imbalance_ratio,
        seed,
        val_per_class,
        bool(skip_bad_images),
        bool(download),
        val_shortfall,
        dict(extra),
    )
    splits = spec.build(req)
    check_no_empty_class(splits.train.targets, splits.num_classes, f"{name} training set")
    return splits
