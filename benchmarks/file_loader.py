"""Images/s of the image-file loaders, per loader process, and end to end with a near-free network.

    python benchmarks/file_loader.py --files 300 --repeats 3 [--authors /path/to/DSCL] [--e2e]

Makes (or takes, ``--folder``) a folder of JPEGs of ImageNet's typical size (500x375 and
375x500, quality 90) and times, in this one process with one thread, every row over every file:

- the decode-only ceilings: PIL (``load_rgb``, what the per-sample path decodes with) and
  torchvision's libjpeg-turbo ``decode_jpeg`` (``dscl.data.decode.decode_rgb``);
- today's per-sample path (``data.file_views=per_sample``): decode + ``MultiViewTransform`` (stage
  1) or ``ClassifierTrainTransform`` (stage 2) under ``PositionSeeded``, what one DataLoader
  worker does per image;
- the fast path (``data.file_views=fast``): the worker part alone (``FileCrops``: decode once,
  uint8 crops) and end to end (worker part + collate + the batched colour ops of
  ``finish_batch`` on this machine's device, batches of 32);
- the fast path with ``data.jpeg_draft`` = the view size (PIL's DCT-scaled decoding);
- with ``--authors PATH`` (a checkout of github.com/SY-Xuan/DSCL), the authors' loader: their
  ``ImageNetLT`` dataset and their ``main.py`` transforms (imported from PATH and run from
  there, as ``benchmarks/authors_side_by_side.py`` does), one item at a time.

Stage 1 is 224 px views with five 64 px patches, then 64 px views with five 18 px patches; stage 2
is one view. The rows of one repetition run one after the other and the repetitions alternate,
so a ratio is taken between rows of the same repetition; medians over the repetitions are
printed. ``--e2e`` then trains stage 1 (``dscl pretrain``) from the folder with a one-convolution
backbone registered here, so the data path decides the speed, once with each setting and the
same number of workers, and prints images/s of the second epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import default_collate

from dscl.data import ImageFileDataset, load_rgb
from dscl.data.classifier_views import ClassifierTrainTransform, EvalTransform
from dscl.data.crop_ops import normalise
from dscl.data.decode import decode_rgb
from dscl.data.fileviews import EvalCrops, FileCrops, finish_batch, to_planes
from dscl.data.views import MultiViewTransform, ViewConfig
from dscl.engine.feed import PositionSeeded

SIZES = ((500, 375), (375, 500))  # (width, height): ImageNet's most common sizes
BATCH = 32  # end-to-end rows: items per finish_batch call
CLASSES = 4


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth shapes plus texture and noise: compresses about as a photograph does."""
    coarse = Image.fromarray(
        (rng.random((height // 25 + 2, width // 25 + 2, 3)) * 255).astype("u1")
    )
    fine = Image.fromarray((rng.random((height // 5, width // 5, 3)) * 255).astype("u1"))
    pixels = 0.6 * np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32)
    pixels += 0.3 * np.asarray(fine.resize((width, height), Image.BILINEAR), np.float32)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_jpeg(job: tuple[Path, int, int]) -> None:
    """File ``index`` of a split: its own generator, so the files do not depend on the order or
    the process that writes them."""
    path, split_seed, index = job
    width, height = SIZES[0] if index % 5 else SIZES[1]
    rng = np.random.default_rng([split_seed, index])
    photo_like(width, height, rng).save(path, quality=90)


def make_folder(root: Path, files: int) -> None:
    """``files`` JPEGs under root/train/c<k>/ and one per class under root/test/c<k>/, written by
    one process per core (a few hundred take seconds instead of a minute)."""
    from multiprocessing import get_context

    jobs = []
    for split_seed, (split, count) in enumerate((("train", files), ("test", CLASSES))):
        for i in range(count):
            path = root / split / f"c{i % CLASSES}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((path, split_seed, i))
    start = time.perf_counter()
    with get_context("spawn").Pool(len(os.sched_getaffinity(0))) as pool:
        pool.map(_write_jpeg, jobs, chunksize=8)
    print(f"wrote {len(jobs)} JPEGs in {time.perf_counter() - start:.1f} s", flush=True)


def train_files(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "train").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ rows


def per_item(fn: Callable[[int], object], n: int) -> Callable[[], None]:
    def run() -> None:
        for i in range(n):
            fn(i)

    return run


def end_to_end(crops: FileCrops, kind: str, cfg: ViewConfig, n: int, device) -> Callable:
    def run() -> None:
        for start in range(0, n - BATCH + 1, BATCH):
            items = [crops[(i, i)] for i in range(start, start + BATCH)]
            sample, labels = default_collate(items)
            out = finish_batch(sample, kind, cfg, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            del out, labels

    return run


_AUTHORS: dict[Path, object] = {}


def authors_dataset(path: Path, root: Path, files: list[str], view: int, patch: int):
    """Their ImageNetLT dataset with their main.py transforms at ``view``/``patch`` px."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import authors_side_by_side as side  # noqa: PLC0415 (their import machinery, reused)

    if path not in _AUTHORS:  # their modules can be imported once per process
        _AUTHORS[path] = side.import_authors(path)
        side.patch_for_current_torchvision(_AUTHORS[path])
    code = _AUTHORS[path]
    lists = root / "datasets" / "ImageNet_LT"
    lists.mkdir(parents=True, exist_ok=True)
    annotations = [
        {"fpath": os.path.relpath(f, root), "category_id": i % CLASSES} for i, f in enumerate(files)
    ]
    (lists / "train.json").write_text(
        json.dumps({"annotations": annotations, "num_classes": CLASSES})
    )
    counts = {str(c): sum(1 for a in annotations if a["category_id"] == c) for c in range(CLASSES)}
    (lists / "train_class_number.json").write_text(json.dumps(counts))
    args = code.main.parser.parse_args([str(root), "-b", str(BATCH), "-j", "0"])
    args.distributed = False
    return side.build_authors_loader(code, args, root, view, patch).dataset


def rows_for(setting: str, files: list[str], root: Path, args, device) -> dict[str, Callable]:
    view = 224 if setting.endswith("224") else 64
    stage = 1 if setting.startswith("stage 1") else 2
    cfg = ViewConfig(view_size=view)
    n = len(files)
    dataset = ImageFileDataset(
        files, [i % CLASSES for i in range(n)], [str(c) for c in range(CLASSES)]
    )
    kind = "views" if stage == 1 else "classify"
    rows: dict[str, Callable] = {
        "decode only: PIL (load_rgb)": per_item(lambda i: load_rgb(files[i]), n),
        "decode only: torchvision decode_jpeg": per_item(lambda i: decode_rgb(files[i]), n),
    }
    if setting.startswith("evaluation"):  # the centre view of validation, test and the kNN bank
        dataset.transform = EvalTransform(view, cfg.mean, cfg.std)
        rows["today: per-sample (file_views=per_sample)"] = per_item(lambda i: dataset[i], n)
        crops = EvalCrops(dataset, cfg)
        rows["new: worker part (file_views=fast)"] = per_item(lambda i: crops[i], n)

        def eval_end_to_end() -> None:
            for start in range(0, n - BATCH + 1, BATCH):
                images, _ = default_collate([crops[i] for i in range(start, start + BATCH)])
                normalise(to_planes(images.to(device)), cfg.mean, cfg.std)

        rows[f"new: end to end, normalised on {device.type}"] = eval_end_to_end
        return rows
    if stage == 1:
        dataset.transform = MultiViewTransform(cfg)
    else:
        dataset.transform = ClassifierTrainTransform(view, cfg.mean, cfg.std)
    today = PositionSeeded(dataset)
    rows["today: per-sample (file_views=per_sample)"] = per_item(lambda i: today[(i, i)], n)
    if args.authors and stage == 1:
        theirs = authors_dataset(args.authors, root, files, view, cfg.patch_px)
        rows["authors' loader (ImageNetLT + their transforms)"] = per_item(lambda i: theirs[i], n)
    crops = FileCrops(dataset, kind, cfg)
    rows["new: worker part (file_views=fast)"] = per_item(lambda i: crops[(i, i)], n)
    rows[f"new: end to end, colour on {device.type}"] = end_to_end(crops, kind, cfg, n, device)
    draft = FileCrops(dataset, kind, cfg, draft_side=view)
    rows[f"new: worker part, jpeg_draft={view}"] = per_item(lambda i: draft[(i, i)], n)
    return rows


def time_rows(rows: dict[str, Callable], n: int, repeats: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():
        fn()  # warm-up: file cache, lazy imports
    for _ in range(repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            count = n if "end to end" not in name else (n // BATCH) * BATCH
            rates[name].append(count / elapsed)
    return rates


def print_table(setting: str, rates: dict[str, list[float]]) -> None:
    today = rates["today: per-sample (file_views=per_sample)"]
    ceiling = rates["decode only: torchvision decode_jpeg"]
    print(f"\n### {setting}\n")
    print("| loader | images/s per process | vs today | vs decode_jpeg ceiling |")
    print("| --- | --- | --- | --- |")
    for name, values in rates.items():
        vs_today = statistics.median(v / t for v, t in zip(values, today, strict=True))
        vs_ceiling = statistics.median(v / c for v, c in zip(values, ceiling, strict=True))
        print(
            f"| {name} | {statistics.median(values):.1f} | {vs_today:.2f}x | "
            f"{100 * vs_ceiling:.0f}% |",
            flush=True,
        )


# ----------------------------------------------------------------------------- end to end


def register_free_backbone() -> str:
    """A one-convolution backbone (32x32 patches, stride 32): nearly free, so the data decide."""
    from dscl.models.backbones import Backbone, register_backbone

    class OneConv(Backbone):
        out_channels, stride = 16, 32

        def __init__(self, in_channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(in_channels, 16, kernel_size=32, stride=32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    @register_backbone("bench_one_conv")
    def build(*, in_channels: int = 3, pretrained: bool = False) -> Backbone:
        return OneConv(in_channels)

    return "bench_one_conv"


MODES = {  # --modes: the settings of each end-to-end run
    "per_sample": ("data.file_views=per_sample",),
    "fast": ("data.file_views=fast",),
    "fast+device_decode": ("data.file_views=fast", "data.decode_on_device=true"),
}


def train_rate(root: Path, out: Path, name: str, mode: str, args) -> float:
    from dscl.cli import main as dscl_main

    argv = [
        "pretrain",
        "--name",
        name,
        "--overwrite",
        f"output_dir={out}",
        "data.name=image_folder",
        f"data.root={root}",
        "data.val_per_class=1",
        "data.image_size=224",
        f"data.num_workers={args.workers}",
        *MODES[mode],
        f"model.backbone={args.backbone}",
        f"device={args.device}",
        "pretrain.epochs=2",
        f"pretrain.batch_size={args.batch_size}",
        "pretrain.queue_size=256",
        "pretrain.warmup_epochs=0",
        f"threads={args.threads}",
        "progress=false",
        "log_every=1",
        "save_every_minutes=0",
    ]
    if dscl_main(argv) != 0:
        raise SystemExit(f"dscl pretrain failed: {argv}")
    records = [
        json.loads(line) for line in (out / name / "train_log.jsonl").read_text().splitlines()
    ]
    last = [r for r in records if r.get("stage") == "pretrain" and "images_per_sec" in r]
    return float(last[-1]["images_per_sec"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--folder",
        type=Path,
        help="a folder made by this script (train/, test/); a new or empty one is made here and "
        "kept, so later runs time the same files",
    )
    parser.add_argument("--files", type=int, default=300, help="JPEGs to make (default 300)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--authors", type=Path, help="a checkout of github.com/SY-Xuan/DSCL")
    parser.add_argument(
        "--device", default="cpu", help="where the colour ops run and end-to-end runs train"
    )
    parser.add_argument(
        "--setting",
        nargs="+",
        default=["stage 1, 224", "stage 2, 224", "stage 1, 64", "stage 2, 64", "evaluation, 224"],
        choices=["stage 1, 224", "stage 2, 224", "stage 1, 64", "stage 2, 64", "evaluation, 224"],
    )
    parser.add_argument("--e2e", action="store_true", help="also train stage 1 from the folder")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end figure")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (main process)")
    parser.add_argument(
        "--backbone", default="bench_one_conv", help="end to end: the network (default one conv)"
    )
    parser.add_argument("--batch-size", type=int, default=BATCH, help="end to end: the batch")
    parser.add_argument("--modes", nargs="+", default=["per_sample", "fast"], choices=sorted(MODES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
        f"{args.threads} thread(s)"
    )
    with tempfile.TemporaryDirectory(prefix="dscl_file_loader_") as tmp:
        root = args.folder or Path(tmp) / "jpegs"
        if args.folder is None or not root.exists() or not any(root.iterdir()):
            make_folder(root, args.files)
        files = train_files(root)
        if not files:
            parser.error(
                f"--folder {root}: no files under {root / 'train'}; give a folder this "
                "script made, or a new path"
            )
        sizes = [os.path.getsize(f) for f in files]
        print(f"{len(files)} JPEGs in {root}, mean {statistics.mean(sizes) / 1e3:.0f} kB")
        if not args.e2e_only:
            for setting in args.setting:
                rows = rows_for(setting, files, Path(tmp), args, device)
                print_table(setting, time_rows(rows, len(files), args.repeats))
        if args.e2e or args.e2e_only:
            register_free_backbone()
            rates: dict[str, list[float]] = {mode: [] for mode in args.modes}
            print(
                f"\nstage 1 end to end, {args.backbone}, 224 px + 5x64 px, batch "
                f"{args.batch_size}, {args.workers} workers, {args.threads} thread(s), device "
                f"{args.device}: images/s of the second epoch (median of {args.repeats})",
                flush=True,
            )
            for rep in range(args.repeats):
                for mode in rates:
                    run = f"{mode.replace('+', '_')}{rep}"
                    rates[mode].append(train_rate(root, Path(tmp) / "runs", run, mode, args))
                    print(f"  {mode}, run {rep + 1}: {rates[mode][-1]:.1f}", flush=True)
            first = rates[args.modes[0]]
            for mode, values in rates.items():
                ratio = statistics.median(v / f for v, f in zip(values, first, strict=True))
                print(
                    f"  {mode}: {statistics.median(values):.1f} ({ratio:.2f}x {args.modes[0]}; "
                    f"runs {[round(v, 1) for v in values]})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
