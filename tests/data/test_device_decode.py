"""data.decode_on_device's machinery (dscl.data.device_decode, TrainFeed's loader): how a batch
crosses from the workers, that a decode on a GPU waits for the work queued before it, and that a
stalled loader stops the run. (Its pixels against the other paths: test_file_views.py and
test_named_views.py.)
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dscl
from dscl.data import ImageFileDataset, device_decode
from dscl.data.device_decode import (
    DeviceDecoder,
    JpegBatch,
    JpegBytes,
    collate_items,
    pack_items,
    wait_for_queued_work,
)
from dscl.data.fileviews import FileCrops
from dscl.data.named_views import randaugment_view
from dscl.data.views import ViewConfig, ViewRequest
from dscl.engine import feed as feed_module
from dscl.engine.feed import TrainFeed
from dscl.errors import SetupError
from dscl.methods.paco import MOCO_VIEW

CPU = torch.device("cpu")
EXTRA = (("moco", MOCO_VIEW), ("strong", randaugment_view(2, 5)))


def _image(path: Path, height: int, width: int, seed: int) -> str:
    """A smooth RGB image (compresses like a photograph) saved at ``path`` (JPEG or PNG)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((3, 4, 3)) * 255).astype(np.uint8))
    low.resize((width, height), Image.BICUBIC).save(path, quality=90)
    return str(path)


def _dataset(tmp_path: Path, count: int = 6, png: bool = True) -> ImageFileDataset:
    paths = [_image(tmp_path / f"{i}.jpg", 30 + 3 * i, 40 + 2 * i, i) for i in range(count)]
    if png:  # not a JPEG: cropped in the worker
        paths.insert(2, _image(tmp_path / "x.png", 35, 45, 99))
    return ImageFileDataset(paths, [i % 2 for i in range(len(paths))], ["a", "b"])


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in ``value``: what a worker's batch sends as shared memory, one file each."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    elif isinstance(value, JpegBatch):
        value = [getattr(value, f.name) for f in fields(value)]
    elif hasattr(value, "__dataclass_fields__"):
        value = [getattr(value, name) for name in value.__dataclass_fields__]
    elif not isinstance(value, list | tuple):
        return []
    return [t for v in value for t in _tensors(v)]


# ---------------------------------------------------------------- a batch crosses as a few tensors


@pytest.mark.parametrize(
    "kind, request_",
    [
        ("views", ViewRequest(("query", "key", "patches"), EXTRA)),
        ("views", ViewRequest(("key",), ())),
        ("views", ViewRequest((), EXTRA)),
        ("classify", None),
    ],
)
def test_a_batch_crosses_as_a_few_tensors_and_unpacks_to_its_items(tmp_path, kind, request_):
    """The workers' collate makes as many tensors for 28 items as for 7 (before: two or more per
    item, so a batch of 256 held some 512 open files), and the batch gives back every item as
    ``JpegBytes`` made it: the same bytes and the same draws."""
    cfg = ViewConfig(view_size=16, num_patches=2)
    kw = {} if request_ is None else {"request": request_}
    dataset = _dataset(tmp_path)
    source = JpegBytes(FileCrops(dataset, kind, cfg, **kw))
    small = [source[(seed, seed % len(dataset))] for seed in range(len(dataset))]
    large = [source[(seed, seed % len(dataset))] for seed in range(4 * len(dataset))]
    batch, labels = collate_items(small)
    assert isinstance(batch, JpegBatch)
    assert torch.equal(labels, torch.tensor([label for _, label in small]))
    count = len(_tensors(batch))
    assert count == len(_tensors(collate_items(large)[0]))
    assert count < len(_tensors([item for item, _ in large]))
    assert len(batch) == len(small)
    for (item, _), back in zip(small, batch, strict=True):
        assert back.keys() == item.keys()
        assert back["path"] == item["path"]
        if "jpeg" not in item:
            assert _same(back["crops"], item["crops"])
            continue
        assert torch.equal(back["jpeg"], item["jpeg"])
        if kind == "classify":
            assert (back["box"], back["flip"]) == (item["box"], item["flip"])
            continue
        assert _same(back["draws"], item["draws"]) and _same(back["named"], item["named"])


def _same(a, b) -> bool:
    """Equal values of equal types: tensors by dtype, shape and value, containers item by item."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return all(_same(getattr(a, k), getattr(b, k)) for k in a.__dataclass_fields__)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


_UNDER_A_FILE_LIMIT = """
import sys, torch
from dscl.config import FeedSettings
from dscl.data import ImageFileDataset
from dscl.data.device_decode import DeviceDecoder
from dscl.data.views import ViewConfig
from dscl.engine.feed import TrainFeed

paths = sys.argv[1:] * 16
cfg, cpu = ViewConfig(view_size=16), torch.device("cpu")
data = ImageFileDataset(paths, [i % 2 for i in range(len(paths))], ["a", "b"])
feed = TrainFeed(
    data, kind="views", view_cfg=cfg, batch_size=256, balanced=False, seed=0, device=cpu,
    settings=FeedSettings(num_workers=2),
)
feed.decoder = DeviceDecoder("views", cfg, cpu)  # the CUDA code path, decoding on the CPU
count = 0
for batch in feed.epoch(0):
    assert batch.inputs["query"].shape == (256, 3, 16, 16)
    count += 1
print("batches", count)
"""


def test_the_device_decode_feed_runs_under_a_limit_of_1024_open_files(tmp_path):
    """Two workers, batches of 256, ``ulimit -n 1024``: every batch arrives. Items sent one by
    one ran the limit out (the worker printed "Too many open files" and the main process waited
    for its batch for ever); here a hang fails the test after two minutes."""
    paths = [_image(tmp_path / f"{i}.jpg", 32, 32, i) for i in range(32)]

    def limit() -> None:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    src = str(Path(dscl.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _UNDER_A_FILE_LIMIT, *paths],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=limit,
        start_new_session=True,  # its workers too are stopped on a hang
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no batch for two minutes under ulimit -n 1024:\n{err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == ["batches", "2"]


# ---------------------------------------------------------------- a stalled loader


def test_a_stalled_loader_stops_with_a_one_line_error(tmp_path, monkeypatch):
    """A worker that never delivers its batch stops the epoch after ``LOADER_TIMEOUT_S`` with a
    one-line ``SetupError`` naming what to check, not the DataLoader's bare RuntimeError (and a
    loader without workers, which a DataLoader refuses a timeout, gets none)."""
    monkeypatch.setattr(feed_module, "LOADER_TIMEOUT_S", 1)
    go_on = tmp_path / "go_on"
    read = JpegBytes.__getitem__

    def stalled(self, item):  # (the workers fork from here, patched)
        while not go_on.exists():
            time.sleep(0.05)
        return read(self, item)

    monkeypatch.setattr(JpegBytes, "__getitem__", stalled)
    dataset = _dataset(tmp_path, count=4, png=False)
    cfg = ViewConfig(view_size=16)
    feed = TrainFeed(
        dataset, kind="views", view_cfg=cfg, batch_size=4, balanced=False, seed=0, device=CPU
    )
    assert feed._loader(dataset, [], 0).timeout == 0
    feed.num_workers = 1
    feed.decoder = DeviceDecoder("views", cfg, CPU)
    try:
        with pytest.raises(SetupError) as info:
            list(feed.epoch(0))
    finally:
        go_on.touch()  # the worker finishes and the loader shuts down now, not at a later test
        gc.collect()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "data.num_workers: no batch came from the 1 DataLoader workers in 1 s"
    )
    assert "ulimit -n" in message and "memory" in message


# ---------------------------------------------------------------- waiting for the queued work


def test_every_decode_on_a_cuda_device_first_waits_for_the_queued_work(tmp_path, monkeypatch):
    """nvJPEG writes its outputs without waiting for the work queued on the current stream
    (pytorch/vision#9606), so the decoder waits for it before each decode: the batch's and,
    when the batch is refused, each single image's. The decoder's device here is CUDA, its
    decode_jpeg torchvision's CPU one."""
    calls: list[str] = []
    monkeypatch.setattr(
        device_decode, "wait_for_queued_work", lambda device: calls.append(f"wait {device}")
    )
    monkeypatch.setattr(
        device_decode, "wait_for_device", lambda device: calls.append(f"idle {device}")
    )
    cfg = ViewConfig(view_size=16)
    dataset = _dataset(tmp_path, count=3)
    source = JpegBytes(FileCrops(dataset, "classify", cfg))
    batch = pack_items([source[(0, i)][0] for i in range(len(dataset))])
    decoder = DeviceDecoder("classify", cfg, torch.device("cuda"))
    cpu_decode, refuse = decoder.decode_jpeg, [False]

    def decode(data, device):
        calls.append(f"decode {device}")
        if refuse[0] and isinstance(data, list):
            raise RuntimeError("refused")
        return cpu_decode(data, device=CPU)

    decoder.decode_jpeg = decode
    images = decoder.decode(batch)
    assert calls == ["wait cuda", "decode cuda"]
    calls.clear()
    refuse[0] = True
    one_by_one = decoder.decode(batch)
    # the batch, the whole device idle (the refused call's outputs), then its three JPEGs
    assert calls == ["wait cuda", "decode cuda", "idle cuda"] + ["wait cuda", "decode cuda"] * 3
    for a, b in zip(images, one_by_one, strict=True):
        assert torch.equal(a, b)


def test_the_wait_synchronises_the_current_cuda_stream_and_nothing_elsewhere(monkeypatch):
    synced: list[torch.device] = []

    class Stream:
        def __init__(self, device):
            self.device = device

        def synchronize(self):
            synced.append(self.device)

    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    wait_for_queued_work(CPU)
    assert synced == []
    wait_for_queued_work(torch.device("cuda", 1))
    assert synced == [torch.device("cuda", 1)]


# ---------------------------------------------------------------- on a GPU


def _busy_gpu(device: torch.device) -> None:
    """Queue some hundred milliseconds of matrix products on ``device``'s current stream."""
    a = torch.randn(8192, 8192, device=device)
    b = torch.empty_like(a)
    for _ in range(4):
        torch.mm(a, a, out=b)
        torch.mm(b, b, out=a)


@pytest.mark.cuda
def test_decoding_on_a_busy_gpu_gives_the_pixels_of_an_idle_one(tmp_path):
    """Blocks of the decoded images' sizes are written by kernels queued behind long matrix
    products and freed at once, so the caching allocator hands them to the decode's outputs: a
    decode that did not wait would be overwritten (pytorch/vision#9606). Every image must equal,
    byte for byte, the same decode on an idle GPU (nvJPEG's own pixels: its IDCT and upsampling
    need not match libjpeg-turbo's), every time."""
    cuda = torch.device("cuda")
    cfg = ViewConfig(view_size=16)
    paths = [_image(tmp_path / f"{i}.jpg", 40 + i, 56 + 2 * i, i) for i in range(16)]
    dataset = ImageFileDataset(paths, [0] * len(paths), ["a"])
    source = JpegBytes(FileCrops(dataset, "classify", cfg))
    batch, _ = collate_items([source[(0, i)] for i in range(len(paths))])
    batch = batch.pin_memory()  # as the DataLoader gives it on CUDA
    assert all(t.is_pinned() for t in _tensors(batch))
    decoder = DeviceDecoder("classify", cfg, cuda)
    torch.cuda.synchronize()
    idle = [image.cpu() for image in decoder.decode(batch)]
    for trial in range(10):
        scratch = [torch.empty(image.shape, dtype=torch.uint8, device=cuda) for image in idle]
        _busy_gpu(cuda)
        for block in scratch:
            block.fill_(trial + 1)
        del scratch
        busy = decoder.decode(batch)
        for i, (a, b) in enumerate(zip(busy, idle, strict=True)):
            assert torch.equal(a.cpu(), b), (trial, i)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["views", "classify"])
def test_the_decoder_makes_its_batch_on_the_gpu_as_on_the_cpu(tmp_path, kind):
    """The whole batch (a PNG cropped in the worker among the JPEGs) made on the GPU: every
    tensor there, the draws equal to the CPU's, the pixels close (nvJPEG's decode differs from
    libjpeg-turbo's by a level here and there)."""
    cuda = torch.device("cuda")
    cfg = ViewConfig(view_size=16, num_patches=2)
    kw = {"request": ViewRequest(("query", "key", "patches"), EXTRA)} if kind == "views" else {}
    dataset = _dataset(tmp_path)
    source = JpegBytes(FileCrops(dataset, kind, cfg, **kw))
    batch, _ = collate_items([source[(7 + i, i)] for i in range(len(dataset))])
    torch.manual_seed(0)
    on_cpu = DeviceDecoder(kind, cfg, CPU, **kw)(batch)
    torch.manual_seed(0)
    on_gpu = DeviceDecoder(kind, cfg, cuda, **kw)(batch.pin_memory())
    assert on_gpu.keys() == on_cpu.keys()
    for name, value in on_gpu.items():
        assert value.device.type == "cuda", name
        assert value.shape == on_cpu[name].shape and value.dtype == on_cpu[name].dtype, name
        if value.is_floating_point() and name != "boxes":
            assert (value.cpu() - on_cpu[name]).abs().mean() < 0.05, name
        else:
            assert torch.equal(value.cpu(), on_cpu[name]), name


def test_patches_cut_for_the_whole_batch_are_each_images_own():
    # The decoder cuts every JPEG item's patches in one batched resample; each image's patches
    # are exactly those of a resample of that image alone (what it did before, image by image).
    from dscl.data.crop_ops import resample_boxes

    g = torch.Generator().manual_seed(0)
    queries = torch.rand(32, 3, 24, 24, generator=g)
    corner = torch.rand(32, 5, 2, generator=g) * 12
    boxes = torch.cat([corner, corner + 3 + torch.rand(32, 5, 2, generator=g) * 8], dim=2)
    flips = torch.rand(32, 5, generator=g) < 0.5
    batched = resample_boxes(queries, boxes, flips, 7)
    for i in range(32):
        alone = resample_boxes(queries[i : i + 1], boxes[i : i + 1], flips[i : i + 1], 7)[0]
        assert torch.equal(batched[i], alone), i
