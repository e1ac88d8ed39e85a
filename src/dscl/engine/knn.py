"""Online k-nearest-neighbour monitor of stage 1: is the representation still improving?

Every ``pretrain.knn_every`` epochs the backbone's pooled features of the training set (the bank)
and of the validation split are computed with the evaluation transform (no augmentation), and a
weighted kNN classifier scores the validation images: cosine similarity, the k = 20 nearest bank
images vote for their class with weight exp(sim / 0.07) (the usual self-supervised monitor).
Top-1 and Many/Medium/Few go to the training log as ``val_knn_*`` of stage ``pretrain``, hence to
TensorBoard and the report's validation curves, so a user sees whether stage 1 has converged
before paying for stage 2. It draws no random numbers, so training is the same with it on or off.

Under several processes the work is shared: each rank computes the features of its own share of
the training set and of the validation split, the validation features are gathered (the split is
small), each rank finds every query's k nearest neighbours in its share of the bank, and the
ranks gather these candidates and keep the k nearest of all (:func:`sharded_knn_class_scores`).
Rank 0 alone would take about world-size times as long while the others wait in a collective,
which on a large training set outlasts the collective's timeout.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dscl import dist
from dscl.engine import runtime

KNN_K = 20
KNN_TEMPERATURE = 0.07


@torch.no_grad()
def knn_class_scores(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> Tensor:
    """Weighted kNN votes.

    Args:
        bank: (N, C) L2-normalised bank features.
        bank_labels: (N,) integer labels of the bank.
        queries: (M, C) L2-normalised query features.
        num_classes: number of classes.
        k: neighbours per query (at most N).
        temperature: vote weight exp(sim / temperature).
        chunk: queries scored at once (bounds the (chunk, N) similarity matrix).

    Returns:
        (M, num_classes) float32 scores: for each class the summed weights of its neighbours.
    """
    # N bank, M queries, C channels
    return _vote(*_nearest(bank, bank_labels, queries, min(k, bank.shape[0]), chunk),
                 num_classes, temperature)  # fmt: skip


def _nearest(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, k: int, chunk: int
) -> tuple[Tensor, Tensor]:
    """Each query's k most similar bank rows: ``(similarities (M, k), labels (M, k))``, most
    similar first, ``chunk`` queries at a time (bounds the (chunk, N) similarity matrix)."""
    sims, labels = [], []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk].float() @ bank.float().T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        sims.append(top_sim)
        labels.append(bank_labels[top_idx])
    return torch.cat(sims), torch.cat(labels)


def _vote(sim: Tensor, labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """(M, classes) scores: each neighbour (similarity ``sim``, class ``labels``, both (M, k))
    votes for its class with weight exp(sim / temperature)."""
    weights = (sim / temperature).exp()  # (M, k)
    scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    return scores.scatter_add_(1, labels, weights)  # (M, classes)


@torch.no_grad()
def sharded_knn_class_scores(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> Tensor:
    """:func:`knn_class_scores` with the bank split over the ranks of the process group.

    Each rank scores all the queries against its share of the bank and keeps each query's k most
    similar rows of it (similarities and labels); the ranks gather these candidates (world * k
    per query) and every rank keeps the k most similar of them, which are the k nearest in the
    whole bank (up to ties), and votes as :func:`knn_class_scores`. A share may be empty. With one
    process this is :func:`knn_class_scores` itself.

    Args:
        bank: (N_r, C) L2-normalised features of this rank's share of the bank; (0, C') when
            the share is empty.
        bank_labels: (N_r,) integer labels of this rank's share.
        queries: (M, C) L2-normalised query features, the same on every rank.
        num_classes: number of classes.
        k: neighbours per query (at most the whole bank's size).
        temperature: vote weight exp(sim / temperature).
        chunk: queries scored at once (bounds the (chunk, N_r) similarity matrix).

    Returns:
        (M, num_classes) float32 scores, the same on every rank.
    """
    # N_r rows of this rank's bank, M queries, W world size
    world = dist.get_world_size()
    if world == 1:
        return knn_class_scores(bank, bank_labels, queries, num_classes, k, temperature, chunk)
    rows = dist.all_gather(torch.tensor([bank.shape[0]], device=queries.device))  # (W,)
    k = min(k, int(rows.sum()))
    # this rank's candidates; a share of fewer than k rows leaves -inf columns, never chosen below
    # since the k most similar of all are k real rows
    cand_sim = torch.full((queries.shape[0], k), -torch.inf, device=queries.device)  # (M, k)
    cand_labels = torch.zeros(queries.shape[0], k, dtype=torch.long, device=queries.device)
    local_k = min(k, bank.shape[0])
    if local_k > 0:
        near_sim, near_labels = _nearest(bank, bank_labels, queries, local_k, chunk)
        cand_sim[:, :local_k], cand_labels[:, :local_k] = near_sim, near_labels
    # (W*M, k) in rank order -> (M, W*k): each query's candidates from every rank side by side
    all_sim = dist.all_gather(cand_sim).view(world, -1, k).permute(1, 0, 2).flatten(1)
    all_labels = dist.all_gather(cand_labels).view(world, -1, k).permute(1, 0, 2).flatten(1)
    top_sim, pick = all_sim.topk(k, dim=1)  # (M, k), most similar first as in knn_class_scores
    return _vote(top_sim, all_labels.gather(1, pick), num_classes, temperature)


@torch.no_grad()
def pooled_features(
    backbone: nn.Module, batches, device: torch.device, amp: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """L2-normalised global-average-pooled backbone features of every batch, in eval mode (the
    train/eval flags are restored afterwards); ``(features (N, C), labels (N,))`` on ``device``.
    No batches (a rank's empty share of a small split) give ``(features (0, 0), labels (0,))``."""
    modes = {module: module.training for module in backbone.modules()}
    backbone.eval()
    features, labels = [], []
    try:
        for images, targets in batches:
            with runtime.autocast(device, amp):
                fmap = backbone(images.to(device, non_blocking=True))  # (B, C, h, w)
            features.append(F.normalize(fmap.float().mean(dim=(2, 3)), dim=1))
            labels.append(torch.as_tensor(targets).to(device).long())
    finally:
        for module, training in modes.items():
            module.training = training
    if not features:
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


class KnnMonitor:
    """Scores the validation split with a kNN on the training set's features.

    Every rank of a process group calls it at the same point (it gathers), each with its own
    share of the batches (``eval_batches(..., rank=, world=)``); all get the same values. In one
    process the batches are whole splits.

    Args:
        bank_batches: this rank's evaluation batches of the training set (re-iterable).
        val_batches: this rank's evaluation batches of the validation split (re-iterable).
        num_classes: number of classes.
        score: maps (logits (M, classes), targets (M,)) to a metrics dict (top1, many, ...).
        device: where features are computed.
        amp: autocast dtype or None.
    """

    def __init__(self, bank_batches, val_batches, num_classes, score, device, amp) -> None:
        self.bank_batches, self.val_batches = bank_batches, val_batches
        self.num_classes, self.score = num_classes, score
        self.device, self.amp = device, amp

    def class_scores(self, backbone: nn.Module) -> tuple[Tensor, Tensor]:
        """The kNN votes of every validation image and its label, the same on every rank.

        Returns:
            ``(scores (M, classes), targets (M,))`` on the device, rows in the order of the ranks'
            shares (rank 0's images first); in one process the split's order.
        """
        bank, bank_labels = pooled_features(backbone, self.bank_batches, self.device, self.amp)
        queries, targets = pooled_features(backbone, self.val_batches, self.device, self.amp)
        # every rank votes for every query against its bank share: the queries are gathered
        queries, targets = dist.all_gather_rows(queries), dist.all_gather_rows(targets)
        scores = sharded_knn_class_scores(bank, bank_labels, queries, self.num_classes)
        return scores, targets

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        scores, targets = self.class_scores(backbone)
        metrics = self.score(scores.cpu(), targets.cpu())
        values = {f"val_knn_{k}": metrics[k] for k in ("top1", "many", "medium", "few")}
        return values | {"knn_seconds": time.perf_counter() - start}
