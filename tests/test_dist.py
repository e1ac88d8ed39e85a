"""dscl.dist: one-process fallbacks, and a real two-process gloo group against one process."""

import pytest
import torch
import torch.distributed as tdist

from dscl import dist
from dscl.errors import SetupError
from dscl.losses import DSCLLoss
from gloo_run import free_port, run_gloo_workers

# --- no process group: every helper is the world of one process ---------------------------


def test_no_group_reports_one_process():
    assert not dist.is_dist_available_and_initialized()
    assert (dist.get_rank(), dist.get_world_size(), dist.is_main_process()) == (0, 1, True)
    dist.barrier()  # a no-op, must not raise
    dist.cleanup()


def test_no_group_gathers_return_input():
    x = torch.randn(3, 2, requires_grad=True)
    gathered = dist.all_gather(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    with_grad = dist.all_gather_with_grad(x)
    assert with_grad is x  # graph kept
    (with_grad * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_no_group_gather_rows_returns_input():
    x = torch.randn(3, 2, requires_grad=True)
    gathered = dist.all_gather_rows(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert dist.all_gather_rows(torch.empty(0, 0)).shape == (0, 0)


def test_no_group_any_rank_is_the_flag():
    assert dist.any_rank(True) is True
    assert dist.any_rank(False) is False
    assert dist.any_rank(1) is True  # any truthy value, returned as a bool


def test_collective_device_follows_the_backend(monkeypatch):
    # No second GPU here: check the choice itself (nccl needs the current CUDA device).
    monkeypatch.setattr(dist.dist, "get_backend", lambda group=None: "gloo")
    assert dist._collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dist._collective_device() == torch.device("cuda", 3)


@pytest.mark.cuda
def test_any_rank_reduces_on_the_cuda_device_with_nccl(monkeypatch):
    # A one-process nccl group; the reduction itself is called (any_rank skips it for one rank).
    if not tdist.is_nccl_available():
        pytest.skip("nccl is not available")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    tdist.init_process_group("nccl", init_method="env://", rank=0, world_size=1)
    try:
        assert dist._collective_device() == torch.device("cuda", 0)
        assert dist._all_reduce_max_flag(True) is True
        assert dist._all_reduce_max_flag(False) is False
    finally:
        dist.cleanup()
    assert not dist.is_dist_available_and_initialized()


def test_no_group_shuffle_is_identity():
    x = torch.randn(5, 3)
    shuffled, index = dist.batch_shuffle(x)
    assert shuffled is x and torch.equal(index, torch.arange(5))
    assert torch.equal(dist.batch_unshuffle(shuffled, index), x)
    with pytest.raises(ValueError, match=r"^unshuffle_index\b"):
        dist.batch_unshuffle(x, torch.arange(4))


def test_init_distributed_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist.init_distributed() == (0, 1, 0)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.init_distributed("gloo") == (0, 1, 0)
    assert not dist.is_dist_available_and_initialized()  # WORLD_SIZE 1: no group created


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
        ({"RANK": "-1"}, "RANK"),
        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR"),  # not started by torchrun
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, "MASTER_PORT"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ],
)
def test_init_distributed_bad_environment(monkeypatch, env, name):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(SetupError, match=rf"\b{name}\b"):
        dist.init_distributed()
    assert not dist.is_dist_available_and_initialized()


def test_init_distributed_bad_backend():
    with pytest.raises(ValueError, match=r"^backend\b") as err:
        dist.init_distributed(backend="")
    assert not isinstance(err.value, SetupError)  # a caller's bug, not the user's


def test_init_distributed_nccl_without_that_gpu_is_a_setup_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SetupError, match=r"LOCAL_RANK=0 needs GPU 0 for nccl but 0 GPU"):
        dist.init_distributed(backend="nccl")
    assert not dist.is_dist_available_and_initialized()


def test_init_distributed_failed_rendezvous_is_a_setup_error(monkeypatch):
    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")

    def refuse(**kwargs):
        raise tdist.DistStoreError("connect() timed out.\nmore detail")

    for var, value in dict(
        WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="10.0.0.9", MASTER_PORT="29500"
    ).items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(tdist, "init_process_group", refuse)
    with pytest.raises(SetupError) as err:
        dist.init_distributed(backend="gloo")
    message = str(err.value)
    assert "rank 1 of 2" in message and "MASTER_ADDR=10.0.0.9" in message
    assert "connect() timed out." in message and "\n" not in message  # one line


# --- two processes on one CPU (gloo) ------------------------------------------------------


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """Runs the worker on ranks 0 and 1 once; returns (worker module, [rank results])."""
    out_dir = tmp_path_factory.mktemp("two_process")
    worker = run_gloo_workers("dscl_two_process_worker", out_dir)
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(worker.WORLD_SIZE)]
    after = [torch.load(out_dir / f"after{r}.pt") for r in range(worker.WORLD_SIZE)]
    assert not any(a["initialized_after_cleanup"] for a in after)
    return worker, results


def test_group_identity(two_process):
    worker, results = two_process
    for rank, out in enumerate(results):
        assert out["init"] == (rank, worker.WORLD_SIZE, rank)
        assert out["initialized"]
        assert (out["rank"], out["world_size"], out["main"]) == (rank, 2, rank == 0)


def test_gathered_keys_and_labels_are_the_concatenation(two_process):
    worker, results = two_process
    problem = worker.make_problem()
    for out in results:
        assert torch.equal(out["keys"], problem["key"])
        assert torch.equal(out["labels"], problem["labels"])


def test_loss_and_query_gradient_match_one_process(two_process):
    worker, results = two_process
    problem = worker.make_problem()
    query = problem["query"].clone().requires_grad_(True)
    loss = DSCLLoss(worker.TEMPERATURE, worker.BETA)(
        query,
        problem["key"],
        problem["labels"],
        problem["queue"],
        problem["queue_labels"],
        problem["queue_valid"],
    )
    loss.backward()
    batch = worker.LOCAL_BATCH
    for rank, out in enumerate(results):
        # Same matrices on every rank; 1e-12 allows only float64 round-off.
        torch.testing.assert_close(out["loss"], loss.detach(), rtol=0, atol=1e-12)
        # Every rank uses all queries, so the summed gradient is world_size times the
        # one-process gradient; DDP's averaging divides it back.
        local_grad = out["query_grad"] / worker.WORLD_SIZE
        want = query.grad[rank * batch : (rank + 1) * batch]
        torch.testing.assert_close(local_grad, want, rtol=0, atol=1e-12)


def test_ddp_parameter_gradients_match_one_process(two_process):
    worker, results = two_process
    problem = worker.make_problem()
    encoder = worker.make_encoder()
    embeddings = torch.nn.functional.normalize(encoder(problem["inputs"]), dim=1)
    loss = DSCLLoss(worker.TEMPERATURE, worker.BETA)(
        embeddings,
        problem["key"],
        problem["labels"],
        problem["queue"],
        problem["queue_labels"],
        problem["queue_valid"],
    )
    loss.backward()
    for out in results:
        torch.testing.assert_close(out["ddp_loss"], loss.detach(), rtol=0, atol=1e-12)
        for name, param in encoder.named_parameters():
            # float64; the two sides differ only in summation order, so 1e-10 is ample.
            torch.testing.assert_close(out["ddp_grads"][name], param.grad, rtol=0, atol=1e-10)


def test_batch_shuffle_round_trip_and_crosses_ranks(two_process):
    worker, results = two_process
    batch, world = worker.SHUFFLE_BATCH, worker.WORLD_SIZE
    total = batch * world
    # Both ranks hold rank 0's permutation.
    assert torch.equal(results[0]["unshuffle_index"], results[1]["unshuffle_index"])
    permutation = torch.argsort(results[0]["unshuffle_index"])
    shuffled = torch.cat([out["shuffled"][:, 0] for out in results])  # global order of rows
    assert torch.equal(shuffled, permutation.double())  # row r holds value r
    assert torch.equal(shuffled.sort().values, torch.arange(total, dtype=torch.float64))
    # The permutation really mixes ranks (fixed seed; a random one fails with p = 1/12870).
    assert shuffled[:batch].max() >= batch
    for rank, out in enumerate(results):
        rows = torch.arange(rank * batch, (rank + 1) * batch, dtype=torch.float64)
        assert torch.equal(out["unshuffled"], 10 * rows[:, None].repeat(1, 3))


def test_any_rank_across_ranks(two_process):
    _, results = two_process
    for out in results:
        # True on both ranks when either rank's flag is True, whichever rank it is.
        assert out["any_rank"] == {"none": False, "all": True, "rank0": True, "rank1": True}


def test_gather_rows_of_unequal_shares(two_process):
    _, results = two_process

    def rows(rank: int, n: int) -> list[list[float]]:
        return [[rank, i] for i in range(n)]

    for out in results:
        gathered = out["gather_rows"]
        assert gathered["uneven"].tolist() == rows(0, 2) + rows(1, 3)  # rank order, no padding
        assert gathered["uneven"].dtype == torch.float64
        assert gathered["empty"].tolist() == rows(1, 3)  # rank 0 had a (0, 0) tensor
        # trailing shapes (2,) and (4,) disagree: every rank raises, so none hangs
        assert "different shapes" in gathered["mismatch"]
