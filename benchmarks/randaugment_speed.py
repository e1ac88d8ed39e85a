"""Speed of RandAugment on one batch: batched (``dscl.data.randaugment``) against image by image.

    python benchmarks/randaugment_speed.py [--size 32 --batch 64 --ops 2 --magnitude 10]
    python benchmarks/randaugment_speed.py --device cuda

"per image" is how named views ran RandAugment before it was batched: torchvision's
``v2.RandAugment`` on each image under torch's CPU RNG seeded with the image's seed (a
``fork_rng`` per image, the seeds read with ``.tolist()``). "batched" is ``randaugment`` on the
same images and seeds. The two alternate over ``--rounds`` in one process; each round times
``--repeats`` calls after a warm-up, and the script prints each way's median over all calls
(milliseconds a batch) and the median of the per-round ratios. On a GPU every call is
synchronised before its clock stops.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.transforms import v2

from dscl.data.draws import SEED_LIMIT
from dscl.data.randaugment import randaugment


def per_image(images: torch.Tensor, seeds: torch.Tensor, ops: int, magnitude: int) -> torch.Tensor:
    """The per-image RandAugment named views used before the batched one (the reference)."""
    transform = v2.RandAugment(num_ops=ops, magnitude=magnitude)
    out = torch.empty_like(images)
    for i, seed in enumerate(seeds.tolist()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out[i] = transform(images[i])
    return out


def times_ms(fn, repeats: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, after one."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ops", type=int, default=2)
    parser.add_argument("--magnitude", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    seeds = torch.randint(0, SEED_LIMIT, (args.batch,), generator=g).to(device)
    ways = {
        "per image": lambda: per_image(images, seeds, args.ops, args.magnitude),
        "batched": lambda: randaugment(images, seeds, args.ops, args.magnitude),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    ratios = []
    for _ in range(args.rounds):
        medians = {}
        for name, fn in ways.items():
            t = times_ms(fn, args.repeats, device)
            times[name] += t
            medians[name] = statistics.median(t)
        ratios.append(medians["per image"] / medians["batched"])
    print(
        f"RandAugment({args.ops}, {args.magnitude}), batch {args.batch} of {args.size} px, "
        f"{device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
        f"median of {args.rounds}×{args.repeats} calls, ms a batch"
    )
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"  {name:9s} {ms:8.2f}  ({1e3 * ms / args.batch:.0f} µs an image)")
    print(f"  per image / batched: {statistics.median(ratios):.2f}× (median of per-round ratios)")


if __name__ == "__main__":
    main()
