"""Host round trips per training step, for every method, on the path a GPU takes.

Each method trains a few steps of :func:`dscl.engine.loop.run_epoch` as ``dscl pretrain`` builds
it on a GPU: inside ``dscl.device_path.gpu_path`` a CPU takes the GPU's way wherever the two
differ (masked colour ops, the loss read on the host at the logging cadence only, batches
finished in the main process, JPEGs decoded by the main process). The steps between the first
and the last (which log) run under :class:`dscl.engine.host_sync.HostSyncAudit`: making the batch
in the main process, the method's step, backward, optimizer, EMA and queue. It prints, per step,
the values read back, the ops whose output size depends on the data, and the tensors built from
host data. The feed (``--path``): synthetic images in memory (views made on the device), or the
same images as JPEG files on the fast file path (one worker crops, the main process colours), or
decoded in the main process (``data.decode_on_device``).

    python benchmarks/sync_audit.py                          # every method, in memory, a CPU
    python benchmarks/sync_audit.py --path files --path device_decode
    python benchmarks/sync_audit.py --method bcl --where     # and where they come from
    python benchmarks/sync_audit.py --device cuda            # also CUDA's own sync warnings

On CUDA the same steps also run under ``torch.cuda.set_sync_debug_mode("warn")``, and the
synchronisations CUDA itself reports are counted (column ``cuda syncs``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from dscl.config import build_config
from dscl.data import ImageFileDataset
from dscl.data.synthetic import make_synthetic
from dscl.data.views import ViewConfig
from dscl.device_path import gpu_path
from dscl.engine import runtime
from dscl.engine.host_sync import KINDS, HostSyncAudit
from dscl.engine.loop import EpochLog, EpochSpan, run_epoch
from dscl.engine.pretrain import build_stage1, training_only_context
from dscl.engine.stage import StageParts
from dscl.methods import method_names

NUM_CLASSES = 10
PATHS = ("memory", "files", "device_decode")  # in memory; JPEG files, fast path; decoded here


def jpeg_folder(images, folder: Path) -> ImageFileDataset:
    """``images`` (a synthetic dataset) written as JPEG files under ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = images.tensor_images().permute(0, 2, 3, 1).numpy()  # (N, S, S, 3) uint8
    paths = []
    for i, image in enumerate(pixels):
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(image).save(paths[-1], quality=90)
    return ImageFileDataset(paths, list(images.targets), list(images.class_names))


def build(method_name: str, device: torch.device, *, image_size: int, batch: int, steps: int,
          overrides: list[str], path: str, folder: Path):  # fmt: skip
    """The method, its feed (``path``, JPEGs written to ``folder``) and its optimization, as
    ``dscl pretrain`` builds them (:func:`~dscl.engine.pretrain.build_stage1`); call it inside
    ``gpu_path`` for the GPU's way on a CPU."""
    cfg = build_config(None, [f"method={method_name}", "model.backbone=resnet32", *overrides])
    cfg.pretrain.batch_size = batch
    cfg.pretrain.epochs = 1
    cfg.data.num_workers = 0 if path == "memory" else 1
    cfg.data.decode_on_device = path == "device_decode"
    counts = [batch * steps // NUM_CLASSES + 1] * NUM_CLASSES
    images = make_synthetic(counts, image_size, seed=0, stream=0)
    if path != "memory":
        images = jpeg_folder(images, folder)
    view_cfg = ViewConfig(view_size=image_size, patch_size=max(8, image_size // 4))
    amp = runtime.amp_dtype("auto", device)
    stage = build_stage1(training_only_context(cfg, images, view_cfg, device, amp))
    stage.method.start_training()
    return stage


def audit_method(method_name: str, device: torch.device, *, image_size: int = 32,
                 batch: int = 64, steps: int = 4, overrides: list[str] = (),
                 path: str = "memory") -> dict:  # fmt: skip
    """Per-step host round trips of ``method_name`` fed by ``path`` (:data:`PATHS`).

    Returns:
        ``{"steps": n, "per_step": {kind: count / n}, "audit": HostSyncAudit, "cuda_syncs":
        CUDA's sync warnings per step, or None off CUDA}``.
    """
    if steps < 3:
        raise ValueError(f"steps: need 3 or more (a warm-up, an audited, a logged), got {steps}")
    if path not in PATHS:
        raise ValueError(f"path: {path!r} is not one of {PATHS}")
    with tempfile.TemporaryDirectory(prefix="dscl_sync_audit_") as tmp, gpu_path():
        stage = build(method_name, device, image_size=image_size, batch=batch,
                                  steps=steps, overrides=list(overrides), path=path,
                                  folder=Path(tmp) / "jpegs")  # fmt: skip
        return _audit(stage, device)


def _audit(stage: StageParts, device: torch.device) -> dict:
    """One epoch of the stage, the steps between the first and the last under the audit."""
    audit, stack, counter, audited = HostSyncAudit(), contextlib.ExitStack(), [], [0]
    method, feed, opt = stage.method, stage.feed, stage.opt
    last = feed.steps_per_epoch - 1

    def after_step(i: int, _step: int, _check) -> bool:
        if i == 0:  # from after the first step (it logs) ...
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                counter.append(stack.enter_context(_cuda_sync_warnings()))
            stack.enter_context(audit)
        elif i == last - 1:  # ... to before the last one (it logs too)
            stack.close()
        audited[0] += 0 < i < last
        return False

    try:
        run_epoch(method, feed.epoch(0), opt, EpochSpan(0, feed.steps_per_epoch),
                  EpochLog(log_every=10**9), after_step=after_step)  # fmt: skip
    finally:
        stack.close()
    n = max(audited[0], 1)
    return {
        "steps": audited[0],
        "per_step": {kind: audit.counts[kind] / n for kind in KINDS},
        "audit": audit,
        "cuda_syncs": counter[0]["count"] / n if counter else None,
    }


@contextlib.contextmanager
def _cuda_sync_warnings():
    """``torch.cuda.set_sync_debug_mode("warn")`` for the block; yields a dict whose ``count``
    is the number of synchronisations CUDA warned about, once the block ends."""
    counter = {"count": 0}
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            counter["count"] = sum("synchroniz" in str(w.message) for w in seen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", action="append", help="a method (default: every one)")
    parser.add_argument("--path", action="append", choices=PATHS, help="the feed (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="steps per method (>= 3)")
    parser.add_argument("--set", action="append", default=[], help="a config override")
    parser.add_argument("--where", action="store_true", help="where each kind comes from")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    header = "| method | feed | read-backs | data-dependent | built from host data | per step |"
    if device.type == "cuda":
        header += " cuda syncs |"
    print(f"host round trips per training step ({device}, {args.image_size} px, batch "
          f"{args.batch_size})\n")  # fmt: skip
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    total = 0
    for path in args.path or ["memory"]:
        for name in args.method or method_names():
            result = audit_method(name, device, image_size=args.image_size,
                                  batch=args.batch_size, steps=args.steps, overrides=args.set,
                                  path=path)  # fmt: skip
            per = result["per_step"]
            row = f"| `{name}` | {path} | " + " | ".join(f"{per[k]:g}" for k in KINDS)
            row += f" | {sum(per.values()):g} |"
            if result["cuda_syncs"] is not None:
                row += f" {result['cuda_syncs']:g} |"
            print(row, flush=True)
            total += sum(result["audit"].counts.values())
            if args.where:
                for kind, places in result["audit"].where.items():
                    for place in places:
                        print(f"    {kind}: {place}")
    return 0 if total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
