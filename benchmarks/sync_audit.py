"""Host round trips per training step, for every method, on the path a GPU takes.

Each method trains a few steps of :func:`dscl.engine.loop.run_epoch` on in-memory synthetic images
(views made on the device, as ``dscl pretrain`` does) with the loss read on the host only at the
logging cadence, as on a GPU (inside ``dscl.device_path.gpu_path``, a CPU takes the GPU's way
wherever the two differ). The steps between the
first and the last (which log) run under :class:`dscl.engine.host_sync.HostSyncAudit`: making the
batch, the method's step, backward, optimizer, EMA and queue. It prints, per step, the values read
back, the ops whose output size depends on the data, and the tensors built from host data.

    python benchmarks/sync_audit.py                          # every method, on a CPU
    python benchmarks/sync_audit.py --method bcl --where     # and where they come from
    python benchmarks/sync_audit.py --device cuda            # also counts CUDA's own sync warnings

On CUDA the same steps also run under ``torch.cuda.set_sync_debug_mode("warn")``, and the
synchronisations CUDA itself reports are counted (column ``cuda syncs``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import ExitStack

import numpy as np
import torch

from dscl.config import build_config
from dscl.data.synthetic import make_synthetic
from dscl.data.views import ViewConfig
from dscl.device_path import gpu_path
from dscl.engine import runtime
from dscl.engine.feed import TrainFeed
from dscl.engine.host_sync import KINDS, HostSyncAudit
from dscl.engine.loop import Optimization, run_epoch
from dscl.methods import DataInfo, build_method, method_names

NUM_CLASSES = 10


def build(method_name: str, device: torch.device, *, image_size: int, batch: int, steps: int,
          overrides: list[str]):  # fmt: skip
    """The method, its feed over in-memory synthetic images and its optimization, as
    ``dscl pretrain`` builds them (the loss read on the host at the logging cadence only)."""
    cfg = build_config(None, [f"method={method_name}", "model.backbone=resnet32", *overrides])
    counts = [batch * steps // NUM_CLASSES + 1] * NUM_CLASSES
    images = make_synthetic(counts, image_size, seed=0, stream=0)
    method = build_method(cfg, DataInfo(num_classes=NUM_CLASSES, class_counts=tuple(counts)))
    view_cfg = ViewConfig(view_size=image_size, patch_size=max(8, image_size // 4))
    feed = TrainFeed(
        images,
        kind=method.feed_kind,
        view_cfg=view_cfg,
        batch_size=batch,
        balanced=False,
        seed=0,
        device=device,
        request=method.view_request(),
    )
    method.to(device)
    method.start_training()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01, momentum=0.9)
    lr_at = np.full(feed.steps_per_epoch, 0.01)
    amp = runtime.amp_dtype("auto", device)
    scaler = runtime.grad_scaler(device, amp)
    opt = Optimization(optimizer, lr_at, scaler, device, amp)
    return method, feed, opt


def audit_method(method_name: str, device: torch.device, *, image_size: int = 32,
                 batch: int = 64, steps: int = 4, overrides: list[str] = ()) -> dict:  # fmt: skip
    """Per-step host round trips of ``method_name`` over the audited steps.

    Returns:
        ``{"steps": n, "per_step": {kind: count / n}, "audit": HostSyncAudit, "cuda_syncs": n or
        None}``.
    """
    if steps < 3:
        raise ValueError(
            f"steps: need at least 3 (one to warm up, one audited, one to log), got {steps}"
        )
    method, feed, opt = build(
        method_name,
        device,
        image_size=image_size,
        batch=batch,
        steps=steps,
        overrides=list(overrides),
    )
    audit = HostSyncAudit()
    stack = ExitStack()
    caught: list = []
    audited = [0]

    def after_step(i: int, _step: int, _check) -> bool:
        # audit from after the first step (which logs) to before the last one (which logs too)
        if i == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                stack.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                caught.append(stack.enter_context(_cuda_sync_debug()))
            stack.enter_context(audit)
        elif i == feed.steps_per_epoch - 2:
            stack.close()
        if 0 < i <= feed.steps_per_epoch - 2:
            audited[0] += 1
        return False

    try:
        with gpu_path():  # a CPU takes the GPU's way wherever the two differ
            run_epoch(method, feed.epoch(0), opt, epoch=0, steps_per_epoch=feed.steps_per_epoch,
                      log_every=10**9, after_step=after_step)  # fmt: skip
    finally:
        stack.close()
    n = max(audited[0], 1)
    cuda_syncs = caught[0].count if caught else None
    return {
        "steps": audited[0],
        "per_step": {kind: audit.counts[kind] / n for kind in KINDS},
        "audit": audit,
        "cuda_syncs": None if cuda_syncs is None else cuda_syncs / n,
    }


class _SyncCount:
    count = 0


def _cuda_sync_debug():
    """``torch.cuda.set_sync_debug_mode("warn")`` for the block; counts the warnings it gives."""
    import contextlib

    @contextlib.contextmanager
    def mode():
        counter = _SyncCount()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode(previous)
                counter.count = sum("synchroniz" in str(w.message) for w in seen)

    return mode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", action="append", help="a method (default: every one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="steps per method (>= 3)")
    parser.add_argument("--set", action="append", default=[], help="a config override")
    parser.add_argument("--where", action="store_true", help="where each kind comes from")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    header = "| method | read-backs | data-dependent | built from host data | per step |"
    if device.type == "cuda":
        header += " cuda syncs |"
    print(f"host round trips per training step ({device}, {args.image_size} px, batch "
          f"{args.batch_size}, in-memory views)\n")  # fmt: skip
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    total_bad = 0
    for name in args.method or method_names():
        result = audit_method(name, device, image_size=args.image_size, batch=args.batch_size,
                              steps=args.steps, overrides=args.set)  # fmt: skip
        per = result["per_step"]
        row = (
            f"| `{name}` | "
            + " | ".join(f"{per[k]:g}" for k in KINDS)
            + f" | {sum(per.values()):g} |"
        )
        if device.type == "cuda":
            row += f" {result['cuda_syncs']:g} |"
        print(row, flush=True)
        total_bad += sum(result["audit"].counts.values())
        if args.where:
            for kind, places in result["audit"].where.items():
                for place in places:
                    print(f"    {kind}: {place}")
    return 0 if total_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
