"""The kNN monitor: votes equal a slow loop written from the definition; the monitor runs in
stage 1 and leaves training unchanged; under two processes (gloo) each rank evaluates only its
share and the votes equal one process's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dscl.checkpoint import load_checkpoint
from dscl.cli import main
from dscl.config import FeedSettings
from dscl.data import ArrayImageDataset
from dscl.data.views import ViewConfig
from dscl.engine.feed import eval_batches, eval_shard
from dscl.engine.knn import KNN_K, knn_class_scores, pooled_features
from gloo_run import run_gloo_workers


def slow_knn(bank, bank_labels, queries, num_classes, k, temperature):
    out = []
    for q in queries.tolist():
        sims = [sum(a * b for a, b in zip(q, row, strict=True)) for row in bank.tolist()]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(bank_labels[i])] += math.exp(sims[i] / temperature)
        out.append(votes)
    return torch.tensor(out)


def test_votes_equal_a_slow_reference_loop():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    queries = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=1)
    for k, chunk in ((5, 3), (20, 1024), (80, 2)):  # k above the bank size takes the whole bank
        fast = knn_class_scores(bank, labels, queries, 4, k=k, temperature=0.07, chunk=chunk)
        slow = slow_knn(bank, labels, queries, 4, min(k, 50), 0.07).float()
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=0)


def test_hand_computed_case():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])  # similarities 1, 0, 0.6
    scores = knn_class_scores(bank, labels, query, 2, k=2, temperature=0.5)
    expected = torch.tensor([[math.exp(2.0), math.exp(1.2)]])  # neighbours: rows 0 and 2
    torch.testing.assert_close(scores, expected)


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={tmp_path}",
        "data.name=synthetic_lt",
        "data.extra={num_classes: 4, image_size: 8}",
        "data.n_max=24",
        "data.imbalance_ratio=4",
        "data.val_per_class=3",
        "data.image_size=8",
        "pretrain.epochs=2",
        "pretrain.batch_size=8",
        "pretrain.queue_size=16",
        "progress=false",
        *extra,
    ]


def test_monitor_logs_curves_and_changes_nothing(tmp_path: Path):
    assert main(["pretrain", "--name", "on", *tiny(tmp_path, "pretrain.knn_every=1")]) == 0
    assert main(["pretrain", "--name", "off", *tiny(tmp_path)]) == 0
    records = [
        json.loads(x) for x in (tmp_path / "on" / "train_log.jsonl").read_text().splitlines()
    ]
    knn = [r for r in records if "val_knn_top1" in r]
    assert [r["epoch"] for r in knn] == [0, 1]
    assert all(0 <= r["val_knn_top1"] <= 100 and r["knn_seconds"] >= 0 for r in knn)
    on, off = (load_checkpoint(tmp_path / n / "pretrain.pt")["model"] for n in ("on", "off"))
    for key, value in on.items():
        assert torch.equal(value, off[key]), key  # the monitor draws no random numbers


# --- each rank's share of the evaluation batches -------------------------------------------


@pytest.mark.parametrize(("n", "batch", "world"), [(11, 4, 2), (11, 4, 3), (8, 4, 2), (3, 4, 2)])
def test_eval_shards_partition_the_split_in_whole_batches(n, batch, world):
    shares = [eval_shard(n, batch, rank, world) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(n))
    for rank, share in enumerate(shares):
        assert share == sorted(share)
        whole = [list(range(b, min(b + batch, n))) for b in range(0, n, batch)]
        assert share == [i for b in whole[rank::world] for i in b]


@pytest.mark.parametrize("in_memory", [True, False])  # the on-device path and a DataLoader
def test_a_rank_evaluates_every_world_th_batch_of_one_process(in_memory):
    rng = np.random.default_rng(0)
    dataset = ArrayImageDataset(
        rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8), list(range(11)), ["x"] * 11
    )
    settings = FeedSettings(in_memory=in_memory)
    kw = {"batch_size": 4, "device": torch.device("cpu"), "settings": settings}
    cfg = ViewConfig(view_size=8)
    whole = list(eval_batches(dataset, cfg, **kw))
    assert [len(y) for _, y in whole] == [4, 4, 3]
    for world in (2, 3):
        for rank in range(world):
            share = list(eval_batches(dataset, cfg, rank=rank, world=world, **kw))
            assert len(share) == len(whole[rank::world])
            for (x, y), (want_x, want_y) in zip(share, whole[rank::world], strict=True):
                assert torch.equal(y, want_y) and torch.equal(x, want_x)


def test_eval_batches_rejects_a_rank_outside_the_world():
    dataset = ArrayImageDataset(np.zeros((2, 8, 8, 3), np.uint8), [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match=r"^rank: 2 is not in \[0, 2\)"):
        eval_batches(dataset, ViewConfig(view_size=8), batch_size=1, device="cpu", rank=2, world=2)


# --- two processes on one CPU (gloo) against one process ----------------------------------


@pytest.fixture(scope="module")
def knn_two_process(tmp_path_factory):
    """Runs the kNN worker on ranks 0 and 1 once; returns (worker module, [rank results])."""
    out_dir = tmp_path_factory.mktemp("knn_two_process")
    worker = run_gloo_workers("dscl_knn_worker", out_dir)
    return worker, [torch.load(out_dir / f"rank{r}.pt") for r in range(worker.WORLD_SIZE)]


def _gathered_order(worker, n: int) -> list[int]:
    """The one-process row of each gathered query: the ranks' shares one after the other."""
    return [i for r in range(worker.WORLD_SIZE) for i in eval_shard(n, worker.BATCH, r, 2)]


# The sharded path computes the same features from the same batches; its similarities come from
# matrix products of other shapes, which may round differently by ~1e-7, and a vote weight
# exp(sim / 0.07) then differs relatively by ~1e-7 / 0.07 ~ 1.5e-6: hence rtol 1e-5.
RTOL = 1e-5


def test_two_processes_vote_as_one_process(knn_two_process):
    worker, results = knn_two_process
    for case, (_, queries) in worker.CASES.items():
        want_scores, want_targets = worker.monitor(case).class_scores(worker.CountingBackbone())
        want_values = worker.monitor(case)(worker.CountingBackbone())
        want_values.pop("knn_seconds")
        order = _gathered_order(worker, queries)
        for out in (r[case] for r in results):  # the same on every rank
            assert torch.equal(out["targets"], want_targets[order]), case
            torch.testing.assert_close(out["scores"], want_scores[order], rtol=RTOL, atol=0)
            assert out["values"] == want_values, case


def test_two_processes_find_the_same_neighbours(knn_two_process):
    worker, results = knn_two_process
    for case, (bank_size, queries) in worker.CASES.items():
        # no near-tie at the k-th neighbour (1e-4 is ~1000 times a similarity's float32
        # rounding), so the neighbour sets are defined
        backbone, cpu = worker.CountingBackbone(), torch.device("cpu")
        bank, _ = pooled_features(backbone, worker.batches(worker.make_sets(case)[0]), cpu, None)
        query, _ = pooled_features(backbone, worker.batches(worker.make_sets(case)[1]), cpu, None)
        sims = (query @ bank.T).sort(dim=1, descending=True).values  # (M, N)
        k = min(KNN_K, bank_size)
        if k < bank_size:
            assert (sims[:, k - 1] - sims[:, k]).min() > 1e-4, case
        # bank image i votes for class i: the non-zero columns of a row are its neighbours
        want = worker.neighbour_scores(case, 0, 1)[_gathered_order(worker, queries)]
        for out in (r[case] for r in results):
            got = out["neighbours"]
            assert torch.equal(got != 0, want != 0), case
            assert ((got != 0).sum(dim=1) == k).all(), case
            torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


def test_each_rank_computes_features_of_its_share_only(knn_two_process):
    worker, results = knn_two_process
    for case, (bank_size, queries) in worker.CASES.items():
        seen = [r[case]["seen"] for r in results]
        share = [
            len(eval_shard(bank_size, worker.BATCH, r, 2))
            + len(eval_shard(queries, worker.BATCH, r, 2))
            for r in range(worker.WORLD_SIZE)
        ]
        assert seen == share, case
        assert sum(seen) == bank_size + queries, case  # every image once, on one rank
    assert 0 < results[1]["main"]["seen"] < results[0]["main"]["seen"] < 37 + 11  # both work
