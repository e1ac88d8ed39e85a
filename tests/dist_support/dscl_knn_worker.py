"""Worker for the two-process gloo test of the kNN monitor in tests/engine/test_knn.py.

Each rank builds the same small image sets and backbone, evaluates only its share of the
batches (``eval_batches(..., rank=, world=)``) and runs the monitor's sharded kNN. Its own
importable module for the reason given in dscl_two_process_worker.py.
"""

from __future__ import annotations

from pathlib import Path

import gloo_group
import numpy as np
import torch
from torch import nn

from dscl import dist
from dscl.data import ArrayImageDataset
from dscl.data.views import ViewConfig
from dscl.engine.evaluate import classification_metrics
from dscl.engine.feed import eval_batches, eval_shard
from dscl.engine.knn import KnnMonitor, pooled_features, sharded_knn_class_scores

WORLD_SIZE = 2
BATCH = 4
CLASSES = 3
# (bank images, query images): 37 bank images are 10 batches, the last of one image, dealt 5 and
# 5 (20 and 17 images); 11 queries are 3 batches, 2 for rank 0 and 1 for rank 1. The small case
# has one batch each: rank 1's shares are empty and the bank (6) is smaller than k (20).
CASES = {"main": (37, 11), "small": (6, 3)}
CFG = ViewConfig(view_size=8)


def make_sets(case: str) -> tuple[ArrayImageDataset, ArrayImageDataset]:
    """(bank, queries): random 8x8 RGB images with labels, the same in every process."""
    bank_size, query_size = CASES[case]
    rng = np.random.default_rng(7 if case == "main" else 8)

    def images(n: int) -> ArrayImageDataset:
        # a colour of its own plus noise per image, so that the features spread out
        colours = rng.integers(0, 192, (n, 1, 1, 3))
        pixels = (colours + rng.integers(0, 64, (n, 8, 8, 3))).astype(np.uint8)
        targets = rng.integers(0, CLASSES, n).tolist()
        return ArrayImageDataset(pixels, targets, [str(c) for c in range(CLASSES)])

    return images(bank_size), images(query_size)


class CountingBackbone(nn.Module):
    """A fixed small conv net (B, 3, 8, 8) -> (B, 16, 6, 6) that counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1))
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.conv(x)


def score(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    return classification_metrics(logits, targets, [10, 5, 1], many_threshold=8, few_threshold=2)


def batches(dataset, rank: int = 0, world: int = 1):
    device = torch.device("cpu")
    return eval_batches(dataset, CFG, batch_size=BATCH, device=device, rank=rank, world=world)


def monitor(case: str, rank: int = 0, world: int = 1) -> KnnMonitor:
    bank, queries = make_sets(case)
    bank_batches, query_batches = batches(bank, rank, world), batches(queries, rank, world)
    return KnnMonitor(bank_batches, query_batches, CLASSES, score, torch.device("cpu"), None)


def neighbour_scores(case: str, rank: int, world: int) -> torch.Tensor:
    """Sharded kNN votes where each bank image is its own class (its index in the bank): row i's
    non-zero columns are query i's neighbours, their values the neighbours' weights."""
    bank, queries = make_sets(case)
    backbone = CountingBackbone()
    cpu = torch.device("cpu")
    features, _ = pooled_features(backbone, batches(bank, rank, world), cpu, None)
    ids = torch.tensor(eval_shard(len(bank), BATCH, rank, world), dtype=torch.long)
    query_features, _ = pooled_features(backbone, batches(queries, rank, world), cpu, None)
    query_features = dist.all_gather_rows(query_features)
    return sharded_knn_class_scores(features, ids, query_features, len(bank))


def run(rank: int, port: int, out_dir: str) -> None:
    """Entry point for torch.multiprocessing.spawn (rank is the process index)."""
    gloo_group.join(rank, port, WORLD_SIZE)
    out: dict = {}
    for case in CASES:
        knn = monitor(case, rank, WORLD_SIZE)
        backbone = CountingBackbone()
        scores, targets = knn.class_scores(backbone)
        seen = backbone.seen
        values = knn(backbone)
        values.pop("knn_seconds")
        out[case] = {
            "scores": scores,
            "targets": targets,
            "seen": seen,
            "values": values,
            "neighbours": neighbour_scores(case, rank, WORLD_SIZE),
        }
    dist.barrier()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.cleanup()
