"""Speed of the colour ops and normalisation of one stage-1 batch on a CPU, milliseconds an image.

    python benchmarks/color_speed.py [--view 224 --patch 64 --batch 32 --repeats 7]
    python benchmarks/color_speed.py --against /tmp/dscl_before   # a checkout of another commit

One batch as the fast file path finishes it: B query views (jitter with hue, grayscale, blur),
B key views (jitter without hue) and 5·B patches (as the queries), each normalised. Times the
ways ``color_ops.apply_color`` can take on a CPU named in ``--ways`` ("auto": what a run uses,
the default; "subset": every image batched; "per_image": every image one at a time in place),
and with ``--against`` the same batch through that checkout's ``color_ops`` and ``normalise``.
Each way runs in processes of its own, alternated over ``--rounds``: on a CPU much of this cost
is the allocator's (whether a batch-sized temporary is a fresh allocation), and one process
timing several ways would hand each the state the previous one left. Prints each way's median
and, with ``--against``, the median of the per-round ratios. Every way is first checked to give
the same images as "subset".
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from authors_side_by_side import load_module  # scripts beside this one
from views_speed import median_ms

from dscl.data import color_ops
from dscl.data.crop_ops import normalise
from dscl.data.draws import P_BLUR, P_GRAY, P_JITTER, QUERY_HUE
from dscl.data.views import ViewConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BLUR_MIN = ViewConfig().blur_min_size
CPU = torch.device("cpu")


def make_batch(args) -> list[tuple[torch.Tensor, color_ops.ColorParams, int]]:
    """(images, colour parameters, blur kernel) of the queries, keys and patches."""
    gen = torch.Generator().manual_seed(0)
    b, view, patch = args.batch, args.view, args.patch
    views = [torch.rand(b, 3, view, view, generator=gen) for _ in range(2)]
    patches = torch.rand(5 * b, 3, patch, patch, generator=gen)
    return [
        (
            views[0],
            color_ops.draw_color(b, QUERY_HUE, P_JITTER, P_GRAY, P_BLUR, gen, CPU),
            color_ops.blur_kernel_size(view, BLUR_MIN),
        ),
        (views[1], color_ops.draw_color(b, 0.0, 1.0, 0.0, 0.0, gen, CPU), 0),
        (
            patches,
            color_ops.draw_color(5 * b, QUERY_HUE, P_JITTER, P_GRAY, P_BLUR, gen, CPU),
            color_ops.blur_kernel_size(patch, BLUR_MIN),
        ),
    ]


def finisher(apply, norm, way: str | None = None):
    """The batch's colour + normalisation through ``apply`` (an ``apply_color``) and ``norm``."""

    def finish(batch):
        kw = {} if way is None else {"way": way}
        return [norm(apply(x, params, kernel, **kw), MEAN, STD) for x, params, kernel in batch]

    return finish


def child_ms(args, way: str) -> float:
    """Median ms an image of ``way`` over ``--repeats`` batches, after one, in this process."""
    fn, batch = ways_of(args)[way], make_batch(args)
    return median_ms(lambda: fn(batch), args.repeats) / args.batch


def ways_of(args) -> dict:
    ways = {
        w: finisher(color_ops.apply_color, normalise, None if w == "auto" else w) for w in args.ways
    }
    if args.against is not None:
        src = args.against / "src" / "dscl" / "data"
        other_color = load_module("other_color_ops", src / "color_ops.py")
        other_crop = load_module("other_crop_ops", src / "crop_ops.py")
        ways["against"] = finisher(other_color.apply_color, other_crop.normalise)
    return ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--view", type=int, default=224)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="batches timed per process")
    parser.add_argument("--rounds", type=int, default=5, help="processes per way, alternated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", type=Path, help="a checkout of another commit")
    parser.add_argument(
        "--ways", nargs="+", default=["auto"], choices=["auto", "subset", "per_image"]
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # time one way, print ms an image
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(child_ms(args, args.child))
        return
    ways = ways_of(args)
    batch = make_batch(args)
    reference = finisher(color_ops.apply_color, normalise, "subset")(batch)
    for name, fn in ways.items():
        out = fn(batch)
        same = all(torch.equal(a, b) for a, b in zip(out, reference, strict=True))
        close = all(
            torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(out, reference, strict=True)
        )
        print(f"{name}: {'the same images' if same else 'within 1e-5' if close else 'DIFFERENT'}")
    # Each way in processes of its own (a fresh allocator), the ways alternated round by round.
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name in ways:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            times[name].append(float(out.split()[-1]))
    print(
        f"\ncolour + normalisation of a stage-1 batch: {args.batch} x {args.view} px query and key,"
        f" {5 * args.batch} x {args.patch} px patches, {args.threads} thread(s); ms an image,"
        f" median of {args.rounds} processes (each the median of {args.repeats} batches)"
    )
    for name, values in times.items():
        line = (
            f"  {name}: {statistics.median(values):.2f}  (rounds {[round(v, 2) for v in values]})"
        )
        if "against" in times and name != "against":
            ratio = statistics.median(a / v for a, v in zip(times["against"], values, strict=True))
            line += f", {ratio:.2f}x against"
        print(line)


if __name__ == "__main__":
    main()
