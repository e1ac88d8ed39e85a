"""FIFO queue of (key embedding, label) pairs with a validity mask (docs/DESIGN.md §2.3).

The authors' code starts the queue with random features and random labels; here entries that
were never written are marked invalid (``valid`` False, features zero) and the losses exclude
them from every contrast set. All state, including the write pointer, lives in registered
buffers, so it is saved in ``state_dict`` and restored exactly by ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LabelledQueue"]


class LabelledQueue(nn.Module):
    """K slots of (embedding, label), overwritten oldest-first with wrap-around.

    Invariant: ``ptr`` is the slot written next, which is the oldest entry once the queue is
    full; reading the slots ``ptr, ptr + 1, …`` (mod K) goes from oldest to newest.

    Args:
        size: K, the number of slots (0 allowed: nothing is ever stored).
        dim: D, the embedding size.

    Buffers:
        features: (K, D) float32 stored embeddings (zeros where never written).
        labels: (K,) int64 stored labels (0 where never written).
        valid: (K,) bool, True for slots that hold an enqueued entry.
        ptr: () int64, next slot to write.
    """

    features: Tensor
    labels: Tensor
    valid: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("valid", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """K, the capacity (number of slots, valid or not)."""
        return self.features.shape[0]

    @property
    def num_valid(self) -> int:
        """Number of slots holding an enqueued entry (min(K, total enqueued))."""
        return int(self.valid.sum())

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue: zero features and labels, mark every slot invalid, pointer to 0."""
        self.features.zero_()
        self.labels.zero_()
        self.valid.fill_(False)
        self.ptr.zero_()

    @torch.no_grad()
    def enqueue(self, features: Tensor, labels: Tensor) -> None:
        """Append a batch, overwriting the oldest entries; a batch larger than K keeps its
        newest (last) K rows. A no-op when K = 0.

        Args:
            features: (N, D) key embeddings (gathered from every rank by the caller).
            labels: (N,) integer class labels.
        """
        # N batch, K queue, D dim
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must have shape (N, {self.dim}), got {tuple(features.shape)}"
            )
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        size = self.size
        count = min(features.shape[0], size)
        if count == 0:
            return
        features = features[-count:].detach().to(self.features)  # (n, D), n = min(N, K)
        labels = labels[-count:].to(self.labels)  # (n,)
        slots = (self.ptr + torch.arange(count, device=self.ptr.device)) % size  # (n,)
        self.features[slots] = features
        self.labels[slots] = labels
        self.valid.index_fill_(0, slots, True)
        self.ptr.copy_((self.ptr + count) % size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
