"""Slow per-anchor loss references straight from docs/DESIGN.md §2.6-§2.8; a random problem maker.

Nothing here is vectorised or shared with ``dscl.losses``: every contrast set is built as a
Python list and every softmax is summed with ``math.fsum`` in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


def _members(query, key, labels, queue, queue_labels, queue_valid, i, temperature):
    """A(i) as a list of (logit, label, is_own_key)."""
    members = []
    for j in range(query.shape[0]):
        if j != i:
            members.append((_dot(query[i], query[j]) / temperature, int(labels[j]), False))
    for j in range(key.shape[0]):
        members.append((_dot(query[i], key[j]) / temperature, int(labels[j]), j == i))
    for m in range(queue.shape[0]):
        if queue_valid is None or bool(queue_valid[m]):
            members.append((_dot(query[i], queue[m]) / temperature, int(queue_labels[m]), False))
    return members


def _log_probs(members):
    log_z = math.log(math.fsum(math.exp(logit) for logit, _, _ in members))
    return [(logit - log_z, label, own) for logit, label, own in members]


def dscl_reference(query, key, labels, queue, queue_labels, queue_valid, temperature, beta):
    """L_dscl by a loop over anchors; returns (loss, per-anchor |P_i| list)."""
    losses, sizes = [], []
    for i in range(query.shape[0]):
        log_p = _log_probs(
            _members(query, key, labels, queue, queue_labels, queue_valid, i, temperature)
        )
        own = [lp for lp, _, is_own in log_p if is_own]
        assert len(own) == 1
        positives = [lp for lp, label, is_own in log_p if label == int(labels[i]) and not is_own]
        sizes.append(len(positives))
        if positives:
            mean_pos = math.fsum(positives) / len(positives)
            losses.append(-(own[0] + beta * mean_pos) / (1.0 + beta))
        else:
            losses.append(-own[0])
    return math.fsum(losses) / len(losses), sizes


def supcon_reference(query, key, labels, queue, queue_labels, queue_valid, temperature):
    """L_scl by a loop over anchors."""
    losses = []
    for i in range(query.shape[0]):
        log_p = _log_probs(
            _members(query, key, labels, queue, queue_labels, queue_valid, i, temperature)
        )
        chosen = [lp for lp, label, is_own in log_p if is_own or label == int(labels[i])]
        losses.append(-math.fsum(chosen) / len(chosen))
    return math.fsum(losses) / len(losses)


def pbsd_reference(teacher, student, key, queue, queue_valid, temperature):
    """L_pbsd by a loop over patches and samples."""
    terms = []
    for j in range(teacher.shape[0]):
        for i in range(teacher.shape[1]):
            contrast = [key[i]] + [
                queue[m]
                for m in range(queue.shape[0])
                if queue_valid is None or bool(queue_valid[m])
            ]
            t_logits = [_dot(teacher[j, i], c) / temperature for c in contrast]
            u_logits = [_dot(student[j, i], c) / temperature for c in contrast]
            t_z = math.fsum(math.exp(x) for x in t_logits)
            u_log_z = math.log(math.fsum(math.exp(x) for x in u_logits))
            target = [math.exp(x) / t_z for x in t_logits]
            terms.append(
                -math.fsum(p * (x - u_log_z) for p, x in zip(target, u_logits, strict=True))
            )
    return math.fsum(terms) / len(terms)


def make_problem(
    batch: int,
    queue_size: int,
    num_classes: int,
    valid: str,
    seed: int,
    dim: int = 6,
    patches: int = 0,
) -> dict:
    """Random L2-normalised float64 inputs; ``valid`` is 'all' (None), 'partial' or 'none'."""
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)

    problem = {
        "query": unit(batch, dim),
        "key": unit(batch, dim),
        "labels": torch.randint(num_classes, (batch,), generator=gen),
        "queue": unit(queue_size, dim),
        "queue_labels": torch.randint(num_classes, (queue_size,), generator=gen),
        "queue_valid": None,
    }
    if valid == "partial":
        mask = torch.rand(queue_size, generator=gen) < 0.6
        problem["queue_valid"] = mask
    elif valid == "none":
        problem["queue_valid"] = torch.zeros(queue_size, dtype=torch.bool)
    if patches:
        problem["teacher"] = unit(patches, batch, dim)
        problem["student"] = unit(patches, batch, dim)
    return problem


def hand_problem() -> dict[str, Tensor]:
    """The small case both hand-computed loss tests work out on paper."""
    # q1=(1,0) q2=(0,1) k1=(.6,.8) k2=(.8,.6), labels (0,1); queue: u=(-1,0) label 1 valid and
    # an invalid row (0,1) label 0 that would change both anchors if it were counted.
    return {
        "query": torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
        "key": torch.tensor([[0.6, 0.8], [0.8, 0.6]], dtype=torch.float64),
        "labels": torch.tensor([0, 1]),
        "queue": torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
        "queue_labels": torch.tensor([1, 0]),
        "queue_valid": torch.tensor([True, False]),
    }
