"""Plain, torch-free pieces of the settings that the layers below the config use too: the values
a setting that takes one of a few may have (the config's checks and the library entry points that
run without a config, such as ``dscl.data.build_splits`` and ``dscl.engine.feed.TrainFeed``,
use these, and nothing keeps its own copy), and the feed settings the data settings resolve
into. It imports nothing of ``dscl`` but its errors, so ``config`` and ``data`` both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dscl.errors import ConfigError

# The values a setting that takes one of a few may have: the config's checks and the library
# entry points that can be called without a config use these, and nothing keeps its own copy.
LABEL_ORDER = "label"  # data.class_order: the class order of the labels (else an integer seed)
VAL_SHORTFALL = ("partial", "carve", "error")  # data.val_shortfall
FILE_VIEWS = ("fast", "per_sample")  # data.file_views
BN_MODES = ("train", "eval")  # classifier.bn_mode
AMP_MODES = ("auto", "off", "bf16", "fp16")  # amp


def check_choice(key: str, value: Any, choices: tuple[str, ...], error: type = ConfigError) -> None:
    """Raise ``error`` naming ``key`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise error(f"{key}: {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class FeedSettings:
    """How batches are fed (``dscl.engine.feed.TrainFeed`` and ``eval_batches``), as
    :meth:`dscl.config.DataConfig.feed_settings` resolves them from the run's data settings.

    Attributes:
        num_workers: DataLoader workers for image files and the per-sample path.
        in_memory: use the on-device path when the dataset supports it (``data.batched_views``).
        file_views: ``"fast"`` or ``"per_sample"``: how an image-file dataset is fed (see
            ``dscl.engine.feed``).
        jpeg_draft: 0, or (fast path) decode JPEGs at the DCT scale 1/2, 1/4 or 1/8 that keeps
            the shorter side >= this many pixels.
        decode_on_device: (fast path, CUDA devices) the workers only read the JPEGs' bytes and
            the main process decodes a batch at a time on the device (nvJPEG); elsewhere the
            workers decode.
    """

    num_workers: int = 0
    in_memory: bool = True
    file_views: str = "fast"
    jpeg_draft: int = 0
    decode_on_device: bool = False

    def __post_init__(self) -> None:
        check_choice("file_views", self.file_views, FILE_VIEWS, ValueError)
