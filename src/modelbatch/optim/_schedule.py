"""Per-model learning-rate schedules.

A vectorized optimizer keeps each model's base learning rate in every param
group's `group["hparams"]["lr"]` (`[N]`); model i steps with
`group["lr"] * group["hparams"]["lr"][i]`. The schedules here write
`hparams["lr"]` in place from a closed form of each model's own step count
and its own schedule parameters (`[N]` tensors), so one `step()` moves every
model exactly one step of its own schedule and nothing compounds. The shared
float factor `group["lr"]` stays free for an ordinary torch scheduler.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from .._indices import model_indices

__all__ = [
    "BatchCosineAnnealingLR",
    "BatchExponentialLR",
    "BatchLRScheduler",
    "BatchMultiStepLR",
    "BatchStepLR",
    "BatchWarmupCosineLR",
]

_F64 = torch.float64


def _lr_tensors(name: str, optimizer: Any) -> list[Tensor]:
    """Every param group's per-model base learning rates, each `[N]` (written in place)."""
    groups = getattr(optimizer, "param_groups", None) or []
    lrs: list[Tensor] = []
    for group in groups:
        lr = group.get("hparams", {}).get("lr") if isinstance(group, Mapping) else None
        if isinstance(lr, Tensor) and lr.dim() == 1:
            lrs.append(lr)
    if not lrs or len(lrs) != len(groups):
        raise TypeError(
            f"{name}: expected a modelbatch.optim optimizer whose param groups hold "
            f"hparams['lr'], an [N] tensor of per-model learning rates; got "
            f"{type(optimizer).__name__}. Build the optimizer with modelbatch.optim (e.g. "
            "BatchSGD), or use torch.optim.lr_scheduler for one schedule shared by all models."
        )
    if len({lr.shape[0] for lr in lrs}) != 1:
        raise ValueError(f"{name}: the param groups disagree on the number of models.")
    return lrs


class _VectorSchedule(LRScheduler):
    """Base of the closed-form schedules: subclasses define `_lr_at(t)`.

    State: `initial_lr` `[G, N]` (float64, each param group's `hparams["lr"]`
    captured at construction), `steps` `[N]` (each model's own step count),
    and the schedule parameters listed in `_params`, each `[N]`. `last_epoch`
    counts `step()` calls as in torch.

    As torch's schedulers, each takes `last_epoch` to resume (default -1,
    fresh): a number or `[N]`, one per model; model i then stands where a
    fresh schedule stands after `last_epoch[i] + 1` steps, from the base
    rates now in `hparams["lr"]`. `step(epoch)` puts every model at that
    step (a number or `[N]`).
    """

    _params: tuple[str, ...] = ()

    def __init__(self, optimizer: Any, last_epoch: Any = -1, **params: Any) -> None:
        # LRScheduler.__init__ is not called: it rewrites param_group["lr"],
        # which here is the shared factor, not the per-model rate.
        name = type(self).__name__
        lrs = _lr_tensors(name, optimizer)
        self.optimizer = optimizer
        self.num_models = n = lrs[0].shape[0]
        device = lrs[0].device
        self.initial_lr = torch.stack([lr.detach().to(device, _F64) for lr in lrs])
        self.steps = torch.zeros(n, dtype=torch.int64, device=device)
        self.last_epoch = 0
        for key, value in params.items():
            setattr(self, key, self._vector(key, value, n, device))
        self._validate(name)
        self._resume(last_epoch)
        self._write()

    def _steps_from(self, key: str, value: Any, low: int) -> Tensor:
        """A number or `[N]` of whole steps >= `low`, as `[N]` int64."""
        t = self._vector(key, value, self.num_models, self.steps.device)
        ok = (t >= low) & (t % 1 == 0)
        if not bool(ok.all()):
            bad = (~ok).nonzero().reshape(-1).tolist()
            raise ValueError(
                f"{type(self).__name__}: {key} must be whole numbers >= {low}, got "
                f"{t[bad].tolist()} for models {bad}."
            )
        return t.to(torch.int64)

    def _resume(self, last_epoch: Any) -> None:
        # As torch: a schedule built with last_epoch=k stands where a fresh one
        # stands after k + 1 steps; here k may differ per model ([N], -1: fresh).
        if isinstance(last_epoch, int) and last_epoch == -1:
            return
        self.steps = self._steps_from("last_epoch", last_epoch, -1) + 1
        self.last_epoch = int(self.steps.max())

    def _jump(self, epoch: Any) -> None:
        # torch's step(epoch): the closed form at that step (a number or [N]).
        self.steps = self._steps_from("epoch", epoch, 0)
        self.last_epoch = int(self.steps.max())
        self._write()

    def _vector(self, key: str, value: Any, n: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(value, dtype=_F64, device=device)
        if t.dim() == 0:
            return t.expand(n).clone()
        if t.shape != (n,):
            raise ValueError(
                f"{type(self).__name__}: {key} must be a number or have shape [N={n}], got shape "
                f"{tuple(t.shape)}; give one value per model."
            )
        return t.clone()

    def _require(self, name: str, key: str, ok: Tensor, expected: str) -> None:
        """Raise, naming the models whose `key` fails `ok` (`[N]`, or `[..., N]` for any row)."""
        ok = ok.reshape(-1, self.num_models).all(0)
        if not bool(ok.all()):
            bad = (~ok).nonzero().reshape(-1).tolist()
            value = getattr(self, key)[..., bad]
            got = value.T.tolist() if value.dim() > 1 else value.tolist()
            raise ValueError(
                f"{name}: {key} must be {expected}, got {got} for models {bad}; give every "
                f"model a {key} {expected}."
            )

    def _validate(self, name: str) -> None:
        """Check every per-model value (base rates and schedule parameters), naming bad models."""
        lr = self.initial_lr
        self._require(name, "initial_lr", lr.isfinite() & (lr >= 0), "finite and >= 0")
        self._check(name)

    def _check(self, name: str) -> None:
        """Validate the schedule parameters (at construction, reset and load)."""

    def _positive(self, name: str, key: str) -> None:
        value = getattr(self, key)
        self._require(name, key, value.isfinite() & (value > 0), "finite and > 0")

    def _steps(self, name: str, key: str, low: int) -> None:
        value = getattr(self, key)
        ok = value.isfinite() & (value >= low) & (value % 1 == 0)
        self._require(name, key, ok, f"an int >= {low}")

    def _nonnegative(self, name: str, key: str) -> None:
        value = getattr(self, key)
        self._require(name, key, value.isfinite() & (value >= 0), "finite and >= 0")

    def _checked_update(self, name: str, update: Any) -> None:
        """Run `update()` (which writes state in place); undo it if the result is invalid."""
        keys = ("initial_lr", "steps", *self._params)
        saved = {k: getattr(self, k).clone() for k in keys}
        try:
            update()
            self._validate(name)
        except Exception:
            for k, v in saved.items():
                current = getattr(self, k)
                if current.shape == v.shape:
                    current.copy_(v)
                else:  # replaced, not written in place (milestones of another width)
                    setattr(self, k, v)
            raise

    def _lr_at(self, t: Tensor) -> Tensor:
        """Rates `[G, N]` (float64) at per-model steps `t` `[N]`."""
        raise NotImplementedError

    def _write(self) -> None:
        values = self._lr_at(self.steps.to(_F64))
        with torch.no_grad():
            for lr, value in zip(_lr_tensors(type(self).__name__, self.optimizer), values):
                lr.copy_(value)

    def step(self, epoch: Any = None) -> None:  # type: ignore[override]
        """Move every model one step along its own schedule.

        Args:
            epoch: as torch's (deprecated there, still accepted): put every
                model at this step of its schedule instead, a number or `[N]`.
        """
        if epoch is not None:
            self._jump(epoch)
            return
        self.last_epoch += 1
        self.steps += 1
        self._write()

    def get_last_lr(self) -> list[Tensor]:  # type: ignore[override]
        """The per-model learning rates now in the optimizer: one `[N]` tensor per param group."""
        return [lr.detach().clone() for lr in _lr_tensors(type(self).__name__, self.optimizer)]

    @property
    def base_lrs(self) -> list[Tensor]:  # type: ignore[override]
        """The per-model base rates the schedules start from: one `[N]` per param group."""
        return list(self.initial_lr)

    def get_lr(self) -> list[Tensor]:  # type: ignore[override]
        """The per-model learning rates at the current steps: one `[N]` (float64) per group."""
        return list(self._lr_at(self.steps.to(_F64)))

    def reset_models(self, indices: Any, initial_lr: Any = None, **params: Any) -> None:
        """Restart these models' schedules from step 0.

        Args:
            indices: model indices (int, sequence, `[K]` tensor or `[N]` bool mask).
            initial_lr: their new base learning rates (a number or `[K]`, for
                every param group); by default each keeps the base rate it
                started with.
            **params: new schedule parameters for them (a number or `[K]`),
                e.g. `gamma=0.5`.
        """
        name = f"{type(self).__name__}.reset_models"
        idx = model_indices(name, indices, self.num_models, self.steps.device)
        for key in params:
            if key not in self._params:
                raise ValueError(
                    f"{name}: unknown schedule parameter {key!r}; expected one of {self._params}."
                )
        updates = dict(params)
        if initial_lr is not None:
            updates["initial_lr"] = initial_lr
        values = {}
        for key, value in updates.items():
            target = getattr(self, key)
            v = torch.as_tensor(value, dtype=target.dtype, device=target.device)
            if v.dim() and v.shape != idx.shape:
                raise ValueError(
                    f"{name}: {key} must be a number or have one value per index "
                    f"({idx.numel()}), got shape {tuple(v.shape)}."
                )
            values[key] = v

        def update() -> None:
            for key, v in values.items():
                getattr(self, key)[..., idx] = v
            self.steps[idx] = 0

        self._checked_update(name, update)
        self._write()

    def state_dict(self) -> dict[str, Any]:
        """Step counts, base rates and schedule parameters (tensors are cloned)."""
        keys = ("initial_lr", "steps", *self._params)
        state: dict[str, Any] = {k: getattr(self, k).clone() for k in keys}
        state["last_epoch"] = self.last_epoch
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a `state_dict()` in place and rewrite the optimizer's per-model rates."""
        name = f"{type(self).__name__}.load_state_dict"
        values = {}
        for key in ("initial_lr", "steps", *self._params):
            target = getattr(self, key)
            value = torch.as_tensor(state_dict[key])
            if value.shape != target.shape:
                raise ValueError(
                    f"{name}: {key!r} has shape "
                    f"{tuple(value.shape)}, expected {tuple(target.shape)}; the state comes from "
                    "a schedule over a different number of models."
                )
            values[key] = value

        def update() -> None:
            for key, value in values.items():
                getattr(self, key).copy_(value)

        self._checked_update(name, update)
        self.last_epoch = int(state_dict["last_epoch"])
        self._write()


class BatchStepLR(_VectorSchedule):
    """Model i's rate: `initial_lr_i * gamma_i ** (t // step_size_i)`.

    Args:
        optimizer: a modelbatch.optim optimizer (its `hparams["lr"]` are `[N]`).
        step_size: a number or `[N]`, steps between decays (>= 1).
        gamma: a number or `[N]`, the decay factor.

    Example:
        >>> sched = BatchStepLR(opt, step_size=[10, 20, 30], gamma=0.5)
        >>> sched.step(); opt.hparams["lr"].shape
        torch.Size([3])
    """

    _params = ("step_size", "gamma")
    step_size: Tensor
    gamma: Tensor

    def __init__(
        self, optimizer: Any, step_size: Any, gamma: Any = 0.1, last_epoch: Any = -1
    ) -> None:
        super().__init__(optimizer, last_epoch, step_size=step_size, gamma=gamma)

    def _check(self, name: str) -> None:
        self._steps(name, "step_size", 1)
        self._positive(name, "gamma")

    def _lr_at(self, t: Tensor) -> Tensor:
        return self.initial_lr * self.gamma.pow(torch.floor(t / self.step_size))


class BatchMultiStepLR(_VectorSchedule):
    """Model i's rate: `initial_lr_i * gamma_i ** (number of its milestones <= t)`.

    Args:
        optimizer: a modelbatch.optim optimizer (its `hparams["lr"]` are `[N]`).
        milestones: one increasing list of steps shared by every model
            (`[10, 20]`), or one list per model (`[[10], [5, 15], ...]`,
            lengths may differ).
        gamma: a number or `[N]`, the decay factor.
    """

    _params = ("milestones", "gamma")
    milestones: Tensor
    gamma: Tensor

    def __init__(
        self, optimizer: Any, milestones: Any, gamma: Any = 0.1, last_epoch: Any = -1
    ) -> None:
        lr = _lr_tensors(type(self).__name__, optimizer)[0]
        self.milestones = self._pad(milestones, lr.shape[0]).to(lr.device)
        super().__init__(optimizer, last_epoch, gamma=gamma)

    @staticmethod
    def _pad(milestones: Any, n: int) -> Tensor:
        rows: list[list[float]]
        if isinstance(milestones, Tensor):
            m = milestones.to(_F64)
            rows = [m.tolist()] * n if m.dim() == 1 else m.tolist()
        else:
            seq = list(milestones)
            if seq and all(isinstance(r, (Sequence, Tensor)) for r in seq):
                rows = [[float(x) for x in r] for r in seq]
            else:
                rows = [[float(x) for x in seq]] * n
        if len(rows) != n:
            raise ValueError(
                f"BatchMultiStepLR: milestones must be one list shared by all models or one list per "
                f"model (N={n}), got {len(rows)} lists."
            )
        width = max(1, *(len(r) for r in rows))
        # Padding with +inf: a milestone that is never reached.
        return torch.tensor([r + [math.inf] * (width - len(r)) for r in rows], dtype=_F64)

    def _check(self, name: str) -> None:
        m = self.milestones
        # +inf pads the shorter lists: a milestone never reached.
        ok = (m == math.inf) | (m.isfinite() & (m >= 0) & (m % 1 == 0))
        ok = ok.all(1)
        if not bool(ok.all()):
            bad = (~ok).nonzero().reshape(-1).tolist()
            rows = [[v for v in m[i].tolist() if v != math.inf] for i in bad]
            raise ValueError(
                f"{name}: milestones must be ints >= 0, got {rows} for models {bad}; give "
                "each model a list of step counts."
            )
        self._positive(name, "gamma")

    def _lr_at(self, t: Tensor) -> Tensor:
        passed = (self.milestones <= t.unsqueeze(1)).sum(1)
        return self.initial_lr * self.gamma.pow(passed.to(_F64))

    def reset_models(self, indices: Any, initial_lr: Any = None, **params: Any) -> None:
        if "milestones" in params:
            name = "BatchMultiStepLR.reset_models"
            idx = model_indices(name, indices, self.num_models, self.steps.device)
            rows = self._pad(params.pop("milestones"), idx.numel()).to(self.steps.device)
            width = max(rows.shape[1], self.milestones.shape[1])
            grown = torch.full((self.num_models, width), math.inf, dtype=_F64, device=rows.device)
            grown[:, : self.milestones.shape[1]] = self.milestones
            grown[idx] = math.inf
            grown[idx, : rows.shape[1]] = rows
            old, self.milestones = self.milestones, grown
            try:
                super().reset_models(indices, initial_lr, **params)
            except Exception:
                self.milestones = old
                raise
            return
        super().reset_models(indices, initial_lr, **params)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        # Milestone lists may have a different padded width: replace rather than copy.
        old = self.milestones
        self.milestones = torch.as_tensor(state_dict["milestones"], dtype=_F64).to(
            self.steps.device
        )
        try:
            super().load_state_dict(state_dict)
        except Exception:
            self.milestones = old
            raise


class BatchExponentialLR(_VectorSchedule):
    """Model i's rate: `initial_lr_i * gamma_i ** t`.

    Args:
        optimizer: a modelbatch.optim optimizer (its `hparams["lr"]` are `[N]`).
        gamma: a number or `[N]`, the decay factor per step.
    """

    _params = ("gamma",)
    gamma: Tensor

    def __init__(self, optimizer: Any, gamma: Any, last_epoch: Any = -1) -> None:
        super().__init__(optimizer, last_epoch, gamma=gamma)

    def _check(self, name: str) -> None:
        self._positive(name, "gamma")

    def _lr_at(self, t: Tensor) -> Tensor:
        return self.initial_lr * self.gamma.pow(t)


def _cosine(base: Tensor, eta_min: Tensor, t: Tensor, period: Tensor) -> Tensor:
    return eta_min + (base - eta_min) * (1 + torch.cos(math.pi * t / period)) / 2


class BatchCosineAnnealingLR(_VectorSchedule):
    """Model i's rate: `eta_min_i + (initial_lr_i - eta_min_i) * (1 + cos(pi t / T_max_i)) / 2`.

    The closed form of `torch.optim.lr_scheduler.CosineAnnealingLR` (which,
    like this, rises again after `T_max`).

    Args:
        optimizer: a modelbatch.optim optimizer (its `hparams["lr"]` are `[N]`).
        T_max: a number or `[N]`, steps of the half period (> 0).
        eta_min: a number or `[N]`, the lowest rate.
    """

    _params = ("T_max", "eta_min")
    T_max: Tensor
    eta_min: Tensor

    def __init__(
        self, optimizer: Any, T_max: Any, eta_min: Any = 0.0, last_epoch: Any = -1
    ) -> None:
        super().__init__(optimizer, last_epoch, T_max=T_max, eta_min=eta_min)

    def _check(self, name: str) -> None:
        self._positive(name, "T_max")
        self._nonnegative(name, "eta_min")

    def _lr_at(self, t: Tensor) -> Tensor:
        return _cosine(self.initial_lr, self.eta_min, t, self.T_max)


class BatchWarmupCosineLR(_VectorSchedule):
    """Linear warmup, then cosine decay to `eta_min`, then constant at `eta_min`.

    Model i's rate at step t, with `W = warmup_steps_i`, `T = total_steps_i`:
    `initial_lr_i * (s + (1 - s) * t / W)` for `t < W` (`s = start_factor_i`),
    then `eta_min_i + (initial_lr_i - eta_min_i) * (1 + cos(pi (t - W) / (T - W))) / 2`
    up to `t = T`, then `eta_min_i`. Up to `T` this equals torch's
    `SequentialLR([LinearLR(start_factor=s, total_iters=W), CosineAnnealingLR(T - W, eta_min)],
    milestones=[W])` on model i.

    Args:
        optimizer: a modelbatch.optim optimizer (its `hparams["lr"]` are `[N]`).
        warmup_steps: a number or `[N]` (>= 0; 0 means no warmup).
        total_steps: a number or `[N]` (> warmup_steps).
        eta_min: a number or `[N]`, the final rate.
        start_factor: a number or `[N]` in [0, 1], the rate at step 0 as a
            fraction of the base rate.
    """

    _params = ("warmup_steps", "total_steps", "eta_min", "start_factor")
    warmup_steps: Tensor
    total_steps: Tensor
    eta_min: Tensor
    start_factor: Tensor

    def __init__(
        self,
        optimizer: Any,
        warmup_steps: Any,
        total_steps: Any,
        eta_min: Any = 0.0,
        start_factor: Any = 0.0,
        last_epoch: Any = -1,
    ) -> None:
        super().__init__(
            optimizer,
            last_epoch,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            eta_min=eta_min,
            start_factor=start_factor,
        )

    def _check(self, name: str) -> None:
        self._steps(name, "warmup_steps", 0)
        self._steps(name, "total_steps", 1)
        ok = self.total_steps > self.warmup_steps
        self._require(name, "total_steps", ok, "> warmup_steps")
        ok = (self.start_factor >= 0) & (self.start_factor <= 1)
        self._require(name, "start_factor", ok, "in [0, 1]")
        self._nonnegative(name, "eta_min")

    def _lr_at(self, t: Tensor) -> Tensor:
        w = self.warmup_steps
        ramp = self.start_factor + (1 - self.start_factor) * t / w.clamp(min=1)
        warm = self.initial_lr * ramp
        cosine = _cosine(self.initial_lr, self.eta_min, t - w, self.total_steps - w)
        lr = torch.where(t < w, warm, cosine)
        return torch.where(t > self.total_steps, self.eta_min, lr)


class BatchLRScheduler(LRScheduler):
    """Any torch LR scheduler class, with its own arguments for each model.

    Keeps N small torch schedulers, each on a dummy optimizer with one
    one-element param group per param group of `optimizer`, whose lrs start at
    model i's `hparams["lr"][i]`, and copies their rates into `hparams["lr"]`
    after every `step()`. Every torch scheduler is taken:

    - `ReduceLROnPlateau`: `step(metrics)` with one metric per model, `[N]`;
    - `LambdaLR`, `MultiplicativeLR`: a function per model through `per_model_kwargs`;
    - `SequentialLR`, `ChainedScheduler`: `schedulers` as `(class, kwargs)`
      pairs or functions `optimizer -> scheduler`, built on each model's
      dummy optimizer;
    - `CyclicLR`, `OneCycleLR` with `cycle_momentum=True`: the cycled momentum
      (SGD, RMSprop) or beta1 (Adam, AdamW) is written to `hparams` too.

    `last_epoch` (in `kwargs` or `per_model_kwargs`, a number or one per
    model) resumes as torch does: model i's scheduler stands where a fresh
    one stands after `last_epoch + 1` steps. `step(epoch)` passes the epoch
    on (a number or `[N]`) where torch's scheduler still accepts one.

    Warning:
        Each `step()` runs a Python loop over the N schedulers and one
        host-to-device copy: fine for hundreds of models, slow for very large
        N. Prefer the vectorized schedules (`BatchStepLR`, `BatchMultiStepLR`,
        `BatchExponentialLR`, `BatchCosineAnnealingLR`, `BatchWarmupCosineLR`) there.

    Args:
        optimizer: a modelbatch.optim optimizer (its `hparams["lr"]` are `[N]`).
        scheduler_cls: a torch scheduler class, e.g. `torch.optim.lr_scheduler.OneCycleLR`.
        per_model_kwargs: N dicts of arguments, one per model, or None.
        **kwargs: arguments shared by every model (a per-model entry wins).

    Example:
        >>> sched = BatchLRScheduler(opt, torch.optim.lr_scheduler.OneCycleLR,
        ...     [{"max_lr": m} for m in (0.1, 0.2, 0.3)], total_steps=100)
        >>> sched.step(); opt.hparams["lr"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        optimizer: Any,
        scheduler_cls: type,
        per_model_kwargs: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        lrs = _lr_tensors("BatchLRScheduler", optimizer)
        self._warned: set[str] = set()  # torch's warnings already passed on
        self.optimizer = optimizer
        self.num_models = n = lrs[0].shape[0]
        if per_model_kwargs is not None and len(per_model_kwargs) != n:
            raise ValueError(
                f"BatchLRScheduler: per_model_kwargs has {len(per_model_kwargs)} entries, "
                f"expected one dict per model (N={n})."
            )
        self.scheduler_cls = self._check_class(scheduler_cls)
        self.shared_kwargs = dict(kwargs)
        self.per_model_kwargs = [dict(k) for k in (per_model_kwargs or [{}] * n)]
        self._spread_last_epoch()
        self.last_epoch = 0
        self._momentum_key = self._momentum_hparam()
        # base[i][g]: model i's base rate in param group g.
        base = torch.stack([lr.detach().to("cpu", _F64) for lr in lrs], dim=1).tolist()
        self.schedulers = [self._make(i, base[i]) for i in range(n)]
        self._cycles_momentum = bool(getattr(self.schedulers[0], "cycle_momentum", False))
        if self._cycles_momentum and self._momentum_key is None:
            raise ValueError(
                f"BatchLRScheduler: {scheduler_cls.__name__} with cycle_momentum=True needs an "
                f"optimizer with momentum or betas, got {type(optimizer).__name__}; pass "
                "cycle_momentum=False."
            )
        self.last_epoch = max(int(getattr(s, "last_epoch", 0)) for s in self.schedulers)
        self._write()

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _check_class(cls: Any) -> type:
        ok = isinstance(cls, type) and issubclass(
            cls, (LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        )
        if not ok:
            raise TypeError(
                "BatchLRScheduler: scheduler_cls must be a torch.optim.lr_scheduler class "
                f"(e.g. OneCycleLR), got {cls!r}."
            )
        if issubclass(cls, (_VectorSchedule, BatchLRScheduler)):
            raise TypeError(
                f"BatchLRScheduler: {cls.__name__} is already per model; use it directly, "
                f"e.g. {cls.__name__}(optimizer, ...)."
            )
        return cls

    def _spread_last_epoch(self) -> None:
        # A shared last_epoch may hold one value per model ([N] or a list).
        value = self.shared_kwargs.get("last_epoch")
        if isinstance(value, (Tensor, Sequence)):
            per = torch.as_tensor(value).reshape(-1).tolist()
            if len(per) != self.num_models:
                raise ValueError(
                    f"BatchLRScheduler: last_epoch must be a number or one per model "
                    f"(N={self.num_models}), got {len(per)} values."
                )
            del self.shared_kwargs["last_epoch"]
            for kw, k in zip(self.per_model_kwargs, per):
                kw.setdefault("last_epoch", int(k))

    def _momentum_hparam(self) -> str | None:
        hparams = self.optimizer.param_groups[0].get("hparams", {})
        for key in ("betas", "momentum"):
            if isinstance(hparams.get(key), Tensor):
                return key
        return None

    def _momenta(self, i: int) -> list[Any]:
        """Model i's momentum (or betas) in each param group, for its dummy optimizer."""
        key = self._momentum_key
        if key is None:
            return [None] * len(self.optimizer.param_groups)
        values = [g["hparams"][key][i].tolist() for g in self.optimizer.param_groups]
        return [tuple(v) if key == "betas" else v for v in values]

    def _make(
        self, i: int, base_lrs: list[float], resume: bool = True, name: str = "BatchLRScheduler"
    ) -> Any:
        self._check_values(i, base_lrs, name)
        key = self._momentum_key
        groups = []
        for lr, m in zip(base_lrs, self._momenta(i)):
            group: dict[str, Any] = {"params": [torch.zeros((), requires_grad=True)], "lr": lr}
            if key is not None:
                group[key] = m
            groups.append(group)
        # Adam-like dummies for betas: CyclicLR and OneCycleLR then cycle beta1.
        opt = (torch.optim.Adam if key == "betas" else torch.optim.SGD)(groups, lr=base_lrs[0])
        kwargs = {**self.shared_kwargs, **self.per_model_kwargs[i]}
        # A shared last_epoch resumes at construction only; reset_models restarts at 0.
        last = int(kwargs.pop("last_epoch", -1))
        if not resume:
            last = -1
        if "schedulers" in kwargs:
            kwargs["schedulers"] = [self._inner(entry, opt) for entry in kwargs["schedulers"]]
        cls_name = self.scheduler_cls.__name__
        if last != -1 and "last_epoch" not in inspect.signature(self.scheduler_cls).parameters:
            raise ValueError(
                f"{name}: {cls_name} takes no last_epoch; resume it with "
                "load_state_dict(state) from the saved BatchLRScheduler.state_dict()."
            )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_ORDER_WARNING)
                sched = self._build(opt, kwargs)
                for _ in range(last + 1):  # torch's resume: a fresh schedule, last + 1 steps on
                    sched.step()
        except (TypeError, ValueError, KeyError) as error:
            raise type(error)(
                f"{name}: model {i}'s {cls_name} refused its arguments: {error}"
            ) from error
        return sched

    def _check_values(self, i: int, base_lrs: list[float], name: str) -> None:
        """Model i's arguments and base rates: finite numbers, rates >= 0 (named in the error)."""
        kwargs = {**self.shared_kwargs, **self.per_model_kwargs[i]}
        cls = getattr(self.scheduler_cls, "__name__", repr(self.scheduler_cls))
        for key, value in kwargs.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(
                    f"{name}: model {i}'s {key}={value} is not finite; give {cls} a finite {key}."
                )
        bad_lr = [lr for lr in base_lrs if not (math.isfinite(lr) and lr >= 0)]
        if bad_lr:
            raise ValueError(
                f"{name}: model {i}'s base learning rate must be finite and >= 0, got {bad_lr[0]}."
            )

    def _build(self, opt: torch.optim.Optimizer, kwargs: dict[str, Any]) -> Any:
        cls = self.scheduler_cls
        first = next(iter(inspect.signature(cls).parameters), "optimizer")
        if first != "optimizer":  # ChainedScheduler(schedulers, optimizer=None)
            return cls(optimizer=opt, **kwargs)
        return cls(opt, **kwargs)

    @staticmethod
    def _inner(entry: Any, opt: torch.optim.Optimizer) -> Any:
        if isinstance(entry, (LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
            raise TypeError(
                "BatchLRScheduler: schedulers must be (class, kwargs) pairs or functions "
                f"optimizer -> scheduler, got a built {type(entry).__name__} (bound to another "
                "optimizer); e.g. schedulers=[(LinearLR, {'total_iters': 5}), "
                "(CosineAnnealingLR, {'T_max': 95})]."
            )
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Mapping):
            return entry[0](opt, **entry[1])
        if callable(entry):
            return entry(opt)
        raise TypeError(
            "BatchLRScheduler: schedulers must be (class, kwargs) pairs or functions "
            f"optimizer -> scheduler, got {entry!r}."
        )

    # ------------------------------------------------------------------ stepping

    def _rates(self) -> list[list[float]]:
        return [[g["lr"] for g in s.optimizer.param_groups] for s in self.schedulers]

    def _write(self) -> None:
        # One host-to-device copy per param group, whatever N.
        rates = torch.tensor(self._rates(), dtype=_F64).T
        ok = (rates.isfinite() & (rates >= 0)).all(0)
        if not bool(ok.all()):
            # Checked before anything is written: the optimizer keeps its last rates.
            bad = (~ok).nonzero().reshape(-1).tolist()
            raise ValueError(
                f"BatchLRScheduler: the schedulers of models {bad} gave learning rates "
                f"{rates[:, bad].T.tolist()}, expected finite and >= 0; check their arguments."
            )
        with torch.no_grad():
            for lr, value in zip(_lr_tensors("BatchLRScheduler", self.optimizer), rates):
                lr.copy_(value)
            if self._cycles_momentum:
                self._write_momentum()

    def _write_momentum(self) -> None:
        key = self._momentum_key
        assert key is not None
        for g, group in enumerate(self.optimizer.param_groups):
            values = [s.optimizer.param_groups[g][key] for s in self.schedulers]
            target = group["hparams"][key]
            if key == "betas":
                first = torch.tensor([b[0] for b in values], dtype=target.dtype)
                target[:, 0].copy_(first.to(target.device))
            else:
                target.copy_(torch.tensor(values, dtype=target.dtype).to(target.device))

    def _per_model(self, what: str, values: Any) -> list[Any]:
        t = torch.as_tensor(values)
        if t.dim() == 0:
            return [t.item()] * self.num_models
        flat = t.reshape(-1).tolist()
        if len(flat) != self.num_models:
            raise ValueError(
                f"BatchLRScheduler.step: {what} must have one value per model "
                f"(N={self.num_models}), got {len(flat)}."
            )
        return flat

    def step(self, metrics: Any = None, epoch: Any = None) -> None:  # type: ignore[override]
        """Step every model's scheduler once.

        Args:
            metrics: for `ReduceLROnPlateau`, one metric per model, `[N]`. For
                every other scheduler the first argument is the epoch, as in torch.
            epoch: passed to each model's `step` (a number or `[N]`) where
                torch's scheduler accepts one (deprecated there, still taken).
        """
        cls: Any = self.scheduler_cls
        plateau = issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if not plateau and metrics is not None:
            if epoch is not None:
                raise TypeError(
                    f"BatchLRScheduler.step: {cls.__name__} takes no metrics; call step() or "
                    "step(epoch)."
                )
            metrics, epoch = None, metrics
        if plateau and metrics is None:
            raise ValueError(
                "BatchLRScheduler.step: ReduceLROnPlateau needs one metric per model; call "
                "step(val_losses) with an [N] tensor."
            )
        values = self._per_model("metrics", metrics) if plateau else [None] * self.num_models
        epochs = [None] * self.num_models
        if epoch is not None:
            if "epoch" not in inspect.signature(cls.step).parameters:
                raise TypeError(
                    f"BatchLRScheduler.step: torch's {cls.__name__}.step takes no epoch; call "
                    "step() once per step (or build it with last_epoch to resume)."
                )
            epochs = self._per_model("epoch", epoch)
        self._step_all(values, epochs)

    def _step_all(self, values: list[Any], epochs: list[Any]) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for sched, value, ep in zip(self.schedulers, values, epochs):
                args = [] if value is None else [value]
                if ep is None:
                    sched.step(*args)
                else:
                    sched.step(*args, epoch=ep)
        # torch's own warnings (the deprecated epoch argument), once per scheduler rather
        # than N times a step (catch_warnings resets the registry that would say "once");
        # the dummy optimizers never step, so torch's warning about the order is dropped.
        for message in dict.fromkeys(str(w.message) for w in caught):
            if (
                message not in self._warned
                and _ORDER_WARNING not in message
                and "optimizer.step()` has been overridden" not in message
            ):
                self._warned.add(message)
                warnings.warn(message, UserWarning, stacklevel=3)
        self.last_epoch += 1
        self._write()

    def get_last_lr(self) -> list[Tensor]:  # type: ignore[override]
        """The per-model learning rates now in the optimizer: one `[N]` tensor per param group."""
        return [lr.detach().clone() for lr in _lr_tensors("BatchLRScheduler", self.optimizer)]

    def get_lr(self) -> list[Tensor]:  # type: ignore[override]
        return self.get_last_lr()

    # ------------------------------------------------------------------ models and state

    def reset_models(
        self,
        indices: Any,
        initial_lr: Any = None,
        per_model_kwargs: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> None:
        """Give these models fresh schedulers (from step 0).

        Args:
            indices: model indices (int, sequence, `[K]` tensor or `[N]` bool mask).
            initial_lr: their new base rates (a number or `[K]`, for every
                param group); by default each keeps the base rates its
                scheduler started with.
            per_model_kwargs: K dicts that replace these models' scheduler
                arguments, or None to keep theirs.
            **params: scheduler arguments changed for all K models, merged
                over their own (as the vectorized schedules' `reset_models`).
        """
        name = "BatchLRScheduler.reset_models"
        idx = model_indices(name, indices, self.num_models, torch.device("cpu")).tolist()
        if per_model_kwargs is not None:
            if len(per_model_kwargs) != len(idx):
                raise ValueError(
                    f"{name}: per_model_kwargs has {len(per_model_kwargs)} entries, expected "
                    f"one per index ({len(idx)})."
                )
            for i, kw in zip(idx, per_model_kwargs):
                self.per_model_kwargs[i] = dict(kw)
        for i in idx:
            self.per_model_kwargs[i] = {**self.per_model_kwargs[i], **params}
            self.per_model_kwargs[i].pop("last_epoch", None)  # restarted: not a resume
        groups = len(self.schedulers[0].optimizer.param_groups)
        if initial_lr is None:
            rates = [list(self.schedulers[i].base_lrs) for i in idx]
        else:
            flat = torch.as_tensor(initial_lr, dtype=_F64).expand(len(idx)).tolist()
            rates = [[r] * groups for r in flat]
        for i, rate in zip(idx, rates):
            self.schedulers[i] = self._make(i, rate, resume=False, name=name)
        self._write()

    def state_dict(self) -> dict[str, Any]:
        """Each model's torch scheduler state and the dummy optimizers' rates."""
        return {
            "last_epoch": self.last_epoch,
            "schedulers": [s.state_dict() for s in self.schedulers],
            "lrs": self._rates(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a `state_dict()` in place and rewrite the optimizer's per-model rates."""
        states = state_dict["schedulers"]
        if len(states) != self.num_models:
            raise ValueError(
                f"BatchLRScheduler.load_state_dict: the state holds {len(states)} schedulers, "
                f"expected N={self.num_models}."
            )
        for sched, state, rates in zip(self.schedulers, states, state_dict["lrs"]):
            sched.load_state_dict(state)
            for group, rate in zip(sched.optimizer.param_groups, rates):
                group["lr"] = rate
        self.last_epoch = int(state_dict["last_epoch"])
        self._write()


# torch warns when a scheduler steps before its optimizer; the dummy optimizers never step.
_ORDER_WARNING = "Detected call of `lr_scheduler.step"
