"""Readers for the array-format datasets: Fashion-MNIST (IDX files) and CIFAR (python pickles).

Fashion-MNIST is looked for in the configured root alone (also ``<root>/fashion-mnist`` and
torchvision's ``<root>/FashionMNIST/raw``) when one is given, else in ``$DSCL_DATA/fashion-mnist``
and ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``); the first
folder holding all four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) wins. Only with
``download=True`` is torchvision's downloader used.

CIFAR-10 reads ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, CIFAR-100
``cifar-100-python/{train, test, meta}`` (``fine_labels``), found in the root or directly in it.
The pickles are read with an unpickler that only allows numpy arrays, so a tampered file cannot run
code. Rows are ``3 * S * S`` bytes, channel-planar (R plane, G plane, B plane), S = 32 for the
real data (any square size is accepted).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib

import numpy as np

from dscl.data.imagesets import ArrayImageDataset, DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes as a uint8 array of its header's shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: bad magic number 0x{raw[:4].hex()}, not an IDX file")
    if raw[2] != _IDX_UBYTE:
        raise DataError(f"{path}: IDX type code 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise DataError(
            f"{path}: {len(raw) - header} data bytes but the header's sizes {dims} need "
            f"{math.prod(dims)}"
        )
    # a writable copy: torch refuses to wrap read-only buffers without a warning
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fashion_files(folder: str) -> dict[str, str] | None:
    found = {}
    for key, stem in _FASHION_FILES.items():
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(folder, name)):
                found[key] = os.path.join(folder, name)
                break
        else:
            return None
    return found


def find_fashion_mnist(root: str | None, download: bool = False) -> dict[str, str]:
    """Paths of the four Fashion-MNIST files (see the module docstring for the search order)."""
    # A configured root is the only place looked in: falling back elsewhere would silently train
    # on other files than the user named.
    if root is not None:
        candidates = [root, os.path.join(root, "fashion-mnist")]
        candidates.append(os.path.join(root, "FashionMNIST", "raw"))
    else:
        candidates = []
        if os.environ.get("DSCL_DATA"):
            candidates.append(os.path.join(os.environ["DSCL_DATA"], "fashion-mnist"))
        candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for folder in candidates:
        found = _fashion_files(folder)
        if found is not None:
            return found
    if download:
        target = root or os.environ.get("DSCL_DATA")
        if not target:
            raise ValueError("download=True needs a root (or $DSCL_DATA) to download into")
        from torchvision.datasets import FashionMNIST

        FashionMNIST(target, train=True, download=True)
        found = _fashion_files(os.path.join(target, "FashionMNIST", "raw"))
        if found is not None:
            return found
    raise DataError(
        f"Fashion-MNIST not found in {candidates}; install the Debian package "
        "dataset-fashion-mnist, set $DSCL_DATA, or pass download=True"
    )


def _idx_pair(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected 3 dimensions (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected 1 dimension (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside [0, 10)")
    return images, labels


def read_fashion_mnist(
    root: str | None, download: bool = False
) -> tuple[ArrayImageDataset, ArrayImageDataset]:
    """The full (balanced) Fashion-MNIST training and test sets: 60,000 and 10,000 28x28 images."""
    files = find_fashion_mnist(root, download)
    parts = []
    for split in ("train", "test"):
        images, labels = _idx_pair(files[f"{split}_images"], files[f"{split}_labels"])
        parts.append(ArrayImageDataset(images, labels.tolist(), FASHION_MNIST_CLASSES))
    return parts[0], parts[1]


_NUMPY_GLOBALS = {
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{prefix}.multiarray", "_reconstruct"),
        (f"{prefix}.multiarray", "scalar"),
        (f"{prefix}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_pickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file does not exist")
    try:
        with open(path, "rb") as handle:
            content = _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a dict, got {type(content).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _cifar_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """(N, S, S, 3) uint8 images and N labels of one CIFAR pickle."""
    content = _load_pickle(path)
    if "data" not in content or label_key not in content:
        raise DataError(f"{path}: missing 'data' or {label_key!r}")
    data = np.asarray(content["data"])
    labels = [int(x) for x in content[label_key]]
    side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * side * side or side == 0:
        raise DataError(f"{path}: 'data' must be uint8 (N, 3*S*S), got {data.dtype} {data.shape}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} rows but {len(labels)} labels")
    bad = [x for x in labels if not 0 <= x < num_classes]
    if bad:
        raise DataError(f"{path}: label {bad[0]} is outside [0, {num_classes})")
    # N images, S side: rows are R plane, G plane, B plane
    images = data.reshape(len(data), 3, side, side).transpose(0, 2, 3, 1)  # (N, S, S, 3)
    return images, labels


def read_cifar(
    root: str, num_classes: int, download: bool = False
) -> tuple[ArrayImageDataset, ArrayImageDataset]:
    """The full (balanced) CIFAR-10 or CIFAR-100 training and test sets."""
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    folder_name = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    first = "data_batch_1" if num_classes == 10 else "train"
    folder = os.path.join(root, folder_name)
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(root, first)):
        folder = root
    if not os.path.isdir(folder) and download:
        from torchvision.datasets import CIFAR10, CIFAR100

        (CIFAR10 if num_classes == 10 else CIFAR100)(root, train=True, download=True)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: CIFAR-{num_classes} folder not found (pass download=True)")
    if num_classes == 10:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file = "test_batch", "batches.meta"
        label_key, names_key = "labels", "label_names"
    else:
        train_files, test_file, meta_file = ["train"], "test", "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
    meta_path = os.path.join(folder, meta_file)
    names = _load_pickle(meta_path).get(names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DataError(f"{meta_path}: {names_key!r} must list {num_classes} class names")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    batches = [_cifar_batch(os.path.join(folder, f), label_key, num_classes) for f in train_files]
    train_images = np.concatenate([b[0] for b in batches])
    train_labels = [label for b in batches for label in b[1]]
    test_images, test_labels = _cifar_batch(os.path.join(folder, test_file), label_key, num_classes)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{folder}: training images {train_images.shape[1:]} and test images "
            f"{test_images.shape[1:]} differ in size"
        )
    return (
        ArrayImageDataset(train_images, train_labels, names),
        ArrayImageDataset(test_images, test_labels, names),
    )
