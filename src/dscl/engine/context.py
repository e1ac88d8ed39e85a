"""What a training stage runs with, decided once by the command line: the run's config, folder,
device, precision, data splits, views, feed settings and logger (:class:`StageContext`), and what
both stages build from it: training feeds, evaluation batches, metrics, the optimizer, the memory
format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dscl import dist
from dscl.config import FeedSettings, RunConfig
from dscl.data.views import ALL_VIEWS, ViewConfig
from dscl.engine import runtime
from dscl.engine.evaluate import classification_metrics
from dscl.engine.feed import TrainFeed, eval_batches
from dscl.engine.loop import Optimization
from dscl.engine.preemption import StopSignals
from dscl.errors import SetupError
from dscl.methods import DataInfo, Method


@dataclass
class StageContext:
    """Where and how a stage runs, decided once by the command line."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    amp: torch.dtype | None
    splits: object  # dscl.data.DataSplits
    view_cfg: ViewConfig  # the views of cfg.data (ViewConfig.from_data)
    feed: FeedSettings  # how batches are fed (cfg.data.feed_settings())
    logger: runtime.RunLogger
    stop: StopSignals | None = None  # stop requests (SIGTERM/SIGINT) while training

    def train_feed(
        self, kind: str, batch_size: int, key: str, balanced: bool, seed: int, request=None
    ):
        """Training batches of ``kind`` for the global ``batch_size`` (setting ``key``), with the
        views of ``request`` (a ``ViewRequest``; None: the standard ones)."""
        return TrainFeed(
            self.splits.train,
            kind=kind,
            view_cfg=self.view_cfg,
            settings=self.feed,
            batch_size=per_process_batch(batch_size, key),
            balanced=balanced,
            seed=seed,
            device=self.device,
            request=request if request is not None else ALL_VIEWS,
        )

    def eval_batches(self, dataset, shard: bool = False):
        """Deterministic evaluation batches over a whole split; with ``shard``, only this rank's
        share of them (every rank a different one, see :func:`~dscl.engine.feed.eval_shard`)."""
        return eval_batches(
            dataset,
            self.view_cfg,
            batch_size=256,
            device=self.device,
            settings=self.feed,
            rank=dist.get_rank() if shard else 0,
            world=dist.get_world_size() if shard else 1,
        )

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        """Top-k, Many/Medium/Few and per-class accuracy against the training class counts."""
        d = self.cfg.data
        return classification_metrics(
            logits,
            targets,
            self.splits.class_counts,
            many_threshold=d.many_threshold,
            few_threshold=d.few_threshold,
        )

    def optimization(self, method: Method, lr_at, momentum: float, weight_decay: float):
        """SGD over the method's trainable parameters (lr set every step from ``lr_at``), the
        loss scaler, precision and memory format of this run."""
        params = method.trainable_parameters()
        sgd = torch.optim.SGD(params, lr=0.0, momentum=momentum, weight_decay=weight_decay)
        scaler = runtime.grad_scaler(self.device, self.amp)
        return Optimization(sgd, lr_at, scaler, self.device, self.amp, memory_format(self.cfg))


def data_info(ctx: StageContext) -> DataInfo:
    """What a method's builder is told about the training data."""
    v = ctx.view_cfg
    return DataInfo(
        num_classes=ctx.splits.num_classes,
        class_counts=tuple(int(n) for n in ctx.splits.class_counts),
        image_size=v.view_size,
        patch_size=v.patch_px,
        num_patches=v.num_patches,
    )


def per_process_batch(batch_size: int, key: str) -> int:
    """The batch of one process for the global ``batch_size`` (setting ``key``)."""
    world = dist.get_world_size()
    if batch_size % world:
        raise SetupError(f"{key}: {batch_size} is not divisible by {world} processes")
    return batch_size // world


def memory_format(cfg: RunConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format
