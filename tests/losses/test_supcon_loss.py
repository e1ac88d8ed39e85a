"""SupConLoss against a slow reference loop and a hand-computed case.

Masking, autocast, gradcheck and argument checks shared with DSCLLoss are parametrised over
both losses in test_dscl_loss.py.
"""

import math

import pytest
import torch
from loss_reference import hand_problem, make_problem, supcon_reference

from dscl.losses import SupConLoss

ARGS = ("query", "key", "labels", "queue", "queue_labels", "queue_valid")


def _call(loss, problem):
    return loss(*(problem[name] for name in ARGS))


@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("queue_size", [0, 5, 64])
@pytest.mark.parametrize("num_classes", [1, 3, 10])
def test_matches_reference_loop(batch, queue_size, num_classes):
    for seed, valid in enumerate(["all", "partial", "none"]):
        problem = make_problem(batch, queue_size, num_classes, valid, seed + 100)
        for temperature in (0.07, 0.5):
            got = _call(SupConLoss(temperature), problem)
            want = supcon_reference(*(problem[n] for n in ARGS), temperature)
            assert got.dtype == torch.float64
            assert abs(got.item() - want) < 1e-10, (valid, temperature, got.item(), want)


def test_hand_computed_case():
    # loss_reference.hand_problem: q1=(1,0) q2=(0,1) k1=(.6,.8) k2=(.8,.6),
    # labels (0,1), queue u=(-1,0) label 1 valid plus a masked row (0,1) label 0; τ = 0.5.
    # Anchor 1: logits q2 0, k1 1.2, k2 1.6, u -2; no same-class member, only k1:
    #   L_1 = -(1.2 - log(e^0 + e^1.2 + e^1.6 + e^-2)) = 1.0416119024112056
    # Anchor 2: logits q1 0, k1 1.6, k2 1.2, u 0; Z2 = 2 + e^1.6 + e^1.2; positives {k2, u}:
    #   L_2 = -[(1.2 - log Z2) + (0 - log Z2)] / 2
    # L = (L_1 + L_2) / 2 = 1.3855727671850278
    got = _call(SupConLoss(temperature=0.5), hand_problem())
    assert math.isclose(got.item(), 1.3855727671850278, rel_tol=0, abs_tol=1e-12)


def test_one_class_weights_every_member_but_self_equally():
    # With one class P_i ∪ {k_i} = A(i): L_i = -mean_a log p_i(a) = log|A(i)| when all
    # logits are equal (identical vectors: every logit is 1/τ).
    vec = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    problem = {
        "query": vec.repeat(3, 1),
        "key": vec.repeat(3, 1),
        "labels": torch.zeros(3, dtype=torch.long),
        "queue": vec.repeat(4, 1),
        "queue_labels": torch.zeros(4, dtype=torch.long),
        "queue_valid": torch.tensor([True, True, False, False]),
    }
    # |A(i)| = 2 other queries + 3 keys + 2 valid queue rows = 7
    got = _call(SupConLoss(0.1), problem)
    assert math.isclose(got.item(), math.log(7), rel_tol=0, abs_tol=1e-12)
