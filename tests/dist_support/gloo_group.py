"""What every two-process worker does first: join the gloo group of ``world`` ranks on this
machine as ``rank`` (one thread each, so two ranks do not halve each other)."""

from __future__ import annotations

import os

import torch

from dscl import dist


def join(rank: int, port: int, world: int):
    """Set the torchrun variables for ``rank`` and join the group; returns what
    ``dist.init_distributed`` returned."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    return dist.init_distributed(backend="gloo")
