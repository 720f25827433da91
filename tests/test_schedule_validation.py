"""Every per-model schedule value is validated where it enters, naming the bad models."""

from __future__ import annotations

import math

import pytest
import torch
from _reference import make_sgd
from torch import nn
from torch.optim import lr_scheduler as tls

from modelbatch.optim import (
    BatchCosineAnnealingLR,
    BatchExponentialLR,
    BatchLRScheduler,
    BatchMultiStepLR,
    BatchStepLR,
    BatchWarmupCosineLR,
)

N = 5
LRS = [0.05, 0.1, 0.2, 0.03, 0.15]
NAN, INF = math.nan, math.inf


def optimizer():
    return make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)


def at(i: int, bad: float, good: float = 0.5) -> list[float]:
    """Good values for every model but model i."""
    return [bad if j == i else good for j in range(N)]


CASES = [
    # (build, message, bad models)
    (
        lambda o: BatchWarmupCosineLR(o, 2, 10, eta_min=NAN),
        "eta_min must be finite and >= 0",
        [0, 1, 2, 3, 4],
    ),
    (
        lambda o: BatchWarmupCosineLR(o, 2, 10, eta_min=at(2, -1.0, 0.0)),
        "eta_min must be finite and >= 0",
        [2],
    ),
    (lambda o: BatchWarmupCosineLR(o, at(1, NAN, 2), 10), "warmup_steps must be an int >= 0", [1]),
    (lambda o: BatchWarmupCosineLR(o, at(3, 1.5, 2), 10), "warmup_steps must be an int >= 0", [3]),
    (lambda o: BatchWarmupCosineLR(o, 2, at(4, INF, 10)), "total_steps must be an int >= 1", [4]),
    (
        lambda o: BatchWarmupCosineLR(o, 2, 10, start_factor=at(0, NAN, 0.1)),
        "start_factor must be in [0, 1]",
        [0],
    ),
    (
        lambda o: BatchStepLR(o, step_size=3, gamma=NAN),
        "gamma must be finite and > 0",
        [0, 1, 2, 3, 4],
    ),
    (lambda o: BatchStepLR(o, step_size=3, gamma=at(2, 0.0)), "gamma must be finite and > 0", [2]),
    (lambda o: BatchStepLR(o, step_size=3, gamma=at(1, -0.5)), "gamma must be finite and > 0", [1]),
    (
        lambda o: BatchStepLR(o, step_size=at(4, NAN, 3), gamma=0.5),
        "step_size must be an int >= 1",
        [4],
    ),
    (lambda o: BatchExponentialLR(o, gamma=at(4, NAN)), "gamma must be finite and > 0", [4]),
    (lambda o: BatchExponentialLR(o, gamma=at(0, INF)), "gamma must be finite and > 0", [0]),
    (
        lambda o: BatchCosineAnnealingLR(o, T_max=at(1, INF, 10)),
        "T_max must be finite and > 0",
        [1],
    ),
    (
        lambda o: BatchCosineAnnealingLR(o, T_max=10, eta_min=at(3, -1e-3, 0.0)),
        "eta_min must be finite and >= 0",
        [3],
    ),
    (
        lambda o: BatchCosineAnnealingLR(o, T_max=10, eta_min=at(2, NAN, 0.0)),
        "eta_min must be finite and >= 0",
        [2],
    ),
    (
        lambda o: BatchMultiStepLR(o, [[1], [2, NAN], [3], [], [4]]),
        "milestones must be ints >= 0",
        [1],
    ),
    (
        lambda o: BatchMultiStepLR(o, [[1], [2], [3], [-4], [4]]),
        "milestones must be ints >= 0",
        [3],
    ),
    (lambda o: BatchMultiStepLR(o, [2.5, 4]), "milestones must be ints >= 0", [0, 1, 2, 3, 4]),
    (lambda o: BatchMultiStepLR(o, [2, 4], gamma=at(0, NAN)), "gamma must be finite and > 0", [0]),
]


@pytest.mark.parametrize(("build", "message", "models"), CASES)
def test_bad_values_are_refused_at_construction_naming_the_models(build, message, models):
    opt = optimizer()
    with pytest.raises(ValueError, match=r"^Batch\w+LR: ") as info:
        build(opt)
    assert message in str(info.value)
    assert f"for models {models}" in str(info.value)
    assert opt.hparams["lr"].tolist() == pytest.approx(LRS)


@pytest.mark.parametrize(
    ("build", "params", "message"),
    [
        (lambda o: BatchStepLR(o, step_size=3, gamma=0.5), {"gamma": NAN}, "gamma must be finite"),
        (lambda o: BatchStepLR(o, step_size=3), {"initial_lr": -1.0}, "initial_lr must be finite"),
        (lambda o: BatchCosineAnnealingLR(o, T_max=9), {"eta_min": -1.0}, "eta_min must be finite"),
        (lambda o: BatchWarmupCosineLR(o, 2, 9), {"warmup_steps": 9}, "total_steps must be >"),
        (lambda o: BatchMultiStepLR(o, [2, 4]), {"milestones": [[1, NAN]] * 2}, "milestones must"),
        (lambda o: BatchExponentialLR(o, 0.9), {"gamma": [0.5, -1.0]}, "gamma must be finite"),
    ],
)
def test_reset_models_refuses_bad_values_and_changes_nothing(build, params, message):
    opt = optimizer()
    sched = build(opt)
    for _ in range(3):
        sched.step()
    before = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sched.state_dict().items()
    }
    lrs = opt.hparams["lr"].clone()
    with pytest.raises(ValueError, match=r"^Batch\w+LR\.reset_models: ") as info:
        sched.reset_models([1, 3], **params)
    assert message in str(info.value) and "for models [" in str(info.value)
    assert "3]" in str(info.value)
    after = sched.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key
    assert torch.equal(opt.hparams["lr"], lrs)
    sched.step()  # still usable


def test_load_state_dict_refuses_bad_values_and_changes_nothing():
    opt = optimizer()
    sched = BatchStepLR(opt, step_size=2, gamma=0.5)
    state = sched.state_dict()
    state["gamma"] = torch.tensor(at(2, NAN), dtype=torch.float64)
    sched.step()
    lrs, gamma = opt.hparams["lr"].clone(), sched.gamma.clone()
    with pytest.raises(
        ValueError, match=r"^BatchStepLR\.load_state_dict: gamma .* for models \[2\]"
    ):
        sched.load_state_dict(state)
    assert torch.equal(sched.gamma, gamma) and torch.equal(opt.hparams["lr"], lrs)
    assert int(sched.steps[0]) == 1


def test_any_torch_scheduler_names_the_model_with_bad_arguments_or_rates():
    opt = optimizer()
    per_model = [{"eta_min": 0.0}] * N
    per_model[2] = {"eta_min": NAN}
    with pytest.raises(ValueError, match=r"^BatchLRScheduler: model 2's eta_min=nan is not finite"):
        BatchLRScheduler(opt, tls.CosineAnnealingLR, per_model, T_max=10)
    factors = [{"start_factor": 0.5}, {"start_factor": 2.0}] + [{"start_factor": 0.5}] * 3
    with pytest.raises(ValueError, match=r"^BatchLRScheduler: model 1's LinearLR refused"):
        BatchLRScheduler(opt, tls.LinearLR, factors)
    # A rule that goes bad mid-run: refused before the optimizer's rates change.
    sched = BatchLRScheduler(
        opt,
        tls.LambdaLR,
        [{"lr_lambda": lambda t, k=k: 1.0 if t < 2 or k != 3 else -t} for k in range(N)],
    )
    sched.step()
    lrs = opt.hparams["lr"].clone()
    with pytest.raises(ValueError, match=r"^BatchLRScheduler: the schedulers of models \[3\]"):
        sched.step()
    assert torch.equal(opt.hparams["lr"], lrs)
    with pytest.raises(
        ValueError, match=r"BatchLRScheduler\.reset_models: model 0's base learning"
    ):
        sched.reset_models([0], initial_lr=NAN)
