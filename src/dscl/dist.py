"""Process-group helpers that also work with no process group (one process).

Every distributed call of the package goes through this module. With no initialised default
group each helper behaves as the world of one process: gathers return their input,
:func:`any_rank` returns its flag, the batch shuffle is the identity.

All gathers but :func:`all_gather_rows` require every rank to pass a tensor of the same shape (in
particular the same batch size). The helpers do not check this on every call (it would cost an
extra collective per step); use ``drop_last=True`` samplers so that the batches agree.
:func:`all_gather_rows` pays that extra collective, for evaluation, where the ranks' shares of a
split differ.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dscl.errors import SetupError

# torch.distributed's own errors (store, network, backend); older torch lacks the class
_DIST_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(dist, "DistError", None),) if cls is not None
)


def is_dist_available_and_initialized() -> bool:
    """True when torch.distributed is built in and the default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group, 0 with no group."""
    return dist.get_rank() if is_dist_available_and_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default group, 1 with no group."""
    return dist.get_world_size() if is_dist_available_and_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Waits for every rank; does nothing with no group."""
    if is_dist_available_and_initialized():
        dist.barrier()


@torch.no_grad()
def all_gather(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` from every rank along dim 0, in rank order, with no gradient.

    Args:
        tensor: (N, ...) this rank's tensor; same shape on every rank.

    Returns:
        (world_size * N, ...) tensor, detached; with no group, ``tensor`` itself (detached).
    """
    if get_world_size() == 1:
        return tensor.detach()
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` from every rank along dim 0, in rank order, where the ranks may hold
    different numbers of rows (their shares of an evaluation split), with no gradient.

    The ranks first gather each other's shapes, then every rank's rows padded to the longest
    share, and cut the padding off again. A rank with no rows may pass any empty tensor with the
    same number of dims and dtype (its other dims are taken from the ranks that have rows).

    Args:
        tensor: (N_r, ...) this rank's rows; every rank with rows has the same trailing shape,
            and all have the same dtype, device and number of dims.

    Returns:
        (N_0 + ... + N_{W-1}, ...) tensor, detached; with no group, ``tensor`` itself (detached).

    Raises:
        ValueError: the ranks with rows disagree on the trailing shape (raised on every rank).
    """
    # W world size, N_r rows of rank r
    if get_world_size() == 1:
        return tensor.detach()
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = all_gather(shape[None]).tolist()  # W lists of ndim sizes
    sizes = [s[0] for s in shapes]
    trailing = {tuple(s[1:]) for s in shapes if s[0] > 0}
    if len(trailing) > 1:
        raise ValueError(f"all_gather_rows: the ranks' rows have different shapes {shapes}")
    if not trailing:  # no rank has a row
        return tensor.detach()
    (rest,) = trailing
    padded = tensor.new_zeros(max(sizes), *rest)
    padded[: sizes[get_rank()]] = tensor.detach().reshape(-1, *rest)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather + cat whose backward sums the gradient over ranks and keeps this rank's slice.

    Every rank computes its loss from the gathered tensor, so the gradient of the total
    objective w.r.t. this rank's rows is the sum over ranks of each rank's gradient for them.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.batch = tensor.shape[0]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()  # (world_size * N, ...)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]  # (N, ...)


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` from every rank along dim 0, keeping the autograd graph.

    Backward all-reduces (sums) the incoming gradient and returns this rank's slice, so the
    gradient from every rank's use of these rows flows back. If each rank computes the same
    global loss from the gathered tensor, this rank's gradient is world_size times the
    single-process gradient, which DDP's gradient averaging divides back out.

    Args:
        tensor: (N, ...) this rank's tensor; same shape on every rank.

    Returns:
        (world_size * N, ...) tensor; ``tensor`` itself (graph kept) with no group.
    """
    if get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def _collective_device() -> torch.device:
    """Where a small tensor for a collective must live: the current CUDA device for nccl, the CPU
    for gloo (and any other backend)."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_max_flag(flag: bool) -> bool:
    """All-reduce (MAX) of ``flag`` as a 0/1 integer over the default group."""
    value = torch.tensor([int(bool(flag))], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one rank.

    A collective: every rank of the default group must call it at the same point (e.g. once per
    step, so that all ranks stop at the same step when one of them got a signal). With no group
    it returns ``flag`` itself.

    Args:
        flag: this rank's condition.

    Returns:
        The logical OR of ``flag`` over ranks, the same on every rank.
    """
    if get_world_size() == 1:
        return bool(flag)
    return _all_reduce_max_flag(flag)


@torch.no_grad()
def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process.

    For small per-rank states written into a checkpoint by rank 0 (RNG and data-order positions).
    """
    if not is_dist_available_and_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffles a batch across ranks for MoCo's shuffled batch norm (key encoder only).

    Rank 0 draws one permutation of the global batch and broadcasts it; each rank keeps its
    slice of the permuted global batch.

    Args:
        x: (N, ...) this rank's batch; same N on every rank.

    Returns:
        ``(shuffled, unshuffle_index)``: (N, ...) this rank's slice of the shuffled global batch
        and (world_size * N,) int64 index that undoes the permutation (for
        :func:`batch_unshuffle`). With no group: ``x`` itself and ``arange(N)``.
    """
    # N local batch, W world size
    batch, world = x.shape[0], get_world_size()
    if world == 1:
        return x, torch.arange(batch, device=x.device)
    gathered = all_gather(x)  # (W*N, ...)
    permutation = torch.empty(world * batch, dtype=torch.long, device=x.device)
    if get_rank() == 0:
        permutation = torch.randperm(world * batch, device=x.device)
    dist.broadcast(permutation, src=0)
    unshuffle_index = torch.argsort(permutation)  # (W*N,)
    start = get_rank() * batch
    return gathered[permutation[start : start + batch]], unshuffle_index


@torch.no_grad()
def batch_unshuffle(x: Tensor, unshuffle_index: Tensor) -> Tensor:
    """Undoes :func:`batch_shuffle`: gathers, applies the inverse permutation, keeps this slice.

    Args:
        x: (N, ...) this rank's outputs computed on the shuffled batch.
        unshuffle_index: (world_size * N,) index returned by :func:`batch_shuffle`.

    Returns:
        (N, ...) outputs in this rank's original sample order.
    """
    # N local batch, W world size
    batch, world = x.shape[0], get_world_size()
    if tuple(unshuffle_index.shape) != (world * batch,):
        raise ValueError(
            f"unshuffle_index must have shape ({world * batch},), "
            f"got {tuple(unshuffle_index.shape)}"
        )
    if world == 1:
        return x[unshuffle_index]
    gathered = all_gather(x)  # (W*N, ...)
    start = get_rank() * batch
    return gathered[unshuffle_index[start : start + batch]]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SetupError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Joins the process group described by torchrun's environment.

    Reads RANK, WORLD_SIZE and LOCAL_RANK (defaults 0, 1, 0). Initialises the default group
    only when WORLD_SIZE > 1 (and it is not initialised yet), with ``backend`` or, when None,
    nccl if CUDA is available (also selecting cuda:LOCAL_RANK) and gloo otherwise.

    Args:
        backend: torch.distributed backend name, or None to choose as above.

    Returns:
        ``(rank, world_size, local_rank)``.

    Raises:
        SetupError: the environment does not describe a usable group (a malformed or
            inconsistent RANK / WORLD_SIZE / LOCAL_RANK, no MASTER_ADDR / MASTER_PORT, a
            LOCAL_RANK with no GPU for nccl) or the group cannot be joined.
        ValueError: ``backend`` is not a non-empty string (a caller's bug).
    """
    if backend is not None and (not isinstance(backend, str) or not backend):
        raise ValueError(f"backend must be a non-empty string or None, got {backend!r}")
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1:
        raise SetupError(f"environment variable WORLD_SIZE must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise SetupError(f"environment variable RANK must be in [0, {world_size}), got {rank}")
    if local_rank < 0:
        raise SetupError(f"environment variable LOCAL_RANK must be >= 0, got {local_rank}")
    if world_size == 1 or is_dist_available_and_initialized():
        return rank, world_size, local_rank
    if not dist.is_available():
        raise SetupError(f"WORLD_SIZE={world_size} but torch.distributed is not available")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise SetupError(
            f"WORLD_SIZE={world_size} but environment variable {' and '.join(missing)} is not "
            "set; start the processes with torchrun"
        )
    port = _env_int("MASTER_PORT", 0)
    if not 0 < port < 65536:
        raise SetupError(
            f"environment variable MASTER_PORT must be a port in [1, 65535], got {port}"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise SetupError(
                f"LOCAL_RANK={local_rank} needs GPU {local_rank} for nccl but {gpus} GPU(s) are "
                "visible; start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size
        )
    except _DIST_ERRORS as err:  # rendezvous failed: address, port, or the other ranks
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SetupError(
            f"cannot join the process group as rank {rank} of {world_size} (MASTER_ADDR="
            f"{os.environ['MASTER_ADDR']}, MASTER_PORT={os.environ['MASTER_PORT']}): {first_line}"
        ) from err
    return rank, world_size, local_rank


def cleanup() -> None:
    """Destroys the default process group if there is one."""
    if is_dist_available_and_initialized():
        dist.destroy_process_group()
