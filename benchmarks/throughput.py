"""Stage-1 training throughput (images/s) and peak memory on synthetic data.

Runs the real training step (views on the device, query/key/patch forward, DSCL + PBSD losses,
backward, SGD, EMA and queue update) for a CIFAR-sized (ResNet-32, 32 px) or ImageNet-sized
(ResNet-50, 224 px) setting, and prints one line per setting with the median over timed steps.

    python benchmarks/throughput.py --setting cifar --steps 20 --amp bf16
    python benchmarks/throughput.py --setting imagenet --batch-size 128 --amp bf16 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dscl.config import RunConfig
from dscl.data.views import BatchedMultiView, ViewConfig
from dscl.engine import runtime
from dscl.engine.pretrain import ContrastiveObjective
from dscl.models import ContrastiveModel, build_backbone

SETTINGS = {
    # name: (backbone, view size, source image size, default batch)
    "cifar": ("resnet32", 32, 32, 256),
    "fmnist": ("resnet32", 28, 28, 128),
    "imagenet": ("resnet50", 224, 256, 64),
}


def measure(
    setting: str,
    *,
    steps: int,
    warmup: int,
    batch_size: int | None,
    amp: str,
    device: str,
    channels_last: bool,
    method: str,
) -> dict:
    backbone_name, view, source, default_batch = SETTINGS[setting]
    batch = batch_size or default_batch
    dev = runtime.select_device(device)
    dtype = runtime.amp_dtype(amp, dev)
    cfg = RunConfig(method=method)
    cfg.pretrain.queue_size = 4096
    model = ContrastiveModel(build_backbone(backbone_name), queue_size=4096).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    model.init_momentum_encoder()
    objective = ContrastiveObjective(cfg)
    views = BatchedMultiView(ViewConfig(view_size=view))
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=5e-4
    )
    gen = torch.Generator(device=dev).manual_seed(0)
    images = torch.randint(
        0, 256, (batch, 3, source, source), dtype=torch.uint8, device=dev, generator=gen
    )
    labels = torch.randint(0, 100, (batch,), device=dev, generator=gen)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for step in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        v = views(images, generator=gen)
        q, k = (v[name].contiguous(memory_format=fmt) for name in ("query", "key"))
        with runtime.autocast(dev, dtype):
            out = model(q, k, v["patches"], v["boxes"])
            loss, parts = objective(out, labels, model.queue)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_momentum_encoder(0.999)
        model.queue.enqueue(parts["_keys"].float(), parts["_labels"])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return {
        "setting": setting,
        "backbone": backbone_name,
        "view": view,
        "batch": batch,
        "amp": str(dtype).replace("torch.", "") if dtype else "fp32",
        "device": str(dev),
        "channels_last": channels_last,
        "median_step_s": median,
        "images_per_s": batch / median,
        "peak_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), action="append")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--method", default="dscl+pbsd")
    parser.add_argument("--no-channels-last", action="store_true")
    args = parser.parse_args()
    for setting in args.setting or ["cifar"]:
        r = measure(
            setting,
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.batch_size,
            amp=args.amp,
            device=args.device,
            channels_last=not args.no_channels_last,
            method=args.method,
        )
        print(
            f"{r['setting']:>8} {r['backbone']:>9} {r['view']:>3}px batch {r['batch']:>4} "
            f"{r['amp']:>8} {r['device']:>6} channels_last={r['channels_last']}: "
            f"{r['images_per_s']:8.1f} images/s (median step {r['median_step_s'] * 1e3:.1f} ms)"
            + (f", peak GPU memory {r['peak_gib']:.2f} GiB" if r["device"] != "cpu" else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
