"""JPEGs decoded on the training device (``data.decode_on_device``): the workers only read bytes.

A worker (``JpegBytes``) reads a file, takes its size from the JPEG frame header and draws the
item's parameters exactly as ``fileviews.FileCrops`` does (same generator, same order); it returns
the bytes and the parameters, no pixels. The worker's ``collate_items`` packs a batch of them into
a few tensors (``JpegBatch``: the bytes end to end, the parameters stacked), so that a batch, not
every item, crosses to the main process. The main process (``DeviceDecoder``) decodes the batch's
JPEGs in one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on a GPU) and crops
there in float with the per-sample path's ``crop_ops.crop_resize`` (patches batched with
``resample_boxes``), then runs the colour ops of ``views.finish_views``.

Files that are not plain JPEGs (PNG, CMYK, 16-bit ...) are decoded and cropped in the worker as on
the fast path and join the batch as uint8 crops; a JPEG the device decoder refuses is decoded again
on the CPU (``decode.decode_rgb``), so a bad file stops with the per-sample path's message.

Meant for CUDA; on a CPU it works the same (torchvision's CPU decoder), which is how it is tested.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate, get_worker_info

from dscl.data.crop_ops import crop_resize, normalise, resample_boxes
from dscl.data.decode import decode_rgb, jpeg_decoder, jpeg_header, read_bytes
from dscl.data.draws import STANDARD, classifier_plan, draw_image
from dscl.data.fileviews import (
    CLASSIFY,
    VIEWS,
    Draws,
    FileCrops,
    assemble_crops,
    draw_request,
    finish_crops,
    to_planes,
)
from dscl.data.views import ALL_VIEWS, ViewConfig, ViewRequest, to_device
from dscl.errors import SetupError

# the drawn parameters that place and flip crops: read on the CPU as Python numbers (crop_resize
# slices the image with them); the others (patch boxes and flips, colour, seeds) go to the device
GEOMETRY = ("box", "flip", "query_box", "query_flip", "key_box", "key_flip")


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
            plan = classifier_plan(crops.scale)
            drawn = draw_image(plan, header.height, header.width, g)[STANDARD]
            out["box"], out["flip"] = drawn["box"], drawn["flip"]
        return out, label


@dataclass
class JpegBatch:
    """A batch of ``JpegBytes`` items as it crosses from a worker to the main process.

    A few tensors whatever the batch size: every tensor that crosses is a shared-memory file
    whose descriptor stays open while the tensor lives, and items sent one by one (two or more
    tensors each) ran a limit of 1,024 open files out at a batch of 256 with two workers (the
    worker drops the batch and the main process waits for it forever).

    Attributes:
        data: (N,) uint8, the files of the J JPEG items end to end.
        offsets: J + 1 byte offsets: JPEG item j is ``data[offsets[j] : offsets[j + 1]]``.
        jpeg: (B,) whether each item, in batch order, is a JPEG (else cropped in the worker).
        paths: (B,) the items' files.
        geometry: the J JPEG items' ``GEOMETRY`` draws (crop boxes and flips) as Python lists,
            ``_draw_tensors``' nesting: the main process slices the images with them, so they
            are read on the host, and made lists in the worker they cost it no read-back.
        params: the J items' other parameters (patch boxes and flips, colour, seeds), each
            stacked on a first dimension J, for the device; both empty when J = 0.
        crops: the K other items' worker crops collated (K first), or None when K = 0.
    """

    data: Tensor
    offsets: list[int]
    jpeg: list[bool]
    paths: list[str]
    geometry: dict
    params: dict
    crops: Tensor | dict | None

    def __len__(self) -> int:
        return len(self.jpeg)

    def __getitem__(self, i: int) -> dict:
        """Item ``i`` as ``JpegBytes`` made it (its tensors are views into the batch's)."""
        path, before = self.paths[i], self.jpeg[:i]
        if not self.jpeg[i]:
            return {"crops": _row(self.crops, before.count(False)), "path": path}
        j = before.count(True)
        item = {"jpeg": self.files()[j], "path": path}
        lists, tensors = self.geometry, self.params
        if "box" in lists:  # classify
            return {**item, "box": tuple(lists["box"][j]), "flip": lists["flip"][j]}
        draws = None
        if "draws" in lists:
            geometry, rows = lists["draws"], _row(tensors["draws"], j)
            draws = Draws(
                tuple(geometry["query_box"][j]),
                geometry["query_flip"][j],
                [tuple(int(v) for v in box) for box in rows["boxes"].tolist()],
                rows["patch_flips"].tolist(),
                tuple(geometry["key_box"][j]),
                geometry["key_flip"][j],
                rows.get("color"),
            )
        named = _named(lists["named"], tensors["named"], j)
        for draw in named.values():
            draw["box"] = tuple(draw["box"])
        return {**item, "draws": draws, "named": named}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def files(self) -> list[Tensor]:
        """The J JPEG files' bytes, (n_j,) uint8 views of ``data``."""
        at = self.offsets
        return [self.data[a:b] for a, b in zip(at[:-1], at[1:], strict=True)]

    def pin_memory(self) -> JpegBatch:
        """The batch in page-locked memory (what a DataLoader with ``pin_memory`` calls), so its
        copies to the device can be asynchronous."""
        return replace(
            self,
            data=self.data.pin_memory(),
            params=_pinned(self.params),
            crops=_pinned(self.crops),
        )


def _draw_tensors(item: dict) -> dict:
    """A JPEG item's drawn parameters as tensors, for ``default_collate`` to stack. Classify:
    ``box`` (4,) int64 and ``flip`` () bool. Views: under ``draws`` (standard views) the query's
    and key's boxes and flips and ``Draws.tensors()``, the patches' float boxes, their flips and
    the colour uniforms as the batch carries them; under ``named`` each named view's box, flip,
    and colour (1, 12) and seed (1,) as drawn."""
    if "box" in item:
        return {"box": torch.tensor(item["box"]), "flip": torch.tensor(item["flip"])}
    named = {
        name: {
            "box": torch.tensor(draw["box"]),
            "flip": torch.tensor(draw["flip"]),
            **{key: draw[key] for key in ("color", "seed") if key in draw},
        }
        for name, draw in item["named"].items()
    }
    out: dict = {"named": named}
    draws = item["draws"]
    if draws is not None:
        out["draws"] = {
            "query_box": torch.tensor(draws.query_box),
            "query_flip": torch.tensor(draws.query_flip),
            "key_box": torch.tensor(draws.key_box),
            "key_flip": torch.tensor(draws.key_flip),
            **draws.tensors(),  # boxes (L, 4) float32, patch_flips (L,), color (2 + L, 12)
        }
    return out


def pack_items(items: list[dict]) -> JpegBatch:
    """``JpegBytes`` items → one ``JpegBatch``. In a worker the bytes are joined straight into
    shared memory (as ``default_collate`` does with the tensors it stacks there), so crossing
    to the main process copies nothing more."""
    files = [item["jpeg"] for item in items if "jpeg" in item]
    offsets = [0, *accumulate(len(data) for data in files)]
    data = torch.empty(offsets[-1], dtype=torch.uint8)
    if files:
        if get_worker_info() is not None:
            data.share_memory_()
        torch.cat(files, out=data)
    others = [item["crops"] for item in items if "jpeg" not in item]
    draws = [_draw_tensors(item) for item in items if "jpeg" in item]
    geometry, params = _split(default_collate(draws)) if draws else ({}, {})
    return JpegBatch(
        data=data,
        offsets=offsets,
        jpeg=["jpeg" in item for item in items],
        paths=[item["path"] for item in items],
        geometry=geometry,
        params=params,
        # one feed's worker crops all have the same shapes, so they always stack
        crops=default_collate(others) if others else None,
    )


def collate_items(batch):
    """The workers' ``collate_fn``: ``JpegBytes`` (item, label) pairs → (``JpegBatch``, labels
    (B,))."""
    items, labels = zip(*batch, strict=True)
    return pack_items(list(items)), torch.as_tensor(labels, dtype=torch.long)


def _row(value, i: int):
    """Row ``i`` of every tensor in ``value`` (a tensor or nested dicts of them)."""
    if isinstance(value, dict):
        return {key: _row(v, i) for key, v in value.items()}
    return value[i]


def _pinned(value):
    if isinstance(value, Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {key: _pinned(v) for key, v in value.items()}
    return value


def _split(draws: dict) -> tuple[dict, dict]:
    """Stacked draws → (their ``GEOMETRY`` tensors as Python lists, one ``tolist`` each; the
    other tensors), both in the draws' nesting."""
    lists, tensors = {}, {}
    for key, value in draws.items():
        if isinstance(value, dict):
            lists[key], tensors[key] = _split(value)
        elif key in GEOMETRY:
            lists[key] = value.tolist()
        else:
            tensors[key] = value
    return lists, tensors


def _named(lists: dict, tensors: dict, j: int) -> dict[str, dict]:
    """JPEG item j's named-view draws as ``fileviews.draw_request`` gives them (the box as a
    list), from the batch's (``_split``): its colour (1, 12) and seed (1,) rows of
    ``tensors``."""
    return {
        name: {"box": lists[name]["box"][j], "flip": lists[name]["flip"][j], **_row(rows, j)}
        for name, rows in tensors.items()
    }


@dataclass
class _RowDraws:
    """A JPEG item's ``fileviews.Draws`` as ``assemble_crops`` reads them, ``tensors()`` rows of
    the batch's parameters moved to the device together (one copy per batch, not per image)."""

    query_box: list[int]
    query_flip: bool
    key_box: list[int]
    key_flip: bool
    rows: dict[str, Tensor]

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.rows)  # a copy: assemble_crops deletes from it


def wait_for_queued_work(device: torch.device) -> None:
    """Return when the work queued on ``device``'s current stream has run; a no-op off CUDA.

    Called before every decode on the device. torchvision's ``decode_jpeg(..., device="cuda")``
    allocates its outputs on the current stream but writes them from nvJPEG's own stream, which
    does not wait for the current one (pytorch/vision#9606: 134 of 200 decodes corrupted on an
    H100, none once the current stream was synchronised first). The training loop queues a step
    and goes on without waiting, and the caching allocator hands a block back as soon as its
    last use is queued, so without this a decode could write memory that kernels of the
    previous step, still queued, read or write.

    Synchronising (upstream's advice) rather than decoding on a side stream: the decode blocks
    the CPU until it is done anyway (torchvision synchronises nvJPEG's stream before it
    returns); what the wait costs is the overlap of the decode with the end of the previous
    step. A side stream (outputs allocated there, ``record_stream`` on the training stream)
    would keep that overlap, at the price of its own memory pool.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def wait_for_device(device: torch.device) -> None:
    """Return when every stream of ``device`` is idle; a no-op off CUDA. After a failed batch
    decode: its outputs are freed with it while nvJPEG's stream may still write them, so their
    memory must not be handed out again before it is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeviceDecoder:
    """The main process's part: decode a ``JpegBatch`` on ``device`` and make the model inputs
    there (the dict of ``fileviews.finish_batch``)."""

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

    def decode(self, batch: JpegBatch) -> list[Tensor]:
        """(3, H, W) uint8 on the device for each of the batch's J JPEGs, in order."""
        files = batch.files()
        if not files:
            return []
        wait_for_queued_work(self.device)  # before decode_jpeg allocates its outputs: see there
        try:
            return self.decode_jpeg(files, device=self.device)
        except RuntimeError:  # one bad file fails the batch: decode one by one
            wait_for_device(self.device)
            paths = [path for path, jpeg in zip(batch.paths, batch.jpeg, strict=True) if jpeg]
            return [self._one(data, path) for data, path in zip(files, paths, strict=True)]

    def _one(self, data: Tensor, path: str) -> Tensor:
        wait_for_queued_work(self.device)
        try:
            return self.decode_jpeg(data, device=self.device)
        except RuntimeError:  # the CPU decoders' verdict: their pixels, or their DataError
            return decode_rgb(path).to(self.device)

    def __call__(self, batch: JpegBatch | list[dict]) -> dict[str, Tensor]:
        """Model inputs from ``batch`` (or from a list of ``JpegBytes`` items, packed here)."""
        if not isinstance(batch, JpegBatch):
            batch = pack_items(list(batch))
        images = self.decode(batch)
        cfg, device = self.cfg, self.device
        # each of the batch's tensors goes to the device in one copy (asynchronous from pinned
        # memory), not image by image; the crop boxes and flips came as Python lists
        lists, params = batch.geometry, batch.params
        crops = to_device(batch.crops, device, non_blocking=True)
        if self.kind == CLASSIFY:
            worker = None if crops is None else to_planes(crops)  # (K, 3, S, S)
            views = [
                worker[k]
                if j is None
                else crop_resize(images[j], lists["box"][j], cfg.view_size, lists["flip"][j])
                for j, k in _places(batch.jpeg)
            ]
            return {"image": normalise(torch.stack(views), cfg.mean, cfg.std)}
        worker = None if crops is None else self._worker_crops(crops)
        params = to_device(params, device, non_blocking=True)
        uncut: list[tuple[dict, Tensor]] = []  # (JPEG item, its query view): patches to cut
        made = [
            _row(worker, k) if j is None else self._crops(images[j], j, lists, params, uncut)
            for j, k in _places(batch.jpeg)
        ]
        if uncut:  # every JPEG item's patches in one batched resample, not one call per image
            items, queries = zip(*uncut, strict=True)
            boxes = torch.stack([item["boxes"] for item in items])  # (J, L, 4)
            flips = torch.stack([item["patch_flips"] for item in items])  # (J, L)
            patches = resample_boxes(torch.stack(queries), boxes, flips, cfg.patch_px)
            for item, cut in zip(items, patches, strict=True):
                item["patches"] = cut  # (L, 3, P, P)
        return finish_crops(default_collate(made), cfg, self.request)

    def _worker_crops(self, crops: dict) -> dict:
        """The workers' collated ``view_crops`` of the images that are not plain JPEGs, on the
        device, their uint8 crops as float planes like the crops made here."""
        out = dict(crops)
        for name in ("query", "key", "patches"):
            if name in out:
                out[name] = to_planes(out[name])
        out["named"] = {
            name: {**named, "crop": to_planes(named["crop"])}
            for name, named in out.get("named", {}).items()
        }
        return out

    def _crops(
        self, image: Tensor, j: int, lists: dict, params: dict, uncut: list[tuple[dict, Tensor]]
    ) -> dict:
        """The request's crops of JPEG item j decoded on the device, as float (3, S, S) planes,
        with their parameters (``lists`` and ``params``: the batch's ``geometry`` and
        ``params``). Its patches are left to cut with the batch's: the item and its query view
        are appended to ``uncut``."""
        cfg = self.cfg
        draws = None
        if "draws" in lists:
            geometry = lists["draws"]
            draws = _RowDraws(
                geometry["query_box"][j],
                geometry["query_flip"][j],
                geometry["key_box"][j],
                geometry["key_flip"][j],
                _row(params["draws"], j),
            )

        query_view: list[Tensor] = []

        def cut_patches(query: Tensor, _tensors: dict) -> None:
            query_view.append(query)  # cut in __call__, with the other items' patches

        named = _named(lists["named"], params["named"], j)
        out = assemble_crops(image, draws, named, self.request, cfg, crop_resize, cut_patches)
        if query_view:
            uncut.append((out, query_view[0]))
        return out


def _places(jpeg: list[bool]):
    """(j, None) for the j-th JPEG item, (None, k) for the k-th other one, in batch order."""
    j = k = 0
    for is_jpeg in jpeg:
        if is_jpeg:
            yield j, None
            j += 1
        else:
            yield None, k
            k += 1
