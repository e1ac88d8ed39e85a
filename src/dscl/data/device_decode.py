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
from dscl.data.decode import decode_rgb, jpeg_header, read_bytes
from dscl.data.fileviews import (
    CLASSIFY,
    VIEWS,
    FileCrops,
    _aspects,
    _boxes,
    _rand_boxes,
    _rand_flips,
    batch_colors,
    draw_views,
    to_planes,
)
from dscl.data.views import ViewConfig, finish_views


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
            draws = draw_views(header.height, header.width, crops.cfg, g)
            out["draws"] = draws
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

    def __init__(self, kind: str, cfg: ViewConfig, device: torch.device) -> None:
        self.kind, self.cfg, self.device = kind, cfg, device

    def decode(self, items: list[dict]) -> list[Tensor | None]:
        """(3, H, W) uint8 on the device for every JPEG item (None for the others)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [i for i, item in enumerate(items) if "jpeg" in item]
        images: list[Tensor | None] = [None] * len(items)
        if not jpegs:
            return images
        data = [items[i]["jpeg"] for i in jpegs]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad file fails the batch: decode one by one
            decoded = [self._one(items[i]) for i in jpegs]
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
        return images

    def _one(self, item: dict) -> Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(item["jpeg"], mode=ImageReadMode.RGB, device=self.device)
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
        queries, keys, patches, params = [], [], [], []
        for item, image in zip(items, images, strict=True):
            if image is None:  # cropped in the worker
                crops = {k: v.to(self.device) for k, v in item["crops"].items()}
                queries.append(to_planes(crops["query"]))
                keys.append(to_planes(crops["key"]))
                patches.append(to_planes(crops["patches"]))
                params.append(
                    {k: crops[k] for k in ("boxes", "patch_flips", "color") if k in crops}
                )
                continue
            draws = item["draws"]
            query = crop_resize(
                image, torch.tensor(draws.query_box), cfg.view_size, draws.query_flip
            )
            tensors = {k: v.to(self.device) for k, v in draws.tensors().items()}
            patches.append(
                resample_boxes(
                    query[None], tensors["boxes"][None], tensors["patch_flips"][None], cfg.patch_px
                )[0]
            )
            queries.append(query)
            keys.append(
                crop_resize(image, torch.tensor(draws.key_box), cfg.view_size, draws.key_flip)
            )
            params.append(tensors)
        stacked = default_collate(params)
        colors = (None, None, None)
        if "color" in stacked:
            colors = batch_colors(stacked["color"], cfg.num_patches)
        return finish_views(
            torch.stack(queries),
            torch.stack(keys),
            torch.stack(patches),
            stacked["boxes"],
            stacked["patch_flips"],
            colors,
            cfg,
        )
