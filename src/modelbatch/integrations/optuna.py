"""Optuna integration: run a study N trials at a time in one ModelBatch.

`optimize_batched` asks the study for N trials, builds one ModelBatch whose
model i trains with trial i's suggested hyperparameters (one vectorized
optimizer, `[N]` hyperparameter tensors), trains them together, reports each
model's intermediate value to its own trial, prunes per trial, and tells each
trial its own result. A slot freed by a pruned or finished trial is refilled
in place with a newly asked trial (weights re-initialized, optimizer state and
hyperparameters reset for that slot only) or, with `refill=False`, retired
until the whole batch is done.

Requires `pip install "torch-modelbatch[optuna]"` (CMA-ES also needs `cmaes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._batch import ModelBatch

try:
    import optuna
except ImportError as exc:  # pragma: no cover - exercised only without optuna
    raise ImportError(
        "modelbatch.integrations.optuna: Optuna is not installed; install it with "
        '`pip install "torch-modelbatch[optuna]"` (or `pip install optuna`).'
    ) from exc

__all__ = ["BatchedTrials", "optimize_batched", "shared_study"]


@dataclass
class BatchedTrials:
    """What runs at one report point, passed to `on_report`.

    Attributes:
        model_batch: the N models (slot i holds `trials[i]`).
        optimizer: the vectorized optimizer; `optimizer.hparams[k][i]` is
            trial i's hyperparameter `k`.
        trials: the trial in each slot, None for a retired slot.
        steps: `[N]` training steps each slot's trial has taken.
        values: `[N]` the values just reported (NaN for empty slots).
        scheduler: the per-model schedule, or None; with one,
            `optimizer.hparams["lr"]` is the scheduled rate and
            `scheduler.initial_lr[0, i]` trial i's suggested one.
    """

    model_batch: ModelBatch
    optimizer: torch.optim.Optimizer
    trials: list[optuna.trial.Trial | None]
    steps: Tensor
    values: Tensor
    scheduler: Any = None


def _batches(data: Iterable[Any]) -> Iterator[Any]:
    # Re-iterate (a DataLoader reshuffles each pass) rather than itertools.cycle,
    # which would keep every batch of the first pass in memory.
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError(
                "optimize_batched: train_data yielded no batches; pass (x, y) batches."
            )


def optimize_batched(
    study: optuna.Study,
    model_fn: Callable[[optuna.trial.Trial], nn.Module],
    suggest: Callable[[optuna.trial.Trial], Mapping[str, Any]],
    train_data: Iterable[Any],
    evaluate: Callable[[ModelBatch], Tensor],
    *,
    n_trials: int,
    batch_size: int,
    steps: int,
    report_every: int,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    base_config: Mapping[str, Any] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    refill: bool = True,
    on_report: Callable[[BatchedTrials], None] | None = None,
) -> list[optuna.trial.FrozenTrial]:
    """Run `n_trials` trials of a study, `batch_size` at a time, in one ModelBatch.

    Args:
        study: the study to ask and tell (any sampler: TPE, CMA-ES, random...;
            any pruner).
        model_fn: `trial -> nn.Module`, a freshly initialized model; the same
            architecture for every trial (seed it from `trial.number` to make
            a trial reproducible).
        suggest: `trial -> {name: value}`, calls `trial.suggest_*` and returns
            the optimizer hyperparameters of that trial (e.g. `lr`, `weight_decay`).
        train_data: re-iterable of `(inputs, targets)` batches shared by all
            models (a DataLoader, or `[(x, y)]` for full-batch training).
        evaluate: `model_batch -> [N]` per-model objective values (run under
            `torch.no_grad()` in eval mode), e.g. the validation loss.
        n_trials: trials to run in this call.
        batch_size: N, the models trained at once.
        steps: training steps of each trial.
        report_every: steps between intermediate reports (and pruning checks);
            must divide `steps`.
        optimizer_cls: the torch optimizer whose vectorized version runs.
        base_config: hyperparameters shared by all trials.
        scheduler: `optimizer -> scheduler`, a `modelbatch.optim` per-model
            schedule (stepped once per training step); a refilled slot
            restarts its own schedule from the new trial's lr.
        loss_fn: per-model training loss; defaults to the ModelBatch default
            (cross-entropy).
        refill: give a slot freed by a pruned or finished trial to a new
            trial at once (True), or retire it until the whole batch is done.
        on_report: called at every report point with a `BatchedTrials`.

    Returns:
        The trials this call ran, as frozen trials (COMPLETE, PRUNED or FAIL).

    Example:
        >>> study = optuna.create_study(sampler=optuna.samplers.TPESampler(constant_liar=True))
        >>> trials = optimize_batched(study, make_model, lambda t: {"lr": t.suggest_float(
        ...     "lr", 1e-4, 1e-1, log=True)}, [(x, y)], val_loss, n_trials=32, batch_size=8,
        ...     steps=100, report_every=10)
        >>> len(trials)
        32

    Warning:
        A value that is not finite fails its trial (Optuna's rule); the other
        models are unaffected. Trials share the training batches: a slot
        refilled mid-run sees the batches from that point on, so with
        shuffled mini-batches its data order differs from a run alone.
    """
    if n_trials < 1 or batch_size < 1:
        raise ValueError(
            f"optimize_batched: n_trials and batch_size must be >= 1, got n_trials={n_trials}, "
            f"batch_size={batch_size}."
        )
    if report_every < 1 or steps < report_every or steps % report_every:
        raise ValueError(
            f"optimize_batched: report_every must divide steps, got steps={steps}, "
            f"report_every={report_every}; e.g. steps={report_every * max(1, steps // max(report_every, 1))}."
        )
    from ..optim import OptimizerFactory

    n = min(batch_size, n_trials)
    trials = [study.ask() for _ in range(n)]
    configs = [dict(suggest(t)) for t in trials]
    mb = ModelBatch([model_fn(t) for t in trials], loss_fn)
    optimizer = OptimizerFactory(optimizer_cls, dict(base_config or {})).create_optimizer(
        mb, configs
    )
    schedule = scheduler(optimizer) if scheduler is not None else None
    if schedule is not None and not hasattr(schedule, "reset_models"):
        raise TypeError(
            f"optimize_batched: the scheduler ({type(schedule).__name__}) cannot restart one "
            "model's schedule; use a modelbatch.optim per-model schedule (BatchStepLR, "
            "BatchCosineAnnealingLR, ...)."
        )
    run = _BatchedStudy(study, mb, optimizer, schedule, list(trials), model_fn, suggest, n_trials)
    try:
        run.loop(_batches(train_data), evaluate, steps, report_every, refill, on_report)
    except BaseException:
        run.fail_running()  # as study.optimize does: an interrupted trial is FAIL, not RUNNING
        raise
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [by_number[i] for i in run.done]


class _BatchedStudy:
    """The slots of one `optimize_batched` call: which trial each holds, and its steps."""

    def __init__(
        self,
        study: optuna.Study,
        mb: ModelBatch,
        optimizer: Any,
        schedule: Any,
        trials: list[optuna.trial.Trial],
        model_fn: Callable[[optuna.trial.Trial], nn.Module],
        suggest: Callable[[optuna.trial.Trial], Mapping[str, Any]],
        n_trials: int,
    ) -> None:
        self.study, self.mb, self.optimizer, self.schedule = study, mb, optimizer, schedule
        self.trials: list[optuna.trial.Trial | None] = list(trials)
        self.model_fn, self.suggest, self.n_trials = model_fn, suggest, n_trials
        self.asked = len(trials)
        self.done: list[int] = []
        self.steps = torch.zeros(len(trials), dtype=torch.long, device=mb.active.device)

    def loop(
        self,
        data: Iterator[Any],
        evaluate: Callable[[ModelBatch], Tensor],
        steps: int,
        report_every: int,
        refill: bool,
        on_report: Callable[[BatchedTrials], None] | None,
    ) -> None:
        mb, n = self.mb, len(self.trials)
        while any(t is not None for t in self.trials):
            for _ in range(report_every):
                inputs, targets = next(data)
                self.optimizer.zero_grad()
                mb.compute_loss(mb(inputs), targets).backward()
                self.optimizer.step()
                if self.schedule is not None:
                    self.schedule.step()
            self.steps += mb.active.long() * report_every
            values = self.evaluate(evaluate)
            if on_report is not None:
                on_report(
                    BatchedTrials(
                        mb,
                        self.optimizer,
                        list(self.trials),
                        self.steps.clone(),
                        values,
                        self.schedule,
                    )
                )
            self.report(values, steps)
            idle = [i for i, t in enumerate(self.trials) if t is None]
            if idle and (refill or len(idle) == n):
                self.start(idle[: max(0, self.n_trials - self.asked)])

    def evaluate(self, evaluate: Callable[[ModelBatch], Tensor]) -> Tensor:
        mb, n = self.mb, len(self.trials)
        was_training = mb.training
        mb.eval()
        with torch.no_grad():
            values = evaluate(mb).detach().float()
        mb.train(was_training)
        if values.shape != (n,):
            raise ValueError(
                f"optimize_batched: evaluate must return one value per model, shape ({n},), got "
                f"{tuple(values.shape)}; reduce over the batch but not over models."
            )
        return torch.where(mb.active, values, torch.full_like(values, math.nan))

    def report(self, values: Tensor, steps: int) -> None:
        # Optuna's report/prune/tell are per-trial calls: this loop runs once
        # per report point, not per training step.
        freed = []
        for i, (value, step) in enumerate(zip(values.tolist(), self.steps.tolist())):
            trial = self.trials[i]
            if trial is None:
                continue
            if not math.isfinite(value):
                self.finish(i, optuna.trial.TrialState.FAIL, None)
            elif step >= steps:
                trial.report(value, step)
                self.finish(i, optuna.trial.TrialState.COMPLETE, value)
            else:
                trial.report(value, step)
                if trial.should_prune():
                    self.finish(i, optuna.trial.TrialState.PRUNED, None)
            if self.trials[i] is None:
                freed.append(i)
        if freed:
            self.mb.retire(freed)

    def start(self, slots: Sequence[int]) -> None:
        from ..lifecycle import replace_model

        for i in slots:
            trial = self.study.ask()
            self.asked += 1
            self.trials[i] = trial
            config = dict(self.suggest(trial))
            # In place: weights, optimizer state and hyperparameters, schedule
            # and active flag of slot i only.
            replace_model(
                self.mb,
                i,
                self.model_fn(trial),
                config=config,
                optimizer=self.optimizer,
                scheduler=self.schedule,
            )
            self.steps[i] = 0

    def finish(self, i: int, state: optuna.trial.TrialState, value: float | None) -> None:
        trial = self.trials[i]
        assert trial is not None
        self.study.tell(trial, value, state=state)
        self.done.append(trial.number)
        self.trials[i] = None

    def fail_running(self) -> None:
        for i, trial in enumerate(self.trials):
            if trial is not None:
                self.finish(i, optuna.trial.TrialState.FAIL, None)


def shared_study(
    path: str | Any,
    ctx: Any = None,
    *,
    study_name: str = "modelbatch",
    **create_study_kwargs: Any,
) -> optuna.Study:
    """A study in an Optuna journal file that every process of a run shares.

    For sweeps over several processes (`modelbatch.distributed`): rank 0
    creates the study (or opens an existing one), the other ranks open it
    after a barrier, and each rank then asks, trains and tells its own batch
    of trials with `optimize_batched`; the journal file (on a file system
    every rank sees) keeps them consistent, and the sampler of each rank sees
    every rank's finished trials.

    Args:
        path: the journal file.
        ctx: a `modelbatch.distributed.Context`, or None for one process.
        study_name: the study's name in the journal.
        **create_study_kwargs: `direction`, `sampler`, `pruner`... for
            `optuna.create_study`.

    Example:
        >>> study = shared_study("sweep.journal", ctx, direction="minimize")
        >>> mine = len(ctx.block(range(256)))           # this rank's share of 256 trials
        >>> optimize_batched(study, ..., n_trials=mine, batch_size=64, ...)
    """
    from optuna.storages import JournalStorage

    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # pragma: no cover - Optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(path)))
    is_main = ctx is None or ctx.rank == 0
    if is_main:
        study = optuna.create_study(
            storage=storage, study_name=study_name, load_if_exists=True, **create_study_kwargs
        )
    if ctx is not None:
        ctx.barrier()
    if not is_main:
        study = optuna.load_study(
            study_name=study_name,
            storage=storage,
            sampler=create_study_kwargs.get("sampler"),
            pruner=create_study_kwargs.get("pruner"),
        )
    return study
