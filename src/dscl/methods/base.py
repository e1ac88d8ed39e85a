"""What every training method is: an object that owns its model, turns a batch into a loss and
does its own work after each optimizer step.

The training loop (:func:`dscl.engine.loop.run_epoch`) knows nothing about any method: it sets
the learning rate, calls :meth:`Method.step` under autocast, back-propagates
:attr:`StepOutput.loss`, steps the optimizer and then calls :meth:`Method.after_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dscl.data.views import CLASSIFY, VIEWS
from dscl.errors import ConfigError


def method_backbone(cfg: Any) -> nn.Module:
    """The backbone a method trains, as the config says (``model.backbone``, ``model.pretrained``,
    ``model.zero_init_residual``): the one place every builder takes it from."""
    from dscl.models import build_backbone, zero_init_residual

    m = cfg.model
    backbone = build_backbone(m.backbone, pretrained=m.pretrained)
    if m.zero_init_residual:
        zero_init_residual(backbone)
    return backbone


@dataclass(frozen=True)
class DataInfo:
    """What the training data says, for a method's builder.

    Attributes:
        num_classes: C.
        class_counts: training images per class (C,), hence the class prior; None where the
            builder is called without data (a benchmark or test on random inputs).
        image_size: the view size in pixels (S).
        patch_size: the patch size in pixels.
        num_patches: L, patches per image.
    """

    num_classes: int
    class_counts: tuple[int, ...] | None = None
    image_size: int | None = None
    patch_size: int | None = None
    num_patches: int | None = None

    @classmethod
    def of(cls, data: DataInfo | int) -> DataInfo:
        """``data`` as a DataInfo (a bare number of classes gives one without counts)."""
        return data if isinstance(data, DataInfo) else cls(num_classes=int(data))

    def counts(self, method: str) -> list[int]:
        """The training class counts; raises ValueError naming ``method`` without them."""
        if self.class_counts is None:
            raise ValueError(f"method {method} needs the training class counts (the class prior)")
        return list(self.class_counts)


# a one-stage peer's views: its authors' own (``authors``) or the shared query and key (``stage1``)
AUGMENTS = ("authors", "stage1")
# BCL and PaCo trained on this project's query and key views before they had their own: their
# runs saved before these settings existed read them so (their MethodSpec's ``added``)
BEFORE_OWN_VIEWS = {"augment": "stage1", "randaugment_ops": 2, "randaugment_magnitude": 10}


def check_augment(settings) -> None:
    """Check the ``augment``, ``randaugment_ops`` and ``randaugment_magnitude`` settings that
    BCL and PaCo share (ConfigError naming the key)."""
    if settings.augment not in AUGMENTS:
        raise ConfigError(f"augment: {settings.augment!r} is not one of {', '.join(AUGMENTS)}")
    if settings.randaugment_ops < 0:
        raise ConfigError(f"randaugment_ops: must not be negative, got {settings.randaugment_ops}")
    if not 0 <= settings.randaugment_magnitude <= 30:
        raise ConfigError(
            f"randaugment_magnitude: must be in 0..30, got {settings.randaugment_magnitude}"
        )


@dataclass
class StepOutput:
    """The result of one training step's forward pass.

    Attributes:
        loss: scalar to minimise (its graph reaches the trained parameters).
        logs: detached scalar tensors to log besides ``loss`` (e.g. the loss's terms). They are
            read only at the logging cadence, so a step never waits for the device.
    """

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


class Method:
    """Base class of a training method.

    A subclass sets :attr:`feed_kind` (which inputs its batches need), builds :attr:`model` (every
    module whose state a checkpoint keeps) and implements :meth:`step`. The forward pass goes
    through :attr:`net`, which is :attr:`model` or, under several processes, its DDP wrapper.

    With ``feed_kind`` VIEWS a method declares its views, and the feed makes exactly those:
    :attr:`views`, the standard stage-1 views it reads (``query``, ``key``, ``patches``), and
    :attr:`extra_views`, views of its own, ``{name: ViewSpec}`` each with its augmentation
    (:mod:`dscl.data.named_views`), found under their names in ``batch.inputs``.

    Args:
        model: the modules this method trains and checkpoints.
    """

    feed_kind: str = CLASSIFY
    # with feed_kind VIEWS: the standard views step() reads; the feed makes no pixels of the
    # others (it draws their random parameters all the same while any is read)
    views: tuple[str, ...] = ("query", "key", "patches")
    # with feed_kind VIEWS: the method's own views, {name: ViewSpec}, drawn after the standard ones
    extra_views: dict[str, Any] = {}  # noqa: RUF012 (read only)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.net: nn.Module = model

    def view_request(self):
        """What the feed makes for this method's batches (:class:`dscl.data.views.ViewRequest`):
        the standard views of :attr:`views` and the views of :attr:`extra_views`."""
        from dscl.data.views import ALL_VIEWS, ViewRequest

        if self.feed_kind != VIEWS:
            return ALL_VIEWS
        return ViewRequest.make(self.views, self.extra_views)

    def to(
        self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format
    ) -> Method:
        """Move :attr:`model` and every other module the method holds (its losses, with their
        buffers: BCL's and PaCo's class priors) to ``device``, so that a step copies nothing
        from the host. Returns the method."""
        self.model.to(device, memory_format=memory_format)
        for value in vars(self).values():
            if isinstance(value, nn.Module) and value is not self.model and value is not self.net:
                value.to(device)
        return self

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Route the forward pass through ``wrapper(model)`` (DistributedDataParallel)."""
        self.net = wrapper(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def start_training(self) -> None:
        """Called once before the first step of a fresh (not resumed) run."""

    def train(self) -> None:
        """Set the train/eval flags of the model's modules for a training epoch."""
        self.model.train()

    def step(self, batch: Any) -> StepOutput:
        """Forward pass and loss of one batch (``batch.inputs`` dict, ``batch.labels`` (B,))."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Work after the optimizer step (momentum-encoder update, enqueueing keys, ...)."""

    def compile_targets(self) -> list[nn.Module]:
        """The modules whose training forward ``compile=true`` hands to ``torch.compile``."""
        return [self.backbone()]

    def backbone(self) -> nn.Module:
        """The backbone whose weights stage 2 keeps and ``dscl export`` writes."""
        return self.model.backbone

    def classifier(self) -> nn.Module | None:
        """The method's own :class:`~dscl.models.Classifier` (backbone + linear layer, sharing
        the trained backbone), which stage 2 may keep or retrain (``classifier.mode``); None for
        a method without one (register it with ``classifier=`` to offer it)."""
        return None
