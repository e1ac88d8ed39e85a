"""PaCoLoss against a slow float64 loop reference written from the formula, hand-computed
numbers, the queue mask, gradients and input checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from loss_reference import make_problem, paco_reference

from dscl.losses import PaCoLoss

ARGS = ("query", "key", "labels", "queue", "queue_labels", "sup_logits", "queue_valid")
REF_ARGS = ("query", "key", "labels", "queue", "queue_labels", "queue_valid", "sup_logits")


def _problem(batch, queue_size, num_classes, valid, seed, dim=3):
    problem = make_problem(batch, queue_size, num_classes, valid, seed, dim=dim)
    gen = torch.Generator().manual_seed(1000 + seed)
    problem["sup_logits"] = 3 * torch.randn(batch, num_classes, generator=gen, dtype=torch.float64)
    problem["class_counts"] = torch.randint(1, 300, (num_classes,), generator=gen).tolist()
    return problem


def _call(loss, problem):
    return loss(*(problem[name] for name in ARGS))


def _reference(problem, counts, temperature, alpha, beta, gamma):
    return paco_reference(*(problem[n] for n in REF_ARGS), counts, temperature, alpha, beta, gamma)


SETTINGS = [  # (temperature, alpha, beta, gamma): the authors' scripts, then odd ones
    (0.2, 0.05, 1.0, 1.0),
    (0.05, 0.01, 1.0, 1.0),
    (0.5, 1.0, 0.5, 2.0),
    (0.1, 0.0, 1.0, 0.3),
    (0.3, 0.7, 0.0, 1.0),
]


@pytest.mark.parametrize("batch", [1, 5, 8])
@pytest.mark.parametrize("queue_size", [0, 6, 20])
@pytest.mark.parametrize("num_classes", [1, 7])
@pytest.mark.parametrize("adjusted", [False, True], ids=["plain", "balanced"])
def test_matches_reference_loop(batch, queue_size, num_classes, adjusted):
    for seed, valid in enumerate(["all", "partial", "none"]):
        problem = _problem(batch, queue_size, num_classes, valid, seed)
        counts = problem["class_counts"] if adjusted else None
        for temperature, alpha, beta, gamma in SETTINGS:
            got = _call(PaCoLoss(counts, temperature, alpha, beta, gamma), problem)
            want = _reference(problem, counts, temperature, alpha, beta, gamma)
            assert got.dtype == torch.float64
            # float64 throughout, logits up to 1/0.05 = 20: 1e-12 relative is ~1e4 ulps
            assert math.isclose(got.item(), want, rel_tol=1e-12), (valid, temperature, alpha)


def test_absent_class_centre_stays_in_the_denominator():
    # B=5, C=7: classes 1, 3, 4, 6 absent from the batch and the queue; their centres are
    # still negatives of every anchor.
    problem = _problem(5, 6, 7, "partial", seed=5)
    problem["labels"] = torch.tensor([0, 0, 2, 5, 5])
    problem["queue_labels"] = torch.tensor([0, 2, 2, 5, 0, 5])
    loss = PaCoLoss(problem["class_counts"], 0.2, 0.05, 1.0, 1.0)
    got = _call(loss, problem).item()
    want = _reference(problem, problem["class_counts"], 0.2, 0.05, 1.0, 1.0)
    assert math.isclose(got, want, rel_tol=1e-12)
    raised = dict(problem, sup_logits=problem["sup_logits"].clone())
    raised["sup_logits"][:, 4] += 2.0  # an absent class's centre logit
    assert _call(loss, raised).item() > got + 1e-3


def _hand():
    # q = (1, 0), k = (0.6, 0.8), label 0; queue: u = (-1, 0) label 1 valid, and (0, 1)
    # label 0 NOT valid (it would be a positive if it counted); C = 2 centres, logits 0.5, -0.5.
    return {
        "query": torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        "key": torch.tensor([[0.6, 0.8]], dtype=torch.float64),
        "labels": torch.tensor([0]),
        "queue": torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
        "queue_labels": torch.tensor([1, 0]),
        "sup_logits": torch.tensor([[0.5, -0.5]], dtype=torch.float64),
        "queue_valid": torch.tensor([True, False]),
    }


def test_hand_computed_case():
    # τ = 0.5, α = 0.5, β = 1, γ = 1, no prior. Contrast logits q·a/τ: k 1.2, u -2 (the anchor
    # itself and the invalid row are out). Z = e^0.5 + e^-0.5 + e^1.2 + e^-2.
    # Positives: centre 0 (weight 1, logit 0.5) and k (weight 0.5, logit 1.2):
    #   L = -[(0.5 - log Z) + 0.5 (1.2 - log Z)] / 1.5 = log Z - 1.1/1.5 = 1.0090089990865512
    got = _call(PaCoLoss(None, temperature=0.5, alpha=0.5, beta=1.0, gamma=1.0), _hand())
    assert math.isclose(got.item(), 1.0090089990865512, rel_tol=0, abs_tol=1e-14)
    # γ = 2 doubles the contrast part of Z only: log(e^.5 + e^-.5 + 2(e^1.2 + e^-2)) - 1.1/1.5
    got = _call(PaCoLoss(None, temperature=0.5, alpha=0.5, beta=1.0, gamma=2.0), _hand())
    assert math.isclose(got.item(), 1.482184709378708, rel_tol=0, abs_tol=1e-14)
    # class counts (1, 1): prior 1/2 each, log(1/2 + 1e-9) added to both centre logits
    got = _call(PaCoLoss([1, 1], temperature=0.5, alpha=0.5, beta=1.0, gamma=1.0), _hand())
    e = math.exp
    shift = math.log(0.5 + 1e-9)
    z = e(0.5 + shift) + e(-0.5 + shift) + e(1.2) + e(-2)
    want = -((0.5 + shift - math.log(z)) + 0.5 * (1.2 - math.log(z))) / 1.5
    assert math.isclose(got.item(), want, rel_tol=0, abs_tol=1e-14)
    low = {n: (v.float() if v.is_floating_point() else v) for n, v in _hand().items()}
    got32 = _call(PaCoLoss(None, temperature=0.5, alpha=0.5, beta=1.0, gamma=1.0), low)
    assert got32.dtype == torch.float32
    assert math.isclose(got32.item(), 1.0090089990865512, rel_tol=0, abs_tol=1e-6)


def test_alpha_zero_is_cross_entropy_with_contrast_negatives():
    # With α = 0 only the own centre is a positive: -log softmax over [centres | γ·contrast].
    problem = _problem(6, 9, 4, "partial", seed=6)
    counts = problem["class_counts"]
    gamma, temperature = 0.7, 0.2
    q, k = problem["query"], problem["key"]
    queue = problem["queue"][problem["queue_valid"]]
    self_logits = (q @ q.T).masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))
    contrast = torch.cat([self_logits, q @ k.T, q @ queue.T], dim=1) / temperature
    prior = torch.tensor(counts, dtype=torch.float64)
    centres = problem["sup_logits"] + torch.log(prior / prior.sum() + 1e-9)
    logits = torch.cat([centres, contrast + math.log(gamma)], dim=1)
    want = F.cross_entropy(logits, problem["labels"])
    got = _call(PaCoLoss(counts, temperature, 0.0, 1.0, gamma), problem)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-12)


def test_invalid_queue_rows_have_no_effect():
    problem = _problem(5, 12, 3, "partial", seed=21)
    valid = problem["queue_valid"]
    assert 0 < int(valid.sum()) < 12
    dropped = dict(problem, queue_valid=None)
    dropped["queue"] = problem["queue"][valid]
    dropped["queue_labels"] = problem["queue_labels"][valid]
    garbage = dict(problem)
    garbage["queue"] = problem["queue"].masked_fill(~valid[:, None], float("nan"))
    garbage["queue_labels"] = problem["queue_labels"].masked_fill(~valid, int(problem["labels"][0]))
    loss = PaCoLoss(problem["class_counts"], 0.2, 0.05, 1.0, 1.0)
    values, grads = [], []
    for case in (dropped, garbage):
        leaves = {n: case[n].clone().requires_grad_(True) for n in ("query", "key", "sup_logits")}
        value = _call(loss, dict(case, **leaves))
        value.backward()
        values.append(value)
        grads.append(torch.cat([leaves[n].grad.flatten() for n in leaves]))
    assert torch.isfinite(values[1]) and torch.isfinite(grads[1]).all()
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


def test_empty_queue_and_all_invalid_queue_agree():
    problem = _problem(4, 0, 3, "all", seed=22)
    loss = PaCoLoss(problem["class_counts"], 0.2, 0.05, 1.0, 1.0)
    empty = _call(loss, problem)
    masked = _problem(4, 6, 3, "none", seed=22)
    masked.update({n: problem[n] for n in ("query", "key", "labels", "sup_logits")})
    assert torch.isfinite(empty)
    torch.testing.assert_close(_call(loss, masked), empty, rtol=0, atol=1e-12)


def test_gradcheck_query_key_and_logits():
    problem = _problem(3, 4, 3, "partial", seed=23, dim=4)
    problem["labels"] = torch.tensor([0, 0, 1])  # class 2 absent
    problem["queue_labels"] = torch.tensor([0, 1, 1, 0])
    problem["queue_valid"] = torch.tensor([True, False, True, True])
    loss = PaCoLoss(problem["class_counts"], 0.3, 0.4, 1.0, 1.5)
    inputs = tuple(problem[n].clone().requires_grad_(True) for n in ("query", "key", "sup_logits"))

    def fn(q, k, s):
        return _call(loss, dict(problem, query=q, key=k, sup_logits=s))

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradient_matches_reference_finite_differences():
    problem = _problem(5, 7, 7, "partial", seed=24)
    counts = problem["class_counts"]
    setting = (0.2, 0.3, 1.0, 1.0)
    names = ("query", "key", "sup_logits")
    leaves = {n: problem[n].clone().requires_grad_(True) for n in names}
    _call(PaCoLoss(counts, *setting), dict(problem, **leaves)).backward()
    h = 1e-6
    for name in names:
        for index in [(0, 0), (2, 1), (4, 2)]:
            plus, minus = problem[name].clone(), problem[name].clone()
            plus[index] += h
            minus[index] -= h
            want = (
                _reference(dict(problem, **{name: plus}), counts, *setting)
                - _reference(dict(problem, **{name: minus}), counts, *setting)
            ) / (2 * h)
            assert math.isclose(leaves[name].grad[index].item(), want, rel_tol=1e-6, abs_tol=1e-8)


def test_autocast_bfloat16_gives_float32():
    problem = _problem(6, 8, 3, "partial", seed=25, dim=5)
    low = {
        n: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for n, v in problem.items()
    }
    loss = PaCoLoss(problem["class_counts"], 0.2, 0.05, 1.0, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _call(loss, low)
    assert got.dtype == torch.float32
    up = {
        n: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for n, v in low.items()
    }
    assert torch.equal(got, _call(loss, up))


def _bad(name, value):
    problem = _problem(3, 4, 2, "partial", seed=26, dim=6)
    problem[name] = value
    return problem


BAD_INPUTS = [
    ("query", lambda: _bad("query", torch.zeros(3, 6, dtype=torch.long))),
    ("query", lambda: _bad("query", torch.zeros(3, 6, 1, dtype=torch.float64))),
    ("key", lambda: _bad("key", torch.zeros(2, 6, dtype=torch.float64))),
    ("labels", lambda: _bad("labels", torch.zeros(3))),
    ("labels", lambda: _bad("labels", torch.tensor([0, 1, 2]))),  # C = 2: out of range
    ("queue", lambda: _bad("queue", torch.zeros(4, 5, dtype=torch.float64))),
    ("queue_labels", lambda: _bad("queue_labels", torch.zeros(3, dtype=torch.long))),
    ("queue_valid", lambda: _bad("queue_valid", torch.ones(4, dtype=torch.long))),
    ("queue_valid", lambda: _bad("queue_valid", torch.ones(5, dtype=torch.bool))),
    ("sup_logits", lambda: _bad("sup_logits", torch.zeros(2, 2, dtype=torch.float64))),
    ("sup_logits", lambda: _bad("sup_logits", torch.zeros(3, 0, dtype=torch.float64))),
    ("sup_logits", lambda: _bad("sup_logits", torch.zeros(3, 2, dtype=torch.long))),
    ("sup_logits", lambda: _bad("sup_logits", torch.zeros(3, 3, dtype=torch.float64))),  # ≠ C
]


@pytest.mark.parametrize(("name", "make"), BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(name, make):
    problem = make()
    loss = PaCoLoss([4, 2], 0.2, 0.05, 1.0, 1.0)  # C = 2 classes
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _call(loss, problem)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 0.0, "beta": 0.0}, "alpha"),
        ({"beta": float("inf")}, "beta"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"class_counts": [1, -1]}, "class_counts"),
        ({"class_counts": [0, 0]}, "class_counts"),
        ({"class_counts": [[1, 2]]}, "class_counts"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        PaCoLoss(**kwargs)


def test_zero_count_class_is_allowed_and_finite():
    # A class with no training image gets log(1e-9) ~ -20.7 as in the authors' code.
    problem = _problem(4, 5, 3, "all", seed=27)
    problem["labels"] = torch.tensor([0, 0, 2, 2])
    counts = [10, 0, 5]
    got = _call(PaCoLoss(counts, 0.2, 0.05, 1.0, 1.0), problem)
    assert torch.isfinite(got)
    want = _reference(problem, counts, 0.2, 0.05, 1.0, 1.0)
    assert math.isclose(got.item(), want, rel_tol=1e-12)
