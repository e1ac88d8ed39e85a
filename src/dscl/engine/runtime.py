"""What both training stages share: device and precision choice, seeding, schedules, logging.

Logging (JSON lines, TensorBoard, progress) happens on rank 0 only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dscl import dist, runfiles
from dscl.cpuinfo import cpu_flags, processor_name
from dscl.errors import SetupError


def select_device(spec: str = "auto", local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto``: this process's GPU when CUDA is available, else the CPU.

    Under several processes (``world_size`` > 1) the local rank picks each process's GPU, so a
    device with an index (``cuda:1``), which would put every process on that one GPU, is
    refused.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SetupError(
            f"device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and device.index is not None and world_size > 1:
        raise SetupError(
            f"device: {spec!r} names one GPU, but under {world_size} processes each uses the "
            "GPU of its LOCAL_RANK; set device=cuda (or auto) and choose the GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(
            f"device: {spec!r} requested but CUDA is not available here (torch "
            f"{torch.__version__}); use device=auto or device=cpu"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise SetupError(
            f"device: {spec!r} requested but this machine has {torch.cuda.device_count()} "
            "GPU(s) (cuda:0 is the first)"
        )
    return device


# CPU flags of native bf16 arithmetic (Linux /proc/cpuinfo names): AVX-512 BF16 and AMX BF16.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 autocast without native support (AVX2 only), measured here against fp32: 13x slower.
EMULATED_BF16_SLOWDOWN = 13


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def gpu_has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes in bf16 natively (compute capability 8.0 on: Ampere,
    Hopper and later); older GPUs (V100, T4) only emulate it, much more slowly."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``setting``.

    ``auto`` is bf16 on a GPU with native bf16, fp16 (with loss scaling, :func:`grad_scaler`) on
    an older GPU, and full precision on a CPU: bf16 on a CPU is faster only where it is native
    (AMX), and three paired seeds did not show it to train as well there
    (docs/bf16_parity/RESULTS.md: top-1 -2.33 +- 5.46 points, outside the +-1 criterion). An
    explicit ``bf16`` on a CPU without native bf16 warns once that it is emulated and much slower.
    """
    if setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        if device.type == "cpu" and dist.is_main_process() and not cpu_has_native_bf16():
            print(
                "dscl: warning: amp=bf16 on a CPU without native bf16 (no avx512_bf16 or "
                f"amx_bf16): it is emulated, about {EMULATED_BF16_SLOWDOWN}x slower than full "
                "precision here; amp=off is faster",
                file=sys.stderr,
            )
        return torch.bfloat16
    if device.type != "cuda":
        return None
    if gpu_has_native_bf16(device):
        return torch.bfloat16
    if dist.is_main_process():
        print(
            f"dscl: amp=auto: {torch.cuda.get_device_name(device)} has no native bf16, so "
            "training runs in fp16 with loss scaling (set amp=off for full precision)",
            file=sys.stderr,
        )
    return torch.float16


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (against underflow); a no-op for bf16 and full precision."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_for_training(modules: Iterable[torch.nn.Module], device: torch.device) -> None:
    """Route each module's forward through ``torch.compile`` while the module is in training
    mode; evaluation passes (``module.eval()``: kNN monitor, stage 2, tests) stay eager, so they
    cost no compile of their own. Parameters and state-dict keys are unchanged.

    Shapes are static (``dynamic=False``): training batches have one size (the last partial batch
    is dropped), and each input size (views, patches) is compiled once.
    """
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++")):
        raise SetupError(
            "compile: torch.compile needs a C++ compiler on a CPU and none was found "
            "(install g++ or set compile=false)"
        )
    for module in modules:
        eager = module.forward
        compiled = torch.compile(eager, dynamic=False)

        def forward(*args, _m=module, _eager=eager, _compiled=compiled, **kwargs):
            return (_compiled if _m.training else _eager)(*args, **kwargs)

        module.forward = forward


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when several processes run, else itself.

    Buffers are not re-broadcast from rank 0 on every forward: the queue is identical on every
    rank already (it is fed with gathered keys) and resending it each step costs bandwidth.
    """
    if dist.get_world_size() == 1:
        return module
    ddp = torch.nn.parallel.DistributedDataParallel
    device_ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:  # newer torch
        return ddp(module, device_ids=device_ids, forward_sync_buffers=False)
    return ddp(module, device_ids=device_ids, broadcast_buffers=False)


def set_threads(threads: int | None) -> None:
    """Share the cores between local processes unless told otherwise (two processes each using
    all cores halve each other's speed). Without ``threads``, a positive ``OMP_NUM_THREADS`` in
    the environment is followed (e.g. two study shards side by side with one thread each)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if threads is None and env.isdigit() and int(env) > 0:
        threads = int(env)
    if threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)


def hardware(device: torch.device) -> dict[str, Any]:
    """What a process trains on, as far as it shapes a run's digits: the GPU's name on a GPU,
    else the CPU's model, and the number of threads torch uses (the same run gives other digits
    on another CPU or with another thread count)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = processor_name() or "unknown CPU"
    return {"processor": name, "threads": torch.get_num_threads()}


def hardware_text(hw: dict[str, Any]) -> str:
    """``hardware(...)`` in words: "AMD EPYC, 2 threads"."""
    threads = hw.get("threads")
    return f"{hw.get('processor')}, {threads} thread{'' if threads == 1 else 's'}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (third-party code may use the global RNG)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG state: torch's CPU generator, Python's, and, training on a GPU, that
    GPU's generator only (the states of every visible GPU would not load where another number of
    GPUs is visible, and the others are not this process's)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`; a saved GPU state goes to ``device`` only, and only when the
    run trains on a GPU (on a CPU no GPU generator is used)."""
    torch.set_rng_state(state["torch"])
    random.setstate(
        tuple(state["python"]) if isinstance(state["python"], list) else state["python"]
    )
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):  # fewer GPUs were visible when it was saved: none is this one's
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def warmup_cosine(base: float, epochs: int, steps_per_epoch: int, warmup_epochs: int) -> np.ndarray:
    """Per-iteration values: linear warm-up from 0 over ``warmup_epochs``, then cosine to 0."""
    total = epochs * steps_per_epoch
    warm = min(warmup_epochs * steps_per_epoch, total)
    it = np.arange(total, dtype=np.float64)
    values = np.empty(total)
    values[:warm] = base * (it[:warm] + 1) / max(warm, 1)
    rest = it[warm:] - warm
    values[warm:] = 0.5 * base * (1 + np.cos(math.pi * rest / max(total - warm, 1)))
    return values


def multistep(base: float, epochs: int, steps_per_epoch: int, milestones, gamma: float):
    """Per-iteration values: ``base`` times ``gamma`` for each milestone epoch passed."""
    epoch_of_step = np.arange(epochs * steps_per_epoch) // steps_per_epoch
    drops = np.zeros_like(epoch_of_step)
    for milestone in milestones:
        drops += epoch_of_step >= milestone
    return base * np.power(gamma, drops.astype(np.float64))


class RunLogger:
    """JSON-lines log, TensorBoard scalars and a progress display, all on rank 0 only."""

    def __init__(self, run_dir: Path, *, progress: bool = True, tensorboard: bool = True) -> None:
        self.active = dist.is_main_process()
        self.progress = progress and self.active
        self.run_dir = run_dir
        self.writer = None
        if self.active:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.log_file = open(run_dir / runfiles.TRAIN_LOG, "a", buffering=1)  # noqa: SIM115
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / runfiles.TENSORBOARD))

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.log_file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            stage, step = record.get("stage", "train"), record.get("step", 0)
            for key, value in record.items():
                if key not in ("stage", "step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{stage}/{key}", value, step)

    def info(self, text: str) -> None:
        if self.active:
            print(text, file=sys.stderr, flush=True)

    def bar(self, iterable: Iterable, total: int, desc: str, initial: int = 0) -> Iterator:
        """A tqdm bar on a terminal; plain lines otherwise (written by :meth:`postfix`).

        ``total`` counts the items of ``iterable``; ``initial`` items of the epoch were done
        before (a resumed epoch), so the display counts from ``initial`` to ``initial + total``.
        """
        self._bar = None
        self._plain = None
        if not self.progress:
            yield from iterable
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(
                iterable,
                total=initial + total,
                initial=initial,
                desc=desc,
                dynamic_ncols=True,
                leave=True,
            )
            self._bar = bar
            yield from bar
            bar.close()
            self._bar = None
        else:
            self._plain = [desc, initial + total, initial]
            for item in iterable:
                self._plain[2] += 1
                yield item

    def postfix(self, values: dict[str, float]) -> None:
        """Show ``values`` beside the bar (a terminal) or as one plain line (a log file)."""
        if not self.progress:
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        if getattr(self, "_bar", None) is not None:
            self._bar.set_postfix_str(text)
        elif getattr(self, "_plain", None) is not None:
            desc, total, done = self._plain
            print(f"{desc} [{done}/{total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.active:
            self.log_file.close()
            if self.writer is not None:
                self.writer.close()


def _fmt(value: float) -> str:
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.4g}"


def check_finite(loss: torch.Tensor, step: int, parts: dict[str, float]) -> None:
    """Stop at once on a non-finite loss, saying which part went wrong."""
    if not torch.isfinite(loss):
        detail = ", ".join(f"{k}={v}" for k, v in parts.items())
        raise FloatingPointError(f"non-finite loss at step {step} ({detail}); lower the lr?")
