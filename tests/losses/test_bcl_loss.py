"""BCL losses (balanced contrastive, logit-adjusted CE, their sum) against slow float64 loop
references written from the formula, hand-computed numbers, gradients and input checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from loss_reference import bcl_reference, logit_adjusted_ce_reference, make_bcl_problem

from dscl.losses import BalancedContrastiveLoss, BCLLoss, BCLTerms, LogitAdjustedCrossEntropy

SCL_ARGS = ("view1", "view2", "labels", "prototypes")


def _scl(loss, problem):
    return loss(*(problem[name] for name in SCL_ARGS))


# ------------------------------------------------------------------- balanced contrastive loss


@pytest.mark.parametrize(
    ("batch", "num_classes", "dim"), [(1, 1, 3), (1, 4, 2), (5, 7, 3), (8, 3, 4), (16, 10, 6)]
)
def test_balanced_contrastive_matches_reference_loop(batch, num_classes, dim):
    for seed in range(3):
        problem = make_bcl_problem(batch, num_classes, seed, dim)
        for temperature in (0.07, 0.2, 1.0):
            got = _scl(BalancedContrastiveLoss(temperature), problem)
            want = bcl_reference(*(problem[n] for n in SCL_ARGS), temperature)
            assert got.dtype == torch.float64
            # float64 throughout; logits up to 1/0.07 ~ 14: 1e-12 relative is ~1e4 ulps
            assert math.isclose(got.item(), want, rel_tol=1e-12), (seed, temperature)


def test_absent_classes_count_their_prototype_only():
    # B=5, C=7: at least two classes are absent from the batch; their prototypes are in
    # every contrast set with weight 1 (one member), which the reference counts independently.
    problem = make_bcl_problem(5, 7, seed=4)
    problem["labels"] = torch.tensor([0, 0, 0, 2, 5])  # classes 1, 3, 4, 6 absent
    got = _scl(BalancedContrastiveLoss(0.1), problem).item()
    assert math.isclose(got, bcl_reference(*(problem[n] for n in SCL_ARGS), 0.1), rel_tol=1e-12)
    # moving an absent class's prototype changes the loss (it is in the contrast set) ...
    moved = dict(problem, prototypes=problem["prototypes"].clone())
    moved["prototypes"][3] = -moved["prototypes"][3]
    assert abs(_scl(BalancedContrastiveLoss(0.1), moved).item() - got) > 1e-6


def test_class_averaging_makes_the_number_of_copies_irrelevant():
    # Class 0: one image v (both views v), prototype c0. Class 1: m images that are all e (both
    # views), and its prototype is e too. With class-averaging, class 1's share of every
    # denominator is exp(s·e/τ) whatever m, so each anchor's term does not depend on m: the
    # loss is (2·L0 + 2m·L1) / (2 + 2m) with the same L0, L1 for every m. Without averaging
    # (SupCon), class 1's share would grow with m and this would not hold.
    v = F.normalize(torch.tensor([[1.0, 0.3]], dtype=torch.float64), dim=1)
    e = F.normalize(torch.tensor([[0.2, 1.0]], dtype=torch.float64), dim=1)
    c0 = F.normalize(torch.tensor([[0.8, -0.6]], dtype=torch.float64), dim=1)
    prototypes = torch.cat([c0, e])

    def loss(m):
        views = torch.cat([v, e.expand(m, -1)])
        labels = torch.tensor([0] + [1] * m)
        return BalancedContrastiveLoss(0.5)(views, views, labels, prototypes).item()

    l1, l2 = loss(1), loss(2)  # (L0 + L1)/2 and (L0 + 2 L1)/3
    per_l1 = 3 * l2 - 2 * l1  # solves the two equations for L1
    per_l0 = 2 * l1 - per_l1
    for m in (3, 5):
        want = (per_l0 + m * per_l1) / (1 + m)
        assert math.isclose(loss(m), want, rel_tol=1e-12)
    # the reference agrees on one of them
    views = torch.cat([v, e.expand(3, -1)])
    labels = torch.tensor([0, 1, 1, 1])
    assert math.isclose(
        loss(3), bcl_reference(views, views, labels, prototypes, 0.5), rel_tol=1e-12
    )


def test_hand_computed_case():
    # τ = 1, one image of class 0: view1 v1 = (1, 0), view2 v2 = (0, 1); prototypes
    # c0 = (0.6, 0.8), c1 = (-1, 0). Members: v1, v2, c0 (class 0), c1 (class 1).
    # Anchor v1: A = {v2, c0, c1}; class 0 has 2 members there, class 1 one.
    #   D1 = (e^0 + e^0.6)/2 + e^-1; positives v2 (logit 0), c0 (0.6):
    #   L1 = -[(0 - log D1) + (0.6 - log D1)]/2 = log D1 - 0.3 = 0.276017029996466
    # Anchor v2: logits v1 0, c0 0.8, c1 0: D2 = (1 + e^0.8)/2 + 1, L2 = log D2 - 0.4
    #   = 0.5604111389165852.   L = (L1 + L2)/2 = 0.41821408445652564
    problem = {
        "view1": torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        "view2": torch.tensor([[0.0, 1.0]], dtype=torch.float64),
        "labels": torch.tensor([0]),
        "prototypes": torch.tensor([[0.6, 0.8], [-1.0, 0.0]], dtype=torch.float64),
    }
    got = _scl(BalancedContrastiveLoss(temperature=1.0), problem)
    assert math.isclose(got.item(), 0.41821408445652564, rel_tol=0, abs_tol=1e-14)
    low = {n: (v.float() if v.is_floating_point() else v) for n, v in problem.items()}
    got32 = _scl(BalancedContrastiveLoss(temperature=1.0), low)
    assert got32.dtype == torch.float32
    assert math.isclose(got32.item(), 0.41821408445652564, rel_tol=0, abs_tol=1e-6)


def test_gradcheck_views_and_prototypes():
    problem = make_bcl_problem(4, 5, seed=7, dim=3)
    problem["labels"] = torch.tensor([0, 0, 1, 3])  # classes 2, 4 absent
    inputs = tuple(
        problem[n].clone().requires_grad_(True) for n in ("view1", "view2", "prototypes")
    )

    def fn(v1, v2, c):
        return BalancedContrastiveLoss(0.3)(v1, v2, problem["labels"], c)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradient_matches_reference_finite_differences():
    # The reference is independent code: its central differences must equal our autograd.
    problem = make_bcl_problem(5, 7, seed=8, dim=3)
    names = ("view1", "view2", "prototypes")
    leaves = {n: problem[n].clone().requires_grad_(True) for n in names}
    _scl(BalancedContrastiveLoss(0.2), dict(problem, **leaves)).backward()
    h = 1e-6
    for name in names:
        for index in [(0, 0), (1, 2), (4, 1)] if name != "prototypes" else [(0, 0), (6, 2)]:
            plus, minus = problem[name].clone(), problem[name].clone()
            plus[index] += h
            minus[index] -= h
            want = (
                bcl_reference(*(dict(problem, **{name: plus})[n] for n in SCL_ARGS), 0.2)
                - bcl_reference(*(dict(problem, **{name: minus})[n] for n in SCL_ARGS), 0.2)
            ) / (2 * h)
            assert math.isclose(leaves[name].grad[index].item(), want, rel_tol=1e-6, abs_tol=1e-8)


def test_autocast_bfloat16_gives_float32():
    problem = make_bcl_problem(6, 4, seed=9, dim=5)
    low = {
        n: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for n, v in problem.items()
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _scl(BalancedContrastiveLoss(0.1), low)
    assert got.dtype == torch.float32
    up = {
        n: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for n, v in low.items()
    }
    assert torch.equal(got, _scl(BalancedContrastiveLoss(0.1), up))


def _bad(name, value):
    problem = make_bcl_problem(3, 4, seed=10)
    problem[name] = value
    return problem


SCL_BAD = [
    ("view1", lambda: _bad("view1", torch.zeros(3, 3, dtype=torch.long))),
    ("view1", lambda: _bad("view1", torch.zeros(3, 3, 1, dtype=torch.float64))),
    (
        "view1",
        lambda: dict(
            _bad("view1", torch.zeros(0, 3, dtype=torch.float64)),
            view2=torch.zeros(0, 3, dtype=torch.float64),
            labels=torch.zeros(0, dtype=torch.long),
        ),
    ),
    ("view2", lambda: _bad("view2", torch.zeros(2, 3, dtype=torch.float64))),
    ("view2", lambda: _bad("view2", torch.zeros(3, 2, dtype=torch.float64))),
    ("labels", lambda: _bad("labels", torch.zeros(3))),
    ("labels", lambda: _bad("labels", torch.zeros(4, dtype=torch.long))),
    ("labels", lambda: _bad("labels", torch.tensor([0, 1, 4]))),  # C = 4: out of range
    ("labels", lambda: _bad("labels", torch.tensor([0, -1, 2]))),
    ("prototypes", lambda: _bad("prototypes", torch.zeros(4, 2, dtype=torch.float64))),
    ("prototypes", lambda: _bad("prototypes", torch.zeros(0, 3, dtype=torch.float64))),
    ("prototypes", lambda: _bad("prototypes", torch.zeros(4, dtype=torch.float64))),
]


@pytest.mark.parametrize(("name", "make"), SCL_BAD)
def test_balanced_contrastive_bad_inputs_raise_naming_the_argument(name, make):
    problem = make()
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _scl(BalancedContrastiveLoss(0.1), problem)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), "0.1", True])
def test_balanced_contrastive_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"^temperature\b"):
        BalancedContrastiveLoss(temperature)


# -------------------------------------------------------------- logit-adjusted cross-entropy


@pytest.mark.parametrize(("batch", "num_classes"), [(1, 1), (5, 7), (9, 3)])
def test_logit_adjusted_matches_reference_loop(batch, num_classes):
    for seed in range(3):
        problem = make_bcl_problem(batch, num_classes, seed)
        for tau in (0.0, 0.5, 1.0, 2.0):
            loss = LogitAdjustedCrossEntropy(problem["class_counts"], tau)
            got = loss(problem["logits"], problem["labels"])
            want = logit_adjusted_ce_reference(
                problem["logits"], problem["labels"], problem["class_counts"], tau
            )
            assert got.dtype == torch.float64
            assert math.isclose(got.item(), want, rel_tol=1e-12, abs_tol=1e-14), (seed, tau)


def test_logit_adjusted_hand_computed_and_tau_zero_is_cross_entropy():
    # Equal logits: the adjusted softmax is the prior itself, so L = -log π_y.
    loss = LogitAdjustedCrossEntropy([3, 1], tau=1.0)
    logits = torch.zeros(2, 2, dtype=torch.float64)
    got = loss(logits, torch.tensor([1, 1]))
    assert math.isclose(got.item(), math.log(4.0), rel_tol=0, abs_tol=1e-15)
    got = loss(logits, torch.tensor([0, 1]))
    assert math.isclose(got.item(), (math.log(4 / 3) + math.log(4)) / 2, abs_tol=1e-15)
    problem = make_bcl_problem(6, 5, seed=11)
    plain = LogitAdjustedCrossEntropy(problem["class_counts"], tau=0.0)
    want = F.cross_entropy(problem["logits"], problem["labels"])
    assert torch.equal(plain(problem["logits"], problem["labels"]), want)


def test_logit_adjusted_gradcheck_and_autocast():
    problem = make_bcl_problem(4, 5, seed=12)
    loss = LogitAdjustedCrossEntropy(problem["class_counts"], 1.0)
    logits = problem["logits"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, problem["labels"]), (logits,))
    low = problem["logits"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(low, problem["labels"])
    assert got.dtype == torch.float32
    assert torch.equal(got, loss(low.float(), problem["labels"]))


@pytest.mark.parametrize(
    ("counts", "kwargs", "name"),
    [
        ([3, 0, 2], {}, "class_counts"),
        ([], {}, "class_counts"),
        ([[1, 2]], {}, "class_counts"),
        ([1, -2], {}, "class_counts"),
        ("abc", {}, "class_counts"),
        ([1, 2], {"tau": -1.0}, "tau"),
        ([1, 2], {"tau": float("nan")}, "tau"),
    ],
)
def test_logit_adjusted_bad_construction(counts, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        LogitAdjustedCrossEntropy(counts, **kwargs)


@pytest.mark.parametrize(
    ("logits", "labels", "name"),
    [
        (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), "logits"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), "logits"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "logits"),
        (torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), "labels"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), "labels"),
        (torch.zeros(2, 3), torch.zeros(2), "labels"),
    ],
)
def test_logit_adjusted_bad_inputs(logits, labels, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        LogitAdjustedCrossEntropy([5, 3, 1])(logits, labels)


# ----------------------------------------------------------------------------- the objective


def test_bcl_objective_is_the_weighted_sum():
    problem = make_bcl_problem(5, 7, seed=13)
    loss = BCLLoss(
        problem["class_counts"], temperature=0.1, tau=1.0, ce_weight=1.0, scl_weight=0.35
    )
    terms = loss(problem["logits"], *(problem[n] for n in SCL_ARGS))
    assert isinstance(terms, BCLTerms)
    ce = LogitAdjustedCrossEntropy(problem["class_counts"], 1.0)(
        problem["logits"], problem["labels"]
    )
    scl = _scl(BalancedContrastiveLoss(0.1), problem)
    assert torch.equal(terms.ce, ce) and torch.equal(terms.scl, scl)
    assert torch.equal(terms.loss, 1.0 * ce + 0.35 * scl)
    want = logit_adjusted_ce_reference(
        problem["logits"], problem["labels"], problem["class_counts"], 1.0
    ) + 0.35 * bcl_reference(*(problem[n] for n in SCL_ARGS), 0.1)
    assert math.isclose(terms.loss.item(), want, rel_tol=1e-12)


def test_bcl_objective_checks():
    problem = make_bcl_problem(3, 4, seed=14)
    loss = BCLLoss(problem["class_counts"])
    with pytest.raises(ValueError, match=r"^prototypes\b"):
        loss(
            problem["logits"],
            problem["view1"],
            problem["view2"],
            problem["labels"],
            problem["prototypes"][:3],
        )
    with pytest.raises(ValueError, match=r"^scl_weight\b"):
        BCLLoss([1, 2], scl_weight=-0.1)
    with pytest.raises(ValueError, match=r"^ce_weight\b"):
        BCLLoss([1, 2], ce_weight=float("inf"))
