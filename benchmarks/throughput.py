"""Stage-1 training throughput: the training step itself, its split into phases, and the compute
limit of the same settings.

For each setting this builds stage 1 as ``dscl pretrain`` does
(:func:`dscl.engine.pretrain.build_stage1`: the method, its feed, SGD with the warm-up + cosine
schedule) and times :func:`dscl.engine.loop.run_epoch` (the function ``dscl pretrain`` runs) on
in-memory synthetic images of the setting's size: the same views on the device, method step,
backward, optimizer, EMA and queue. It prints images/s (median over timed epochs of a few
steps, with no synchronisation inside an epoch), then, from one more epoch, the share of a step
spent making views, in the forward pass, the backward pass and the update (optimizer + EMA +
queue), and peak memory (RSS of the process so far on a CPU, the setting's allocated memory on a
GPU). The synthetic images of a setting are made once, for both measurements.

The *compute limit* is the same encoder work with nothing else: the query view, key view and
patches are made once, and each step only runs the query and patch forward + backward and the key
forward, with no losses, no optimizer and no bookkeeping. "share of limit" = training images/s
divided by limit images/s.

    python benchmarks/throughput.py                        # demo and cifar settings, on a CPU
    python benchmarks/throughput.py --setting imagenet --steps 2 --epochs 1
    python benchmarks/throughput.py --setting cifar --setting imagenet --device cuda --amp bf16
    python benchmarks/throughput.py --setting demo --compile   # torch.compile, as compile=true

"one-off s" is the warm-up epoch's time beyond a steady epoch of the same steps: kernel
selection and, with --compile, the compile itself (the limit is then measured compiled too).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from dscl.config import build_config
from dscl.data.synthetic import make_synthetic
from dscl.data.views import BatchedMultiView, ViewConfig
from dscl.engine import runtime
from dscl.engine.loop import EpochSpan, StepTimes, run_epoch
from dscl.engine.pretrain import build_stage1, training_only_context

SETTINGS = {
    # name: (backbone, view size, patch size, source image size, default batch)
    "demo": ("resnet32", 28, 8, 28, 128),
    "cifar": ("resnet32", 32, 16, 32, 128),
    "imagenet": ("resnet50", 224, 64, 256, 32),
}
PHASES = ("data", "forward", "backward", "update")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


_IMAGES: dict[tuple, object] = {}


def synthetic_images(counts: tuple[int, ...], size: int):
    """The synthetic training set of ``counts`` images per class at ``size`` px, made once per
    process (the training and limit measurements of a setting share it; making it takes longer
    than a measurement at 224 px)."""
    key = (counts, size)
    if key not in _IMAGES:
        _IMAGES[key] = make_synthetic(list(counts), size, seed=0, stream=0)
    return _IMAGES[key]


def build(setting: str, args, device: torch.device):
    """The setting's stage 1 as ``dscl pretrain`` builds it (:func:`build_stage1`), started."""
    backbone, view, patch, source, default_batch = SETTINGS[setting]
    batch = args.batch_size or default_batch
    cfg = build_config(None, [f"method={args.method}", *args.set])  # a method's settings too
    cfg.model.backbone = backbone
    cfg.pretrain.queue_size = args.queue_size
    cfg.pretrain.batch_size = batch
    cfg.pretrain.epochs = args.epochs + 2  # the schedule covers the warm-up and phase-split epochs
    cfg.channels_last = not args.no_channels_last
    cfg.compile = args.compile  # what `dscl pretrain compile=true` does
    view_cfg = ViewConfig(view_size=view, patch_size=patch)
    counts = [batch * args.steps // 10 + 1] * 10
    images = synthetic_images(tuple(counts), source)
    amp = runtime.amp_dtype(args.amp, device)
    ctx = training_only_context(cfg, images, view_cfg, device, amp)
    # --all-patches: patch pixels whether the method reads them
    stage = build_stage1(ctx, all_views=args.all_patches)
    stage.method.start_training()
    return cfg, view_cfg, stage, batch


def measure_training(setting: str, args, device: torch.device) -> dict:
    """Images/s of run_epoch (median over epochs after one warm-up epoch), then the phase split
    from one more epoch: the split synchronises the device after every phase, which would slow
    a GPU's images/s, so the two are measured apart."""
    _, _, stage, batch = build(setting, args, device)
    method, feed, opt = stage.method, stage.feed, stage.opt
    steps = feed.steps_per_epoch
    speeds, warmup = [], 0.0
    for epoch in range(args.epochs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run_epoch(method, feed.epoch(epoch), opt, EpochSpan(epoch, steps))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch == 0:  # warms up (allocator, oneDNN kernels, cuDNN autotuning, compile)
            warmup = time.perf_counter() - start
        else:
            speeds.append(steps * batch / (time.perf_counter() - start))
    split = {}
    if args.phases:
        times = StepTimes(device)
        epoch = args.epochs + 1
        run_epoch(method, feed.epoch(epoch), opt, EpochSpan(epoch, steps), times=times)
        total = sum(times.seconds.get(p, 0.0) for p in PHASES)
        split = {p: times.seconds.get(p, 0.0) / total for p in PHASES}
    rate = statistics.median(speeds)
    # the warm-up epoch's time beyond a steady epoch: one-off costs such as compiling
    extra = warmup - steps * batch / rate
    return {"images_per_s": rate, "split": split, "batch": batch, "warmup_extra_s": extra}


def measure_limit(setting: str, args, device: torch.device) -> float:
    """Images/s of the encoders' forward + backward alone on fixed, precomputed inputs."""
    cfg, view_cfg, stage, batch = build(setting, args, device)
    model = stage.method.model
    fmt = stage.opt.memory_format
    moco = getattr(model, "contrastive", model)  # paco keeps its MoCo model beside a classifier
    encoder = getattr(moco, "query_encoder", None)
    two_views = args.method == "bcl"  # one backbone pass over both views, no momentum encoder
    # bcl on its authors' views: a third (classifier) view in the same backbone pass
    class_view = two_views and cfg.section("bcl").augment == "authors"
    views = BatchedMultiView(view_cfg)
    images = stage.feed.images[:batch]
    x = views(images, generator=torch.Generator(device=device).manual_seed(0))
    query = x["query"].contiguous(memory_format=fmt)
    key = x["key"].contiguous(memory_format=fmt)
    patches = x["patches"].flatten(0, 1).contiguous(memory_format=fmt)  # (B·L, 3, p, p)
    with_patches = "pbsd" in args.method

    def work() -> None:
        with runtime.autocast(device, stage.opt.amp):
            if two_views:
                third = query if class_view else None
                out = sum(t.float().sum() for t in model(query, key, third))
            elif encoder is None:  # ce: one view through backbone + linear layer
                out = model(query).float().sum()
            else:
                out = encoder(query).float().sum()
                if with_patches:
                    out = out + encoder(patches).float().sum()
                with torch.no_grad():
                    moco.momentum_encoder(key)
        out.backward()

    rates = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:
            rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), action="append")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--amp", default="off", choices=("auto", "off", "bf16", "fp16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--method", default="dscl+pbsd")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-phases", dest="phases", action="store_false")
    parser.add_argument(
        "--cudnn-benchmark",
        action="append",
        choices=("on", "off"),
        help="torch.backends.cudnn.benchmark for each setting (repeatable: on and off measure "
        "each setting twice, in this order); default: torch's",
    )
    parser.add_argument("--compile", action="store_true", help="as compile=true in a config")
    parser.add_argument(
        "--all-patches",
        action="store_true",
        help="make patch pixels even for a method that reads none (as before they were skipped)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config setting, e.g. bcl.augment=stage1 (repeatable)",
    )
    args = parser.parse_args()
    runtime.set_threads(args.threads)
    device = runtime.select_device(args.device)
    print(
        f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, amp={args.amp}, "
        f"method {args.method} {' '.join(args.set)}, compile={args.compile}",
        flush=True,
    )
    header = "| setting | backbone | view/patch px | batch | cudnn benchmark | images/s | limit "
    header += "images/s | share of limit | data | forward | backward | update | peak memory GiB "
    header += "| one-off s |"
    print(header)
    print("|" + "---|" * 14)
    for setting in args.setting or ["demo", "cifar"]:
        for bench in args.cudnn_benchmark or [None]:
            if bench is not None:
                torch.backends.cudnn.benchmark = bench == "on"
            print_setting(setting, args, device, torch.backends.cudnn.benchmark)
    sys.stdout.flush()


def print_setting(setting: str, args, device: torch.device, cudnn_benchmark: bool) -> None:
    """Measure ``setting`` and print its row as soon as it is measured."""
    backbone, view, patch, _, _ = SETTINGS[setting]
    if device.type == "cuda":  # each setting's own peak (a CPU's peak RSS cannot be reset)
        torch.cuda.reset_peak_memory_stats(device)
    trained = measure_training(setting, args, device)
    limit = measure_limit(setting, args, device)
    split = trained["split"]
    cells = [f"{100 * split[p]:.0f}%" if split else "-" for p in PHASES]
    bench = ("on" if cudnn_benchmark else "off") if device.type == "cuda" else "-"
    print(
        f"| {setting} | {backbone} | {view}/{patch} | {trained['batch']} | {bench} | "
        f"{trained['images_per_s']:.1f} | {limit:.1f} | "
        f"{100 * trained['images_per_s'] / limit:.0f}% | " + " | ".join(cells) + " | "
        f"{peak_memory_gib(device):.2f} | {trained['warmup_extra_s']:.1f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
