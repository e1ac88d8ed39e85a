"""Speed of the DSCL view + patch transform: batched (one call per batch) against per sample.

    python benchmarks/views_speed.py --batch-size 256 --sizes 28 32 --repeats 7

Prints the median milliseconds per batch for the batched path and the per-sample path over the
same images, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dscl.data.views import BatchedMultiView, MultiViewTransform, ViewConfig


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for size in args.sizes:
        cfg = ViewConfig(view_size=size)
        images = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8)
        batched, per_sample = BatchedMultiView(cfg), MultiViewTransform(cfg)
        gen = torch.Generator().manual_seed(0)
        b_ms = median_ms(lambda: batched(images, generator=gen), args.repeats)  # noqa: B023
        p_ms = median_ms(
            lambda: [per_sample(img, generator=gen) for img in images],  # noqa: B023
            max(1, args.repeats // 3),
        )
        print(
            f"{size:>3}px batch {args.batch_size}, {args.threads} thread(s): batched "
            f"{b_ms:7.1f} ms, per-sample {p_ms:8.1f} ms ({p_ms / b_ms:.1f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
