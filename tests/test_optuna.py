"""Optuna integration: batched ask/tell gives every trial its own hyperparameters and result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

optuna = pytest.importorskip("optuna")

from modelbatch import optim as mb_optim  # noqa: E402
from modelbatch.integrations.optuna import optimize_batched  # noqa: E402

STEPS = 30
REPORT = 10


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:600], y[:600]), (x[1200:], y[1200:])


def make_model(trial) -> nn.Module:
    torch.manual_seed(1000 + trial.number)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def suggest(trial) -> dict[str, float]:
    return {
        "lr": trial.suggest_float("lr", 1e-4, 3.0, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-4, 0.3, log=True),
    }


def val_loss(val):
    x, y = val
    return lambda mb: mb.per_model_losses(mb(x), y)


def step_lr(opt):
    return mb_optim.BatchStepLR(opt, step_size=7, gamma=0.5)


def as_stored(value: float, like: torch.Tensor) -> float:
    return torch.tensor(value, dtype=like.dtype).item()


def retrain_alone(
    params: dict, number: int, train, val, steps: int = STEPS, schedule: bool = False
) -> float:
    """The trial's config alone, with plain torch.optim.AdamW (and torch's StepLR)."""
    model = make_model(optuna.trial.FixedTrial(params, number=number))
    opt = torch.optim.AdamW(
        model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"]
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(train[0]), train[1]).backward()
        opt.step()
        if schedule:
            sched.step()
    with torch.no_grad():
        return F.cross_entropy(model(val[0]), val[1]).item()


@pytest.mark.parametrize(
    ("refill", "schedule"), [(True, True), (False, False)], ids=["refill+schedule", "retire"]
)
def test_study_of_32_trials_in_batches_of_8(digits, refill, schedule):
    train, val = digits
    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True, n_startup_trials=8),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0),
    )
    seen: dict[int, tuple[float, float]] = {}

    def check_hparams(state):
        hp = state.optimizer.hparams
        assert state.optimizer.param_groups[0]["lr"] == 1.0  # no shared schedule factor
        assert len(state.trials) == 8
        for i, trial in enumerate(state.trials):
            if trial is None:
                assert not state.model_batch.active[i]
                continue
            # What model i trained with, read back from the optimizer (and
            # the schedule, which holds the base lr when there is one).
            lr = hp["lr"][i].item()
            if state.scheduler is not None:
                lr = state.scheduler.initial_lr[0, i].item()
                decay = 0.5 ** (int(state.steps[i]) // 7)
                assert hp["lr"][i].item() == pytest.approx(lr * decay, rel=1e-12)
            used = (lr, hp["weight_decay"][i].item())
            assert used == (
                as_stored(trial.params["lr"], hp["lr"]),
                as_stored(trial.params["weight_decay"], hp["weight_decay"]),
            )
            seen[trial.number] = used

    trials = optimize_batched(
        study,
        make_model,
        suggest,
        [train],
        val_loss(val),
        n_trials=32,
        batch_size=8,
        steps=STEPS,
        report_every=REPORT,
        refill=refill,
        on_report=check_hparams,
        scheduler=step_lr if schedule else None,
    )
    assert len(trials) == len(study.trials) == 32
    assert sorted(seen) == list(range(32))  # every trial's model was checked
    states = [t.state for t in trials]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(pruned) + len(complete) == 32, states
    assert pruned, "the pruner pruned nothing: the test would not exercise pruning"
    for t in pruned:
        assert max(t.intermediate_values) < STEPS
    for t in complete:
        assert sorted(t.intermediate_values) == [10, 20, 30]
        assert t.value == t.intermediate_values[STEPS]

    # The best trial's score is what its config gives when trained alone.
    best = study.best_trial
    alone = retrain_alone(best.params, best.number, train, val, schedule=schedule)
    assert best.value == pytest.approx(alone, rel=1e-5)
    # ... and the last completed trial too (a refilled slot when refill=True),
    # so a mix-up of slots cannot hide.
    other = max((t for t in complete if t.number != best.number), key=lambda t: t.number)
    alone = retrain_alone(other.params, other.number, train, val, schedule=schedule)
    assert other.value == pytest.approx(alone, rel=1e-5)


def test_cma_es_sampler_runs_batched(digits):
    pytest.importorskip("cmaes")
    train, val = digits
    study = optuna.create_study(
        sampler=optuna.samplers.CmaEsSampler(seed=0, n_startup_trials=0),
        pruner=optuna.pruners.NopPruner(),
    )
    trials = optimize_batched(
        study,
        make_model,
        suggest,
        [train],
        val_loss(val),
        n_trials=12,
        batch_size=6,
        steps=STEPS,
        report_every=REPORT,
    )
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 12
    assert len({t.params["lr"] for t in trials}) == 12
    best = study.best_trial
    assert best.value == pytest.approx(
        retrain_alone(best.params, best.number, train, val), rel=1e-5
    )


def test_non_finite_value_fails_only_its_trial(digits):
    train, val = digits
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def evaluate(mb):
        losses = mb.per_model_losses(mb(val[0]), val[1])
        return torch.where(torch.arange(mb.num_models) == 1, torch.nan, losses)

    trials = optimize_batched(
        study,
        make_model,
        suggest,
        [train],
        evaluate,
        n_trials=3,
        batch_size=3,
        steps=REPORT,
        report_every=REPORT,
    )
    states = {t.number: t.state for t in trials}
    assert states == {
        0: optuna.trial.TrialState.COMPLETE,
        1: optuna.trial.TrialState.FAIL,
        2: optuna.trial.TrialState.COMPLETE,
    }
    for t in trials:
        if t.number != 1:
            alone = retrain_alone(t.params, t.number, train, val, steps=REPORT)
            assert t.value == pytest.approx(alone, rel=1e-5)


def test_bad_arguments_give_clear_errors(digits):
    train, val = digits
    study = optuna.create_study()
    with pytest.raises(ValueError, match=r"^optimize_batched: report_every must divide steps"):
        optimize_batched(
            study,
            make_model,
            suggest,
            [train],
            val_loss(val),
            n_trials=2,
            batch_size=2,
            steps=25,
            report_every=10,
        )
    with pytest.raises(ValueError, match=r"^optimize_batched: evaluate must return one value"):
        optimize_batched(
            study,
            make_model,
            suggest,
            [train],
            lambda mb: torch.zeros(3),
            n_trials=2,
            batch_size=2,
            steps=10,
            report_every=10,
        )


def test_an_error_fails_the_running_trials_and_propagates(digits):
    train, val = digits
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    calls = []

    def evaluate(mb):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("evaluation broke")
        return mb.per_model_losses(mb(val[0]), val[1])

    with pytest.raises(RuntimeError, match="evaluation broke"):
        optimize_batched(
            study, make_model, suggest, [train], evaluate,
            n_trials=4, batch_size=2, steps=2 * REPORT, report_every=REPORT,
        )  # fmt: skip
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
