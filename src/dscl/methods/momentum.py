"""What the methods with a MoCo momentum encoder share (``supcon``, ``dscl`` with or without
``+pbsd``, and ``paco``): the momentum encoder starts as a copy of the query encoder, and after
each optimizer step it follows the query encoder by EMA and the step's keys enter the queue."""

from __future__ import annotations

import torch
from torch import nn

from dscl.methods.base import Method

# the settings that shape a ContrastiveModel's state: its heads' width and its queue's length
MOMENTUM_KEYS = ("model.embed_dim", "pretrain.queue_size")


class MomentumMethod(Method):
    """A method whose model holds a :class:`~dscl.models.ContrastiveModel` (query encoder,
    momentum encoder, labelled queue). Its :meth:`step` hands the keys for the queue to
    :meth:`hold_keys`; :meth:`after_step` then does MoCo's order: the EMA step, then the keys
    into the queue, so the queue never holds the keys of the batch being scored.

    Args:
        model: the modules the method trains and checkpoints.
        encoder_momentum: m of the key encoder's EMA, θ_m ← m·θ_m + (1 − m)·θ_q.
    """

    def __init__(self, model: nn.Module, encoder_momentum: float) -> None:
        super().__init__(model)
        self.encoder_momentum = encoder_momentum
        self._keys: tuple[torch.Tensor, torch.Tensor] | None = None  # for the queue, after step

    def momentum_model(self) -> nn.Module:
        """The :class:`~dscl.models.ContrastiveModel` (the whole model unless overridden)."""
        return self.model

    def hold_keys(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep this step's keys (N, D) and their labels (N,) for the queue, after the step."""
        self._keys = (keys, labels)

    def start_training(self) -> None:
        self.momentum_model().init_momentum_encoder()

    def after_step(self) -> None:
        self.momentum_model().follow_and_enqueue(self.encoder_momentum, *self._keys)
        self._keys = None

    def compile_targets(self) -> list[nn.Module]:
        c = self.momentum_model()
        return [c.query_encoder.backbone, c.momentum_encoder.backbone]
