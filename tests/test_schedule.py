"""Per-model LR schedules (and clipping) against torch schedulers run on each model alone."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _reference import CountOps, make_sgd, max_rel_diff
from torch import nn
from torch.optim import lr_scheduler as tls

from modelbatch import ModelBatch
from modelbatch.optim import (
    BatchAdam,
    BatchCosineAnnealingLR,
    BatchExponentialLR,
    BatchLRScheduler,
    BatchMultiStepLR,
    BatchOptimizer,
    BatchStepLR,
    BatchWarmupCosineLR,
    clip_grad_norm_,
    clip_grad_value_,
)

N = 5
STEPS = 30
LRS = [0.05, 0.1, 0.2, 0.03, 0.15]


# ---------------------------------------------------------------- the table

Ours = Callable[[Any], Any]
Theirs = Callable[[torch.optim.Optimizer, int], Any]

STEP_SIZE = [3, 5, 7, 4, 10]
GAMMA = [0.5, 0.9, 0.7, 0.3, 0.8]
MILESTONES = [[5], [2, 8, 20], [10, 11, 25], [], [1, 3, 5, 7, 9, 29]]
T_MAX = [10, 20, 30, 7, 13]
ETA_MIN = [0.0, 1e-3, 5e-3, 0.0, 2e-2]
WARMUP = [3, 5, 1, 8, 10]
TOTAL = [30, 40, 31, 35, 50]
START = [0.1, 0.25, 0.5, 0.01, 1 / 3]
MAX_LR = [0.2, 0.4, 0.1, 0.3, 0.25]
PCT = [0.3, 0.1, 0.5, 0.25, 0.4]


def _warmup_cosine_torch(opt: torch.optim.Optimizer, i: int) -> Any:
    warm = tls.LinearLR(opt, start_factor=START[i], end_factor=1.0, total_iters=WARMUP[i])
    cos = tls.CosineAnnealingLR(opt, T_max=TOTAL[i] - WARMUP[i], eta_min=ETA_MIN[i])
    return tls.SequentialLR(opt, [warm, cos], milestones=[WARMUP[i]])


SCHEDULES: dict[str, tuple[Ours, Theirs]] = {
    "step": (
        lambda opt: BatchStepLR(opt, step_size=STEP_SIZE, gamma=GAMMA),
        lambda opt, i: tls.StepLR(opt, step_size=STEP_SIZE[i], gamma=GAMMA[i]),
    ),
    "multistep": (
        lambda opt: BatchMultiStepLR(opt, milestones=MILESTONES, gamma=torch.tensor(GAMMA)),
        lambda opt, i: tls.MultiStepLR(opt, milestones=MILESTONES[i], gamma=GAMMA[i]),
    ),
    "multistep_shared": (
        lambda opt: BatchMultiStepLR(opt, milestones=[4, 9, 16], gamma=GAMMA),
        lambda opt, i: tls.MultiStepLR(opt, milestones=[4, 9, 16], gamma=GAMMA[i]),
    ),
    "exponential": (
        lambda opt: BatchExponentialLR(opt, gamma=GAMMA),
        lambda opt, i: tls.ExponentialLR(opt, gamma=GAMMA[i]),
    ),
    "cosine": (
        lambda opt: BatchCosineAnnealingLR(opt, T_max=T_MAX, eta_min=ETA_MIN),
        lambda opt, i: tls.CosineAnnealingLR(opt, T_max=T_MAX[i], eta_min=ETA_MIN[i]),
    ),
    "warmup_cosine": (
        lambda opt: BatchWarmupCosineLR(opt, WARMUP, TOTAL, eta_min=ETA_MIN, start_factor=START),
        _warmup_cosine_torch,
    ),
    "any_torch_onecycle": (
        lambda opt: BatchLRScheduler(
            opt,
            tls.OneCycleLR,
            [{"max_lr": m, "pct_start": p} for m, p in zip(MAX_LR, PCT)],
            total_steps=STEPS + 1,
            cycle_momentum=False,
        ),
        lambda opt, i: tls.OneCycleLR(
            opt, max_lr=MAX_LR[i], pct_start=PCT[i], total_steps=STEPS + 1, cycle_momentum=False
        ),
    ),
    "any_torch_lambda": (
        lambda opt: BatchLRScheduler(
            opt, tls.LambdaLR, [{"lr_lambda": (lambda t, k=k: 1 / (1 + k * t))} for k in GAMMA]
        ),
        lambda opt, i: tls.LambdaLR(opt, lr_lambda=lambda t: 1 / (1 + GAMMA[i] * t)),
    ),
}


def _assert_lr_close(ours: torch.Tensor, theirs: list[float], step: int) -> None:
    expected = torch.tensor(theirs, dtype=torch.float64)
    got = ours.detach().cpu().to(torch.float64)
    # Relative 1e-5; the absolute floor only matters where a cosine touches 0.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12, msg=f"step {step}")


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_one_step_moves_each_model_one_step_of_its_own_schedule(kind: str) -> None:
    """The anti-compounding test: after every step(), model i's lr equals torch's on model i."""
    ours_fn, theirs_fn = SCHEDULES[kind]
    params = nn.Parameter(torch.randn(N, 3))
    opt = make_sgd([params], LRS)
    sched = ours_fn(opt)
    singles = []
    for i in range(N):
        single_opt = torch.optim.SGD([nn.Parameter(torch.randn(3))], lr=LRS[i])
        singles.append((single_opt, theirs_fn(single_opt, i)))
    _assert_lr_close(opt.hparams["lr"], [o.param_groups[0]["lr"] for o, _ in singles], 0)
    for step in range(1, STEPS + 1):
        for o, s in singles:
            o.step()
            s.step()
        sched.step()
        _assert_lr_close(opt.hparams["lr"], [o.param_groups[0]["lr"] for o, _ in singles], step)
        # The shared factor is left to torch schedulers.
        assert opt.param_groups[0]["lr"] == 1.0
    assert sched.last_epoch == STEPS


def test_exponential_one_step_is_gamma_not_gamma_to_the_n() -> None:
    params = nn.Parameter(torch.randn(N, 3))
    opt = make_sgd([params], LRS)
    sched = BatchExponentialLR(opt, gamma=GAMMA)
    sched.step()
    expected = torch.tensor(LRS, dtype=torch.float64) * torch.tensor(GAMMA, dtype=torch.float64)
    assert torch.equal(opt.hparams["lr"], expected)


CLIPS: dict[
    str, tuple[Callable[[ModelBatch], Any] | None, Callable[[nn.Module, int], Any] | None]
] = {
    "none": (None, None),
    "norm2": (
        lambda mb: clip_grad_norm_(mb, torch.tensor([0.05, 0.1, 0.5, 1.0, 0.2])),
        lambda m, i: nn.utils.clip_grad_norm_(m.parameters(), [0.05, 0.1, 0.5, 1.0, 0.2][i]),
    ),
    "norm_inf": (
        lambda mb: clip_grad_norm_(mb, 0.02, norm_type=math.inf),
        lambda m, i: nn.utils.clip_grad_norm_(m.parameters(), 0.02, norm_type=math.inf),
    ),
    "value": (
        lambda mb: clip_grad_value_(mb, [0.01, 0.02, 0.005, 0.1, 0.03]),
        lambda m, i: nn.utils.clip_grad_value_(m.parameters(), [0.01, 0.02, 0.005, 0.1, 0.03][i]),
    ),
}

# Adam: model i also gets its own betas, so the schedule is checked on top of
# a stateful update with per-model hyperparameters.
BETAS = [(0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.999), (0.85, 0.95)]
ADAM_LRS = [1e-3, 3e-3, 5e-4, 2e-3, 1e-2]
OPTIMIZERS: dict[str, tuple[Callable[[ModelBatch], Any], Callable[[nn.Module, int], Any]]] = {
    "sgd": (
        lambda mb: make_sgd(mb, LRS),
        lambda m, i: torch.optim.SGD(m.parameters(), lr=LRS[i]),
    ),
    "adam": (
        lambda mb: BatchAdam(
            mb.parameters(),
            [{"lr": lr, "betas": b} for lr, b in zip(ADAM_LRS, BETAS)],
            model_batch=mb,
        ),
        lambda m, i: torch.optim.Adam(m.parameters(), lr=ADAM_LRS[i], betas=BETAS[i]),
    ),
}

TRAINING_TABLE = [
    ("step", "none", "sgd"),
    ("multistep", "norm2", "sgd"),
    ("exponential", "norm_inf", "sgd"),
    ("cosine", "norm2", "sgd"),
    ("cosine", "value", "adam"),
    ("warmup_cosine", "value", "sgd"),
    ("warmup_cosine", "norm2", "adam"),
    ("any_torch_onecycle", "norm2", "sgd"),
    ("any_torch_lambda", "none", "adam"),
]


@pytest.mark.parametrize(("kind", "clip", "optimizer"), TRAINING_TABLE)
def test_training_matches_torch_per_model(kind: str, clip: str, optimizer: str) -> None:
    """N=5 models, 30 steps, own lr, own schedule and own clip each, against torch one by one."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)) for _ in range(N)]
    separate = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    make_ours, make_theirs = OPTIMIZERS[optimizer]
    opt = make_ours(mb)
    ours_fn, theirs_fn = SCHEDULES[kind]
    sched = ours_fn(opt)
    clip_ours, clip_theirs = CLIPS[clip]
    torch_opts = [make_theirs(m, i) for i, m in enumerate(separate)]
    torch_scheds = [theirs_fn(o, i) for i, o in enumerate(torch_opts)]

    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(32, 8, generator=gen)
        y = torch.randint(0, 4, (32,), generator=gen)
        opt.zero_grad()
        mb.compute_loss(mb(x), y).backward()
        if clip_ours is not None:
            clip_ours(mb)
        opt.step()
        sched.step()
        for i, (m, o, s) in enumerate(zip(separate, torch_opts, torch_scheds)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if clip_theirs is not None:
                clip_theirs(m, i)
            o.step()
            s.step()

    assert max_rel_diff(mb, separate) <= 1e-5


# ---------------------------------------------------------------- state, reset, errors


@pytest.mark.parametrize(
    "kind", ["step", "multistep", "cosine", "warmup_cosine", "any_torch_lambda"]
)
def test_state_dict_resumes_the_same_trajectory(kind: str) -> None:
    ours_fn, _ = SCHEDULES[kind]
    opt_a = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    sched_a = ours_fn(opt_a)
    for _ in range(7):
        sched_a.step()
    state = sched_a.state_dict()
    opt_b = make_sgd([nn.Parameter(torch.randn(N, 2))], [1.0] * N)
    opt_b.hparams["lr"].copy_(torch.tensor(LRS, dtype=torch.float64))
    sched_b = ours_fn(opt_b)
    sched_b.load_state_dict(state)
    assert torch.equal(opt_b.hparams["lr"], opt_a.hparams["lr"])
    for _ in range(5):
        sched_a.step()
        sched_b.step()
        assert torch.equal(opt_b.hparams["lr"], opt_a.hparams["lr"])
    assert sched_b.last_epoch == sched_a.last_epoch == 12


def test_reset_models_restarts_only_those_schedules() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    sched = BatchStepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)
    for _ in range(6):
        sched.step()
    before = opt.hparams["lr"].clone()
    sched.reset_models([1, 3], initial_lr=[0.7, 0.9], gamma=0.25)
    assert torch.equal(opt.hparams["lr"][[0, 2, 4]], before[[0, 2, 4]])
    assert opt.hparams["lr"][[1, 3]].tolist() == [0.7, 0.9]
    for _ in range(STEP_SIZE[1]):
        sched.step()
    assert opt.hparams["lr"][1].item() == pytest.approx(0.7 * 0.25)
    # Unchanged models keep walking their own schedule.
    t = 6 + STEP_SIZE[1]
    assert opt.hparams["lr"][0].item() == pytest.approx(LRS[0] * GAMMA[0] ** (t // STEP_SIZE[0]))


def test_reset_models_generic_scheduler() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    sched = BatchLRScheduler(opt, tls.ExponentialLR, [{"gamma": g} for g in GAMMA])
    for _ in range(4):
        sched.step()
    sched.reset_models([2], per_model_kwargs=[{"gamma": 0.5}])
    assert opt.hparams["lr"][2].item() == pytest.approx(LRS[2])
    sched.step()
    assert opt.hparams["lr"][2].item() == pytest.approx(LRS[2] * 0.5)
    assert opt.hparams["lr"][0].item() == pytest.approx(LRS[0] * GAMMA[0] ** 5)


def test_warmup_cosine_stays_at_eta_min_after_total_steps() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    sched = BatchWarmupCosineLR(opt, warmup_steps=[0, 1, 2, 3, 4], total_steps=10, eta_min=ETA_MIN)
    assert opt.hparams["lr"][0].item() == pytest.approx(LRS[0])  # no warmup: starts at base
    for _ in range(25):
        sched.step()
    assert torch.equal(opt.hparams["lr"], torch.tensor(ETA_MIN, dtype=torch.float64))


def test_reduce_on_plateau_with_per_model_metrics() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    sched = BatchLRScheduler(opt, tls.ReduceLROnPlateau, factor=0.5, patience=0)
    sched.step(torch.ones(N))
    # Models 0 and 2 stop improving; the others keep improving.
    sched.step(torch.tensor([1.0, 0.5, 1.0, 0.5, 0.5]))
    assert opt.hparams["lr"].tolist() == pytest.approx(
        [LRS[0] * 0.5, LRS[1], LRS[2] * 0.5, LRS[3], LRS[4]]
    )


def test_bad_inputs_give_clear_errors() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    plain = torch.optim.SGD([nn.Parameter(torch.randn(2))], lr=0.1)
    with pytest.raises(TypeError, match=r"StepLR: expected a modelbatch.optim optimizer"):
        BatchStepLR(plain, step_size=2)
    with pytest.raises(ValueError, match=r"StepLR: gamma must be a number or have shape \[N=5\]"):
        BatchStepLR(opt, step_size=2, gamma=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"StepLR: step_size must be an int >= 1, got \[0.0\]"):
        BatchStepLR(opt, step_size=[1, 2, 0, 3, 4])
    with pytest.raises(ValueError, match="WarmupCosineLR: total_steps must be > warmup_steps"):
        BatchWarmupCosineLR(opt, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="MultiStepLR: milestones must be one list shared"):
        BatchMultiStepLR(opt, milestones=[[1], [2]])
    with pytest.raises(ValueError, match="BatchLRScheduler: per_model_kwargs has 2 entries"):
        BatchLRScheduler(opt, tls.StepLR, [{"step_size": 1}] * 2)
    with pytest.raises(ValueError, match=r"StepLR\.reset_models: unknown schedule parameter"):
        BatchStepLR(opt, step_size=2).reset_models([0], T_max=3)


def _vectorized(kind: str, opt: Any, n: int) -> Any:
    if kind == "step":
        return BatchStepLR(opt, step_size=torch.randint(1, 9, (n,)), gamma=0.5)
    if kind == "multistep":
        return BatchMultiStepLR(opt, milestones=[[2, 5]] * n, gamma=0.5)
    if kind == "exponential":
        return BatchExponentialLR(opt, gamma=torch.rand(n))
    if kind == "cosine":
        return BatchCosineAnnealingLR(opt, T_max=torch.randint(5, 50, (n,)))
    return BatchWarmupCosineLR(opt, torch.randint(0, 5, (n,)), 60)


@pytest.mark.parametrize("kind", ["step", "multistep", "exponential", "cosine", "warmup_cosine"])
def test_vectorized_step_launch_count_does_not_grow_with_n(kind: str) -> None:
    counts = []
    for n in (5, 400):
        opt = make_sgd([nn.Parameter(torch.randn(n, 2))], [0.1] * n)
        sched = _vectorized(kind, opt, n)
        with CountOps() as ops:
            sched.step()
        counts.append(ops.count)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("kind", ["step", "warmup_cosine", "any_torch_onecycle"])
def test_every_param_group_follows_its_own_base_rates(kind: str) -> None:
    ours_fn, theirs_fn = SCHEDULES[kind]
    first, second = nn.Parameter(torch.randn(N, 3)), nn.Parameter(torch.randn(N, 2))
    opt = make_sgd([first], LRS)
    opt.add_param_group({"params": [second]})
    group_lrs = [0.5 * lr + 0.01 for lr in LRS]
    opt.param_groups[1]["hparams"]["lr"].copy_(torch.tensor(group_lrs))
    sched = ours_fn(opt)
    singles = []
    for i in range(N):
        groups = [
            {"params": [nn.Parameter(torch.randn(3))], "lr": LRS[i]},
            {"params": [nn.Parameter(torch.randn(2))], "lr": group_lrs[i]},
        ]
        single = torch.optim.SGD(groups, lr=LRS[i])
        singles.append((single, theirs_fn(single, i)))
    for step in range(1, 12):
        for o, s in singles:
            o.step()
            s.step()
        sched.step()
        for g in range(2):
            expected = [o.param_groups[g]["lr"] for o, _ in singles]
            _assert_lr_close(opt.param_groups[g]["hparams"]["lr"], expected, step)
    assert [t.shape for t in sched.get_last_lr()] == [(N,), (N,)]


def test_is_a_torch_lr_scheduler_with_per_model_base_rates() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    sched = BatchCosineAnnealingLR(opt, T_max=10)
    assert isinstance(sched, tls.LRScheduler)
    assert torch.equal(sched.base_lrs[0], torch.tensor(LRS, dtype=torch.float64))
    generic = BatchLRScheduler(opt, tls.ExponentialLR, gamma=0.5)
    assert isinstance(generic, tls.LRScheduler)


def test_multistep_reset_models_with_new_milestones() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    sched = BatchMultiStepLR(opt, milestones=MILESTONES, gamma=GAMMA)
    for _ in range(4):
        sched.step()
    sched.reset_models([3], milestones=[[1, 2, 3, 4, 5, 6, 7]], gamma=0.5)
    for _ in range(3):
        sched.step()
    assert opt.hparams["lr"][3].item() == pytest.approx(LRS[3] * 0.5**3)
    # Model 1 (milestones 2, 8, 20) is at step 7: one decay.
    assert opt.hparams["lr"][1].item() == pytest.approx(LRS[1] * GAMMA[1])
    restored = BatchMultiStepLR(make_sgd([nn.Parameter(torch.randn(N, 2))], LRS), [3], 0.1)
    restored.load_state_dict(sched.state_dict())
    sched.step()
    restored.step()
    assert isinstance(restored.optimizer, BatchOptimizer)
    assert torch.equal(restored.optimizer.hparams["lr"], opt.hparams["lr"])
