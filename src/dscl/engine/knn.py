"""Online k-nearest-neighbour monitor of stage 1: is the representation still improving?

Every ``pretrain.knn_every`` epochs the backbone's pooled features of the training set (the bank)
and of the validation split are computed with the evaluation transform (no augmentation), and a
weighted kNN classifier scores the validation images: cosine similarity, the k = 20 nearest bank
images vote for their class with weight exp(sim / 0.07) (the usual self-supervised monitor).
Top-1 and Many/Medium/Few go to the training log as ``val_knn_*`` of stage ``pretrain``, hence to
TensorBoard and the report's validation curves, so a user sees whether stage 1 has converged
before paying for stage 2. It draws no random numbers, so training is the same with it on or off.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk].float() @ bank.float().T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()  # (m, k)
        scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        scores.scatter_add_(1, bank_labels[top_idx], weights)  # (m, classes)
        out.append(scores)
    return torch.cat(out)


@torch.no_grad()
def pooled_features(
    backbone: nn.Module, batches, device: torch.device, amp: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """L2-normalised global-average-pooled backbone features of every batch, in eval mode (the
    train/eval flags are restored afterwards); ``(features (N, C), labels (N,))`` on ``device``."""
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
    return torch.cat(features), torch.cat(labels)


class KnnMonitor:
    """Scores the validation split with a kNN on the training set's features.

    Args:
        bank_batches: evaluation batches of the training set (re-iterable).
        val_batches: evaluation batches of the validation split (re-iterable).
        num_classes: number of classes.
        score: maps (logits (M, classes), targets (M,)) to a metrics dict (top1, many, ...).
        device: where features are computed.
        amp: autocast dtype or None.
    """

    def __init__(self, bank_batches, val_batches, num_classes, score, device, amp) -> None:
        self.bank_batches, self.val_batches = bank_batches, val_batches
        self.num_classes, self.score = num_classes, score
        self.device, self.amp = device, amp

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        bank, bank_labels = pooled_features(backbone, self.bank_batches, self.device, self.amp)
        queries, targets = pooled_features(backbone, self.val_batches, self.device, self.amp)
        scores = knn_class_scores(bank, bank_labels, queries, self.num_classes)
        metrics = self.score(scores.cpu(), targets.cpu())
        values = {f"val_knn_{k}": metrics[k] for k in ("top1", "many", "medium", "few")}
        return values | {"knn_seconds": time.perf_counter() - start}
