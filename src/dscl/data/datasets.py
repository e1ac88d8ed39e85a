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
(image folders without a ``val`` folder, list files or JSON without a validation list) up to
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
  ``train_list`` / ``val_list`` / ``test_list`` (file names or paths), ``class_names`` (a file,
  one name per line) and ``check_files``; see ``dscl.data.listsets``.
- ``list_files``: your own list files, the same format; ``extra`` must give ``train_list`` and
  ``test_list`` (relative to ``root`` or absolute), may give ``val_list``, ``num_classes``
  (default: the largest training label + 1) and the settings above.
- ``json``: ``extra`` gives ``train_json`` and ``test_json`` (``val_json`` optional) in the
  authors' format; ``root`` is the image root the ``fpath`` entries lie in.
- ``image_folder``: ``<root>/train/<class>/...``, ``<root>/test/<class>/...`` and optionally
  ``<root>/val/<class>/...``; with ``n_max`` and ``imbalance_ratio`` the training folder is
  subsampled to the exponential profile (classes in sorted name order, the first the largest,
  unless ``class_order`` is a seed).
- ``synthetic_lt``: generated (see ``dscl.data.synthetic``); ``extra``: ``num_classes`` (10),
  ``image_size`` (32), ``test_per_class`` (50). ``root`` is ignored.

With ``skip_bad_images`` every image file is decoded once when the splits are built and the
unreadable ones are left out of their split; ``DataSplits.summary()`` lists them under
``bad_images`` and adds one note per split that lost images.
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
    scan_image_folder,
)
from dscl.data.listsets import (
    IMAGENET_LT,
    INAT2018,
    LIST_FILES,
    LIST_KEYS,
    PLACES_LT,
    list_builder,
)
from dscl.data.longtail import subsample_longtail
from dscl.data.splits import (
    DataSplits,
    SplitRequest,
    carve_split,
    data_root,
    flag_setting,
    lt_indices,
    make_splits,
    profile_counts,
    skip_unreadable,
)
from dscl.data.synthetic import make_synthetic
from dscl.settings import LABEL_ORDER, VAL_SHORTFALL, check_choice

__all__ = ["DATASETS", "DataError", "DataSplits", "DatasetSpec", "build_splits", "build_splits_for"]


def _array_lt(full: ArrayImageDataset, test: ArrayImageDataset, req: SplitRequest) -> DataSplits:
    counts, permutation = profile_counts(full.num_classes, req)
    kept, val, notes = lt_indices(full.targets, counts, req)
    return make_splits(full.subset(kept), full.subset(val), test, notes, permutation)


def _files(images: ImageList, names: list[str]) -> ImageFileDataset:
    return ImageFileDataset(images.paths, images.targets, names)


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
            raise DataError(f"{key} must be a positive integer, got {value!r}")
    # A balanced pool big enough for the head class and a full validation set in every class.
    pool = make_synthetic([req.n_max + req.val_per_class] * num_classes, image_size, req.seed, 0)
    test = make_synthetic([test_per_class] * num_classes, image_size, req.seed, 1)
    return _array_lt(pool, test, req)


def _build_json(req: SplitRequest) -> DataSplits:
    for key in ("train_json", "test_json"):
        if not isinstance(req.extra.get(key), str):
            raise DataError(f"{key}: the json dataset needs the path of the {key[:-5]} file")
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
        others[key] = _files(images, names)
    train_set = _files(train_list, names)
    if "val_json" in others:
        return make_splits(train_set, others["val_json"], others["test_json"], [])
    train_set, val_set, notes = carve_split(train_set, req)
    return make_splits(train_set, val_set, others["test_json"], notes)


def _build_image_folder(req: SplitRequest) -> DataSplits:
    root = data_root(req, "")
    train_list, names = scan_image_folder(os.path.join(root, "train"))
    full = _files(train_list, names)
    test_set = _files(scan_image_folder(os.path.join(root, "test"), names)[0], names)
    val_set = None
    if os.path.isdir(os.path.join(root, "val")):
        val_set = _files(scan_image_folder(os.path.join(root, "val"), names)[0], names)
    if req.n_max is None:
        if val_set is not None:
            return make_splits(full, val_set, test_set, [])
        train_set, carved, notes = carve_split(full, req)
        return make_splits(train_set, carved, test_set, notes)
    counts, permutation = profile_counts(len(names), req)
    for c, (have, need) in enumerate(zip(full.class_counts, counts, strict=True)):
        if have < need:
            raise DataError(
                f"{os.path.join(train_list.source, names[c])}: {have} images, the long-tailed "
                f"profile needs {need}; lower n_max"
            )
    if val_set is not None:
        kept = subsample_longtail(full.targets, counts, req.seed)
        return make_splits(full.subset(kept), val_set, test_set, [], permutation)
    kept, val, notes = lt_indices(full.targets, counts, req)
    return make_splits(full.subset(kept), full.subset(val), test_set, notes, permutation)


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
        list_builder(IMAGENET_LT), "ImageNet-LT (list files)", extra_keys=LIST_KEYS
    ),
    "places_lt": DatasetSpec(
        list_builder(PLACES_LT), "Places-LT (list files)", extra_keys=LIST_KEYS
    ),
    "inat2018": DatasetSpec(
        list_builder(INAT2018), "iNaturalist 2018 (list files)", extra_keys=LIST_KEYS
    ),
    "list_files": DatasetSpec(
        list_builder(LIST_FILES), "your own list files", extra_keys=(*LIST_KEYS, "num_classes")
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
    class_order: str | int = LABEL_ORDER,
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
        class_order: which class receives which count of the long-tailed profile: "label" gives
            class c the c-th largest (the benchmarks), an integer seeds a permutation (see
            ``longtail.order_profile``). Only where dscl draws the profile (Fashion-MNIST-LT,
            CIFAR-LT, synthetic, image folders with ``n_max``); elsewhere only "label" applies.
        val_per_class: validation images per class drawn from unused or carved training images.
        skip_bad_images: decode every image file once and leave out the unreadable ones (listed
            in ``summary()["bad_images"]``, one note per split) instead of raising ``DataError``
            when one is loaded.
        download: allow torchvision's downloader (Fashion-MNIST, CIFAR only).
        val_shortfall: "partial", "carve" or "error" (see the module docstring).
        **extra: dataset-specific settings (see the module docstring); unknown keys are errors.

    Raises:
        DataError: (a ValueError) on a bad argument or setting, or on bad data.
    """
    if name not in DATASETS:
        raise DataError(f"name: unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    unknown = sorted(set(extra) - set(spec.extra_keys))
    if unknown:
        raise DataError(f"unknown setting(s) {unknown} for {name}; accepted: {spec.extra_keys}")
    for key, value in (("seed", seed), ("val_per_class", val_per_class)):
        if not _is_count(value):
            raise DataError(f"{key} must be a non-negative integer, got {value!r}")
    check_choice("val_shortfall", val_shortfall, VAL_SHORTFALL, DataError)
    if spec.profile == "none" and (n_max is not None or imbalance_ratio is not None):
        raise DataError(
            f"n_max / imbalance_ratio: {name} has a fixed profile, got {n_max} / {imbalance_ratio}"
        )
    if spec.profile == "optional" and (n_max is None) != (imbalance_ratio is None):
        raise DataError(
            f"n_max and imbalance_ratio must be given together for {name}, got "
            f"{n_max} / {imbalance_ratio}"
        )
    if spec.profile == "required":
        n_max = spec.n_max if n_max is None else n_max
        imbalance_ratio = spec.imbalance_ratio if imbalance_ratio is None else imbalance_ratio
    if class_order != LABEL_ORDER:
        if not _is_count(class_order):
            raise DataError(
                f"class_order must be {LABEL_ORDER!r} or a non-negative integer seed, got "
                f"{class_order!r}"
            )
        if n_max is None:
            raise DataError(
                f"class_order: an integer order does not apply to {name}, whose class counts "
                "are its own (it applies where dscl draws the long-tailed profile: "
                "fashion_mnist_lt, cifar10_lt, cifar100_lt, synthetic_lt, image_folder with "
                f"n_max and imbalance_ratio); use {LABEL_ORDER!r}"
            )
    req = SplitRequest(
        name=name,
        root=root,
        n_max=n_max,
        imbalance_ratio=imbalance_ratio,
        seed=seed,
        class_order=class_order,
        val_per_class=val_per_class,
        skip_bad_images=bool(skip_bad_images),
        download=bool(download),
        val_shortfall=val_shortfall,
        extra=dict(extra),
    )
    splits = spec.build(req)
    check_no_empty_class(splits.train.targets, splits.num_classes, f"{name} training set")
    if req.skip_bad_images:
        splits = skip_unreadable(splits, name)
    splits.class_order = class_order
    return splits


def build_splits_for(data: Any) -> DataSplits:
    """The splits of a run's data settings (a ``dscl.config.DataConfig``, read by attribute):
    :func:`build_splits` with every split setting of ``data`` and its ``extra`` mapping as the
    dataset's own settings."""
    return build_splits(
        data.name,
        data.root,
        n_max=data.n_max,
        imbalance_ratio=data.imbalance_ratio,
        seed=data.seed,
        class_order=data.class_order,
        val_per_class=data.val_per_class,
        val_shortfall=data.val_shortfall,
        skip_bad_images=data.skip_bad_images,
        download=data.download,
        **data.extra,
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
