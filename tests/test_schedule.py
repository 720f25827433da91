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


# ---------------------------------------------------------------- what torch's schedulers accept


def _torch_single(lr: float, **opt_kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.randn(3))], lr=lr, **opt_kwargs)


def _torch_lrs(singles: list) -> list[float]:
    return [s.optimizer.param_groups[0]["lr"] for s in singles]


def _step_quietly(sched: Any, *args: Any, **kwargs: Any) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of step(epoch), its order check
        sched.step(*args, **kwargs)


@pytest.mark.parametrize("kind", ["step", "multistep", "exponential", "cosine"])
def test_vectorized_step_epoch_is_torchs_closed_form(kind: str) -> None:
    ours_fn, theirs_fn = SCHEDULES[kind]
    opt = make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)
    sched = ours_fn(opt)
    singles = [theirs_fn(_torch_single(LRS[i]), i) for i in range(N)]
    for epoch in (7, 3, 12):
        sched.step(epoch)
        for s in singles:
            _step_quietly(s, epoch)
        _assert_lr_close(opt.hparams["lr"], _torch_lrs(singles), epoch)
        assert sched.last_epoch == epoch
    # One epoch per model; then plain steps go on from there.
    epochs = [0, 4, 9, 2, 15]
    sched.step(torch.tensor(epochs))
    expected = []
    for i, e in enumerate(epochs):
        single = theirs_fn(_torch_single(LRS[i]), i)
        for _ in range(e + 2):
            _step_quietly(single)
        expected.append(single.optimizer.param_groups[0]["lr"])
    sched.step()
    sched.step()
    _assert_lr_close(opt.hparams["lr"], expected, -1)


@pytest.mark.parametrize("kind", ["step", "multistep", "exponential", "cosine"])
def test_vectorized_last_epoch_resumes_per_model_as_torch(kind: str) -> None:
    ours_fn, theirs_fn = SCHEDULES[kind]
    # -1: model 3 starts fresh. torch's StepLR / MultiStepLR resume applies a decay twice
    # when last_epoch + 1 is a milestone; these points avoid that.
    last = [3, 0, 11, -1, 7]
    opt = make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)
    cls = type(ours_fn(make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)))
    kwargs_of: dict[str, dict[str, Any]] = {
        "step": {"step_size": STEP_SIZE, "gamma": GAMMA},
        "multistep": {"milestones": MILESTONES, "gamma": GAMMA},
        "exponential": {"gamma": GAMMA},
        "cosine": {"T_max": T_MAX, "eta_min": ETA_MIN},
    }
    kwargs = kwargs_of[kind]
    sched = cls(opt, last_epoch=last, **kwargs)
    # torch's resume: a scheduler built with last_epoch=k on an optimizer that holds
    # initial_lr and the rate a fresh run had after k + 1 steps (torch's last_epoch k+1).
    singles = []
    for i, k in enumerate(last):
        fresh = theirs_fn(_torch_single(LRS[i]), i)
        for _ in range(k + 1):
            _step_quietly(fresh)
        opt_i = _torch_single(fresh.optimizer.param_groups[0]["lr"])
        opt_i.param_groups[0]["initial_lr"] = LRS[i]
        singles.append(theirs_fn(opt_i, i) if k == -1 else None)
        if k != -1:
            import inspect as _inspect

            torch_cls = type(fresh)
            params = _inspect.signature(torch_cls).parameters
            theirs_kwargs = {
                key: (value[i] if isinstance(value, list) else value)
                for key, value in kwargs.items()
                if key in params
            }
            singles[-1] = torch_cls(opt_i, last_epoch=k, **theirs_kwargs)
    for step in range(10):
        _assert_lr_close(opt.hparams["lr"], _torch_lrs(singles), step)
        sched.step()
        for s in singles:
            _step_quietly(s)


def test_generic_scheduler_last_epoch_per_model_resumes_as_torch() -> None:
    last = [3, -1, 8, 0, 5]
    opt = make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)
    sched = BatchLRScheduler(
        opt,
        tls.OneCycleLR,
        [{"max_lr": m} for m in MAX_LR],
        total_steps=40,
        cycle_momentum=False,
        last_epoch=last,
    )
    singles = []
    for i, k in enumerate(last):
        s = tls.OneCycleLR(
            _torch_single(LRS[i]), max_lr=MAX_LR[i], total_steps=40, cycle_momentum=False
        )
        for _ in range(k + 1):
            _step_quietly(s)
        singles.append(s)
    for step in range(10):
        _assert_lr_close(opt.hparams["lr"], _torch_lrs(singles), step)
        sched.step()
        for s in singles:
            _step_quietly(s)
    # torch's own resume of one of them agrees (OneCycleLR reads initial_lr, max_lr, ...).
    fresh = tls.OneCycleLR(
        _torch_single(LRS[2]), max_lr=MAX_LR[2], total_steps=40, cycle_momentum=False
    )
    for _ in range(9):
        _step_quietly(fresh)
    resumed_opt = _torch_single(fresh.optimizer.param_groups[0]["lr"])
    for key in ("initial_lr", "max_lr", "min_lr"):
        resumed_opt.param_groups[0][key] = fresh.optimizer.param_groups[0][key]
    resumed = tls.OneCycleLR(
        resumed_opt, max_lr=MAX_LR[2], total_steps=40, cycle_momentum=False, last_epoch=8
    )
    ours = BatchLRScheduler(
        make_sgd([nn.Parameter(torch.randn(N, 3))], LRS),
        tls.OneCycleLR,
        [{"max_lr": m} for m in MAX_LR],
        total_steps=40,
        cycle_momentum=False,
        last_epoch=8,
    )
    assert ours.get_last_lr()[0][2].item() == pytest.approx(resumed.get_last_lr()[0], rel=1e-6)


def test_sequential_and_chained_schedulers_per_model() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)
    seq = BatchLRScheduler(
        opt,
        tls.SequentialLR,
        [
            {
                "schedulers": [
                    (tls.LinearLR, {"start_factor": START[i], "total_iters": WARMUP[i]}),
                    lambda o, i=i: tls.CosineAnnealingLR(o, T_max=T_MAX[i], eta_min=ETA_MIN[i]),
                ],
                "milestones": [WARMUP[i]],
            }
            for i in range(N)
        ],
    )
    opt2 = make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)
    chained = BatchLRScheduler(
        opt2,
        tls.ChainedScheduler,
        [
            {"schedulers": [(tls.ExponentialLR, {"gamma": g}), (tls.ConstantLR, {"factor": 0.5})]}
            for g in GAMMA
        ],
    )
    singles, chains = [], []
    for i in range(N):
        o = _torch_single(LRS[i])
        warm = tls.LinearLR(o, start_factor=START[i], total_iters=WARMUP[i])
        cos = tls.CosineAnnealingLR(o, T_max=T_MAX[i], eta_min=ETA_MIN[i])
        singles.append(tls.SequentialLR(o, [warm, cos], milestones=[WARMUP[i]]))
        o2 = _torch_single(LRS[i])
        chains.append(
            tls.ChainedScheduler([tls.ExponentialLR(o2, gamma=GAMMA[i]), tls.ConstantLR(o2, 0.5)])
        )
    for step in range(STEPS):
        _assert_lr_close(opt.hparams["lr"], _torch_lrs(singles), step)
        _assert_lr_close(
            opt2.hparams["lr"], [c.optimizer.param_groups[0]["lr"] for c in chains], step
        )
        seq.step()
        chained.step()
        for s in [*singles, *chains]:
            _step_quietly(s)
    with pytest.raises(
        TypeError, match=r"BatchLRScheduler.step: torch's SequentialLR.step takes no epoch"
    ):
        seq.step(3)


def every_third_step(g: float) -> Callable[[int], float]:
    """`g ** (t % 3)`: one model's multiplicative factor at epoch t."""
    return lambda t: g ** (t % 3)


def test_multiplicative_with_a_function_per_model() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)
    sched = BatchLRScheduler(
        opt, tls.MultiplicativeLR, [{"lr_lambda": every_third_step(g)} for g in GAMMA]
    )
    singles = [
        tls.MultiplicativeLR(_torch_single(LRS[i]), every_third_step(GAMMA[i])) for i in range(N)
    ]
    for step in range(12):
        _assert_lr_close(opt.hparams["lr"], _torch_lrs(singles), step)
        sched.step()
        for s in singles:
            _step_quietly(s)


def test_reduce_on_plateau_trajectory_equals_torch_per_model() -> None:
    g = torch.Generator().manual_seed(3)
    opt = make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)
    patience = [0, 1, 2, 0, 3]
    sched = BatchLRScheduler(
        opt,
        tls.ReduceLROnPlateau,
        [{"patience": p} for p in patience],
        factor=0.5,
        threshold=0.05,
        cooldown=1,
    )
    singles = [
        tls.ReduceLROnPlateau(
            _torch_single(LRS[i]), patience=patience[i], factor=0.5, threshold=0.05, cooldown=1
        )
        for i in range(N)
    ]
    for step in range(20):
        metrics = torch.rand(N, generator=g, dtype=torch.float64) + 1.0 / (step + 1)
        sched.step(metrics)
        for s, m in zip(singles, metrics.tolist()):
            s.step(m)
        _assert_lr_close(opt.hparams["lr"], _torch_lrs(singles), step)
    assert len(set(opt.hparams["lr"].tolist())) > 1  # the models were reduced differently
    with pytest.raises(ValueError, match="ReduceLROnPlateau needs one metric per model"):
        sched.step()
    with pytest.raises(ValueError, match="metrics must have one value per model"):
        sched.step(torch.ones(N + 1))


def test_warm_restarts_step_with_a_fractional_epoch_per_model() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)
    sched = BatchLRScheduler(opt, tls.CosineAnnealingWarmRestarts, [{"T_0": t} for t in STEP_SIZE])
    singles = [
        tls.CosineAnnealingWarmRestarts(_torch_single(LRS[i]), T_0=STEP_SIZE[i]) for i in range(N)
    ]
    for epoch in (0.5, 1.25, 6.75):
        per_model = torch.tensor([epoch + 0.1 * i for i in range(N)])
        sched.step(epoch=per_model)
        for s, e in zip(singles, per_model.tolist()):
            s.step(e)
        _assert_lr_close(opt.hparams["lr"], _torch_lrs(singles), int(epoch))


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_cycled_momentum_reaches_the_optimizer(opt_kind: str) -> None:
    params = nn.Parameter(torch.randn(N, 3))
    opt: BatchOptimizer
    if opt_kind == "sgd":
        from modelbatch.optim import BatchSGD

        opt = BatchSGD([params], [{"lr": lr, "momentum": 0.9} for lr in LRS])
    else:
        opt = BatchAdam([params], [{"lr": lr, "betas": (0.9, 0.99)} for lr in LRS])
    sched = BatchLRScheduler(
        opt,
        tls.OneCycleLR,
        [{"max_lr": m, "pct_start": p} for m, p in zip(MAX_LR, PCT)],
        total_steps=STEPS + 1,
    )
    singles = []
    for i in range(N):
        p = [nn.Parameter(torch.randn(3))]
        o = (
            torch.optim.SGD(p, lr=LRS[i], momentum=0.9)
            if opt_kind == "sgd"
            else torch.optim.Adam(p, lr=LRS[i], betas=(0.9, 0.99))
        )
        singles.append(tls.OneCycleLR(o, max_lr=MAX_LR[i], pct_start=PCT[i], total_steps=STEPS + 1))

    def momenta() -> list[float]:
        key = "momentum" if opt_kind == "sgd" else "betas"
        values = [s.optimizer.param_groups[0][key] for s in singles]
        return values if opt_kind == "sgd" else [b[0] for b in values]

    lowest = 1.0
    for step in range(STEPS):
        ours = opt.hparams["momentum"] if opt_kind == "sgd" else opt.hparams["betas"][:, 0]
        lowest = min(lowest, float(ours.min()))
        _assert_lr_close(ours, momenta(), step)
        _assert_lr_close(opt.hparams["lr"], _torch_lrs(singles), step)
        if opt_kind == "adam":
            assert torch.equal(
                opt.hparams["betas"][:, 1], torch.full((N,), 0.99, dtype=torch.float64)
            )
        sched.step()
        for s in singles:
            _step_quietly(s)
    assert lowest < 0.9  # it did cycle


def test_generic_scheduler_refuses_clearly() -> None:
    from modelbatch.optim import BatchAdagrad

    opt = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    with pytest.raises(TypeError, match="BatchLRScheduler: scheduler_cls must be a torch"):
        BatchLRScheduler(opt, lambda o: tls.StepLR(o, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BatchLRScheduler: BatchStepLR is already per model"):
        BatchLRScheduler(opt, BatchStepLR, step_size=2)
    built = tls.StepLR(_torch_single(0.1), 2)
    with pytest.raises(TypeError, match=r"schedulers must be \(class, kwargs\) pairs"):
        BatchLRScheduler(opt, tls.SequentialLR, schedulers=[built, built], milestones=[2])
    with pytest.raises(ValueError, match="ReduceLROnPlateau takes no last_epoch"):
        BatchLRScheduler(opt, tls.ReduceLROnPlateau, last_epoch=3)
    with pytest.raises(ValueError, match="last_epoch must be a number or one per model"):
        BatchLRScheduler(opt, tls.StepLR, step_size=2, last_epoch=[1, 2])
    with pytest.raises(TypeError, match="BatchLRScheduler: model 0's StepLR refused its arguments"):
        BatchLRScheduler(opt, tls.StepLR, stepsize=2)
    adagrad = BatchAdagrad([nn.Parameter(torch.randn(N, 2))], [{"lr": lr} for lr in LRS])
    with pytest.raises(ValueError, match="cycle_momentum=True needs an optimizer with momentum"):
        BatchLRScheduler(adagrad, tls.OneCycleLR, max_lr=0.1, total_steps=10)
    with pytest.raises(ValueError, match=r"BatchStepLR: last_epoch must be whole numbers >= -1"):
        BatchStepLR(opt, step_size=2, last_epoch=[1, 2, -3, 0, 0])


def test_generic_reset_models_restarts_a_resumed_schedule_from_zero() -> None:
    opt = make_sgd([nn.Parameter(torch.randn(N, 3))], LRS)
    sched = BatchLRScheduler(opt, tls.StepLR, step_size=2, gamma=0.5, last_epoch=3)
    assert opt.hparams["lr"].tolist() == pytest.approx([lr * 0.25 for lr in LRS])
    sched.reset_models([1], initial_lr=0.4)
    assert opt.hparams["lr"][1].item() == pytest.approx(0.4)  # step 0 again, not step 4
    assert "last_epoch" not in sched.per_model_kwargs[1]


def test_torch_warnings_are_passed_on_once_not_every_step() -> None:
    import warnings

    opt = make_sgd([nn.Parameter(torch.randn(N, 2))], LRS)
    sched = BatchLRScheduler(opt, tls.StepLR, step_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(1, 5):
            sched.step(epoch)  # torch warns that the epoch argument is deprecated
    passed_on = [w for w in caught if "epoch" in str(w.message)]
    assert len(passed_on) == 1, [str(w.message) for w in caught]
