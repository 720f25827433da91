"""Per-model lifecycle: early stopping, a NaN/inf guard, and replacing a model in place.

All three work in the user's own training loop: call `EarlyStopping.step`
after each validation, `NaNGuard.step` after each backward or step, and
`replace_model` whenever a search (successive halving, Hyperband, ASHA)
frees a slot. They change the batch's tensors in place, so nothing is
rebuilt and a captured training step stays valid.

Example:
    >>> stopper = EarlyStopping(mb, patience=3)
    >>> guard = NaNGuard(mb)
    >>> for epoch in range(100):
    ...     train_one_epoch(mb)
    ...     guard.step()                   # retire diverged models
    ...     stopper.step(val_loss)         # val_loss: [N]
    ...     if not mb.active.any():
    ...         break
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._batch import ModelBatch
from ._indices import model_indices
from ._stack import check_compatible, meta_skeleton, split_name

__all__ = ["EarlyStopping", "LifecycleLog", "NaNGuard", "replace_model"]

logger = logging.getLogger("modelbatch")


def _per_model(owner: str, values: Any, model_batch: ModelBatch) -> Tensor:
    n = model_batch.num_models
    t = torch.as_tensor(values, device=model_batch.active.device).detach()
    if t.shape != (n,):
        raise ValueError(
            f"{owner}: expected one value per model, shape [N={n}], got {tuple(t.shape)}; "
            "pass a per-model metric such as ModelBatch.latest_losses."
        )
    return t.to(torch.float64)


class EarlyStopping:
    """Retire each model whose validation metric has stopped improving.

    A model improves when its metric beats its own best by more than
    `min_delta`; after `patience` calls in a row without improvement it is
    retired (`model_batch.retire`). NaN never improves. Only active models
    are watched: a retired model's counter stands still.

    Args:
        model_batch: the batch whose models are retired.
        patience: calls without improvement before a model is retired (>= 1).
        min_delta: the smallest change that counts as an improvement (>= 0).
        mode: `"min"` (a loss) or `"max"` (an accuracy).

    State: `best` `[N]`, `wait` `[N]` (calls since the last improvement),
    `stopped` `[N]` bool (retired by this callback).

    Example:
        >>> stopper = EarlyStopping(mb, patience=2)
        >>> stopper.step(val_losses).shape    # [N] bool: retired by this call
        torch.Size([8])
    """

    def __init__(
        self, model_batch: ModelBatch, patience: int = 5, min_delta: float = 0.0, mode: str = "min"
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}.")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping: patience must be an int >= 1, got {patience!r}.")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping: min_delta must be >= 0, got {min_delta!r}.")
        self.model_batch, self.patience, self.min_delta, self.mode = (
            model_batch,
            patience,
            float(min_delta),
            mode,
        )
        n, device = model_batch.num_models, model_batch.active.device
        # Kept as "lower is better" internally; `best` shows the user's sign.
        self._best = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        self.wait = torch.zeros(n, dtype=torch.int64, device=device)
        self.stopped = torch.zeros(n, dtype=torch.bool, device=device)

    @property
    def best(self) -> Tensor:
        """Each model's best metric so far, `[N]` (inf / -inf before the first call)."""
        return self._best if self.mode == "min" else -self._best

    def step(self, metric: Tensor | Iterable[float]) -> Tensor:
        """Record one validation metric per model and retire the stalled models.

        Args:
            metric: `[N]`, one value per model.

        Returns:
            `[N]` bool: the models retired by this call.
        """
        value = _per_model("EarlyStopping.step", metric, self.model_batch)
        if self.mode == "max":
            value = -value
        watching = self.model_batch.active
        improved = value < self._best - self.min_delta
        self._best = torch.where(watching & improved, value, self._best)
        self.wait = torch.where(watching, torch.where(improved, 0, self.wait + 1), self.wait)
        stop = watching & (self.wait >= self.patience)
        self.model_batch.active &= ~stop
        self.stopped |= stop
        return stop

    def reset(self, indices: int | Sequence[int] | Tensor) -> None:
        """Forget these models' history (after `replace_model`)."""
        mb = self.model_batch
        idx = model_indices("EarlyStopping.reset", indices, mb.num_models, mb.active.device)
        self._best[idx] = math.inf
        self.wait[idx] = 0
        self.stopped[idx] = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self._best.clone(),
            "wait": self.wait.clone(),
            "stopped": self.stopped.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, target in (("best", self._best), ("wait", self.wait), ("stopped", self.stopped)):
            target.copy_(torch.as_tensor(state[key]))


class NaNGuard:
    """Find models whose loss or weights became NaN/inf, and retire or reset them.

    Args:
        model_batch: the batch to watch.
        action: `"retire"` the diverged models, or `"reset"` them to fresh
            weights from `init_fn` (with fresh optimizer, scheduler and scaler
            state, as `replace_model`).
        init_fn: for `"reset"`: a function returning a new model of the batch's class.
        check_weights: also check the stacked parameters (one reduction per
            parameter tensor); otherwise only the losses are checked.
        optimizer: for `"reset"`: its state for the model is reset (`reset_models`).
        scheduler: for `"reset"`: the model's schedule restarts.
        scaler: for `"reset"`: the model's scale is reset.

    State: `events`, a list of `(call number, [model indices])`, one entry per
    call that found diverged models; `diverged` `[N]` counts each model's events.

    Example:
        >>> guard = NaNGuard(mb)
        >>> guard.step().nonzero().flatten().tolist()    # after a backward
        [5]
    """

    def __init__(
        self,
        model_batch: ModelBatch,
        action: str = "retire",
        *,
        init_fn: Callable[[], nn.Module] | None = None,
        check_weights: bool = True,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
    ) -> None:
        if action not in ("retire", "reset"):
            raise ValueError(f"NaNGuard: action must be 'retire' or 'reset', got {action!r}.")
        if action == "reset" and init_fn is None:
            raise ValueError(
                "NaNGuard: action='reset' needs init_fn, a function returning a fresh model; "
                "pass init_fn=lambda: MyNet(), or use action='retire'."
            )
        self.model_batch, self.action, self.init_fn = model_batch, action, init_fn
        self.check_weights = check_weights
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.calls = 0
        self.events: list[tuple[int, list[int]]] = []
        n, device = model_batch.num_models, model_batch.active.device
        self.diverged = torch.zeros(n, dtype=torch.int64, device=device)

    def find(self, losses: Tensor | None = None) -> Tensor:
        """`[N]` bool: active models whose losses (default `latest_losses`) or weights are not finite."""
        mb = self.model_batch
        bad = torch.zeros_like(mb.active)
        losses = mb.latest_losses if losses is None else losses
        if losses is not None:
            bad |= ~torch.isfinite(_per_model("NaNGuard.step", losses, mb))
        if self.check_weights:
            for p in mb.stacked_params().values():
                bad |= ~torch.isfinite(p.detach()).flatten(1).all(dim=1)
        return bad & mb.active

    def reset(self, indices: int | Sequence[int] | Tensor) -> None:
        """Forget these models' divergence count (after `replace_model`)."""
        mb = self.model_batch
        self.diverged[model_indices("NaNGuard.reset", indices, mb.num_models, mb.active.device)] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "events": list(self.events), "diverged": self.diverged.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.events = [(int(c), [int(i) for i in idx]) for c, idx in state["events"]]
        self.diverged.copy_(torch.as_tensor(state["diverged"]))

    def step(self, losses: Tensor | None = None) -> Tensor:
        """Check every model once; retire or reset the diverged ones.

        Args:
            losses: `[N]` per-model losses; defaults to `model_batch.latest_losses`.

        Returns:
            `[N]` bool: the models found diverged by this call.
        """
        self.calls += 1
        bad = self.find(losses)
        if not bool(bad.any()):
            return bad
        indices = bad.nonzero().flatten().tolist()
        self.events.append((self.calls, indices))
        self.diverged += bad.long()
        logger.warning("NaNGuard: models %s diverged (NaN/inf); action=%s.", indices, self.action)
        if self.action == "retire":
            self.model_batch.active &= ~bad
        else:
            assert self.init_fn is not None
            for i in indices:
                replace_model(
                    self.model_batch,
                    i,
                    self.init_fn,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    scaler=self.scaler,
                )
        return bad


class LifecycleLog:
    """Which trial ran in which slot, from which step to which, and how it ended.

    A search that retires or replaces models (successive halving, ASHA,
    Hyperband) records its decisions here; `modelbatch.plot.bracket` draws
    them. `replace_model(..., log=log, step=s)` records a replacement by
    itself; call `retire` where models stop for good. Recording only: the
    batch is not changed.

    Args:
        num_models: N; trials 0..N-1 start in slots 0..N-1.
        configs: the first N trials' configurations (kept with each trial).
        step: the step at which they start.

    State: `trials`, one dict per trial: `trial` (its id, in order of start),
    `slot`, `start`, `end` (None while it runs), `outcome` (`"running"`,
    `"replaced"`, `"retired"` or the reason given), `config`.

    Example:
        >>> log = LifecycleLog(8, configs)
        >>> replace_model(mb, 3, MLP, config=cfg, optimizer=opt, log=log, step=200)
        >>> log.retire([5, 6], step=400)
        >>> log.trial_in(3), len(log.trials)  # trial 8 now runs in slot 3
        (8, 9)
    """

    def __init__(
        self, num_models: int, configs: Sequence[Any] | None = None, step: int = 0
    ) -> None:
        if configs is not None and len(configs) != num_models:
            raise ValueError(
                f"LifecycleLog: configs has {len(configs)} entries, expected one per model "
                f"(N={num_models})."
            )
        self.num_models = num_models
        self.trials: list[dict[str, Any]] = []
        self._slot_trial: list[int] = []
        for i in range(num_models):
            self._start(i, step, None if configs is None else configs[i])

    def _start(self, slot: int, step: int, config: Any) -> int:
        trial = len(self.trials)
        self.trials.append(
            {
                "trial": trial,
                "slot": slot,
                "start": int(step),
                "end": None,
                "outcome": "running",
                "config": config,
            }
        )
        if slot < len(self._slot_trial):
            self._slot_trial[slot] = trial
        else:
            self._slot_trial.append(trial)
        return trial

    def _end(self, slot: int, step: int, outcome: str) -> None:
        record = self.trials[self._slot_trial[slot]]
        if record["end"] is None:
            record["end"], record["outcome"] = int(step), outcome

    def trial_in(self, slot: int) -> int:
        """The id of the trial now in `slot`."""
        return self._slot_trial[slot]

    def retire(
        self, indices: int | Sequence[int] | Tensor, step: int, outcome: str = "retired"
    ) -> None:
        """Record that the trials in these slots stopped at `step`."""
        for i in model_indices("LifecycleLog.retire", indices, self.num_models, "cpu").tolist():
            self._end(i, step, outcome)

    def replace(self, index: int, step: int, config: Any = None) -> int:
        """Record that slot `index`'s trial stopped at `step` and a new one started there.

        Returns:
            The new trial's id.
        """
        self._end(index, step, "replaced")
        return self._start(index, step, config)

    def state_dict(self) -> dict[str, Any]:
        return {"trials": [dict(t) for t in self.trials], "slots": list(self._slot_trial)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trials = [dict(t) for t in state["trials"]]
        self._slot_trial = [int(t) for t in state["slots"]]


def _fresh_module(new: nn.Module | Callable[[], nn.Module], seed: int | None) -> nn.Module:
    if isinstance(new, nn.Module):
        return new
    if not callable(new):
        raise TypeError(
            f"replace_model: new must be an nn.Module or a function returning one, "
            f"got {type(new).__name__}."
        )
    if seed is None:
        module = new()
    else:
        # Seed only a forked CPU generator: the caller's random stream (data
        # order, other models' dropout) is left exactly where it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            module = new()
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"replace_model: the init function returned a {type(module).__name__}, "
            "expected an nn.Module."
        )
    return module


def _per_model_config(model_batch: ModelBatch) -> dict[str, tuple[str, str]]:
    """Stacked buffers that hold a per-model module attribute (Dropout `p`): name -> (module, attr)."""
    ref = model_batch._export_skeleton
    found = {}
    for name in model_batch.stacked_buffers():
        prefix, leaf = split_name(name)
        try:
            sub = ref.get_submodule(prefix)
        except AttributeError:  # a buffer of a substituted layer with no user-side twin
            continue
        if isinstance(sub, nn.modules.dropout._DropoutNd) and leaf == "p":
            found[name] = (prefix, leaf)
    return found


def _check_fits(model_batch: ModelBatch, module: nn.Module) -> dict[str, Tensor | float]:
    """The new model's tensors (and per-model attributes) by stacked name, once it is checked."""
    ref = model_batch._export_skeleton
    config = _per_model_config(model_batch)
    probe = meta_skeleton(module)
    probe.train(ref.training)
    try:
        check_compatible([ref, probe], ignore_dropout_p=bool(config))
    except ValueError as e:
        detail = str(e).removeprefix("ModelBatch: ").replace("model 1", "the new model")
        raise ValueError(
            f"replace_model: the new model does not fit this batch: {detail} Build it "
            "with the batch's class and configuration."
        ) from None
    values: dict[str, Tensor | float] = {**dict(module.named_parameters())}
    values.update(dict(module.named_buffers()))
    for name, (prefix, attr) in config.items():
        values[name] = float(getattr(module.get_submodule(prefix), attr))
    return values


def replace_model(
    model_batch: ModelBatch,
    index: int,
    new: nn.Module | Callable[[], nn.Module],
    *,
    config: Mapping[str, Any] | None = None,
    schedule: Mapping[str, Any] | None = None,
    seed: int | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    loader: Any = None,
    callbacks: Iterable[Any] = (),
    log: LifecycleLog | None = None,
    step: int | None = None,
) -> None:
    """Put a fresh model into slot `index`, in place; every other model is untouched.

    Copies the new weights and buffers into slice `index` of the stacked
    tensors, zeroes its gradient, resets its optimizer state (and sets its
    hyperparameters from `config`), restarts its learning-rate schedule and
    its grad-scaler entry, gives its data a new seed, and activates it. No
    tensor is reallocated: optimizers, schedulers and a captured training
    step keep working.

    Args:
        model_batch: the batch.
        index: the slot to replace.
        new: a model of the batch's class, or a function returning one
            (called under `seed`, if given, without touching the global RNG).
        config: the new model's optimizer hyperparameters (`{"lr": 1e-3, ...}`);
            None keeps the slot's current ones.
        schedule: new schedule parameters for `scheduler.reset_models` (its
            `initial_lr` follows `config["lr"]` when given).
        seed: seeds `new()` and, with `loader`, the new model's data order.
        optimizer: defaults to `model_batch.optimizer`; needs `reset_models`
            (the modelbatch.optim optimizers).
        scheduler: a per-model schedule with `reset_models`.
        scaler: defaults to `model_batch.grad_scaler`.
        loader: a `PerModelLoader` whose seed for this model becomes `seed`.
        callbacks: objects with `reset(indices)` (`EarlyStopping`, ...).
        log: a `LifecycleLog` that records the replacement (at `step`, with `config`).
        step: the training step, for `log`.

    Example:
        >>> replace_model(mb, 3, lambda: MLP(), config={"lr": 3e-4}, seed=17, optimizer=opt)
    """
    n = model_batch.num_models
    if not isinstance(index, int) or not -n <= index < n:
        raise IndexError(f"replace_model: index must be an int in [0, {n}), got {index!r}.")
    i = index % n
    optimizer = model_batch.optimizer if optimizer is None else optimizer
    scaler = model_batch.grad_scaler if scaler is None else scaler
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and not hasattr(obj, "reset_models"):
            raise TypeError(
                f"replace_model: the {name} ({type(obj).__name__}) cannot reset one model "
                f"(no reset_models); use a modelbatch.optim {name}, or pass {name}=None and "
                "reset its state yourself."
            )
    if config is not None and optimizer is None:
        raise ValueError("replace_model: config sets optimizer hyperparameters; pass optimizer=.")
    if schedule is not None and scheduler is None:
        raise ValueError("replace_model: schedule needs scheduler=.")
    if log is not None and step is None:
        raise ValueError("replace_model: log records when the model was replaced; pass step=.")
    values = _check_fits(model_batch, _fresh_module(new, seed))

    if optimizer is not None:
        optimizer.reset_models([i], configs=None if config is None else [dict(config)])
    if scheduler is not None:
        params = dict(schedule or {})
        if config is not None and "lr" in config:
            params.setdefault("initial_lr", float(config["lr"]))
        scheduler.reset_models([i], **params)
    own = {**model_batch.stacked_params(), **model_batch.stacked_buffers()}
    with torch.no_grad():
        for name, t in own.items():
            if name in values:
                t[i] = values[name]
            if t.grad is not None:
                t.grad[i].zero_()
    if scaler is not None:
        scaler.reset_models([i])
    if loader is not None and seed is not None:
        loader.set_seed(i, seed)
    for callback in callbacks:
        callback.reset([i])
    model_batch.activate(i)
    if log is not None:
        assert step is not None
        log.replace(i, step, None if config is None else dict(config))
