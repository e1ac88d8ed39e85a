"""DSCLLoss against a slow reference, hand-computed numbers, InfoNCE and SupCon cross-checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from loss_reference import dscl_reference, hand_problem, make_problem

from dscl.losses import DSCLLoss, SupConLoss

ARGS = ("query", "key", "labels", "queue", "queue_labels", "queue_valid")


def _call(loss, problem):
    return loss(*(problem[name] for name in ARGS))


def infonce(query, key, queue, queue_valid, temperature):
    """InfoNCE over A(i), written independently: drop invalid rows, -inf on the self column."""
    if queue_valid is not None:
        queue = queue[queue_valid]
    self_logits = query @ query.T
    self_logits = self_logits.masked_fill(torch.eye(len(query), dtype=torch.bool), float("-inf"))
    logits = torch.cat([self_logits, query @ key.T, query @ queue.T], dim=1) / temperature
    target = torch.arange(len(query)) + len(query)  # column of k_i
    return F.cross_entropy(logits, target)


@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("queue_size", [0, 5, 64])
@pytest.mark.parametrize("num_classes", [1, 3, 10])
def test_matches_reference_loop(batch, queue_size, num_classes):
    for seed, valid in enumerate(["all", "partial", "none"]):
        problem = make_problem(batch, queue_size, num_classes, valid, seed)
        for temperature, beta in [(0.07, 8.0), (0.5, 0.0), (0.2, 2.5)]:
            got = _call(DSCLLoss(temperature, beta), problem)
            want, _ = dscl_reference(*(problem[n] for n in ARGS), temperature, beta)
            assert got.dtype == torch.float64
            assert abs(got.item() - want) < 1e-10, (valid, temperature, beta, got.item(), want)


def test_mixed_anchors_with_and_without_positives():
    problem = make_problem(7, 5, 10, "partial", seed=3)
    problem["labels"] = torch.tensor([0, 0, 1, 2, 3, 3, 4])
    problem["queue_labels"] = torch.tensor([4, 5, 5, 5, 5])
    problem["queue_valid"] = torch.tensor([True, True, False, True, False])
    want, sizes = dscl_reference(*(problem[n] for n in ARGS), 0.1, 8.0)
    assert 0 in sizes and max(sizes) > 0  # both branches of L_i are exercised
    assert abs(_call(DSCLLoss(0.1, 8.0), problem).item() - want) < 1e-10


def test_hand_computed_case():
    # τ = 0.5, β = 2.
    # Anchor 1, A(1) = {q2, k1, k2, u}, logits q1·a/τ = 0, 1.2, 1.6, -2;
    #   Z1 = e^0 + e^1.2 + e^1.6 + e^-2. No member has label 0, so P_1 is empty:
    #   L_1 = -(1.2 - log Z1) = 1.0416119024112056
    # Anchor 2, A(2) = {q1, k1, k2, u}, logits 0, 1.6, 1.2, 0; Z2 = 1 + e^1.6 + e^1.2 + 1.
    #   P_2 = {u} (label 1): L_2 = -[(1.2 - log Z2) + 2 (0 - log Z2)] / 3 = 1.9295336319588499
    # L = (L_1 + L_2) / 2 = 1.4855727671850278
    got = _call(DSCLLoss(temperature=0.5, beta=2.0), hand_problem())
    assert math.isclose(got.item(), 1.4855727671850278, rel_tol=0, abs_tol=1e-12)


def test_hand_computed_case_float32_default_dtype():
    problem = {
        n: (v.float() if v is not None and v.is_floating_point() else v)
        for n, v in hand_problem().items()
    }
    got = _call(DSCLLoss(temperature=0.5, beta=2.0), problem)
    assert got.dtype == torch.float32
    # float32 round-off on logits of size ~2: 1e-6 is ~10 ulps of the result.
    assert math.isclose(got.item(), 1.4855727671850278, rel_tol=0, abs_tol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0, 8.0])
def test_no_same_class_positives_is_infonce(beta):
    problem = make_problem(6, 9, 1, "partial", seed=11)
    problem["labels"] = torch.arange(6)  # every batch label distinct
    problem["queue_labels"] = torch.arange(9) + 100  # no queue entry shares a batch label
    want = infonce(problem["query"], problem["key"], problem["queue"], problem["queue_valid"], 0.1)
    got = _call(DSCLLoss(0.1, beta), problem)
    assert abs(got.item() - want.item()) < 1e-10


def test_beta_zero_is_infonce_with_positives_present():
    problem = make_problem(7, 16, 2, "partial", seed=12)  # 2 classes: plenty of positives
    want = infonce(problem["query"], problem["key"], problem["queue"], problem["queue_valid"], 0.1)
    assert abs(_call(DSCLLoss(0.1, 0.0), problem).item() - want.item()) < 1e-10
    # ... while any β > 0 differs, so the equality above is not vacuous.
    assert abs(_call(DSCLLoss(0.1, 1.0), problem).item() - want.item()) > 1e-3


@pytest.mark.parametrize(
    ("labels", "queue_labels", "positives"),
    [
        # each anchor: 1 other query, 1 other key and 1 queue entry of its class -> |P_i| = 3
        ([0, 0, 1, 1], [0, 1], 3),
        # one class everywhere: 3 other queries + 3 other keys + 2 queue entries -> |P_i| = 8
        ([5, 5, 5, 5], [5, 5], 8),
    ],
)
def test_beta_equal_to_positive_count_is_supcon(labels, queue_labels, positives):
    # With β = |P_i|: k_i gets 1/(1+β) and each of the |P_i| positives β/((1+β)|P_i|)
    # = 1/(1+|P_i|), i.e. equal weights over P_i ∪ {k_i}: exactly SupCon.
    problem = make_problem(4, 3, 1, "all", seed=13)
    problem["labels"] = torch.tensor(labels)
    problem["queue_labels"] = torch.tensor([*queue_labels, 7])
    problem["queue_valid"] = torch.tensor([True, True, False])  # the label-7 row is masked
    _, sizes = dscl_reference(*(problem[n] for n in ARGS), 0.2, 0.0)
    assert sizes == [positives] * 4
    dscl = _call(DSCLLoss(0.2, float(positives)), problem)
    supcon = _call(SupConLoss(0.2), problem)
    assert abs(dscl.item() - supcon.item()) < 1e-12


LOSSES = [DSCLLoss(0.1, 8.0), SupConLoss(0.1)]
LOSS_IDS = ["dscl", "supcon"]


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_invalid_queue_rows_have_no_effect(loss):
    problem = make_problem(5, 12, 3, "partial", seed=21)
    valid = problem["queue_valid"]
    assert 0 < int(valid.sum()) < 12
    dropped = dict(problem, queue_valid=None)
    dropped["queue"] = problem["queue"][valid]
    dropped["queue_labels"] = problem["queue_labels"][valid]
    # Garbage in never-written rows (NaN features, labels equal to the batch's) must not leak
    # into the value or the gradient.
    garbage = dict(problem)
    garbage["queue"] = problem["queue"].masked_fill(~valid[:, None], float("nan"))
    garbage["queue_labels"] = problem["queue_labels"].masked_fill(~valid, int(problem["labels"][0]))
    values, grads = [], []
    for case in (dropped, garbage):
        query = case["query"].clone().requires_grad_(True)
        key = case["key"].clone().requires_grad_(True)
        value = _call(loss, dict(case, query=query, key=key))
        value.backward()
        values.append(value)
        grads.append(torch.cat([query.grad, key.grad]))
    assert torch.isfinite(values[1]) and torch.isfinite(grads[1]).all()
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_empty_queue_and_all_invalid_queue_agree(loss):
    problem = make_problem(4, 0, 2, "all", seed=22)
    empty = _call(loss, problem)
    masked = make_problem(4, 6, 2, "none", seed=22)
    masked.update({n: problem[n] for n in ("query", "key", "labels")})
    assert torch.isfinite(empty)
    torch.testing.assert_close(_call(loss, masked), empty, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_gradcheck_query_and_key(loss):
    problem = make_problem(3, 4, 2, "partial", seed=23, dim=4)
    problem["labels"] = torch.tensor([0, 0, 1])
    problem["queue_labels"] = torch.tensor([0, 1, 1, 0])
    problem["queue_valid"] = torch.tensor([True, False, True, True])
    query = problem["query"].clone().requires_grad_(True)
    key = problem["key"].clone().requires_grad_(True)

    def fn(q, k):
        return _call(loss, dict(problem, query=q, key=k))

    assert torch.autograd.gradcheck(fn, (query, key))


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_autocast_bfloat16_gives_float32(loss):
    problem = make_problem(6, 8, 3, "partial", seed=24)
    low = {
        n: (v.bfloat16() if v is not None and v.is_floating_point() else v)
        for n, v in problem.items()
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _call(loss, low)
    assert got.dtype == torch.float32
    # Same bf16 numbers cast up outside autocast: identical, so nothing ran in bf16 inside.
    up = {n: (v.float() if v is not None and v.is_floating_point() else v) for n, v in low.items()}
    assert torch.equal(got, _call(loss, up))


def _bad(name, value):
    problem = make_problem(3, 4, 2, "partial", seed=25)
    problem[name] = value
    return problem


BAD_INPUTS = [
    ("query", lambda: _bad("query", torch.zeros(3, 6, dtype=torch.long))),
    ("query", lambda: _bad("query", torch.zeros(3, 6, 1, dtype=torch.float64))),
    (
        "query",
        lambda: dict(
            _bad("query", torch.zeros(0, 6, dtype=torch.float64)),
            key=torch.zeros(0, 6, dtype=torch.float64),
            labels=torch.zeros(0, dtype=torch.long),
        ),
    ),
    ("key", lambda: _bad("key", torch.zeros(2, 6, dtype=torch.float64))),
    ("key", lambda: _bad("key", torch.zeros(3, 5, dtype=torch.float64))),
    ("labels", lambda: _bad("labels", torch.zeros(3))),
    ("labels", lambda: _bad("labels", torch.zeros(4, dtype=torch.long))),
    ("queue", lambda: _bad("queue", torch.zeros(4, 5, dtype=torch.float64))),
    ("queue", lambda: _bad("queue", torch.zeros(4, dtype=torch.float64))),
    ("queue_labels", lambda: _bad("queue_labels", torch.zeros(3, dtype=torch.long))),
    ("queue_labels", lambda: _bad("queue_labels", torch.zeros(4, dtype=torch.float64))),
    ("queue_valid", lambda: _bad("queue_valid", torch.ones(4, dtype=torch.long))),
    ("queue_valid", lambda: _bad("queue_valid", torch.ones(5, dtype=torch.bool))),
]


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize(("name", "make"), BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(loss, name, make):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _call(loss, make())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "0.1"}, "temperature"),
        ({"beta": -1.0}, "beta"),
        ({"beta": float("inf")}, "beta"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        DSCLLoss(**kwargs)
    if name == "temperature":
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            SupConLoss(**kwargs)
