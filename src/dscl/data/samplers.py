"""Class-balanced sampling for the classifier stage, rank-aware.

Stage 2 of DSCL trains the linear classifier on a class-balanced stream (Kang et al., 2020,
"Decoupling representation and classifier"): each draw picks a class uniformly, then an image of
that class uniformly, so every class is equally likely whatever its size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ClassBalancedSampler(Sampler[int]):
    """Draws (with replacement) a class uniformly, then one of its images uniformly.

    The epoch's global stream of ``total`` draws depends only on (targets, seed, epoch, total),
    where ``total`` is ``num_samples`` rounded UP to a multiple of ``world_size`` (so every rank
    gets the same number; at most ``world_size - 1`` extra draws). Rank r yields the draws at
    positions r, r + W, r + 2W, ... of that stream, so ranks see disjoint positions and together
    the whole stream. Classes with no image are never drawn.

    Args:
        targets: (N,) label of every image of the dataset.
        num_samples: draws per epoch over all ranks; None means N.
        seed: base seed, shared by all ranks.
        rank: this process's rank r in [0, W).
        world_size: number of processes W.
    """

    def __init__(
        self,
        targets: Sequence[int],
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels = np.asarray(targets)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"targets must be a non-empty 1-D integer sequence, got {labels!r}")
        if labels.min() < 0:
            raise ValueError(f"targets must be non-negative, got {int(labels.min())}")
        num_samples = len(labels) if num_samples is None else num_samples
        for name, value, low in (
            ("num_samples", num_samples, 1),
            ("world_size", world_size, 1),
            ("seed", seed, 0),
            ("rank", rank, 0),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        # Indices grouped by class: class k's images are order[offsets[k] : offsets[k] + sizes[k]].
        self._order = np.argsort(labels, kind="stable")
        classes, sizes = np.unique(labels, return_counts=True)
        self._sizes = sizes
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.num_classes_present = len(classes)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.total_size = -(-int(num_samples) // self.world_size) * self.world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose stream ``__iter__`` yields next."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def global_stream(self) -> np.ndarray:
        """The epoch's (total_size,) int64 dataset indices over all ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        cls = rng.integers(0, self.num_classes_present, size=self.total_size)  # (T,) class slot
        within = rng.integers(0, self._sizes[cls])  # (T,) position inside the class
        return self._order[self._offsets[cls] + within].astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        stream = self.global_stream()[self.rank :: self.world_size]
        return iter(stream.tolist())

    def __len__(self) -> int:
        return self.total_size // self.world_size
