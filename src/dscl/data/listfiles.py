"""Reading and validating image lists: list files, JSON annotations and image folders.

Every problem raises ``DataError`` naming the file (and the line or annotation number):
a file that is not UTF-8 text, a malformed line, a label outside [0, C), a duplicate entry, a path
that escapes the image root, a listed image that does not exist, an empty class folder.

Formats:
- list file: one ``relative/path label`` per line (the published ImageNet-LT, Places-LT and
  iNaturalist 2018 split files); the label is the last whitespace-separated field, so a path may
  contain spaces; blank lines are ignored.
- class names file: line i is the name of class i (blank lines only at the end).
- JSON (the authors' / BBN format): ``{"annotations": [{"fpath": ..., "category_id": ...}, ...],
  "num_classes": N}``; other keys are ignored.
- image folder: ``<dir>/<class name>/**/<image>``, class names sorted, files with an image
  extension only.

Paths are relative to the image root. An absolute path is accepted only if it lies inside the
image root (BBN-style JSON files store absolute paths); any path that leads outside it (``..``,
an absolute path elsewhere) is an error. The check is lexical, so symlinked folders inside the
root still work.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from dscl.data.imagesets import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageList:
    """Validated entries of one list: absolute paths, labels and where each came from."""

    source: str  # the list / JSON file or folder
    paths: list[str]
    targets: list[int]
    where: list[str]  # "file:line" (or "file: annotation #i") of each entry, for messages


def resolve_under(root: str, path: str, where: str) -> str:
    """The normalised absolute path of ``path`` under ``root``; DataError if it escapes ``root``."""
    root_abs = os.path.abspath(root)
    full = os.path.abspath(path if os.path.isabs(path) else os.path.join(root_abs, path))
    if os.path.commonpath([root_abs, full]) != root_abs:
        raise DataError(f"{where}: path {path!r} escapes the image root {root_abs}")
    return full


def _parse_label(value: object, num_classes: int | None, where: str) -> int:
    """An integer label in [0, C), or any non-negative one when C is not known yet (None)."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        label = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        label = value
    else:
        raise DataError(f"{where}: label {value!r} is not an integer")
    if num_classes is None and label < 0:
        raise DataError(f"{where}: label {label} is negative")
    if num_classes is not None and not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} is outside [0, {num_classes})")
    return label


def _read_text(path: str, what: str) -> str:
    """The content of a UTF-8 text file.

    Args:
        path: the file.
        what: what the file is, for messages ("list file", "class names file").

    Raises:
        DataError: naming the file if it does not exist, and the file and line if it is not
            UTF-8 text.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} does not exist")
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise DataError(
            f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
            f"{column}); save it as UTF-8"
        ) from None


def _read_text_lines(path: str, what: str) -> list[tuple[int, str]]:
    """(line number, text without surrounding whitespace) of every line of a UTF-8 text file.

    Lines end as in Python's universal newlines mode; blank lines are kept (as ""). Errors as
    ``_read_text``.
    """
    lines = io.StringIO(_read_text(path, what), newline=None)
    return [(number, text.strip()) for number, text in enumerate(lines, start=1)]


def _finish(
    source: str, root: str, raw: Sequence[tuple[str, int, str]], check_files: bool
) -> ImageList:
    """Resolve paths, reject duplicates and (optionally) missing files."""
    paths, targets, where, seen = [], [], [], {}
    for rel, label, at in raw:
        full = resolve_under(root, rel, at)
        if full in seen:
            raise DataError(f"{at}: duplicate entry {rel!r}, already listed at {seen[full]}")
        seen[full] = at
        paths.append(full)
        targets.append(label)
        where.append(at)
    if check_files:
        # One stat per image: about 440k for iNaturalist 2018, a few seconds on a local disk but
        # possibly minutes on a network file system (turn off with check_files=False).
        missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
        if missing:
            first = ", ".join(f"{where[i]} {paths[i]}" for i in missing[:5])
            raise DataError(f"{source}: {len(missing)} listed images do not exist: {first}")
    return ImageList(source, paths, targets, where)


def read_list_file(
    path: str, root: str, num_classes: int | None, check_files: bool = True
) -> ImageList:
    """Parse a ``relative/path label`` list file, validating every line.

    Args:
        path: the list file (UTF-8 text).
        root: image root the listed paths are relative to.
        num_classes: C; every label must lie in [0, C). None accepts any non-negative label (the
            caller infers C from the labels).
        check_files: check that every listed image exists.
    """
    raw = []
    for number, text in _read_text_lines(path, "list file"):
        if not text:
            continue
        at = f"{path}:{number}"
        fields = text.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise DataError(f"{at}: malformed line {text!r}, expected 'relative/path label'")
        raw.append((fields[0], _parse_label(fields[1], num_classes, at), at))
    if not raw:
        raise DataError(f"{path}: list file has no entries")
    return _finish(path, root, raw, check_files)


def read_class_names(path: str, num_classes: int) -> list[str]:
    """Class names from a UTF-8 text file: line i names class i; trailing blank lines ignored.

    Raises:
        DataError: naming the file (and line) on a blank or repeated name, or a number of names
            other than ``num_classes``.
    """
    lines = _read_text_lines(path, "class names file")
    while lines and not lines[-1][1]:
        lines.pop()
    seen: dict[str, int] = {}
    for number, name in lines:
        if not name:
            raise DataError(f"{path}:{number}: blank class name")
        if name in seen:
            raise DataError(f"{path}:{number}: class name {name!r} repeats line {seen[name]}")
        seen[name] = number
    if len(lines) != num_classes:
        raise DataError(
            f"{path}: {len(lines)} class names, but the lists have {num_classes} classes"
        )
    return [name for _, name in lines]


def read_json_annotations(path: str, root: str, check_files: bool = True) -> tuple[ImageList, int]:
    """Parse the authors' JSON annotation file; returns (entries, num_classes)."""
    text = _read_text(path, "annotation file")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
        raise DataError(f"{path}: expected an object with an 'annotations' list")
    num_classes = content.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise DataError(f"{path}: 'num_classes' must be a positive integer, got {num_classes!r}")
    raw = []
    for i, item in enumerate(content["annotations"]):
        at = f"{path}: annotation #{i}"
        if not isinstance(item, dict) or not isinstance(item.get("fpath"), str):
            raise DataError(f"{at}: expected an object with a string 'fpath'")
        if "category_id" not in item:
            raise DataError(f"{at}: missing 'category_id'")
        raw.append((item["fpath"], _parse_label(item["category_id"], num_classes, at), at))
    if not raw:
        raise DataError(f"{path}: no annotations")
    return _finish(path, root, raw, check_files), num_classes


def scan_image_folder(
    folder: str, class_names: Sequence[str] | None = None
) -> tuple[ImageList, list[str]]:
    """Images of a ``<folder>/<class>/**/<image>`` tree, and the class names.

    Args:
        folder: the split folder.
        class_names: the expected classes (e.g. the training classes when scanning the test
            folder); None takes the sorted sub-folder names. Each must have an image.
    """
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: image folder does not exist")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    names = found if class_names is None else list(class_names)
    extra = sorted(set(found) - set(names))
    if extra:
        raise DataError(f"{folder}: class folders {extra} are not training classes")
    if not names:
        raise DataError(f"{folder}: no class sub-folders")
    raw = []
    for label, name in enumerate(names):
        class_dir = os.path.join(folder, name)
        files = []
        for base, dirs, filenames in os.walk(class_dir, followlinks=True):
            dirs.sort()
            files += [
                os.path.join(base, f)
                for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not files:
            raise DataError(f"{class_dir}: class {name!r} has no images")
        raw += [(f, label, f) for f in files]
    return _finish(folder, folder, raw, check_files=False), names


def check_no_empty_class(targets: Sequence[int], num_classes: int, source: str) -> None:
    """DataError naming ``source`` and the classes in [0, C) with no image (up to ten of them)."""
    present = set(targets)
    empty = [c for c in range(num_classes) if c not in present]
    if len(empty) == 1:
        raise DataError(f"{source}: class {empty[0]} has no images")
    if empty:
        listed = ", ".join(str(c) for c in empty[:10]) + (", ..." if len(empty) > 10 else "")
        raise DataError(
            f"{source}: class {empty[0]} has no images ({len(empty)} empty classes: {listed})"
        )


def check_disjoint(first: ImageList, second: ImageList) -> None:
    """DataError if an image appears in both lists (e.g. in training and validation)."""
    where = dict(zip(first.paths, first.where, strict=True))
    for path, at in zip(second.paths, second.where, strict=True):
        if path in where:
            raise DataError(f"{at}: {path} is also listed at {where[path]}")


def names_from_paths(images: ImageList, root: str, num_classes: int) -> list[str]:
    """Class names from the folders of the listed images.

    A class whose images all sit in one folder is named after that folder relative to the image
    root, without its first component (the split folder): ``train/n01440764/x.JPEG`` ->
    ``n01440764``; ``data_256/a/abbey/x.jpg`` -> ``a/abbey``. Otherwise (or if two classes would
    share a name) the class indices.
    """
    folders: list[set[str]] = [set() for _ in range(num_classes)]
    root_abs = os.path.abspath(root)
    for path, label in zip(images.paths, images.targets, strict=True):
        folders[label].add(os.path.relpath(os.path.dirname(path), root_abs))
    names = []
    for c, found in enumerate(folders):
        parts = found.pop().replace(os.sep, "/").split("/") if len(found) == 1 else []
        names.append("/".join(parts[1:]) if len(parts) > 1 else (parts[0] if parts else str(c)))
    if len(set(names)) < len(names):  # folders do not identify classes: use the indices
        return [str(c) for c in range(num_classes)]
    return names


def folder_class_names(images: ImageList, root: str, num_classes: int) -> list[str]:
    """Class names from the parent folder names of the listed images (the generic list files).

    Class c is named after the parent folder of its first image when every image of the class
    has a parent folder of that name (``train/cat/1.png`` -> ``cat``); otherwise, or when the
    image lies directly in the image root, or when another class gets the same name, it is
    ``class_<c>``.
    """
    root_abs = os.path.abspath(root)
    found: list[list[str]] = [[] for _ in range(num_classes)]
    for path, label in zip(images.paths, images.targets, strict=True):
        found[label].append(os.path.basename(os.path.relpath(os.path.dirname(path), root_abs)))
    names = [
        folders[0] if folders and folders[0] not in ("", ".") and len(set(folders)) == 1 else ""
        for folders in found
    ]
    taken = Counter(names)
    return [name if name and taken[name] == 1 else f"class_{c}" for c, name in enumerate(names)]
