"""The one switch between a CPU's way and an accelerator's way, and constants made once per device.

Where the fastest code differs, a CPU reads values on the host freely (``nonzero`` to work on a
subset, the loss checked every step), while on an accelerator the host must never wait for the
device: it queues step N+1 while the device computes step N. :func:`sync_free` says which way
to go; :func:`gpu_path` makes a CPU take the accelerator's way, so that tests and the host-sync
audit (``dscl.engine.host_sync``) run on a CPU exactly the code a GPU runs.

:func:`device_constant` gives a small constant tensor (luma weights, normalisation mean and std)
on a device, made once: built from a Python list at every call it would be a blocking copy from
the host on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["device_constant", "gpu_path", "sync_free"]

_GPU_PATH_ON_CPU = [False]
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def sync_free(device: torch.device) -> bool:
    """Whether code on ``device`` must avoid reading values back to the host: on an
    accelerator always, on a CPU inside :func:`gpu_path`."""
    return device.type != "cpu" or _GPU_PATH_ON_CPU[0]


@contextmanager
def gpu_path() -> Iterator[None]:
    """Within the block, a CPU takes the accelerator's way wherever the two differ."""
    before = _GPU_PATH_ON_CPU[0]
    _GPU_PATH_ON_CPU[0] = True
    try:
        yield
    finally:
        _GPU_PATH_ON_CPU[0] = before


def device_constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """``torch.tensor(values)`` with ``like``'s device and dtype, made on the first call for that
    (values, device, dtype) and reused after (never written to: callers only read it)."""
    key = (values, like.device, like.dtype)
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = torch.tensor(values, dtype=like.dtype, device=like.device)
        _CONSTANTS[key] = constant
    return constant
