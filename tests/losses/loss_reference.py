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


# ------------------------------------------------------------------ peer methods: BCL and PaCo


def bcl_reference(view1, view2, labels, prototypes, temperature):
    """L_bcl (BCL, class-averaged and class-complemented) by a loop over the 2B anchors.

    Members: the 2B view embeddings (label y_b) and the C prototypes (label c). For anchor i
    every other member is in the contrast set; a class's exponentials are averaged over its
    members in that set; the positives are the members of the anchor's class.
    """
    batch, num_classes = view1.shape[0], prototypes.shape[0]
    members = [(view1[b], int(labels[b])) for b in range(batch)]
    members += [(view2[b], int(labels[b])) for b in range(batch)]
    members += [(prototypes[c], c) for c in range(num_classes)]
    losses = []
    for i in range(2 * batch):
        anchor, label = members[i]
        by_class = {}  # class -> list of logits of its members in the contrast set
        for j, (member, member_label) in enumerate(members):
            if j != i:
                by_class.setdefault(member_label, []).append(_dot(anchor, member) / temperature)
        log_z = math.log(
            math.fsum(math.fsum(math.exp(x) for x in xs) / len(xs) for xs in by_class.values())
        )
        positives = [x - log_z for x in by_class[label]]
        losses.append(-math.fsum(positives) / len(positives))
    return math.fsum(losses) / len(losses)


def logit_adjusted_ce_reference(logits, labels, class_counts, tau):
    """mean_i -log softmax(logits_i + tau log prior)[y_i], by loops."""
    total = math.fsum(float(n) for n in class_counts)
    log_prior = [math.log(float(n) / total) for n in class_counts]
    terms = []
    for i in range(logits.shape[0]):
        adjusted = [float(logits[i, c]) + tau * log_prior[c] for c in range(logits.shape[1])]
        log_z = math.log(math.fsum(math.exp(x) for x in adjusted))
        terms.append(log_z - adjusted[int(labels[i])])
    return math.fsum(terms) / len(terms)


def paco_reference(
    query,
    key,
    labels,
    queue,
    queue_labels,
    queue_valid,
    sup_logits,
    class_counts,
    temperature,
    alpha,
    beta,
    gamma,
):
    """L_paco by a loop over anchors: centres (classifier logits, + log(prior + 1e-9) when
    class_counts is given) and the contrast set A(i) of DSCL (other queries, all keys, valid
    queue); positives: the own centre (weight beta) and same-class members of A(i) (alpha)."""
    num_classes = sup_logits.shape[1]
    if class_counts is None:
        log_prior = [0.0] * num_classes
    else:
        total = math.fsum(float(n) for n in class_counts)
        log_prior = [math.log(float(n) / total + 1e-9) for n in class_counts]
    losses = []
    for i in range(query.shape[0]):
        centres = [float(sup_logits[i, c]) + log_prior[c] for c in range(num_classes)]
        members = _members(query, key, labels, queue, queue_labels, queue_valid, i, temperature)
        z = math.fsum(math.exp(x) for x in centres)
        z += gamma * math.fsum(math.exp(logit) for logit, _, _ in members)
        log_z = math.log(z)
        y = int(labels[i])
        weighted = [beta * (centres[y] - log_z)]
        weights = [beta]
        for logit, label, _ in members:
            if label == y:
                weighted.append(alpha * (logit - log_z))
                weights.append(alpha)
        losses.append(-math.fsum(weighted) / math.fsum(weights))
    return math.fsum(losses) / len(losses)


def make_bcl_problem(batch: int, num_classes: int, seed: int, dim: int = 3) -> dict:
    """Random float64 BCL inputs: two views (B, D), labels (B,), prototypes (C, D), logits
    (B, C) and class counts (C,); every embedding L2-normalised."""
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)

    return {
        "view1": unit(batch, dim),
        "view2": unit(batch, dim),
        "labels": torch.randint(num_classes, (batch,), generator=gen),
        "prototypes": unit(num_classes, dim),
        "logits": 3 * torch.randn(batch, num_classes, generator=gen, dtype=torch.float64),
        "class_counts": torch.randint(1, 500, (num_classes,), generator=gen).tolist(),
    }
