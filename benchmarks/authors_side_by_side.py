"""Stage-1 throughput of the authors' DSCL code and of this project, side by side.

The authors' implementation (github.com/SY-Xuan/DSCL, a MoCo fork written for two GPUs under
DistributedDataParallel with 224 px ImageNet views) stays outside this repository: PATH is a
checkout of it, and this script imports their modules from there and patches them AT RUN TIME
(module attributes replaced from here; nothing of theirs is copied or edited). Every patch is
listed in ``PATCHES`` below with its reason, and printed after the table.

Both sides train on Fashion-MNIST-LT as this project builds it (2,773 training images, 10
classes, n_max 1280, imbalance 256), with the same ResNet-32 backbone, batch 128, 5 patches and
a queue of 1024, in one process, fp32:

- the authors' side runs their data pipeline (their ``ImageNetLT`` dataset reading image files,
  their ``MultiCropsROITransform`` / ``SmallGlobalRandomResizedCrop`` PIL transforms and their
  ``DataLoader`` call, executed from their ``main.py`` with ONE worker), their ``DSCL`` model with
  its ``DSCLLoss`` and ``PBSDLoss``, their learning-rate schedule and their SGD step. The time of a
  step is taken as their ``train()`` takes it (from the end of one step to the end of the next,
  so it includes waiting for the loader); images/s is the batch over the median step time.
- this project's side runs ``dscl pretrain`` for two epochs as a subprocess and reads
  ``images_per_sec`` of the last record of the second epoch from ``train_log.jsonl`` (the mean
  over that epoch, data included). :func:`measure_dscl` is the one place to change for an
  in-process timing.

Settings: ``demo`` = 28 px views with 8 px patches (this project's demo), ``cifar`` = 32 px views
with 16 px patches (the authors use 224 px views and 64 px patches).

    python benchmarks/authors_side_by_side.py /path/to/DSCL --steps 10 --setting demo cifar
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
import torchvision.transforms
import torchvision.transforms.functional as TF
import yaml
from torch import nn

from dscl.data import build_splits
from dscl.models import build_backbone
from dscl.models.backbones import BasicBlock

SETTINGS = {
    # name: (view px, patch px)
    "demo": (28, 8),
    "cifar": (32, 16),
}
BATCH = 128
NUM_PATCHES = 5
QUEUE = 1024
DATASET = "fashion_mnist_lt"
N_MAX, IMBALANCE = 1280, 256
# the authors' sizes (main.py: SmallGlobalRandomResizedCrop(size=224, small_size=64)) and the
# stride their RoIAlign assumes (DSCL.forward_train: spatial_scale=1/32, ResNet-50's layer4)
AUTHORS_VIEW, AUTHORS_PATCH, AUTHORS_STRIDE = 224, 64, 32
# the statements of their main.main_worker() that build the data pipeline, run from their source
PIPELINE_NAMES = (
    "traindir",
    "normalize",
    "q_augmentation",
    "k_augmentation",
    "small_augmentation",
    "small_global_crop",
    "merge_transform",
    "train_dataset",
    "train_loader",
)

PATCHES: list[str] = []  # one line per run-time patch or substitution, filled as they are applied


def _patched(line: str) -> None:
    if line not in PATCHES:
        PATCHES.append(line)


# ----------------------------------------------------------------- importing the authors' code


class AuthorsCode(types.SimpleNamespace):
    """Their modules: ``model`` (dscl/DSCL.py), ``loader`` (dscl/loader_roi.py), ``data``
    (dscl/ImageNet_LT.py), ``main`` (main.py), and ``main_path``."""


def _stub_missing_module(name: str, reason: str, **attrs: object) -> None:
    """Insert an empty module ``name`` into sys.modules when it is not installed."""
    if importlib.util.find_spec(name) is not None:
        return
    stub = types.ModuleType(name)
    stub.__dict__.update(attrs)
    sys.modules[name] = stub
    _patched(f"sys.modules[{name!r}]: empty stub, the package is not installed; {reason}")


def load_module(name: str, path: Path, package_dir: Path | None = None) -> types.ModuleType:
    """The module at ``path`` (a file outside this project), imported under ``name``."""
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_authors(path: Path) -> AuthorsCode:
    """Import their package and main.py from the checkout at ``path``.

    Their package is also called ``dscl``, like this project's, so it is loaded under the name
    ``authors_dscl``; while their main.py runs its imports (``import dscl.loader_roi``,
    ``from dscl.DSCL import DSCL``), ``sys.modules['dscl']`` points at their package, and this
    project's modules are put back right after.
    """
    path = path.resolve()
    needed = ["main.py", "dscl/__init__.py", "dscl/DSCL.py", "dscl/loader_roi.py"]
    needed.append("dscl/ImageNet_LT.py")
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise SystemExit(f"{path} is not a checkout of SY-Xuan/DSCL: missing {', '.join(missing)}")
    _stub_missing_module(
        "cv2", "dscl/ImageNet_LT.py imports it for imread_with_retry(), which training never calls"
    )
    _stub_missing_module(
        "click", "main.py imports it for main()'s overwrite prompt, which is not run here"
    )
    package = load_module("authors_dscl", path / "dscl/__init__.py", path / "dscl")
    model = importlib.import_module("authors_dscl.DSCL")
    loader = importlib.import_module("authors_dscl.loader_roi")
    data = importlib.import_module("authors_dscl.ImageNet_LT")
    ours = {k: v for k, v in sys.modules.items() if k == "dscl" or k.startswith("dscl.")}
    theirs = {
        "dscl": package,
        "dscl.DSCL": model,
        "dscl.loader_roi": loader,
        "dscl.ImageNet_LT": data,
    }
    for key in ours:
        del sys.modules[key]
    sys.modules.update(theirs)
    try:
        main = load_module("authors_main", path / "main.py")
    finally:
        for key in theirs:
            sys.modules.pop(key, None)
        sys.modules.update(ours)
    _patched(
        "package name: their package 'dscl' is imported as 'authors_dscl' (this project is "
        "'dscl' too); sys.modules['dscl'] points at theirs only while main.py imports it"
    )
    return AuthorsCode(model=model, loader=loader, data=data, main=main, main_path=path / "main.py")


# ------------------------------------------------------------------------- run-time patches


def patch_for_current_torchvision(code: AuthorsCode) -> None:
    """loader_roi.SmallGlobalRandomResizedCrop.get_params calls ``F._get_image_size`` unless
    torchvision is exactly 0.12.0; newer torchvision has only the public ``get_image_size``."""
    if hasattr(TF, "_get_image_size"):
        return
    proxy = types.ModuleType("torchvision.transforms.functional (with _get_image_size)")
    proxy.__dict__.update(TF.__dict__)
    proxy._get_image_size = TF.get_image_size
    code.loader.F = proxy
    _patched(
        "loader_roi.F: torchvision.transforms.functional plus _get_image_size = get_image_size "
        f"(removed from torchvision {torchvision.__version__}; their code only special-cases "
        "0.12.0)"
    )


def patch_single_process(code: AuthorsCode) -> None:
    """Replace their distributed collectives by what they compute with world size 1."""

    @torch.no_grad()
    def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor], dim=0)  # all_gather over one rank: a copy of the tensor

    @torch.no_grad()
    def batch_shuffle(self: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        return x[idx_shuffle], torch.argsort(idx_shuffle)

    @torch.no_grad()
    def batch_unshuffle(self: nn.Module, x: torch.Tensor, idx_unshuffle: torch.Tensor):
        return x[idx_unshuffle]

    code.model.concat_all_gather = concat_all_gather
    code.model.DSCL._batch_shuffle_ddp = batch_shuffle
    code.model.DSCL._batch_unshuffle_ddp = batch_unshuffle
    _patched(
        "DSCL.concat_all_gather: torch.distributed.all_gather over one rank -> a copy of the "
        "tensor (used by _dequeue_and_enqueue); no process group exists"
    )
    _patched(
        "DSCL._batch_shuffle_ddp/_batch_unshuffle_ddp (shuffle BN): all_gather + broadcast + "
        "get_rank -> one-process permutation and its inverse; theirs also hard-codes .cuda()"
    )


def patch_roi_stride(code: AuthorsCode, stride: int) -> None:
    """DSCL.forward_train passes ``spatial_scale=1/32`` (ResNet-50's layer4); ResNet-32's last
    map has stride ``stride``, so the boxes (in view pixels) must be scaled by 1/stride."""
    original = torchvision.ops.roi_align

    def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
        if not math.isclose(spatial_scale, 1.0 / AUTHORS_STRIDE):
            raise RuntimeError(f"unexpected spatial_scale {spatial_scale} in their RoIAlign call")
        return original(input, boxes, output_size, 1.0 / stride, sampling_ratio, aligned)

    code.model.roi_align = roi_align
    _patched(
        f"DSCL.roi_align: spatial_scale 1/{AUTHORS_STRIDE} (hard-coded for ResNet-50) -> "
        f"1/{stride}, the stride of ResNet-32's last feature map"
    )


class ResNet32AsTorchvision(nn.Module):
    """This project's ResNet-32 behind the interface their DSCL expects of a torchvision ResNet:
    ``base_encoder(num_classes=dim, zero_init_residual=...)`` returning fc logits, an ``fc``
    Linear that DSCL wraps in its MLP, and a ``layer4`` whose forward hook yields the last
    feature map (here an identity on ResNet-32's last stage output, stride 4)."""

    def __init__(self, num_classes: int = 1000, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.body = build_backbone("resnet32")
        self.layer4 = nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.body.out_channels, num_classes)
        if zero_init_residual:  # as torchvision: the last BN of each residual branch starts at 0
            for module in self.body.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = self.layer4(self.body(x))
        return self.fc(torch.flatten(self.avgpool(feature_map), 1))


# ----------------------------------------------------------------------------- their data


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def write_dataset_for_authors(folder: Path) -> tuple[int, list[int]]:
    """Write Fashion-MNIST-LT's training split as their ImageNetLT reads a dataset: image files
    under the data root, and ``datasets/ImageNet_LT/train.json`` (``annotations`` with ``fpath``
    and ``category_id``, ``num_classes``) plus ``train_class_number.json``, both opened relative
    to the working directory. Returns (number of classes, images per class)."""
    splits = build_splits(DATASET, n_max=N_MAX, imbalance_ratio=IMBALANCE)
    train = splits.train
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    annotations = []
    for index in range(len(train)):
        image, label = train[index]  # RGB PIL image as this project reads it
        name = f"images/{index:05d}.png"
        image.save(folder / name)
        annotations.append({"fpath": name, "category_id": int(label)})
    lists = folder / "datasets" / "ImageNet_LT"
    lists.mkdir(parents=True)
    (lists / "train.json").write_text(
        json.dumps({"annotations": annotations, "num_classes": splits.num_classes})
    )
    counts = list(splits.class_counts)
    (lists / "train_class_number.json").write_text(
        json.dumps({str(c): n for c, n in enumerate(counts)})
    )
    return splits.num_classes, counts


def _pipeline_statements(main_path: Path) -> ast.Module:
    """The assignments of PIPELINE_NAMES at the top level of their main_worker(), in order."""
    tree = ast.parse(main_path.read_text(), filename=str(main_path))
    worker = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main_worker"), None
    )
    if worker is None:
        raise SystemExit(f"{main_path}: no main_worker() function")
    picked = [
        node
        for node in worker.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in PIPELINE_NAMES
    ]
    found = [node.targets[0].id for node in picked]
    if sorted(found) != sorted(PIPELINE_NAMES):
        raise SystemExit(f"{main_path}: expected assignments {PIPELINE_NAMES}, found {found}")
    return ast.Module(body=picked, type_ignores=[])


def build_authors_loader(
    code: AuthorsCode, args: argparse.Namespace, data_folder: Path, view: int, patch: int
) -> torch.utils.data.DataLoader:
    """Run their main_worker()'s data statements (transforms, ImageNetLT, DataLoader) from their
    main.py, with the crop sizes set to ``view`` and ``patch``."""
    their_crop = code.loader.SmallGlobalRandomResizedCrop

    def sized_crop(**kwargs):
        if (kwargs.get("size"), kwargs.get("small_size")) != (AUTHORS_VIEW, AUTHORS_PATCH):
            raise RuntimeError(f"unexpected crop sizes in their main.py: {kwargs}")
        return their_crop(**{**kwargs, "size": view, "small_size": patch})

    loader_module = types.SimpleNamespace(**vars(code.loader))
    loader_module.SmallGlobalRandomResizedCrop = sized_crop
    namespace = {
        "args": args,
        "transforms": torchvision.transforms,
        "torch": torch,
        "dscl": types.SimpleNamespace(loader_roi=loader_module),
        "ImageNetLT": code.data.ImageNetLT,
        "train_sampler": None,  # args.distributed is False: their else-branch
    }
    program = compile(_pipeline_statements(code.main_path), str(code.main_path), "exec")
    with _working_directory(data_folder), contextlib.redirect_stdout(sys.stderr):
        exec(program, namespace)  # noqa: S102 - their own statements, from their main.py
    _patched(
        f"main.py SmallGlobalRandomResizedCrop(size={AUTHORS_VIEW}, small_size={AUTHORS_PATCH}) "
        "-> the setting's view and patch sizes (called through a wrapper when their data "
        "statements are run)"
    )
    return namespace["train_loader"]


# ------------------------------------------------------------------------------ their side


def measure_authors(
    code: AuthorsCode,
    data_folder: Path,
    num_classes: int,
    setting: str,
    *,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict:
    """Time their training step (main.py train() lines for one iteration) on one process."""
    view, patch = SETTINGS[setting]
    random.seed(0)
    torch.manual_seed(0)
    args = code.main.parser.parse_args(
        [
            str(data_folder),
            "-b",
            str(BATCH),
            "-j",
            "1",
            "--dscl-k",
            str(QUEUE),
            "--num_crops",
            str(NUM_PATCHES),
        ]
    )
    args.distributed = False
    args.gpu = device.index if device.type == "cuda" else None
    args.lr = args.lr * args.batch_size / 256  # main_worker: "NOTE: rescale learning rate"
    model = code.model.DSCL(
        functools.partial(ResNet32AsTorchvision, zero_init_residual=args.zero_init_residual),
        args.dscl_dim,
        args.dscl_k,
        args.dscl_m,
        args.dscl_t,
        beta=args.contrastive_beta,
        num_classes=num_classes,
    ).to(device)
    _patched(
        f"DSCL(num_classes={num_classes}): main.py keeps the default 1000 (ImageNet-LT); the "
        "random labels that fill the initial queue are drawn from this dataset's classes"
    )
    optimizer = torch.optim.SGD(
        model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as their main_worker()
    loader = build_authors_loader(code, args, data_folder, view, patch)

    model.train()
    iters_per_epoch = len(loader)
    batches = iter(loader)
    epoch, i = 0, 0
    step_times, waits, losses = [], [], []
    end = time.perf_counter()
    for step in range(warmup + steps):
        fetch_start = time.perf_counter()
        try:
            images, main_labels = next(batches)
        except StopIteration:  # a new epoch, as their loop over epochs would start
            epoch, i = epoch + 1, 0
            batches = iter(loader)
            images, main_labels = next(batches)
        wait = time.perf_counter() - fetch_start
        # --- main.py train(), one iteration (the .cuda() copies done with .to(device))
        code.main.adjust_learning_rate(optimizer, epoch + i / iters_per_epoch, args)
        images[0] = images[0].to(device, non_blocking=True)
        images[1] = images[1].to(device, non_blocking=True)
        small_images = [im.to(device) for im in images[2 : 2 + args.num_crops]]
        small_bboxs = [bb.to(device) for bb in images[2 + args.num_crops : 2 + args.num_crops * 2]]
        main_labels = main_labels.to(device, non_blocking=True)
        loss_contrastive, loss_dis = model(
            im_q=images[0],
            im_k=images[1],
            small_bbox=small_bboxs,
            small_im_qs=small_images,
            main_labels=main_labels,
        )
        values = (loss_contrastive.item(), loss_dis.item())  # their AverageMeter updates
        loss = loss_contrastive + loss_dis * args.pbsd_weight
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # ---
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if not all(math.isfinite(v) for v in values):
            raise RuntimeError(f"their loss is not finite at step {step}: {values}")
        if step >= warmup:
            step_times.append(now - end)
            waits.append(wait)
            losses.append(values)
        end = now
        i += 1
    del batches  # ends the loader's worker
    median = statistics.median(step_times)
    return {
        "images_per_s": BATCH / median,
        "median_step_s": median,
        "median_wait_s": statistics.median(waits),
        "last_losses": losses[-1],
        "batch_shapes": {
            "query": tuple(images[0].shape),
            "patches": tuple(small_images[0].shape),
            "boxes": tuple(small_bboxs[0].shape),
        },
    }


# ------------------------------------------------------------------------ this project's side


def measure_dscl(setting: str, *, threads: int, device: str, extra: tuple[str, ...] = ()) -> dict:
    """This project's stage-1 images/s for ``setting``: ``dscl pretrain`` for two epochs in a
    subprocess, then ``images_per_sec`` of the last logged record of the second epoch (epoch 1),
    which is the mean over that epoch including the data path."""
    view, patch = SETTINGS[setting]
    script = Path(sys.executable).with_name("dscl")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "dscl.cli"]
    with tempfile.TemporaryDirectory(prefix="dscl_side_by_side_") as tmp:
        name = f"side_by_side_{setting}"
        command += [
            "pretrain",
            "--config",
            DATASET,
            "--name",
            name,
            f"output_dir={tmp}",
            "pretrain.epochs=2",
            "progress=false",
            f"data.image_size={view}",
            f"data.patch_size={patch}",
            f"pretrain.batch_size={BATCH}",
            f"pretrain.queue_size={QUEUE}",
            f"data.num_patches={NUM_PATCHES}",
            "amp=off",
            f"threads={threads}",
        ]
        if device != "auto":
            command.append(f"device={device}")
        command += extra  # e.g. compile=true (epoch 0 then holds the compile; epoch 1 is timed)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}"
            )
        run_dir = Path(tmp) / name
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        got = (resolved["data"]["image_size"], resolved["data"]["patch_size"])
        got += (resolved["pretrain"]["batch_size"], resolved["pretrain"]["queue_size"])
        if got != (view, patch, BATCH, QUEUE):
            raise RuntimeError(f"dscl ran with (view, patch, batch, queue) {got}")
        log = run_dir / "train_log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    epoch1 = [
        r
        for r in records
        if r.get("epoch") == 1 and "images_per_sec" in r and r.get("stage") in (None, "pretrain")
    ]
    if not epoch1:
        raise RuntimeError(f"no images_per_sec record of epoch 1 in {log}")
    return {"images_per_s": float(epoch1[-1]["images_per_sec"]), "wall_s": wall, "command": command}


# ------------------------------------------------------------------------------------ main


def authors_revision(path: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a checkout of github.com/SY-Xuan/DSCL")
    parser.add_argument("--steps", type=int, default=10, help="timed steps on the authors' side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument(
        "--setting",
        nargs="+",
        action="extend",
        choices=sorted(SETTINGS),
        help="demo (28 px views, 8 px patches) and/or cifar (32 px, 16 px)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both sides (default: all cores)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--side", choices=("both", "authors", "dscl"), default="both")
    parser.add_argument(
        "--dscl-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for this project's side, e.g. compile=true (repeatable)",
    )
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    settings = list(dict.fromkeys(args.setting or ["demo", "cifar"]))

    code = None
    if args.side in ("both", "authors"):
        code = import_authors(args.path)
        patch_for_current_torchvision(code)
        patch_single_process(code)
        patch_roi_stride(code, build_backbone("resnet32").stride)
        _patched(
            "base_encoder: torchvision has no ResNet-32, so DSCL gets dscl's "
            "build_backbone('resnet32') behind a torchvision-style fc/layer4 interface"
        )
        _patched(
            "training loop: main.py's train() is run one iteration at a time from here, since "
            "main_worker() refuses to run without DistributedDataParallel and train() only "
            "defines small_images/small_bboxs when args.gpu is set"
        )

    rows = []
    with tempfile.TemporaryDirectory(prefix="authors_dscl_data_") as data_tmp:
        num_classes = 0
        if code is not None:
            num_classes, counts = write_dataset_for_authors(Path(data_tmp))
            print(
                f"Fashion-MNIST-LT for their ImageNetLT: {sum(counts)} images, counts {counts}",
                file=sys.stderr,
            )
        for setting in settings:
            row = {"setting": setting}
            if code is not None:
                row["authors"] = measure_authors(
                    code,
                    Path(data_tmp),
                    num_classes,
                    setting,
                    steps=args.steps,
                    warmup=args.warmup,
                    device=device,
                )
                a = row["authors"]
                print(
                    f"{setting}: authors {a['images_per_s']:.1f} images/s, losses (DSCL, PBSD) "
                    f"{a['last_losses'][0]:.3f}, {a['last_losses'][1]:.3f}; {a['batch_shapes']}",
                    file=sys.stderr,
                    flush=True,
                )
            if args.side in ("both", "dscl"):
                row["dscl"] = measure_dscl(
                    setting, threads=threads, device=args.device, extra=tuple(args.dscl_set)
                )
                print(
                    f"{setting}: dscl {row['dscl']['images_per_s']:.1f} images/s "
                    f"({row['dscl']['wall_s']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append(row)

    print(
        f"\nbatch {BATCH}, {NUM_PATCHES} patches, queue {QUEUE}, ResNet-32, fp32, "
        f"{device}, {threads} torch thread(s); authors' code at {args.path} "
        f"({authors_revision(args.path)})"
    )
    print(
        f"authors: median of {args.steps} steps after {args.warmup} (one loader worker); "
        "dscl: mean images/s of its 2nd epoch from train_log.jsonl"
        + (f" (with {' '.join(args.dscl_set)})" if args.dscl_set else "")
    )
    print(
        f"{'setting':<8} {'view/patch':>10} {'authors img/s':>14} {'dscl img/s':>11} "
        f"{'dscl/authors':>13}"
    )
    for row in rows:
        view, patch = SETTINGS[row["setting"]]
        theirs = row.get("authors", {}).get("images_per_s")
        ours = row.get("dscl", {}).get("images_per_s")
        ratio = f"{ours / theirs:.2f}x" if theirs and ours else "-"
        print(
            f"{row['setting']:<8} {f'{view}/{patch} px':>10} "
            f"{f'{theirs:.1f}' if theirs else '-':>14} {f'{ours:.1f}' if ours else '-':>11} "
            f"{ratio:>13}"
        )
        if theirs:
            a = row["authors"]
            print(
                f"{'':<8} authors: median step {a['median_step_s'] * 1e3:.0f} ms, of which "
                f"waiting for the loader {a['median_wait_s'] * 1e3:.0f} ms (median)"
            )
    if PATCHES:
        print("\npatched at run time to run the authors' code here:")
        for line in PATCHES:
            print(f"- {line}")


if __name__ == "__main__":
    main()
