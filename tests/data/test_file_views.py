"""The fast image-file path (dscl.data.fileviews, dscl.data.decode, TrainFeed file_views="fast").

Against the per-sample path (MultiViewTransform / ClassifierTrainTransform under PositionSeeded)
for the same position seed: the same boxes, flips and colour parameters exactly; pixels equal up
to the uint8 rounding of the crops (stated below); decoding equal to ``to_rgb`` exactly; the same
error messages for bad files; and a resumed epoch equal to an uninterrupted one.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from dscl.config import FeedSettings, RunConfig
from dscl.data import DataError, ImageFileDataset, load_rgb
from dscl.data.classifier_views import ClassifierTrainTransform
from dscl.data.crop_ops import draw_boxes, to_unit
from dscl.data.decode import decode_rgb, jpeg_header, pil_tensor
from dscl.data.draws import boxes_from_uniforms
from dscl.data.fileviews import FileCrops, batch_colors, finish_batch, to_planes
from dscl.data.views import MultiViewTransform, ViewConfig, _finish, draw_view_params
from dscl.engine.feed import PositionSeeded, TrainFeed, eval_batches
from dscl.errors import ConfigError

CPU = torch.device("cpu")
# |fast - per-sample| of a pixel in [0, 1], before colour: the crop is rounded to uint8 (half a
# level), and a patch is cut from the rounded query view (its rounding passes through the
# filter, another half level); torch's uint8 kernel rounds its fixed-point weights too.
CROP_TOLERANCE = 1.5 / 255
COLOUR_TOLERANCE = 1e-6  # batched colour ops on a batch against image by image, same crops


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 with structure at several scales (compresses like a photograph)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((4, 5, 3)) * 255).astype(np.uint8))
    base = np.asarray(low.resize((width, height), Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(0, 12, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save_jpeg(path, height=60, width=80, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth_image(height, width, seed)).save(path, quality=90)
    return str(path)


@pytest.fixture
def jpegs(tmp_path):
    """Six JPEGs of different sizes in two classes, as an ImageFileDataset."""
    sizes = [(60, 80), (80, 60), (47, 101), (64, 64), (33, 90), (75, 52)]
    paths = [save_jpeg(tmp_path / f"{i}.jpg", h, w, i) for i, (h, w) in enumerate(sizes)]
    return ImageFileDataset(paths, [0, 1, 0, 1, 0, 1], ["a", "b"])


def per_sample(dataset: ImageFileDataset, transform, seed: int, index: int):
    dataset.transform = transform
    return PositionSeeded(dataset)[(seed, index)][0]


# ---------------------------------------------------------------- the same random draws


@pytest.mark.parametrize(
    "height, width", [(375, 500), (500, 375), (5, 300), (300, 4), (1, 1), (3, 7), (224, 224)]
)
def test_boxes_from_uniforms_equal_draw_boxes(height, width):
    """Every box, fallback included, equals crop_ops.draw_boxes' for the same uniforms."""
    for seed in range(300):
        for n, scale in ((1, (0.08, 1.0)), (5, (0.05, 0.6)), (3, (0.9, 1.0))):
            g = torch.Generator().manual_seed(seed)
            ref = draw_boxes(n, height, width, scale, (3 / 4, 4 / 3), g, CPU)
            g = torch.Generator().manual_seed(seed)
            u = torch.rand(n, 22, generator=g, dtype=torch.float64)
            mine = boxes_from_uniforms(u, height, width, scale, (3 / 4, 4 / 3))
            assert torch.equal(torch.tensor(mine, dtype=torch.float32), ref), (seed, n)


@pytest.mark.parametrize("color", [True, False])
def test_same_boxes_flips_and_colour_draws_as_the_per_sample_path(jpegs, color):
    cfg = ViewConfig(view_size=32, color_augment=color)
    crops = FileCrops(jpegs, "views", cfg)
    for seed in range(12):
        index = seed % len(jpegs)
        sample, label = crops[(seed, index)]
        assert label == jpegs.targets[index]
        ref = per_sample(jpegs, MultiViewTransform(cfg), seed, index)
        assert torch.equal(sample["boxes"], ref["boxes"])
        assert torch.equal(sample["patch_flips"], ref["patch_flips"])
        height, width = load_rgb(jpegs.paths[index]).size[::-1]
        torch.manual_seed(seed)
        drawn = draw_view_params(cfg, 1, height, width, None)
        assert ("color" in sample) == color
        if color:
            mine = batch_colors(sample["color"][None], cfg)
            theirs = (drawn.query_color, drawn.patch_color, drawn.key_color)
            for a, b in zip(mine, theirs, strict=True):
                for field in ("jitter", "factors", "order", "gray", "blur", "sigma"):
                    assert torch.equal(getattr(a, field), getattr(b, field)), field
                assert a.use_hue == b.use_hue
        else:  # geometry only: the crops themselves, up to the uint8 rounding
            out = finish_batch(default_collate([sample]), "views", cfg, CPU)
            for name in ("query", "key", "patches"):
                diff = ((out[name][0] - ref[name]) * torch.tensor(cfg.std).view(3, 1, 1)).abs()
                assert diff.max() <= CROP_TOLERANCE, name


def test_colour_ops_equal_the_batched_path_on_the_same_crops(jpegs):
    """finish_batch on a batch = the in-memory path's colour ops (views._finish) image by image
    on the same crops with the parameters draw_view_params draws for each position."""
    cfg = ViewConfig(view_size=32)
    crops = FileCrops(jpegs, "views", cfg)
    items = [crops[(100 + i, i)][0] for i in range(len(jpegs))]
    out = finish_batch(default_collate(items), "views", cfg, CPU)
    for i, item in enumerate(items):
        height, width = load_rgb(jpegs.paths[i]).size[::-1]
        torch.manual_seed(100 + i)
        params = draw_view_params(cfg, 1, height, width, None)
        ref = _finish(
            to_planes(item["query"][None]),
            to_planes(item["key"][None]),
            to_planes(item["patches"][None]),
            params,
            cfg,
        )
        for name in ("query", "key", "patches"):
            assert torch.allclose(out[name][i], ref[name][0], atol=COLOUR_TOLERANCE, rtol=0)
        assert torch.equal(out["boxes"][i], ref["boxes"][0])


def test_to_planes_equals_to_unit():
    hwc = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    planes = to_planes(hwc)
    assert planes.is_contiguous() and planes.shape == (2, 3, 5, 7)
    assert torch.equal(planes, to_unit(hwc.permute(0, 3, 1, 2).contiguous()))


def test_stage2_view_equals_the_per_sample_transform(jpegs):
    cfg = ViewConfig(view_size=24)
    crops = FileCrops(jpegs, "classify", cfg)
    for seed in range(12):
        index = seed % len(jpegs)
        view, _ = crops[(seed, index)]
        ref = per_sample(jpegs, ClassifierTrainTransform(24, cfg.mean, cfg.std), seed, index)
        out = finish_batch(view[None], "classify", cfg, CPU)["image"][0]
        diff = ((out - ref) * torch.tensor(cfg.std).view(3, 1, 1)).abs()
        assert diff.max() <= CROP_TOLERANCE  # a different box or flip would differ by far more


# ---------------------------------------------------------------- decoding


def test_jpeg_decode_is_pil_exactly_and_reads_the_header(tmp_path):
    path = save_jpeg(tmp_path / "a.jpg", 45, 70)
    assert torch.equal(decode_rgb(path), pil_tensor(load_rgb(path)))
    header = jpeg_header(open(path, "rb").read())
    assert (header.height, header.width, header.components, header.precision) == (45, 70, 3, 8)
    assert jpeg_header(b"\x89PNG\r\n\x1a\n....") is None and jpeg_header(b"") is None


def _modes(tmp_path):
    rgb = smooth_image(20, 30, 1)
    gray = rgb[..., 0]
    yield "L.png", Image.fromarray(gray, "L")
    yield "L.jpg", Image.fromarray(gray, "L")
    yield "RGBA.png", Image.fromarray(np.dstack([rgb, gray]), "RGBA")
    yield "I16.png", Image.fromarray((gray.astype(np.uint16) * 257 + 3).astype(np.uint16))
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    yield "P.png", palette
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    yield "Pt.png", transparent
    yield "CMYK.jpg", Image.fromarray(rgb).convert("CMYK")
    yield "LA.png", Image.fromarray(np.dstack([gray, gray]), "LA")


def test_every_mode_decodes_to_the_pixels_to_rgb_gives(tmp_path):
    for name, image in _modes(tmp_path):
        path = tmp_path / name
        image.save(path)
        assert Image.open(path).mode == image.mode, name  # the file holds that mode
        assert torch.equal(decode_rgb(str(path)), pil_tensor(load_rgb(str(path)))), name


def test_without_torchvisions_decoder_files_decode_with_pil(tmp_path, monkeypatch, jpegs):
    """torchvision deprecates its image decoders (0.29) and will remove them: without
    ``decode_jpeg`` every file decodes through PIL to the same pixels, a bad file still stops
    with its message, and decoding on the device is refused naming the key."""
    import torchvision.io

    from dscl.data.decode import jpeg_decoder
    from dscl.data.device_decode import DeviceDecoder
    from dscl.errors import SetupError

    paths = [save_jpeg(tmp_path / "a.jpg", 45, 70)]
    for name, image in _modes(tmp_path):
        image.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    before = [decode_rgb(path) for path in paths]
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    assert jpeg_decoder() is None
    for path, pixels in zip(paths, before, strict=True):
        assert torch.equal(decode_rgb(path), pixels), path
    truncated = _bad_files(tmp_path)[1]
    assert _message(lambda: decode_rgb(truncated)) == _message(
        lambda: ImageFileDataset([truncated], [0], ["a"])[0]
    )
    with pytest.raises(SetupError, match=r"^data\.decode_on_device: "):
        DeviceDecoder("views", ViewConfig(view_size=32), CPU)
    with pytest.raises(SetupError, match=r"^data\.decode_on_device: "):  # before any epoch
        _feed(jpegs, "views", decode_on_device=True, device=torch.device("cuda"))


def test_jpeg_draft_decodes_at_a_dct_scale(tmp_path):
    path = save_jpeg(tmp_path / "big.jpg", 300, 400)
    assert decode_rgb(path, 0).shape == (3, 300, 400)
    assert decode_rgb(path, 140).shape == (3, 150, 200)  # 1/2 keeps the side >= 140
    assert decode_rgb(path, 70).shape == (3, 75, 100)  # 1/4
    assert decode_rgb(path, 200).shape == (3, 300, 400)  # no scale keeps 200
    with Image.open(path) as image:
        image.draft("RGB", (100, 75))
        assert torch.equal(decode_rgb(path, 70), pil_tensor(image.convert("RGB")))


# ---------------------------------------------------------------- bad files


def _bad_files(tmp_path):
    whole = open(save_jpeg(tmp_path / "good.jpg", 40, 50), "rb").read()
    files = {
        "corrupt.jpg": b"not an image at all",
        "truncated.jpg": whole[: len(whole) // 2],
        "zero.jpg": b"",
        "header_only.jpg": whole[:200],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [str(tmp_path / name) for name in files]


def _message(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    return str(info.value)


def test_bad_files_stop_with_the_per_sample_message(tmp_path):
    paths = _bad_files(tmp_path)
    dataset = ImageFileDataset(paths, [0] * len(paths), ["a"])
    crops = FileCrops(dataset, "views", ViewConfig(view_size=16))
    for index, path in enumerate(paths):
        expected = _message(lambda i=index: dataset[i])
        assert expected.startswith(f"{path}: unreadable image (") and "\n" not in expected
        assert _message(lambda i=index: crops[(0, i)]) == expected
        assert _message(lambda p=path: decode_rgb(p, 8)) == expected  # the draft path too


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_file_in_an_epoch_is_one_line_naming_it(tmp_path, workers):
    good = [save_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(3)]
    bad = _bad_files(tmp_path)[1]  # truncated
    dataset = ImageFileDataset([*good, bad], [0, 1, 0, 1], ["a", "b"])
    expected = _message(lambda: dataset[3])
    feed = TrainFeed(
        dataset,
        kind="views",
        view_cfg=ViewConfig(view_size=16),
        batch_size=4,
        balanced=False,
        seed=0,
        device=CPU,
        settings=FeedSettings(num_workers=workers),
    )
    assert _message(lambda: list(feed.epoch(0))) == expected


# ---------------------------------------------------------------- the feed


def _feed(dataset, kind, device=CPU, **settings):
    return TrainFeed(
        dataset,
        kind=kind,
        view_cfg=ViewConfig(view_size=16),
        settings=FeedSettings(**settings),
        batch_size=2,
        balanced=kind == "classify",
        seed=3,
        device=device,
    )


@pytest.mark.parametrize("kind", ["views", "classify"])
def test_a_resumed_epoch_gets_the_batches_of_an_uninterrupted_one(jpegs, kind):
    feed = _feed(jpegs, kind)
    assert feed.fast_files and feed.position() is None
    whole = list(feed.epoch(1))
    resumed = list(_feed(jpegs, kind, num_workers=1).epoch(1, start=1))
    assert len(whole) == 3 and len(resumed) == 2
    for a, b in zip(whole[1:], resumed, strict=True):
        assert torch.equal(a.labels, b.labels)
        assert a.inputs.keys() == b.inputs.keys()
        for name in a.inputs:
            assert torch.equal(a.inputs[name], b.inputs[name]), name


def test_per_sample_setting_keeps_the_per_sample_path(jpegs):
    feed = _feed(jpegs, "views", file_views="per_sample")
    assert not feed.fast_files
    batch = next(iter(feed.epoch(0)))
    fast = next(iter(_feed(jpegs, "views").epoch(0)))
    assert torch.equal(batch.inputs["boxes"], fast.inputs["boxes"])  # same draws, either path
    diff = (batch.inputs["query"] - fast.inputs["query"]).abs().max()
    assert 0 < diff < 0.2  # colour amplifies the uint8 rounding, but no other view is made
    with pytest.raises(ValueError, match="file_views"):
        _feed(jpegs, "views", file_views="fastest")


def _jpeg_folder(root):
    for split, counts in (("train", (10, 6)), ("test", (3, 3))):
        for c, count in enumerate(counts):
            for i in range(count):
                save_jpeg(root / split / f"c{c}" / f"{i}.jpg", 30 + 3 * i, 40, 10 * c + i)
    return root


def test_mid_epoch_resume_on_a_jpeg_folder_is_exact(tmp_path, monkeypatch):
    """dscl pretrain on JPEG files (fast path, one worker), stopped by SIGINT after the second
    of 4 steps and resumed: the checkpoint equals an uninterrupted run's bit for bit."""
    import signal

    from dscl.checkpoint import load_checkpoint
    from dscl.cli import main
    from dscl.errors import EXIT_INTERRUPTED

    root = _jpeg_folder(tmp_path / "data")
    args = [
        "data.name=image_folder",
        f"data.root={root}",
        "data.image_size=16",
        "data.val_per_class=1",
        "data.num_workers=1",
        "pretrain.epochs=1",
        "pretrain.batch_size=3",
        "pretrain.queue_size=6",
        "pretrain.warmup_epochs=0",
        "pretrain.save_every_steps=1",
        "threads=1",
        "progress=false",
        f"output_dir={tmp_path}",
    ]
    assert main(["pretrain", "--name", "straight", *args]) == 0
    original = TrainFeed.epoch

    def epoch(self, epoch, start=0, generator_state=None):
        for i, batch in enumerate(original(self, epoch, start, generator_state), start):
            if i == 1:
                signal.raise_signal(signal.SIGINT)
            yield batch

    with monkeypatch.context() as patch:
        patch.setattr(TrainFeed, "epoch", epoch)
        assert main(["pretrain", "--name", "resumed", *args]) == EXIT_INTERRUPTED
    assert load_checkpoint(tmp_path / "resumed" / "pretrain.pt")["next_batch"] == 2
    assert main(["pretrain", "--name", "resumed", "--resume", *args]) == 0
    a = load_checkpoint(tmp_path / "straight" / "pretrain.pt")
    b = load_checkpoint(tmp_path / "resumed" / "pretrain.pt")
    assert (a["next_batch"], b["next_batch"]) == (4, 4)
    for key in ("model", "backbone", "optimizer"):
        flat_a, flat_b = _tensors(a[key]), _tensors(b[key])
        assert flat_a.keys() == flat_b.keys() and flat_a
        for name, value in flat_a.items():
            assert torch.equal(value, flat_b[name]), f"{key}/{name}"


def _tensors(obj, prefix=""):
    """Every tensor leaf of nested dicts and lists, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    out = {}
    for key, value in items:
        out |= _tensors(value, f"{prefix}/{key}")
    return out


def test_file_settings_are_checked_naming_the_key():
    cfg = RunConfig()
    assert (cfg.data.file_views, cfg.data.jpeg_draft) == ("fast", 0)
    cfg.data.file_views = "quick"
    with pytest.raises(ConfigError, match=r"^data\.file_views: 'quick'"):
        cfg.validate()
    cfg.data.file_views, cfg.data.jpeg_draft = "per_sample", 64
    with pytest.raises(ConfigError, match=r"^data\.jpeg_draft: "):
        cfg.validate()
    cfg.data.file_views, cfg.data.jpeg_draft = "fast", -1
    with pytest.raises(ConfigError, match=r"^data\.jpeg_draft: "):
        cfg.validate()


def test_pil_bytes_roundtrip_helper():
    """pil_tensor keeps (H, W, 3) order in memory, as the decoders' output."""
    image = Image.fromarray(smooth_image(6, 9, 2))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    tensor = pil_tensor(Image.open(buffer).convert("RGB"))
    assert tensor.shape == (3, 6, 9) and tensor.permute(1, 2, 0).is_contiguous()


# ---------------------------------------------------------------- decoding on the device


@pytest.mark.parametrize("kind", ["views", "classify"])
def test_device_decode_path_on_the_cpu_equals_the_worker_path(jpegs, tmp_path, kind):
    """data.decode_on_device's two halves run on the CPU here (torchvision's CPU decoder): the
    same draws as the worker path, pixels up to its uint8 rounding; a PNG in the batch is cropped
    in the worker; a bad JPEG stops with the per-sample message."""
    from dscl.data.device_decode import DeviceDecoder, JpegBytes, collate_items

    png = tmp_path / "extra.png"
    Image.fromarray(smooth_image(50, 70, 9)).save(png)
    dataset = ImageFileDataset([*jpegs.paths, str(png)], [*jpegs.targets, 0], ["a", "b"])
    cfg = ViewConfig(view_size=32)
    crops = FileCrops(dataset, kind, cfg)
    positions = [(40 + i, i) for i in range(len(dataset))]
    items, labels = collate_items([JpegBytes(crops)[p] for p in positions])
    assert ["jpeg" in item for item in items] == [True] * len(jpegs) + [False]
    out = DeviceDecoder(kind, cfg, CPU)(items)
    ref = finish_batch(default_collate([crops[p][0] for p in positions]), kind, cfg, CPU)
    assert torch.equal(labels, torch.tensor(dataset.targets))
    std = torch.tensor(cfg.std).view(3, 1, 1)
    names = ("query", "key", "patches") if kind == "views" else ("image",)
    for name in names:
        diff = ((out[name] - ref[name]) * std).abs()
        assert diff.max() <= (0.05 if kind == "views" else CROP_TOLERANCE), (
            name
        )  # colour: see above
    if kind == "views":
        assert torch.equal(out["boxes"], ref["boxes"])
        assert torch.equal(out["patch_flips"], ref["patch_flips"])
    bad = _bad_files(tmp_path)[1]  # truncated: its header parses, the decoder refuses it
    bad_set = ImageFileDataset([bad], [0], ["a"])
    item = JpegBytes(FileCrops(bad_set, kind, cfg))[(0, 0)][0]
    assert "jpeg" in item
    expected = _message(lambda: bad_set[0])
    assert _message(lambda: DeviceDecoder(kind, cfg, CPU)([item])) == expected


def test_decode_on_device_is_a_cuda_option():
    cfg = RunConfig()
    cfg.data.decode_on_device, cfg.data.jpeg_draft = True, 64
    with pytest.raises(ConfigError, match=r"^data\.decode_on_device: "):
        cfg.validate()


def test_the_feed_decodes_on_the_device_only_when_it_is_cuda(jpegs):
    feed = _feed(jpegs, "views", decode_on_device=True)
    assert not feed.device_decode  # a CPU: the workers decode
    plain = list(feed.epoch(0))
    assert feed.decoder is None
    # the CUDA code path, with torchvision's CPU decoder
    from dscl.data.device_decode import DeviceDecoder

    feed.decoder = DeviceDecoder("views", feed.view_cfg, CPU)
    assert feed.device_decode
    forced = list(feed.epoch(0, start=1))
    for a, b in zip(plain[1:], forced, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.inputs["boxes"], b.inputs["boxes"])
        assert (a.inputs["query"] - b.inputs["query"]).abs().max() < 0.25


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("size", [16, 64])
@pytest.mark.parametrize("workers", [0, 1])
def test_fast_evaluation_equals_the_per_sample_transform(tmp_path, size, workers):
    """Decoded, resized and centre-cropped in uint8 by the workers, normalised a batch at a time
    (in the workers on a CPU): the per-sample EvalTransform's views up to the uint8 rounding,
    every mode of image included, in order, with the labels."""
    sizes = [(60, 80), (80, 60), (47, 101), (64, 64), (33, 90)]
    paths = [save_jpeg(tmp_path / f"{i}.jpg", h, w, i) for i, (h, w) in enumerate(sizes)]
    for name, image in _modes(tmp_path):  # 16-bit, palette, alpha, grayscale, CMYK
        image.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    dataset = ImageFileDataset(paths, [i % 2 for i in range(len(paths))], ["a", "b"])
    cfg = ViewConfig(view_size=size)
    kw = {"batch_size": 3, "device": CPU}
    fast = list(eval_batches(dataset, cfg, settings=FeedSettings(num_workers=workers), **kw))
    per_sample = FeedSettings(num_workers=workers, file_views="per_sample")
    slow = list(eval_batches(dataset, cfg, settings=per_sample, **kw))
    assert len(fast) == len(slow) == -(-len(paths) // 3)
    for (a, ya), (b, yb) in zip(fast, slow, strict=True):
        assert torch.equal(ya, yb) and a.shape == b.shape == (len(ya), 3, size, size)
        diff = ((a - b) * torch.tensor(cfg.std).view(1, 3, 1, 1)).abs().max()
        assert diff <= CROP_TOLERANCE, float(diff)


def test_fast_evaluation_stops_at_a_bad_file_with_its_message(tmp_path):
    good = [save_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(3)]
    bad = _bad_files(tmp_path)[0]  # corrupt
    dataset = ImageFileDataset([*good, bad], [0, 1, 0, 1], ["a", "b"])
    expected = _message(lambda: dataset[3])
    for workers in (0, 1):
        batches = eval_batches(
            dataset,
            ViewConfig(view_size=16),
            batch_size=2,
            device=CPU,
            settings=FeedSettings(num_workers=workers),
        )
        assert _message(lambda b=batches: list(b)) == expected


@pytest.mark.parametrize("workers", [0, 1])
def test_fast_evaluation_share_is_every_world_th_batch(jpegs, workers):
    """A rank's share of the evaluation batches (kNN monitor under several processes): the
    one-process batches rank, rank + world, ..., the same images and labels."""
    kw = {"batch_size": 2, "device": CPU, "settings": FeedSettings(num_workers=workers)}
    cfg = ViewConfig(view_size=16)
    whole = list(eval_batches(jpegs, cfg, **kw))
    assert len(whole) == 3
    for world in (2, 4):  # with 4 ranks, rank 3 gets no batch
        for rank in range(world):
            share = list(eval_batches(jpegs, cfg, rank=rank, world=world, **kw))
            assert len(share) == len(whole[rank::world])
            for (x, y), (want_x, want_y) in zip(share, whole[rank::world], strict=True):
                assert torch.equal(y, want_y) and torch.equal(x, want_x)
