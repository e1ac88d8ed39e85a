"""Batches for the training loops and evaluation.

Three paths with the same semantics:
- in memory: datasets that expose ``tensor_images()`` (Fashion-MNIST, CIFAR, synthetic) are moved to
  the device once as uint8 and augmented there a whole batch at a time (``BatchedMultiView``);
- image files, fast (``file_views="fast"``, the default for image-file datasets): DataLoader
  workers decode each file once and crop it to uint8 views (``dscl.data.fileviews``), the main
  process runs the colour ops on the whole batch on the device (training on the CPU, the workers
  run them on their own batches: there the workers are the cores that are free);
- per sample: any other dataset (and image files with ``file_views="per_sample"``) goes through a
  DataLoader whose workers run the per-sample transforms.
Which images a rank sees in an epoch and how they are augmented depend only on (seed, epoch,
rank), and an epoch can start at any batch (:meth:`TrainFeed.epoch`), so training resumes exactly
from a mid-epoch checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from dscl import dist
from dscl.data.device_decode import DeviceDecoder, JpegBytes, collate_items
from dscl.data.fileviews import EvalCrops, FileCrops, finish_batch, normalised_planes
from dscl.data.imagesets import ImageFileDataset
from dscl.data.samplers import ClassBalancedSampler
from dscl.data.views import (
    ALL_VIEWS,
    BatchedMultiView,
    MultiViewTransform,
    ViewConfig,
    ViewRequest,
    batched_classifier_train,
    batched_eval,
    classifier_train_transform,
    eval_transform,
)
from dscl.device_path import sync_free
from dscl.errors import DataError, SetupError
from dscl.methods.base import CLASSIFY, VIEWS
from dscl.settings import FeedSettings

# seconds a training loader with workers may go without a batch before the run stops: a worker
# whose batch never arrives (its queue's feeder thread failed, e.g. "Too many open files", and the
# worker lives on) would otherwise leave the main process waiting for ever. Far above a batch's
# time even with slow storage and large batches, so that only a stalled loader hits it.
LOADER_TIMEOUT_S = 600


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**63 - 1)


@dataclass
class Batch:
    # "image" (classify), or what the method's ViewRequest names: "query", "key", "patches" with
    # "boxes" and "patch_flips", and the method's own views by name
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # (B,) int64


class TrainFeed:
    """Per-rank training batches of ``batch_size`` (drop-last), for one epoch at a time.

    Args:
        dataset: a dscl dataset (``targets``, optional ``tensor_images()``).
        kind: ``"views"`` for contrastive views, ``"classify"`` for one augmented image.
        view_cfg: view sizes, patch settings and normalisation.
        settings: how batches are fed: DataLoader workers, the on-device path, the image-file
            path and its JPEG decoding (:class:`~dscl.config.FeedSettings`; the defaults where
            None).
        batch_size: images per step on this rank.
        balanced: class-balanced sampling (stage 2) instead of a random permutation.
        seed: base seed; an epoch's order and augmentations depend on (seed, epoch, rank).
        device: where batches are made.
        request: (kind ``"views"``) the views to make, as the method declares them
            (:meth:`dscl.methods.Method.view_request`): exactly those on every path.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        kind: str,
        view_cfg: ViewConfig,
        settings: FeedSettings | None = None,
        batch_size: int,
        balanced: bool,
        seed: int,
        device: torch.device,
        request: ViewRequest = ALL_VIEWS,
    ) -> None:
        if kind not in (VIEWS, CLASSIFY):
            raise ValueError(f"kind: {kind!r} is not 'views' or 'classify'")
        settings = FeedSettings() if settings is None else settings
        self.settings = settings
        self.fast_files = settings.file_views == "fast" and isinstance(dataset, ImageFileDataset)
        self.jpeg_draft = settings.jpeg_draft
        self.dataset, self.kind, self.view_cfg = dataset, kind, view_cfg
        if not isinstance(request, ViewRequest):
            raise ValueError(f"request: must be a ViewRequest, got {type(request).__name__}")
        if kind == CLASSIFY and request != ALL_VIEWS:
            raise ValueError("request: only a 'views' feed makes a method's own views")
        if kind == VIEWS and not request.standard and not request.extra:
            raise ValueError("request: names no view at all")
        self.request = request
        # decoding on the device needs nvJPEG, so on a CPU the workers decode (but inside
        # device_path.gpu_path, where a CPU takes the GPU's way, with torchvision's CPU decoder);
        # made here so that a torchvision without decode_jpeg stops the run before it starts
        self.decoder: DeviceDecoder | None = None
        if settings.decode_on_device and sync_free(device):
            self.decoder = DeviceDecoder(kind, view_cfg, device, request)
        self.batch_size, self.balanced, self.seed = batch_size, balanced, seed
        self.device, self.num_workers = device, settings.num_workers
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.targets = torch.as_tensor(list(dataset.targets), dtype=torch.long)
        per_rank = len(self.targets) // self.world
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size: {batch_size} per process is larger than the {per_rank} training "
                "images each process gets; lower the batch size"
            )
        self.images = None
        self.generator: torch.Generator | None = None
        if settings.in_memory and hasattr(dataset, "tensor_images"):
            self.images = dataset.tensor_images().to(device)  # (N, 3, H, W) uint8
            self.labels_on_device = self.targets.to(device)
            self.multiview = BatchedMultiView(view_cfg, request) if kind == VIEWS else None

    @property
    def device_decode(self) -> bool:
        """Whether the workers only read the JPEGs' bytes and the main process decodes them on
        the device (``settings.decode_on_device`` on a CUDA device)."""
        return self.decoder is not None

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, ``steps_per_epoch * batch_size`` of them."""
        n = len(self.targets)
        if self.balanced:
            sampler = ClassBalancedSampler(
                self.targets.tolist(),
                num_samples=n,
                seed=self.seed,
                rank=self.rank,
                world_size=self.world,
            )
            sampler.set_epoch(epoch)
            local = torch.as_tensor(list(sampler), dtype=torch.long)
        else:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            perm = torch.randperm(n, generator=g)
            local = perm[self.rank : (n // self.world) * self.world : self.world]
        return local[: self.steps_per_epoch * self.batch_size]

    def epoch(
        self, epoch: int, start: int = 0, generator_state: torch.Tensor | None = None
    ) -> Iterator[Batch]:
        """The batches of ``epoch`` from batch ``start`` on.

        A resumed epoch passes the ``start`` and ``generator_state`` that :meth:`position` gave
        when the checkpoint was written, and gets exactly the batches an uninterrupted epoch
        would have had from there on.
        """
        idx = self.indices(epoch)
        if self.images is not None:
            yield from self._in_memory(idx, epoch, start, generator_state)
        elif self.fast_files:
            yield from self._file_views(idx, epoch, start)
        else:
            yield from self._per_sample(idx, epoch, start)

    def position(self) -> torch.Tensor | None:
        """The state of the current epoch's augmentation generator (in-memory path), to be saved
        with a mid-epoch checkpoint; None for the DataLoader paths, which need none."""
        return None if self.generator is None else self.generator.get_state()

    def _in_memory(
        self, idx: torch.Tensor, epoch: int, start: int, generator_state: torch.Tensor | None
    ) -> Iterator[Batch]:
        g = torch.Generator(device=self.device)
        g.manual_seed(_epoch_seed(self.seed, epoch, self.rank))
        if generator_state is not None:
            g.set_state(generator_state)
        self.generator = g
        cfg = self.view_cfg
        idx = idx.to(self.device)  # one copy per epoch, not one per batch
        for step in range(start, self.steps_per_epoch):
            batch_idx = idx[step * self.batch_size : (step + 1) * self.batch_size]
            images = self.images[batch_idx]  # (B, 3, H, W) uint8
            labels = self.labels_on_device[batch_idx]
            if self.kind == VIEWS:
                inputs = self.multiview(images, generator=g)
            else:
                inputs = {
                    "image": batched_classifier_train(
                        images, cfg.view_size, cfg.mean, cfg.std, generator=g
                    )
                }
            yield Batch(inputs, labels)

    def _positions(self, idx: torch.Tensor, epoch: int, start: int) -> list[tuple[int, int]]:
        """(seed, index) of every sample from batch ``start`` on: one seed per position in the
        epoch, so a sample's augmentation does not depend on the worker or the resume point."""
        base = _epoch_seed(self.seed, epoch, self.rank)
        first = start * self.batch_size
        return [(base + p, int(i)) for p, i in enumerate(idx.tolist()) if p >= first]

    def _loader(
        self, dataset: Dataset, positions: list[tuple[int, int]], seed: int, collate_fn=None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            collate_fn=collate_fn,
            batch_size=self.batch_size,
            sampler=positions,
            num_workers=self.num_workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            timeout=LOADER_TIMEOUT_S if self.num_workers > 0 else 0,  # 0: none (needs workers)
            # its own generator: the loader's seed draw must not advance the global RNG, or a
            # resumed epoch would continue with another RNG state than an uninterrupted one
            generator=torch.Generator().manual_seed(seed),
        )

    def _file_views(self, idx: torch.Tensor, epoch: int, start: int) -> Iterator[Batch]:
        self.generator = None
        crops = FileCrops(self.dataset, self.kind, self.view_cfg, self.jpeg_draft, self.request)
        positions = self._positions(idx, epoch, start)
        seed = _epoch_seed(self.seed, epoch, self.rank)
        if self.device_decode:
            loader = self._loader(JpegBytes(crops), positions, seed, collate_items)
            for items, labels in _worker_errors(loader):
                yield Batch(self.decoder(items), labels.to(self.device, non_blocking=True))
            return
        if not sync_free(self.device) and self.num_workers > 0:
            # training on the CPU: the workers are the spare cores, so each finishes its own
            # batches (colour ops and normalisation, batched) instead of the main process
            finish = partial(
                finished_batch, kind=self.kind, cfg=self.view_cfg, request=self.request
            )
            for inputs, labels in _worker_errors(self._loader(crops, positions, seed, finish)):
                yield Batch(inputs, labels)
            return
        loader = self._loader(crops, positions, seed)
        for sample, labels in _worker_errors(loader):
            inputs = finish_batch(sample, self.kind, self.view_cfg, self.device, self.request)
            yield Batch(inputs, labels.to(self.device, non_blocking=True))

    def _per_sample(self, idx: torch.Tensor, epoch: int, start: int) -> Iterator[Batch]:
        cfg = self.view_cfg
        if self.kind == VIEWS:
            self.dataset.transform = MultiViewTransform(cfg, self.request)
        else:
            self.dataset.transform = classifier_train_transform(cfg.view_size, cfg.mean, cfg.std)
        self.generator = None
        positions = self._positions(idx, epoch, start)
        loader = self._loader(
            PositionSeeded(self.dataset), positions, _epoch_seed(self.seed, epoch, self.rank)
        )
        for sample, labels in _worker_errors(loader):
            if self.kind == VIEWS:
                inputs = {k: v.to(self.device, non_blocking=True) for k, v in sample.items()}
            else:
                inputs = {"image": sample.to(self.device, non_blocking=True)}
            yield Batch(inputs, labels.to(self.device, non_blocking=True))


def finished_batch(items, *, kind: str, cfg: ViewConfig, request: ViewRequest):
    """A DataLoader ``collate_fn`` for ``FileCrops`` items on a CPU: the collated batch finished
    (``fileviews.finish_batch``) in the worker, as (inputs, labels)."""
    sample, labels = default_collate(items)
    return finish_batch(sample, kind, cfg, torch.device("cpu"), request), labels


def _worker_errors(loader: DataLoader) -> Iterator:
    """``loader``'s batches; a ``DataError`` raised in a worker is raised again with its own
    one-line message (a DataLoader wraps it in "Caught DataError in DataLoader worker ..." and
    the worker's traceback), and a loader that timed out (``LOADER_TIMEOUT_S``) stops with a
    one-line ``SetupError`` saying what to check."""
    try:
        yield from loader
    except DataError as err:
        text = str(err)
        last = text.rstrip().splitlines()[-1] if text.strip() else ""
        prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
        if text.startswith("Caught DataError") and last.startswith(prefix):
            raise DataError(last[len(prefix) :]) from None
        raise
    except RuntimeError as err:
        if not str(err).startswith("DataLoader timed out after"):
            raise
        raise SetupError(
            f"data.num_workers: no batch came from the {loader.num_workers} DataLoader workers "
            f"in {loader.timeout:g} s (a worker hangs or lost a batch); look for an error "
            "printed by a worker above, such as 'Too many open files' (raise the limit: "
            "ulimit -n) or one of memory (fewer data.num_workers, or more memory), and check "
            "that the data files can be read"
        ) from None


class PositionSeeded(Dataset):
    """Items ``(seed, index)``: ``dataset[index]`` transformed under torch's RNG seeded with
    ``seed`` (one per position in the epoch), so a sample's augmentation is the same whichever
    worker makes it and wherever a resumed epoch starts. The caller's RNG is left untouched."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        seed, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def eval_batches(
    dataset: Dataset,
    view_cfg: ViewConfig,
    *,
    batch_size: int,
    device: torch.device,
    settings: FeedSettings | None = None,
    rank: int = 0,
    world: int = 1,
):
    """Deterministic (images, labels) batches over a whole evaluation split, in order.

    ``settings`` (:class:`~dscl.config.FeedSettings`; the defaults where None) gives the
    DataLoader workers, the on-device path and the image-file path; JPEG drafts and decoding on
    the device apply to training only. Image files on the fast path (``file_views="fast"``) are
    decoded, resized and centre-cropped in uint8 by the workers (``fileviews.EvalCrops``) and
    normalised a batch at a time on the device (in the workers when training on the CPU with
    workers).

    With ``world`` > 1 only the share of rank ``rank`` is made: batches ``rank``, ``rank + world``,
    ... of the one-process order (:func:`eval_shard`), each the same images as there, so that the
    ranks of a process group split the work of one evaluation between them. The defaults make
    every batch."""
    cfg = view_cfg
    settings = FeedSettings() if settings is None else settings
    num_workers = settings.num_workers
    if not 0 <= rank < world:
        raise ValueError(f"rank: {rank} is not in [0, {world}) for world {world}")
    # one process: the sequential sampler, as always; a share: its images, in order
    shard = None if world == 1 else eval_shard(len(dataset), batch_size, rank, world)
    if settings.file_views == "fast" and isinstance(dataset, ImageFileDataset):
        return _file_eval_batches(dataset, cfg, batch_size, device, num_workers, shard)
    if settings.in_memory and hasattr(dataset, "tensor_images"):
        images = dataset.tensor_images()
        labels = torch.as_tensor(list(dataset.targets), dtype=torch.long)

        def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for start in range(rank * batch_size, len(labels), world * batch_size):
                chunk = images[start : start + batch_size].to(device)
                yield (
                    batched_eval(chunk, cfg.view_size, cfg.mean, cfg.std),
                    labels[start : start + batch_size],
                )

        return _Reiterable(generate)
    dataset.transform = eval_transform(cfg.view_size, cfg.mean, cfg.std)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=shard,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def eval_shard(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The indices of the images of one rank's share of an evaluation split: those of batches
    ``rank``, ``rank + world``, ... of the one-process order, in order.

    Every batch but the split's last is full, so the share, cut into batches of ``batch_size``,
    gives exactly those batches. Dealing out whole batches in turn keeps the shares within one
    batch of each other and each batch the same images as in one process.

    Args:
        n: images in the split.
        batch_size: images per batch.
        rank: this rank, in [0, world).
        world: number of ranks.

    Returns:
        Increasing indices in [0, n); the shares of the ranks 0 .. world - 1 partition range(n).
    """
    batches = range(rank, -(-n // batch_size), world)
    return [i for b in batches for i in range(b * batch_size, min((b + 1) * batch_size, n))]


def normalised_batch(items, *, mean, std):
    """A DataLoader ``collate_fn`` for ``EvalCrops`` items on a CPU: the normalised batch."""
    crops, labels = default_collate(items)
    return normalised_planes(crops, torch.device("cpu"), mean, std), labels


def _file_eval_batches(
    dataset, cfg: ViewConfig, batch_size: int, device, num_workers: int, shard: list[int] | None
):
    crops = EvalCrops(dataset, cfg)
    in_workers = device.type == "cpu" and num_workers > 0
    collate = partial(normalised_batch, mean=cfg.mean, std=cfg.std) if in_workers else None

    def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            crops,
            batch_size=batch_size,
            shuffle=False,
            sampler=shard,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            collate_fn=collate,
        )
        for images, labels in _worker_errors(loader):
            if not in_workers:
                images = normalised_planes(images, device, cfg.mean, cfg.std)
            yield images, labels

    return _Reiterable(generate)


class _Reiterable:
    """An iterable that can be walked more than once (each walk calls ``make`` anew)."""

    def __init__(self, make) -> None:
        self.make = make

    def __iter__(self):
        return self.make()
