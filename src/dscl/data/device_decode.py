"""JPEGs decoded on the training device (``data.decode_on_device``): the workers only read bytes.

A worker (``JpegBytes``) reads a file, takes its size from the JPEG frame header and draws the
item's parameters exactly as ``fileviews.FileCrops`` does (same generator, same order); it returns
the bytes and the parameters, no pixels. The main process (``DeviceDecoder``) decodes the batch's
JPEGs in one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on a GPU) and crops
there in float with the per-sample path's ``crop_ops.crop_resize`` (patches batched with
``resample_boxes``), then runs the colour ops of ``views.finish_views``.

Files that are not plain JPEGs (PNG, CMYK, 16-bit ...) are decoded and cropped in the worker as on
the fast path and join the batch as uint8 crops; a JPEG the device decoder refuses is decoded again
on the CPU (``decode.decode_rgb``), so a bad file stops with the per-sample path's message.

Meant for CUDA; on a CPU it works the same (torchvision's CPU decoder), which is how it is tested.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from dscl.data.crop_ops import CROP_RATIO, crop_resize, normalise, resample_boxes
from dscl.data.decode import decode_rgb, jpeg_decoder, jpeg_header, read_bytes
from dscl.data.fileviews import (
    CLASSIFY,
    VIEWS,
    FileCrops,
    _aspects,
    _boxes,
    _rand_boxes,
    _rand_flips,
    assemble_crops,
    draw_request,
    finish_crops,
    to_planes,
)
from dscl.data.views import ALL_VIEWS, ViewConfig, ViewRequest, to_device
from dscl.errors import SetupError


class JpegBytes(Dataset):
    """Items ``(seed, index)`` → (item, label): the file's bytes and drawn parameters for a plain
    JPEG, else ``FileCrops``' uint8 crops (under ``"crops"``)."""

    def __init__(self, crops: FileCrops) -> None:
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, item: tuple[int, int]):
        seed, index = item
        crops = self.crops
        path, label = crops.paths[index], crops.targets[index]
        data = read_bytes(path)
        header = jpeg_header(data) if data is not None else None
        if header is None or not header.plain:
            return {"crops": crops[item][0], "path": path}, label
        g = torch.Generator().manual_seed(seed)
        out = {"jpeg": torch.frombuffer(data, dtype=torch.uint8), "path": path}
        if crops.kind == VIEWS:
            out["draws"], out["named"] = draw_request(
                header.height, header.width, crops.cfg, crops.request, g
            )
        else:
            u = _rand_boxes(g, 1).tolist()
            aspects = _aspects([(u, CROP_RATIO)])[0]
            box = _boxes(u, aspects, header.height, header.width, crops.scale, CROP_RATIO)[0]
            out["box"], out["flip"] = box, _rand_flips(g, 1)[0]
        return out, label


def collate_items(batch):
    """A list of ``JpegBytes`` items (kept apart: sizes differ) and the labels (B,)."""
    items, labels = zip(*batch, strict=True)
    return list(items), torch.as_tensor(labels, dtype=torch.long)


class DeviceDecoder:
    """The main process's part: decode a batch of ``JpegBytes`` items on ``device`` and make the
    model inputs there (the dict of ``fileviews.finish_batch``)."""

    def __init__(
        self, kind: str, cfg: ViewConfig, device: torch.device, request: ViewRequest = ALL_VIEWS
    ) -> None:
        self.kind, self.cfg, self.device, self.request = kind, cfg, device, request
        self.decode_jpeg = jpeg_decoder()
        if self.decode_jpeg is None:
            raise SetupError(
                "data.decode_on_device: this torchvision has no decode_jpeg (its image decoders "
                "are deprecated from 0.29 on); set data.decode_on_device=false"
            )

    def decode(self, items: list[dict]) -> list[Tensor | None]:
        """(3, H, W) uint8 on the device for every JPEG item (None for the others)."""
        jpegs = [i for i, item in enumerate(items) if "jpeg" in item]
        images: list[Tensor | None] = [None] * len(items)
        if not jpegs:
            return images
        data = [items[i]["jpeg"] for i in jpegs]
        try:
            decoded = self.decode_jpeg(data, device=self.device)
        except RuntimeError:  # one bad file fails the batch: decode one by one
            decoded = [self._one(items[i]) for i in jpegs]
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
        return images

    def _one(self, item: dict) -> Tensor:
        try:
            return self.decode_jpeg(item["jpeg"], device=self.device)
        except RuntimeError:  # the CPU decoders' verdict: their pixels, or their DataError
            return decode_rgb(item["path"]).to(self.device)

    def __call__(self, items: list[dict]) -> dict[str, Tensor]:
        images = self.decode(items)
        cfg = self.cfg
        if self.kind == CLASSIFY:
            views = []
            for item, image in zip(items, images, strict=True):
                if image is None:
                    views.append(to_planes(item["crops"].to(self.device)))  # (3, S, S)
                else:
                    views.append(
                        crop_resize(image, torch.tensor(item["box"]), cfg.view_size, item["flip"])
                    )
            return {"image": normalise(torch.stack(views), cfg.mean, cfg.std)}
        made = [
            self._worker_crops(item["crops"]) if image is None else self._crops(item, image)
            for item, image in zip(items, images, strict=True)
        ]
        return finish_crops(default_collate(made), cfg, self.request)

    def _worker_crops(self, crops: dict) -> dict:
        """A worker's ``view_crops`` of one image (not a plain JPEG), on the device, its uint8
        crops as float planes like the crops made here."""
        out = to_device(crops, self.device)
        for name in ("query", "key", "patches"):
            if name in out:
                out[name] = to_planes(out[name])
        for named in out.get("named", {}).values():
            named["crop"] = to_planes(named["crop"])
        return out

    def _crops(self, item: dict, image: Tensor) -> dict:
        """The request's crops of one image decoded on the device, as float (3, S, S) planes,
        with their parameters."""
        cfg, device = self.cfg, self.device

        def crop(image: Tensor, box, size: int, flip: bool) -> Tensor:
            return crop_resize(image, torch.tensor(box), size, flip)

        def cut_patches(query: Tensor, tensors: dict) -> Tensor:
            boxes, flips = tensors["boxes"].to(device), tensors["patch_flips"].to(device)
            return resample_boxes(query[None], boxes[None], flips[None], cfg.patch_px)[0]

        out = assemble_crops(
            image, item["draws"], item["named"], self.request, cfg, crop, cut_patches
        )
        return to_device(out, device)
