"""Balanced contrastive learning (BCL): the balanced contrastive loss and the logit-adjusted
cross-entropy of its classification branch.

Zhu et al., "Balanced Contrastive Learning for Long-Tailed Visual Recognition", CVPR 2022
(github.com/FlamieZhu/Balanced-Contrastive-Learning: ``loss/contrastive.py`` ``BalSCL`` and
``loss/logitadjust.py`` ``LogitAdjust``). This module imports nothing from the rest of ``dscl``
but the input checks of :mod:`dscl.losses.dscl` and the CPU/accelerator switch of
:mod:`dscl.device_path` (which way the label check goes): tensors in, scalar out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dscl.device_path import sync_free

from .dscl import (
    TemperatureLoss,
    _check_labels,
    check_embedding,
    check_view_pair,
    check_weight,
    compute_dtype,
)


def check_class_counts(class_counts: Sequence[int] | Tensor, allow_zero: bool) -> Tensor:
    """Training images per class as a float64 (C,) tensor (C >= 1, every count finite)."""
    try:
        counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"class_counts must be a sequence of counts, got {class_counts!r}"
        ) from error
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}"
        )
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"class_counts must be finite and >= 0, got {counts.tolist()}")
    if not allow_zero and (counts == 0).any():
        raise ValueError(f"class_counts must all be > 0 (log prior), got {counts.tolist()}")
    if counts.sum() <= 0:
        raise ValueError(f"class_counts must not all be 0, got {counts.tolist()}")
    return counts


def check_label_range(name: str, labels: Tensor, num_classes: int) -> None:
    """Every label in [0, num_classes): a ValueError naming the range on a CPU; where the host
    must not wait for the device (:func:`dscl.device_path.sync_free`), an assertion queued on the
    device, which stops the run with ``name``'s message when it runs, without a host read."""
    if sync_free(labels.device):
        if labels.numel():
            in_range = ((labels >= 0) & (labels < num_classes)).all()
            torch._assert_async(in_range, f"{name} must lie in [0, {num_classes})")
        return
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values from {int(labels.min())} "
            f"to {int(labels.max())}"
        )


class BalancedContrastiveLoss(TemperatureLoss):
    """Balanced contrastive loss L_bcl (the BCL paper's class-averaged, class-complemented loss as
    the authors' ``BalSCL`` computes it).

    The anchors are the 2B embeddings of two views of the batch, z = [view1 | view2]; the
    contrast set of anchor i is every other anchor and the C class prototypes,
    A(i) = {z_j : j != i} ∪ {c_1, ..., c_C} (class-complement: every class is present in every
    batch through its prototype). With n_c the number of members of class c among the 2B + C
    embeddings (2·|{b : y_b = c}| + 1, so an absent class counts 1, its prototype) and
    |A_c(i)| = n_c - [c = y_i] the members of class c in A(i)::

        s_ia     = z_i·a / τ
        log p_ia = s_ia - log Σ_c (1/|A_c(i)|) Σ_{b∈A_c(i)} exp(s_ib)     (class-averaging)
        P(i)     = {a ∈ A(i) : label(a) = y_i}     (other view, same-class views, prototype c_y)
        L_i      = -(1/|P(i)|) Σ_{a∈P(i)} log p_ia
        L_bcl    = mean over the 2B anchors of L_i

    The prototypes are anchors of nothing, only members of every contrast set. Each class's
    share of the denominator is the mean of its exponentials, so a head class with many
    samples in the batch pushes no harder than a tail class. |P(i)| >= 2 always (the other view
    of the image and the prototype), so no anchor is ever without positives.

    Args:
        temperature: τ > 0 (the authors' ``--temp``, default 0.07).
    """

    def forward(self, view1: Tensor, view2: Tensor, labels: Tensor, prototypes: Tensor) -> Tensor:
        """Computes L_bcl.

        Args:
            view1: (B, D) L2-normalised embeddings of the first contrastive view.
            view2: (B, D) L2-normalised embeddings of the second view of the same images.
            labels: (B,) integer class labels in [0, C).
            prototypes: (C, D) L2-normalised class prototypes (in BCL: the classifier weights
                passed through the prototype head and normalised), with gradient if wanted.

        Returns:
            Scalar loss, float32 (float64 when an embedding input is float64), even under
            autocast.
        """
        check_view_pair("view1", view1, "view2", view2)
        check_embedding("prototypes", prototypes, 2)
        if prototypes.shape[0] == 0 or prototypes.shape[1] != view1.shape[1]:
            raise ValueError(
                f"prototypes must have shape (C >= 1, {view1.shape[1]}), got "
                f"{tuple(prototypes.shape)}"
            )
        _check_labels("labels", labels, view1.shape[0])
        num_classes = prototypes.shape[0]
        check_label_range("labels", labels, num_classes)
        with torch.autocast(device_type=view1.device.type, enabled=False):
            return self._loss(view1, view2, labels.long(), prototypes)

    def _loss(self, view1: Tensor, view2: Tensor, labels: Tensor, prototypes: Tensor) -> Tensor:
        # B batch, C classes, D dim; N = 2B anchors, M = 2B + C columns [view1 | view2 | prototypes]
        num_classes = prototypes.shape[0]
        dtype = compute_dtype(view1, view2, prototypes)
        device = view1.device
        anchors = torch.cat([view1, view2], dim=0).to(dtype)  # (N, D)
        columns = torch.cat([anchors, prototypes.to(dtype)], dim=0)  # (M, D)
        logits = anchors @ columns.T / self.temperature  # (N, M)

        anchor_labels = labels.repeat(2)  # (N,)
        column_labels = torch.cat([anchor_labels, torch.arange(num_classes, device=device)])
        not_self = torch.ones_like(logits, dtype=torch.bool)
        not_self.fill_diagonal_(False)  # (N, M): the anchor is not in its own contrast set
        same_class = anchor_labels[:, None] == column_labels[None, :]  # (N, M)
        positive = same_class & not_self

        # members of each class among the M embeddings: 2·(count in batch) + 1 (prototype)
        # (a scatter, not bincount, whose output size depends on the largest label)
        ones = torch.ones_like(column_labels)
        class_size = torch.zeros_like(column_labels[:num_classes]).scatter_add_(
            0, column_labels, ones
        )  # (C,)
        class_size = class_size.to(dtype)
        # |A_c(i)| for column j of class c: the anchor's own class loses the anchor itself
        member_count = class_size[column_labels][None, :] - same_class.to(dtype)  # (N, M)

        # log Σ_j exp(s_ij) / |A_{y_j}(i)| as one logsumexp over the contrast set
        averaged = (logits - member_count.clamp(min=1).log()).masked_fill(~not_self, float("-inf"))
        log_prob = logits - torch.logsumexp(averaged, dim=1, keepdim=True)  # (N, M)
        positive_mean = (log_prob * positive).sum(dim=1) / positive.sum(dim=1)  # (N,)
        return -positive_mean.mean()


class LogitAdjustedCrossEntropy(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al. 2021; BCL's classification loss, the authors'
    ``LogitAdjust``): cross-entropy of ``logits + tau * log(prior)``, with prior_c = n_c / Σ n
    the training class frequencies::

        L_ce = mean_i -log softmax(logits_i + τ_la · log π)[y_i]

    The adjustment is applied in training only; predictions use the raw logits.

    Args:
        class_counts: (C,) training images per class, every count > 0.
        tau: τ_la >= 0, the strength of the adjustment (the authors use 1; 0 is plain CE).
    """

    def __init__(self, class_counts: Sequence[int] | Tensor, tau: float = 1.0) -> None:
        super().__init__()
        counts = check_class_counts(class_counts, allow_zero=False)
        self.tau = check_weight("tau", tau)
        # float64 buffer: cast to the logits' compute dtype in forward, moved by .to(device)
        self.register_buffer("log_prior", (counts / counts.sum()).log(), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.log_prior.shape[0]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Computes L_ce.

        Args:
            logits: (B, C) classifier outputs (unnormalised).
            labels: (B,) integer class labels in [0, C).

        Returns:
            Scalar loss, float32 (float64 for float64 logits), even under autocast.
        """
        check_embedding("logits", logits, 2)
        if logits.shape[0] == 0 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (B >= 1, {self.num_classes}), got {tuple(logits.shape)}"
            )
        _check_labels("labels", labels, logits.shape[0])
        check_label_range("labels", labels, self.num_classes)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            dtype = compute_dtype(logits)
            adjustment = (self.tau * self.log_prior).to(device=logits.device, dtype=dtype)
            return F.cross_entropy(logits.to(dtype) + adjustment, labels.long())


class BCLTerms(NamedTuple):
    """The BCL objective and its two parts (scalars)."""

    loss: Tensor  # ce_weight · ce + scl_weight · scl
    ce: Tensor  # logit-adjusted cross-entropy
    scl: Tensor  # balanced contrastive loss


class BCLLoss(nn.Module):
    """The BCL objective as the authors combine it (``main.py``:
    ``loss = args.alpha * ce_loss + args.beta * scl_loss``)::

        L = ce_weight · L_ce(logits, y) + scl_weight · L_bcl(view1, view2, y, prototypes)

    ``logits`` are the classifier's outputs on the classification view (in the authors' code a
    third, RandAugment view of the same images), ``view1``/``view2`` the normalised head outputs
    of the two contrastive views, ``prototypes`` the normalised prototype-head outputs of the
    classifier weights.

    Args:
        class_counts: (C,) training images per class (the prior of the logit adjustment).
        temperature: τ of :class:`BalancedContrastiveLoss` (authors: 0.07).
        tau: τ_la of :class:`LogitAdjustedCrossEntropy` (authors: 1).
        ce_weight: weight of L_ce (the authors' ``--alpha``, 1.0).
        scl_weight: weight of L_bcl (the authors' ``--beta``, 0.35 for ImageNet-LT/iNat).
    """

    def __init__(
        self,
        class_counts: Sequence[int] | Tensor,
        temperature: float = 0.07,
        tau: float = 1.0,
        ce_weight: float = 1.0,
        scl_weight: float = 0.35,
    ) -> None:
        super().__init__()
        self.ce = LogitAdjustedCrossEntropy(class_counts, tau)
        self.scl = BalancedContrastiveLoss(temperature)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.scl_weight = check_weight("scl_weight", scl_weight)

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, scl_weight={self.scl_weight}"

    def forward(
        self, logits: Tensor, view1: Tensor, view2: Tensor, labels: Tensor, prototypes: Tensor
    ) -> BCLTerms:
        """Returns :class:`BCLTerms` (loss, ce, scl); shapes as in the two parts."""
        if prototypes.dim() == 2 and prototypes.shape[0] != self.ce.num_classes:
            raise ValueError(
                f"prototypes must have one row per class ({self.ce.num_classes}), got "
                f"{tuple(prototypes.shape)}"
            )
        ce = self.ce(logits, labels)
        scl = self.scl(view1, view2, labels, prototypes)
        return BCLTerms(self.ce_weight * ce + self.scl_weight * scl, ce, scl)
