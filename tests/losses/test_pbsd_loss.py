"""PBSDLoss against a slow reference loop, a hand-computed case, gradcheck and edge cases."""

import math

import pytest
import torch
from loss_reference import make_problem, pbsd_reference

from dscl.losses import PBSDLoss

ARGS = ("teacher", "student", "key", "queue", "queue_valid")


def _call(loss, problem):
    return loss(*(problem[name] for name in ARGS))


@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("queue_size", [0, 5, 64])
@pytest.mark.parametrize("patches", [1, 3])
def test_matches_reference_loop(batch, queue_size, patches):
    for seed, valid in enumerate(["all", "partial", "none"]):
        problem = make_problem(batch, queue_size, 1, valid, seed + 200, patches=patches)
        for temperature in (0.07, 0.5):
            got = _call(PBSDLoss(temperature), problem)
            want = pbsd_reference(*(problem[n] for n in ARGS), temperature)
            assert got.dtype == torch.float64
            assert abs(got.item() - want) < 1e-10, (valid, temperature, got.item(), want)


def test_only_own_key_is_in_the_contrast_set():
    # Changing another sample's key must not change sample 0's term; with B=1 per call the
    # loss of a two-sample batch is the mean of the two one-sample losses.
    problem = make_problem(2, 5, 1, "partial", seed=210, patches=3)
    loss = PBSDLoss(0.2)
    whole = _call(loss, problem)
    halves = [
        _call(
            loss,
            dict(
                problem,
                teacher=problem["teacher"][:, i : i + 1],
                student=problem["student"][:, i : i + 1],
                key=problem["key"][i : i + 1],
            ),
        )
        for i in range(2)
    ]
    assert abs(whole.item() - (halves[0].item() + halves[1].item()) / 2) < 1e-12


def hand_problem():
    # L=1, B=2, τ=0.5. teacher t1=(1,0) t2=(0,1); student u1=(.6,.8) u2=(.8,.6);
    # keys k1=(0,1) k2=(1,0); queue: c=(-1,0) valid and a masked row (.6,.8).
    return {
        "teacher": torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64),
        "student": torch.tensor([[[0.6, 0.8], [0.8, 0.6]]], dtype=torch.float64),
        "key": torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64),
        "queue": torch.tensor([[-1.0, 0.0], [0.6, 0.8]], dtype=torch.float64),
        "queue_valid": torch.tensor([True, False]),
    }


def test_hand_computed_case():
    # Sample 1: teacher logits (t1·k1, t1·c)/τ = (0, -2) -> target a = 1/(1+e^-2), b = 1-a;
    #   student logits (0.8, -0.6)/τ = (1.6, -1.2), lse1 = log(e^1.6 + e^-1.2);
    #   CE_1 = -[a (1.6 - lse1) + b (-1.2 - lse1)]
    # Sample 2: teacher logits (0, 0) -> target (1/2, 1/2);
    #   student logits (0.8, -0.8)/τ = (1.6, -1.6), CE_2 = lse2 = log(e^1.6 + e^-1.6)
    # L = (CE_1 + CE_2) / 2 = 1.0163771705561655
    got = _call(PBSDLoss(temperature=0.5), hand_problem())
    assert math.isclose(got.item(), 1.0163771705561655, rel_tol=0, abs_tol=1e-12)


def test_cross_entropy_not_kl():
    # Student equal to teacher: KL would be 0, the cross-entropy is the teacher's entropy.
    problem = hand_problem()
    problem["student"] = problem["teacher"]
    a = 1 / (1 + math.exp(-2))
    entropy_1 = -(a * math.log(a) + (1 - a) * math.log(1 - a))
    entropy_2 = math.log(2)
    got = _call(PBSDLoss(temperature=0.5), problem)
    assert math.isclose(got.item(), (entropy_1 + entropy_2) / 2, rel_tol=0, abs_tol=1e-12)


def test_gradcheck_student_and_teacher_gets_no_gradient():
    problem = make_problem(3, 4, 1, "partial", seed=220, dim=4, patches=2)
    problem["queue_valid"] = torch.tensor([True, False, True, True])
    student = problem["student"].clone().requires_grad_(True)

    def fn(s):
        return _call(PBSDLoss(0.3), dict(problem, student=s))

    assert torch.autograd.gradcheck(fn, (student,))

    # The teacher is detached inside the loss, so autograd never reaches it: its .grad stays
    # None (not a zero tensor) even though it requires grad.
    teacher = problem["teacher"].clone().requires_grad_(True)
    student = problem["student"].clone().requires_grad_(True)
    _call(PBSDLoss(0.3), dict(problem, teacher=teacher, student=student)).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_invalid_queue_rows_have_no_effect():
    problem = make_problem(4, 10, 1, "partial", seed=230, patches=3)
    valid = problem["queue_valid"]
    assert 0 < int(valid.sum()) < 10
    dropped = dict(problem, queue=problem["queue"][valid], queue_valid=None)
    garbage = dict(problem, queue=problem["queue"].masked_fill(~valid[:, None], float("nan")))
    values, grads = [], []
    for case in (dropped, garbage):
        student = case["student"].clone().requires_grad_(True)
        value = _call(PBSDLoss(0.1), dict(case, student=student))
        value.backward()
        values.append(value)
        grads.append(student.grad)
    assert torch.isfinite(values[1]) and torch.isfinite(grads[1]).all()
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


def test_empty_queue_gives_zero():
    # C_i = {k_i} alone: target 1 and log-prediction 0, so the loss is exactly 0, for K=0 and
    # for a queue with no valid entry.
    for valid in ("all", "none"):
        problem = make_problem(3, 0 if valid == "all" else 4, 1, valid, seed=240, patches=2)
        assert _call(PBSDLoss(0.1), problem).item() == 0.0


def test_autocast_bfloat16_gives_float32():
    problem = make_problem(4, 6, 1, "partial", seed=250, patches=3)
    low = {
        n: (v.bfloat16() if v is not None and v.is_floating_point() else v)
        for n, v in problem.items()
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _call(PBSDLoss(0.1), low)
    assert got.dtype == torch.float32
    up = {n: (v.float() if v is not None and v.is_floating_point() else v) for n, v in low.items()}
    assert torch.equal(got, _call(PBSDLoss(0.1), up))


def _bad(name, value):
    problem = make_problem(3, 4, 1, "partial", seed=260, patches=2)
    problem[name] = value
    return problem


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("teacher", lambda: _bad("teacher", torch.zeros(3, 6, dtype=torch.float64))),
        ("teacher", lambda: _bad("teacher", torch.zeros(2, 3, 6, dtype=torch.long))),
        (
            "teacher",
            lambda: dict(
                _bad("teacher", torch.zeros(0, 3, 6, dtype=torch.float64)),
                student=torch.zeros(0, 3, 6, dtype=torch.float64),
            ),
        ),
        ("student", lambda: _bad("student", torch.zeros(2, 2, 6, dtype=torch.float64))),
        ("student", lambda: _bad("student", torch.zeros(2, 3, 6, dtype=torch.int32))),
        ("key", lambda: _bad("key", torch.zeros(4, 6, dtype=torch.float64))),
        ("key", lambda: _bad("key", torch.zeros(3, 5, dtype=torch.float64))),
        ("queue", lambda: _bad("queue", torch.zeros(4, 5, dtype=torch.float64))),
        ("queue_valid", lambda: _bad("queue_valid", torch.ones(3, dtype=torch.bool))),
        ("queue_valid", lambda: _bad("queue_valid", torch.ones(4))),
    ],
)
def test_bad_inputs_raise_naming_the_argument(name, make):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _call(PBSDLoss(), make())


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), True])
def test_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match=r"^temperature\b"):
        PBSDLoss(temperature)
