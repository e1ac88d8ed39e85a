"""Worker for the two-process gloo test in tests/test_dist.py.

It lives in its own importable module (the test puts this folder on sys.path, which spawned
children inherit) because test modules imported by pytest's importlib mode cannot be pickled
by name for ``torch.multiprocessing.spawn``.
"""

from __future__ import annotations

from pathlib import Path

import gloo_group
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dscl import dist
from dscl.losses import DSCLLoss

WORLD_SIZE = 2
LOCAL_BATCH = 4
SHUFFLE_BATCH = 8
IN_DIM, DIM, QUEUE, CLASSES = 5, 6, 7, 3
TEMPERATURE, BETA = 0.2, 4.0


def make_problem() -> dict:
    """The global float64 batch (WORLD_SIZE * LOCAL_BATCH rows), identical on every rank."""
    gen = torch.Generator().manual_seed(1234)
    total = WORLD_SIZE * LOCAL_BATCH

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)

    return {
        "inputs": torch.randn(total, IN_DIM, generator=gen, dtype=torch.float64),
        "query": unit(total, DIM),
        "key": unit(total, DIM),
        "labels": torch.randint(CLASSES, (total,), generator=gen),
        "queue": unit(QUEUE, DIM),
        "queue_labels": torch.randint(CLASSES, (QUEUE,), generator=gen),
        "queue_valid": torch.tensor([True, True, False, True, True, False, True]),
    }


def make_encoder() -> nn.Linear:
    torch.manual_seed(99)
    return nn.Linear(IN_DIM, DIM).double()


def run(rank: int, port: int, out_dir: str) -> None:
    """Entry point for torch.multiprocessing.spawn (rank is the process index)."""
    out: dict = {"init": gloo_group.join(rank, port, WORLD_SIZE)}
    out.update(
        initialized=dist.is_dist_available_and_initialized(),
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        main=dist.is_main_process(),
    )
    problem = make_problem()
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    loss_fn = DSCLLoss(TEMPERATURE, BETA)
    queue_args = (problem["queue"], problem["queue_labels"], problem["queue_valid"])

    # Gathers, and the DSCL loss over the gathered batch with gradient to local queries.
    keys = dist.all_gather(problem["key"][local])
    labels = dist.all_gather(problem["labels"][local])
    query = problem["query"][local].clone().requires_grad_(True)
    loss = loss_fn(dist.all_gather_with_grad(query), keys, labels, *queue_args)
    loss.backward()
    out.update(keys=keys, labels=labels, loss=loss.detach(), query_grad=query.grad)

    # A DDP-wrapped encoder producing the queries.
    encoder = make_encoder()
    ddp = DistributedDataParallel(encoder)
    embeddings = F.normalize(ddp(problem["inputs"][local]), dim=1)
    ddp_loss = loss_fn(dist.all_gather_with_grad(embeddings), keys, labels, *queue_args)
    ddp_loss.backward()
    out["ddp_loss"] = ddp_loss.detach()
    out["ddp_grads"] = {name: p.grad.clone() for name, p in encoder.named_parameters()}

    # Shuffled batch norm helpers: row r of the global batch holds the value r.
    torch.manual_seed(500 + rank)  # ranks disagree: only rank 0's permutation may be used
    rows = torch.arange(rank * SHUFFLE_BATCH, (rank + 1) * SHUFFLE_BATCH, dtype=torch.float64)
    x = rows[:, None].repeat(1, 3)
    shuffled, unshuffle_index = dist.batch_shuffle(x)
    out.update(
        shuffled=shuffled,
        unshuffle_index=unshuffle_index,
        unshuffled=dist.batch_unshuffle(shuffled * 10, unshuffle_index),
        any_rank={
            "none": dist.any_rank(False),
            "all": dist.any_rank(True),
            "rank0": dist.any_rank(rank == 0),
            "rank1": dist.any_rank(rank == 1),
        },
    )

    # Shares of unequal length: row i of rank r holds (r, i) twice; rank 0 has none in "empty".
    def share(rows: int, width: int = 2) -> torch.Tensor:
        return torch.tensor([[rank, i] * (width // 2) for i in range(rows)], dtype=torch.float64)

    out["gather_rows"] = {
        "uneven": dist.all_gather_rows(share(2 + rank)),
        "empty": dist.all_gather_rows(share(3 * rank) if rank else torch.empty(0, 0).double()),
    }
    try:
        dist.all_gather_rows(share(1, width=2 + 2 * rank))
    except ValueError as err:
        out["gather_rows"]["mismatch"] = str(err)
    dist.barrier()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.cleanup()
    out_after = dist.is_dist_available_and_initialized()
    torch.save({"initialized_after_cleanup": out_after}, Path(out_dir) / f"after{rank}.pt")
