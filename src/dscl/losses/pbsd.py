"""Patch-based self distillation loss (PBSD, Xuan & Zhang, AAAI 2024, §3.3; docs/DESIGN.md §2.8).

Imports nothing from the rest of ``dscl`` but the argument checks of its sibling loss module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dscl import TemperatureLoss, check_embedding, check_queue, compute_dtype


class PBSDLoss(TemperatureLoss):
    """Patch-based self distillation: the patch's similarity distribution follows the teacher's.

    For sample i and patch j, over the per-sample set C_i = {k_i} ∪ {valid queue rows} (its own
    key only, not the other samples' keys)::

        target_ij     = softmax(t_ij · C_i / τ)        (no gradient: teacher is detached here)
        prediction_ij = log_softmax(u_ij · C_i / τ)
        L_pbsd        = mean over i, j of -Σ_c target_ij(c) · prediction_ij(c)

    This is the cross-entropy, not the KL divergence: the two differ by the teacher's entropy,
    which is constant in the student, so gradients agree; the value keeps the paper's form.

    Queue entries never written yet are masked out of C_i (``queue_valid``), rather than filled
    with random features as in the authors' code.

    Args:
        temperature: τ, softmax temperature, > 0.
    """

    def forward(
        self,
        teacher: Tensor,
        student: Tensor,
        key: Tensor,
        queue: Tensor,
        queue_valid: Tensor | None = None,
    ) -> Tensor:
        """Computes L_pbsd.

        Args:
            teacher: (L, B, D) L2-normalised teacher patch features t (RoIAlign of the query
                view's feature map); detached inside, so it never receives a gradient.
            student: (L, B, D) L2-normalised student patch features u (patches encoded alone).
            key: (B, D) L2-normalised key embeddings; sample i is compared with k_i only.
            queue: (K, D) queued key embeddings, one entry per row; K may be 0.
            queue_valid: (K,) bool, True for entries ever written; None means all valid.

        Returns:
            Scalar loss, float32 (float64 when an embedding input is float64), even under
            autocast.
        """
        check_embedding("teacher", teacher, 3)
        check_embedding("student", student, 3)
        check_embedding("key", key, 2)
        if student.shape != teacher.shape:
            raise ValueError(
                f"student must have the shape of teacher {tuple(teacher.shape)}, "
                f"got {tuple(student.shape)}"
            )
        if teacher.shape[0] == 0 or teacher.shape[1] == 0:
            raise ValueError(f"teacher must have L >= 1 and B >= 1, got {tuple(teacher.shape)}")
        if key.shape != teacher.shape[1:]:
            raise ValueError(
                f"key must have shape (B, D) = {tuple(teacher.shape[1:])}, got {tuple(key.shape)}"
            )
        check_queue(queue, key.shape[1], queue_valid)

        # L patches, B batch, K queue, D dim
        with torch.autocast(device_type=key.device.type, enabled=False):
            dtype = compute_dtype(teacher, student, key, queue)
            key = key.to(dtype)
            queue = queue.to(dtype)
            if queue_valid is not None:
                # Zero never-written rows so that garbage there cannot reach any gradient.
                queue = torch.where(queue_valid[:, None], queue, 0.0)  # (K, D)
            teacher_logits = self._logits(teacher.detach().to(dtype), key, queue)  # (L, B, 1+K)
            student_logits = self._logits(student.to(dtype), key, queue)  # (L, B, 1+K)
            if queue_valid is not None:
                invalid = torch.cat([queue_valid.new_zeros(1), ~queue_valid])  # (1+K,)
                teacher_logits = teacher_logits.masked_fill(invalid, float("-inf"))
                student_logits = student_logits.masked_fill(invalid, float("-inf"))
            target = torch.softmax(teacher_logits, dim=-1)  # masked entries exactly 0
            prediction = torch.log_softmax(student_logits, dim=-1)
            if queue_valid is not None:
                prediction = prediction.masked_fill(invalid, 0.0)  # avoid 0 * -inf = NaN
            return -(target * prediction).sum(dim=-1).mean()

    def _logits(self, features: Tensor, key: Tensor, queue: Tensor) -> Tensor:
        """(L, B, D) patch features -> (L, B, 1+K) similarities to [k_i | queue] over τ."""
        own_key = (features * key).sum(dim=-1, keepdim=True)  # (L, B, 1)
        queued = features @ queue.T  # (L, B, K)
        return torch.cat([own_key, queued], dim=-1) / self.temperature
