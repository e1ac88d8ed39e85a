"""Decoupled supervised contrastive loss (DSCL) and the supervised contrastive baseline (SupCon).

Both losses share one contrast set per anchor and differ only in how the positives are weighted
(Xuan & Zhang, AAAI 2024, §3.2; docs/DESIGN.md §2.6 and §2.7). This module imports nothing from
the rest of ``dscl``: tensors in, scalar out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_temperature(temperature: float) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def check_weight(name: str, value: float) -> float:
    """A finite number >= 0 (a loss weight or exponent)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_embedding(name: str, tensor: Tensor, ndim: int) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")


def check_view_pair(first: str, a: Tensor, second: str, b: Tensor) -> None:
    """Two (B, D) embeddings of the same B >= 1 images (query/key, view1/view2)."""
    check_embedding(first, a, 2)
    check_embedding(second, b, 2)
    if a.shape[0] == 0:
        raise ValueError(f"{first} must hold at least one row, got batch size 0")
    if b.shape != a.shape:
        raise ValueError(
            f"{second} must have the shape of {first} {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def _check_labels(name: str, tensor: Tensor, size: int) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")
    if tuple(tensor.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(tensor.shape)}")


def check_queue(queue: Tensor, dim: int, queue_valid: Tensor | None) -> None:
    """Checks ``queue`` (K, D) and the optional ``queue_valid`` (K,) bool mask."""
    check_embedding("queue", queue, 2)
    if queue.shape[1] != dim:
        raise ValueError(f"queue must have D={dim} columns, got shape {tuple(queue.shape)}")
    if queue_valid is None:
        return
    if not isinstance(queue_valid, Tensor) or queue_valid.dtype != torch.bool:
        raise ValueError(f"queue_valid must be a bool tensor or None, got {queue_valid!r}")
    if tuple(queue_valid.shape) != (queue.shape[0],):
        raise ValueError(
            f"queue_valid must have shape ({queue.shape[0]},), got {tuple(queue_valid.shape)}"
        )


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (exact tests), float32 otherwise (fp16/bf16 cast up)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _contrast_log_prob(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    queue_valid: Tensor | None,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """log p_i(a) over the contrast set A(i) = {q_j, j != i} ∪ {k_j} ∪ {valid queue rows}.

    Returns:
        ``log_prob`` (B, 2B+K): columns are [queries | keys | queue]; entries outside A(i)
        are exactly 0 (never -inf, so products with a zero weight stay finite).
        ``positive`` (B, 2B+K) bool: P_i, members of A(i) with label y_i except k_i.
    """
    # B batch, K queue, D dim
    batch, queue_size = query.shape[0], queue.shape[0]
    dtype = compute_dtype(query, key, queue)
    query = query.to(dtype)
    if queue_valid is not None:
        # Zero never-written rows: masking the logits alone would let NaN or inf garbage there
        # reach the query gradient through the matmul's backward (0 * NaN = NaN).
        queue = torch.where(queue_valid[:, None], queue, 0.0)  # (K, D)
    contrast = torch.cat([query, key.to(dtype), queue.to(dtype)], dim=0)  # (2B+K, D)
    logits = query @ contrast.T / temperature  # (B, 2B+K)

    device = query.device
    column_valid = torch.ones(2 * batch + queue_size, dtype=torch.bool, device=device)
    if queue_valid is not None:
        column_valid[2 * batch :] = queue_valid
    valid = column_valid.expand(batch, -1).clone()  # (B, 2B+K)
    valid[:, :batch].fill_diagonal_(False)  # an anchor is not in its own contrast set

    labels = labels.long()
    column_labels = torch.cat([labels, labels, queue_labels.long()])  # (2B+K,)
    positive = (labels[:, None] == column_labels[None, :]) & valid  # (B, 2B+K)
    positive[:, batch : 2 * batch].fill_diagonal_(False)  # k_i: the augmentation positive

    # logsumexp subtracts the row max; -inf entries get exactly zero weight and zero gradient.
    logits = logits.masked_fill(~valid, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~valid, 0.0)
    return log_prob, positive


def _positive_terms(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    queue_valid: Tensor | None,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """What both losses weigh differently, per anchor (each (B,)): log p_i(k_i),
    Σ_{a∈P_i} log p_i(a) and |P_i|."""
    log_prob, positive = _contrast_log_prob(
        query, key, labels, queue, queue_labels, queue_valid, temperature
    )  # (B, 2B+K) each
    batch = query.shape[0]
    rows = torch.arange(batch, device=query.device)
    key_log_prob = log_prob[rows, batch + rows]  # (B,)
    return key_log_prob, (log_prob * positive).sum(dim=1), positive.sum(dim=1)


def _check_contrast_inputs(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    queue_valid: Tensor | None,
) -> None:
    check_view_pair("query", query, "key", key)
    _check_labels("labels", labels, query.shape[0])
    check_queue(queue, query.shape[1], queue_valid)
    _check_labels("queue_labels", queue_labels, queue.shape[0])


class TemperatureLoss(nn.Module):
    """Base of the losses here: a softmax temperature τ (``temperature``, > 0)."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class _PositiveWeightedLoss(TemperatureLoss):
    """Shared forward of DSCL and SupCon: one contrast set, the positives weighted by
    :meth:`combine`."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        labels: Tensor,
        queue: Tensor,
        queue_labels: Tensor,
        queue_valid: Tensor | None = None,
    ) -> Tensor:
        """Computes the loss (L_dscl or L_scl).

        Args:
            query: (B, D) L2-normalised query embeddings q (the anchors).
            key: (B, D) L2-normalised key embeddings k; k_i is q_i's augmentation positive.
            labels: (B,) integer class labels y of the batch.
            queue: (K, D) queued key embeddings, one entry per row; K may be 0.
            queue_labels: (K,) integer labels of the queue entries.
            queue_valid: (K,) bool, True for entries ever written; None means all valid.

        Returns:
            Scalar loss, float32 (float64 when an embedding input is float64), even under
            autocast.
        """
        _check_contrast_inputs(query, key, labels, queue, queue_labels, queue_valid)
        # B batch, K queue, D dim
        with torch.autocast(device_type=query.device.type, enabled=False):
            key_log_prob, positive_sum, num_positive = _positive_terms(
                query, key, labels, queue, queue_labels, queue_valid, self.temperature
            )  # (B,) each
            return self.combine(key_log_prob, positive_sum, num_positive).mean()

    def combine(self, key_log_prob: Tensor, positive_sum: Tensor, num_positive: Tensor) -> Tensor:
        """(B,) per-anchor losses from log p_i(k_i), Σ_{a∈P_i} log p_i(a) and |P_i| (each (B,))."""
        raise NotImplementedError


class DSCLLoss(_PositiveWeightedLoss):
    """Decoupled supervised contrastive loss (paper Eq. 6 in the β form of docs/DESIGN.md §2.6).

    For anchor q_i with contrast set A(i) = {q_j : j != i} ∪ {k_j : all j} ∪ {valid queue rows},
    p_i(a) = exp(q_i·a/τ) / Σ_{b∈A(i)} exp(q_i·b/τ) and P_i = members of A(i) with label y_i
    except k_i::

        L_i = -[log p_i(k_i) + β · mean_{a∈P_i} log p_i(a)] / (1 + β)   if P_i is not empty
        L_i = -log p_i(k_i)                                             otherwise
        L   = mean_i L_i

    With α = 1/(1+β) this is the paper's form: the augmentation positive k_i has weight α and
    the same-class positives share 1-α, so the optimum of p_i(k_i) no longer depends on the size
    of the class. β = 0 gives InfoNCE over the same contrast set.

    Queue entries never written yet are masked out of every contrast set (``queue_valid``),
    rather than filled with random features and labels as in the authors' code.

    Args:
        temperature: τ, softmax temperature, > 0.
        beta: β >= 0, weight of the same-class positives relative to the augmentation positive.
    """

    def __init__(self, temperature: float = 0.07, beta: float = 8.0) -> None:
        super().__init__(temperature)
        self.beta = check_weight("beta", beta)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, beta={self.beta}"

    def combine(self, key_log_prob: Tensor, positive_sum: Tensor, num_positive: Tensor) -> Tensor:
        positive_mean = positive_sum / num_positive.clamp(min=1)  # (B,)
        # Weight α = 1/(1+β) on k_i when P_i is non-empty, 1 when it is empty.
        key_weight = torch.where(
            num_positive > 0,
            torch.full_like(key_log_prob, 1.0 / (1.0 + self.beta)),
            torch.ones_like(key_log_prob),
        )
        return -(key_weight * key_log_prob + (1.0 - key_weight) * positive_mean)  # (B,)


class SupConLoss(_PositiveWeightedLoss):
    """Supervised contrastive loss (SCL baseline, Khosla et al. 2020, with a MoCo-style queue).

    Same contrast set A(i) and positives P_i as :class:`DSCLLoss`; every positive in
    P_i ∪ {k_i} gets the same weight::

        L_i = -mean_{a∈P_i∪{k_i}} log p_i(a),   L = mean_i L_i

    Equivalently DSCL with β = |P_i| for every anchor. Never-written queue entries are masked
    rather than filled with random features as in the authors' code.

    Args:
        temperature: τ, softmax temperature, > 0.
    """

    def combine(self, key_log_prob: Tensor, positive_sum: Tensor, num_positive: Tensor) -> Tensor:
        return -(key_log_prob + positive_sum) / (num_positive + 1)  # (B,)
