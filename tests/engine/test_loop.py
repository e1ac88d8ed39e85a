"""The shared training loop: a new method plugs in with a few lines, and the loop's own duties
(learning rate per step, finite check, logging cadence, early stop, resumed epochs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dscl.config import build_config
from dscl.engine import runtime
from dscl.engine.loop import EpochLog, EpochSpan, Optimization, StepTimes, run_epoch
from dscl.errors import ConfigError
from dscl.methods import CLASSIFY, Method, StepOutput, build_method, method_names, register_method
from dscl.methods.registry import unregister_method


class Batch:
    def __init__(self, image: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = {"image": image}, labels


def batches(n: int, batch: int = 4, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        Batch(torch.randn(batch, 3, 4, 4, generator=g), torch.arange(batch) % 2) for _ in range(n)
    ]


class ToyMethod(Method):
    """Mean-pooled pixels -> linear layer, cross-entropy; counts its after-step calls."""

    feed_kind = CLASSIFY

    def __init__(self) -> None:
        super().__init__(nn.Linear(3, 2))
        self.after = 0

    def step(self, batch) -> StepOutput:
        logits = self.net(batch.inputs["image"].mean(dim=(2, 3)))
        loss = F.cross_entropy(logits, batch.labels)
        return StepOutput(loss, {"twice": 2 * loss.detach()})

    def after_step(self) -> None:
        self.after += 1


@pytest.fixture
def toy_registered():
    register_method("toy")(lambda cfg, data: ToyMethod())
    yield
    unregister_method("toy")


def make_opt(method: Method, lrs) -> Optimization:
    sgd = torch.optim.SGD(method.trainable_parameters(), lr=0.0)
    cpu = torch.device("cpu")
    return Optimization(sgd, np.asarray(lrs, dtype=float), runtime.grad_scaler(cpu, None), cpu)


def test_a_registered_toy_method_trains_one_step(toy_registered):
    cfg = build_config(None, ["method=toy"])  # the config accepts any registered method
    assert "toy" in method_names()
    method = build_method(cfg, 2)
    before = method.model.weight.detach().clone()
    (batch,) = batches(1)
    # the expected update of plain SGD at lr 0.5, computed outside the loop
    reference = nn.Linear(3, 2)
    reference.load_state_dict(method.model.state_dict())
    F.cross_entropy(reference(batch.inputs["image"].mean(dim=(2, 3))), batch.labels).backward()
    expected = before - 0.5 * reference.weight.grad
    result = run_epoch(method, [batch], make_opt(method, [0.5]), EpochSpan(0, 1))
    assert result.steps == 1 and method.after == 1
    torch.testing.assert_close(method.model.weight.detach(), expected, rtol=0, atol=1e-7)
    assert result.last_values["twice"] == pytest.approx(2 * result.last_values["loss"])
    assert result.last_values["lr"] == 0.5


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="method: 'nope' is not one of ce, supcon"):
        build_config(None, ["method=nope"])


def test_lr_follows_the_schedule_by_global_step():
    method = ToyMethod()
    opt = make_opt(method, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    seen = []
    run_epoch(
        method,
        batches(3),
        opt,
        EpochSpan(epoch=1, steps_per_epoch=3),
        after_step=lambda i, step, check: seen.append(
            (i, step, opt.optimizer.param_groups[0]["lr"])
        ),
    )
    assert seen == [(0, 3, 0.4), (1, 4, 0.5), (2, 5, 0.6)]


def test_resumed_epoch_starts_at_first_batch_and_stop_ends_it():
    method = ToyMethod()
    opt = make_opt(method, [0.1] * 8)
    steps = []
    result = run_epoch(
        method,
        batches(3),
        opt,
        EpochSpan(epoch=1, steps_per_epoch=4, first_batch=1),
        after_step=lambda i, step, check: steps.append(step) or step == 6,
    )
    assert steps == [5, 6] and result.stopped and result.steps == 2 and method.after == 2


def test_non_finite_loss_stops_with_the_step():
    class Exploding(ToyMethod):
        def step(self, batch) -> StepOutput:
            out = super().step(batch)
            return StepOutput(out.loss * float("nan") if self.after == 1 else out.loss)

    method = Exploding()
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        run_epoch(method, batches(3), make_opt(method, [0.1] * 3), EpochSpan(0, 3))


def test_step_times_cover_every_phase():
    method = ToyMethod()
    times = StepTimes(torch.device("cpu"))
    run_epoch(method, batches(2), make_opt(method, [0.1] * 2), EpochSpan(0, 2), times=times)
    assert times.steps == 2
    assert {"data", "forward", "backward", "update"} <= set(times.seconds)
    assert all(v >= 0 for v in times.seconds.values())


def test_log_records_follow_the_cadence(tmp_path):
    logger = runtime.RunLogger(tmp_path, progress=False, tensorboard=False)
    method = ToyMethod()
    run_epoch(
        method,
        batches(5),
        make_opt(method, [0.1] * 5),
        EpochSpan(0, 5),
        EpochLog(logger, log_every=2),
    )
    logger.close()
    import json

    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]  # every 2nd step, and the last
    assert all({"loss", "twice", "lr", "images_per_sec"} <= set(r) for r in records)
