"""Decoding image files to (3, H, W) uint8 RGB tensors for the fast file path.

JPEGs that libjpeg-turbo can take as they are (8-bit, one or three components) are decoded by
``torchvision.io.decode_jpeg``; everything else (PNG, 16-bit, palette, alpha, CMYK JPEGs, a JPEG
torchvision refuses) goes through ``imagesets.load_rgb``, i.e. PIL and ``to_rgb``, so every
conversion and every error message is the one the per-sample path gives. Both decoders use
libjpeg-turbo with its default (ISLOW) DCT and fancy upsampling and give the same pixels for the
same file; neither applies the EXIF orientation.

``draft_side`` > 0 decodes JPEGs with PIL's draft mode instead: the DCT scales the image by 1/2,
1/4 or 1/8 while decoding (the largest reduction whose shorter side stays >= ``draft_side``), so
the crops are then taken from a smaller image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dscl.data.imagesets import _describe, load_rgb, to_rgb
from dscl.errors import DataError

# start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI, EOI: no length field


@dataclass(frozen=True)
class JpegHeader:
    """What the start-of-frame segment of a JPEG says."""

    height: int
    width: int
    components: int  # 1 grayscale, 3 YCbCr (or RGB), 4 CMYK / YCCK
    precision: int  # bits per sample

    @property
    def plain(self) -> bool:
        """True when torchvision's decoder gives the same RGB pixels as PIL + ``to_rgb``."""
        return self.precision == 8 and self.components in (1, 3) and self.height > 0


def jpeg_header(data: bytes | bytearray | memoryview) -> JpegHeader | None:
    """The frame header of JPEG ``data``, or None when ``data`` is not a JPEG one can parse.

    Walks the marker segments up to the first start-of-frame; reads nothing past it.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF:
            if pos + 10 > n or length < 8:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return JpegHeader(height, width, data[pos + 9], data[pos + 4])
        if marker == 0xDA or length < 2:  # a scan before any frame header: not a JPEG we parse
            return None
        pos += 2 + length
    return None


def read_bytes(path: str) -> bytearray | None:
    """The file's bytes (writable, so torch can wrap them), or None when it cannot be read (the
    PIL fallback then raises the per-sample path's error)."""
    try:
        with open(path, "rb") as handle:
            return bytearray(handle.read())
    except OSError:
        return None


def pil_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor (a view of its (H, W, 3) pixels)."""
    array = np.array(image, dtype=np.uint8)  # (H, W, 3), a copy: writable
    return torch.from_numpy(array).permute(2, 0, 1)


def load_pil(path: str, draft_side: int = 0) -> Tensor:
    """``load_rgb`` (PIL + ``to_rgb``) as a tensor; raises the per-sample path's ``DataError``.

    With ``draft_side`` > 0 a JPEG is decoded at a DCT scale of 1/2, 1/4 or 1/8 (the largest
    whose shorter side stays >= ``draft_side``).
    """
    try:
        if draft_side > 0:
            image = _load_draft(path, draft_side)
        else:
            image = load_rgb(path)
    # as ImageFileDataset.__getitem__: PIL raises many exception types for corrupt data
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: unreadable image ({_describe(exc)})") from exc
    return pil_tensor(image)


def _load_draft(path: str, draft_side: int) -> Image.Image:
    with open(path, "rb") as handle:
        image = Image.open(handle)
        if image.format == "JPEG":
            width, height = image.size
            short = min(width, height)
            if short >= 2 * draft_side:  # otherwise no DCT scale keeps the side
                want = (max(1, width * draft_side // short), max(1, height * draft_side // short))
                image.draft(image.mode, want)
        image.load()
    return to_rgb(image)


def decode_rgb(path: str, draft_side: int = 0) -> Tensor:
    """Decode the image file at ``path`` once: (3, H, W) uint8 RGB (memory laid out H, W, 3).

    Args:
        path: the image file.
        draft_side: 0 for full size; > 0 decodes JPEGs with PIL's draft mode (see the module
            docstring).

    Raises:
        DataError: ``"<path>: unreadable image (<ExceptionType>: <message>)"``, the message of
            the per-sample path, for a missing, empty, truncated or corrupt file.
    """
    if draft_side == 0:
        data = read_bytes(path)
        header = jpeg_header(data) if data is not None else None
        if header is not None and header.plain:
            image = decode_jpeg_bytes(data)
            if image is not None:
                return image
    return load_pil(path, draft_side)


def jpeg_decoder():
    """torchvision's ``decode_jpeg`` as ``decode(data, device=...)`` → RGB uint8, or None when
    this torchvision has none.

    torchvision deprecates its image decoders from 0.29 on (in favour of TorchCodec) and will
    remove them; without them the fast path decodes every file with PIL (the same libjpeg-turbo,
    the same pixels, somewhat slower) and ``data.decode_on_device`` is refused.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return partial(decode_jpeg, mode=ImageReadMode.RGB)


def decode_jpeg_bytes(data: bytearray) -> Tensor | None:
    """torchvision's libjpeg-turbo decode of ``data`` to RGB, or None when it refuses it (or has
    no decoder: ``jpeg_decoder``)."""
    decode = jpeg_decoder()
    if decode is None:
        return None
    try:
        return decode(torch.frombuffer(data, dtype=torch.uint8))
    except RuntimeError:  # a file it refuses, or a torchvision built without its image library
        return None
