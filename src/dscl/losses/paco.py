"""Parametric contrastive loss (PaCo) over a MoCo-style contrast set with learnable class centres.

Cui et al., "Parametric Contrastive Learning", ICCV 2021 (github.com/dvlab-research/
Parametric-Contrastive-Learning, ``PaCo/LT/losses.py`` ``PaCoLoss`` and ``moco/builder.py``).
This module imports nothing from the rest of ``dscl`` but the input checks of
:mod:`dscl.losses.dscl`: tensors in, scalar out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .bcl import check_class_counts, check_label_range
from .dscl import (
    TemperatureLoss,
    _check_contrast_inputs,
    check_embedding,
    check_weight,
    compute_dtype,
)

# added to the prior inside the log, as in the authors' code (log(weight + 1e-9)); it also keeps
# a class with no training image finite
PRIOR_EPS = 1e-9


class PaCoLoss(TemperatureLoss):
    """Parametric contrastive loss L_paco (as the authors' ``PaCo/LT/losses.py`` computes it).

    For anchor q_i (a query) the contrast set has two parts laid out as
    [centres (C) | queries (B) | keys (B) | queue (K)]:

    - the C learnable class centres, whose logits are the classifier's outputs on the query
      image, balanced-softmax adjusted when ``class_counts`` is given:
      s_ic = sup_logits_ic + log(π_c + 1e-9), π the training class prior (not divided by τ);
    - the contrast samples A(i) = {q_j : j != i} ∪ {k_j : all j} ∪ {valid queue entries}, with
      logits s_ia = q_i·a / τ.

    ::

        log Z_i  = log( Σ_c exp(s_ic) + γ · Σ_{a∈A(i)} exp(s_ia) )
        log p_ix = s_ix - log Z_i                       x a centre or a member of A(i)
        P(i)     = {a ∈ A(i) : label(a) = y_i}          (k_i included; never empty)
        L_i      = -[β · log p_i(c_{y_i}) + α · Σ_{a∈P(i)} log p_ia] / (β + α·|P(i)|)
        L_paco   = mean_i L_i

    α down-weights the contrastive positives against the own-class centre (weight β), γ scales
    the contrast samples' share of the denominator. With α = 0 and β > 0 the loss is the
    (balanced-softmax) cross-entropy of the centres with the contrast samples as extra
    negatives. Queue entries never written are masked out (``queue_valid``) instead of being
    random features with random labels as in the authors' code.

    Args:
        class_counts: (C,) training images per class, the prior of the balanced-softmax
            adjustment; None for none (the balanced-data form).
        temperature: τ > 0 of the contrast logits (the authors' ``--moco-t``).
        alpha: α >= 0, weight of each contrastive positive (``--alpha``).
        beta: β >= 0, weight of the own-class centre (``--beta``); α + β > 0.
        gamma: γ > 0, weight of the contrast samples in the denominator (``--gamma``).

    Defaults are the authors' ImageNet-LT ResNet-50 script (τ 0.2, α 0.05, β 1, γ 1); their
    class itself has no default α and τ = 1.
    """

    def __init__(
        self,
        class_counts: Sequence[int] | Tensor | None = None,
        temperature: float = 0.2,
        alpha: float = 0.05,
        beta: float = 1.0,
        gamma: float = 1.0,
    ) -> None:
        super().__init__(temperature)
        self.alpha = check_weight("alpha", alpha)
        self.beta = check_weight("beta", beta)
        if self.alpha + self.beta == 0:
            raise ValueError("alpha and beta must not both be 0 (no positive would have weight)")
        self.gamma = check_weight("gamma", gamma)
        if self.gamma == 0:
            raise ValueError("gamma must be > 0, got 0.0")
        if class_counts is None:
            log_prior = None
        else:
            counts = check_class_counts(class_counts, allow_zero=True)
            log_prior = (counts / counts.sum() + PRIOR_EPS).log()
        self.register_buffer("log_prior", log_prior, persistent=False)

    def extra_repr(self) -> str:
        adjusted = "none" if self.log_prior is None else f"{self.log_prior.shape[0]} classes"
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, "
            f"gamma={self.gamma}, prior={adjusted}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        labels: Tensor,
        queue: Tensor,
        queue_labels: Tensor,
        sup_logits: Tensor,
        queue_valid: Tensor | None = None,
    ) -> Tensor:
        """Computes L_paco.

        Args:
            query: (B, D) L2-normalised query embeddings q (the anchors).
            key: (B, D) L2-normalised key embeddings k (momentum encoder).
            labels: (B,) integer class labels y in [0, C).
            queue: (K, D) queued key embeddings; K may be 0.
            queue_labels: (K,) integer labels of the queue entries.
            sup_logits: (B, C) the classifier's logits for the query images (the query-centre
                similarities), unadjusted: the prior is added here.
            queue_valid: (K,) bool, True for entries ever written; None means all valid.

        Returns:
            Scalar loss, float32 (float64 when an embedding input or ``sup_logits`` is
            float64), even under autocast.
        """
        _check_contrast_inputs(query, key, labels, queue, queue_labels, queue_valid)
        check_embedding("sup_logits", sup_logits, 2)
        batch = query.shape[0]
        if sup_logits.shape[0] != batch or sup_logits.shape[1] == 0:
            raise ValueError(
                f"sup_logits must have shape ({batch}, C >= 1), got {tuple(sup_logits.shape)}"
            )
        num_classes = sup_logits.shape[1]
        if self.log_prior is not None and self.log_prior.shape[0] != num_classes:
            raise ValueError(
                f"sup_logits must have one column per class of class_counts "
                f"({self.log_prior.shape[0]}), got {tuple(sup_logits.shape)}"
            )
        check_label_range("labels", labels, num_classes)
        with torch.autocast(device_type=query.device.type, enabled=False):
            return self._loss(query, key, labels, queue, queue_labels, sup_logits, queue_valid)

    def _loss(
        self,
        query: Tensor,
        key: Tensor,
        labels: Tensor,
        queue: Tensor,
        queue_labels: Tensor,
        sup_logits: Tensor,
        queue_valid: Tensor | None,
    ) -> Tensor:
        # B batch, K queue, C classes, D dim; contrast columns [queries | keys | queue]
        batch, queue_size = query.shape[0], queue.shape[0]
        dtype = compute_dtype(query, key, queue, sup_logits)
        device = query.device
        query = query.to(dtype)
        if queue_valid is not None:
            # zero never-written rows so that no garbage (NaN, inf) reaches a gradient
            queue = torch.where(queue_valid[:, None], queue, 0.0)
        contrast = torch.cat([query, key.to(dtype), queue.to(dtype)], dim=0)  # (2B+K, D)
        contrast_logits = query @ contrast.T / self.temperature  # (B, 2B+K)
        centre_logits = sup_logits.to(dtype)  # (B, C)
        if self.log_prior is not None:
            centre_logits = centre_logits + self.log_prior.to(device=device, dtype=dtype)

        rows = torch.arange(batch, device=device)
        valid = torch.ones(2 * batch + queue_size, dtype=torch.bool, device=device)
        if queue_valid is not None:
            valid[2 * batch :] = queue_valid
        valid = valid.expand(batch, -1).clone()  # (B, 2B+K)
        valid[:, :batch].fill_diagonal_(False)  # the anchor is not in its own contrast set
        labels = labels.long()
        column_labels = torch.cat([labels, labels, queue_labels.long()])  # (2B+K,)
        positive = (labels[:, None] == column_labels[None, :]) & valid  # (B, 2B+K), k_i in it

        # log Z_i = logsumexp([s_ic] ∪ [s_ia + log γ : a ∈ A(i)])
        scaled = (contrast_logits + math.log(self.gamma)).masked_fill(~valid, float("-inf"))
        log_z = torch.logsumexp(torch.cat([centre_logits, scaled], dim=1), dim=1)  # (B,)
        centre_log_prob = centre_logits[rows, labels] - log_z  # (B,)
        contrast_log_prob = (contrast_logits - log_z[:, None]).masked_fill(~valid, 0.0)
        positive_sum = (contrast_log_prob * positive).sum(dim=1)  # (B,)
        total_weight = self.beta + self.alpha * positive.sum(dim=1).to(dtype)  # (B,)
        per_anchor = -(self.beta * centre_log_prob + self.alpha * positive_sum) / total_weight
        return per_anchor.mean()
