"""Vectorized optimizers over stacked parameters, with per-model hyperparameters.

Thin `torch.optim.Optimizer` shells: each class names an update rule
(`_rules`) and how its hyperparameters are validated; `_executor` runs the
rule for every optimizer, on every device.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._indices import model_indices
from .._layout import restrided
from ._executor import ParamSlot, run_rule
from ._hparams import HPARAM_DTYPE, HParam, Rule, build_hparams, check_rules, per_model
from ._rules import RULES, UpdateRule

__all__ = [
    "BatchOptimizer",
    "BatchSGD",
    "BatchAdam",
    "BatchAdamW",
    "BatchAdamax",
    "BatchNAdam",
    "BatchRAdam",
    "BatchRMSprop",
    "BatchAdagrad",
    "BatchAdadelta",
    "BatchASGD",
    "BatchRprop",
    "BATCH_CLASSES",
    "update_mask",
]

#: Options torch optimizers take that choose an implementation, not the math:
#: accepted and ignored (the vectorized implementation is always used).
IGNORED_OPTIONS = ("foreach", "fused", "capturable")


def update_mask(owner: str, model_batch: Any, skip: Tensor | None, n: int, device: Any) -> Tensor:
    """The models that update this step: `active & ~skip`, `[N]` bool on `device`."""
    active = getattr(model_batch, "active", None)
    mask = (
        active.to(device=device, dtype=torch.bool)
        if active is not None
        else torch.ones(n, dtype=torch.bool, device=device)
    )
    if skip is not None:
        if tuple(skip.shape) != (n,):
            raise ValueError(
                f"{owner}.step: skip must be a [N={n}] bool tensor, got shape "
                f"{tuple(skip.shape)}; pass one flag per model (True = do not update)."
            )
        mask = mask & ~skip.to(device=device, dtype=torch.bool)
    return mask


def _nonneg(key: str) -> Rule:
    return Rule((key,), f"{key} >= 0", lambda h: h[key] >= 0)


def _finite(specs: Mapping[str, HParam]) -> tuple[Rule, ...]:
    """One rule per number-valued hyperparameter: no nan or inf."""

    def rule(key: str) -> Rule:
        def valid(h: Mapping[str, Tensor]) -> Tensor:
            finite = torch.isfinite(h[key])
            return finite if finite.dim() == 1 else finite.all(dim=1)

        return Rule((key,), f"a finite {key} (no nan or inf)", valid)

    return tuple(rule(k) for k, spec in specs.items() if spec.kind != "bool")


class BatchOptimizer(torch.optim.Optimizer):
    """Base of the vectorized optimizers: N models' hyperparameters as `[N]` tensors.

    Every param group holds `group["hparams"]` (`{name: [N] tensor}`, pairs
    such as `betas` as `[N, 2]`, flags as `[N]` bool), `group["step"]`
    (`[K, N]` float64: the step count of each of the group's K parameters in
    each model; like torch, a parameter's count advances only on steps where
    it has a gradient), per-(parameter, model) scalar state in
    `group["scalars"]` (NAdam's `mu_product`, ASGD's `eta`, `mu`), and
    `group["lr"]`, a 0-dim float64 tensor factor (1.0 at creation) that
    multiplies every model's own lr: torch LR schedulers drive it in place.

    Args:
        params: stacked parameters `[N, *shape]` (or param groups of them).
        configs: N dicts of hyperparameters, one per model, merged over
            `base_config` and the torch class's defaults.
        model_batch: the ModelBatch whose `active` mask `step()` honours (read
            at every step, held by a weak reference); None updates every model.
        base_config: hyperparameters shared by all models.

    Warning:
        Writing `hparams` tensors directly is not validated; `set_hparams`
        is. State that a per-model option needs (amsgrad's
        `max_exp_avg_sq`, a momentum buffer) exists only if some model had
        the option on at creation.
    """

    rule: ClassVar[UpdateRule]
    torch_cls: ClassVar[type[torch.optim.Optimizer]]
    specs: ClassVar[dict[str, HParam]]
    rules: ClassVar[tuple[Rule, ...]] = ()
    #: options that must be equal for every model (they choose the math).
    shared: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        params: Iterable[Any],
        configs: Sequence[Mapping[str, Any]],
        *,
        model_batch: Any = None,
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        name = type(self).__name__
        base = {**self.default_config(), **dict(base_config or {})}
        configs = [dict(cfg) for cfg in configs]
        if not configs:
            raise ValueError(f"{name}: expected one config per model, got none.")
        accepted = sorted([*self.specs, *self.shared, *IGNORED_OPTIONS, "differentiable"])
        for i, cfg in enumerate([base, *configs]):
            unknown = sorted(set(cfg) - set(accepted))
            if unknown:
                where = "base_config" if i == 0 else f"config {i - 1}"
                raise ValueError(
                    f"{name}: {where} has unknown keys {unknown}; accepted keys are {accepted}."
                )
        full = [{**base, **cfg} for cfg in configs]
        if any(cfg.get("differentiable") for cfg in full):
            raise ValueError(
                f"{name}: differentiable=True is not supported (the update runs without "
                "autograd); drop it."
            )
        self.options = {k: full[0][k] for k in self.shared}
        for k in self.shared:
            differ = [i for i, cfg in enumerate(full) if cfg[k] != self.options[k]]
            if differ:
                raise ValueError(
                    f"{name}: config {differ[0]} has {k}={full[differ[0]][k]!r} but config 0 "
                    f"has {self.options[k]!r}; {k} must be the same for every model."
                )
        param_list = list(params)
        self.num_models = len(configs)
        self._base_config = base
        self._model_batch = (lambda: None) if model_batch is None else weakref.ref(model_batch)
        #: parameter -> its low-precision copy (see `low_precision_copies`).
        self.low_precision: dict[Tensor, Tensor] = {}
        self._low_versions: dict[Tensor, int] = {}
        device = _first_device(param_list)
        self._new_hparams = build_hparams(name, self.specs, full, device)
        check_rules(name, (*_finite(self.specs), *self.rules), self._new_hparams)
        super().__init__(param_list, {"lr": 1.0})
        del self._new_hparams

    # ------------------------------------------------------------------ construction

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """The torch class's defaults for the keys this optimizer accepts."""
        sig = inspect.signature(cls.torch_cls.__init__).parameters
        keys = [*cls.specs, *cls.shared]
        return {k: sig[k].default for k in keys if k in sig}

    def _rule_options(self) -> dict[str, bool]:
        return {o: bool(self.options.get(f"{o}_weight_decay", False)) for o in self.rule.options}

    @classmethod
    def structure(cls, hparams: Mapping[str, Tensor]) -> dict[str, bool]:
        """Which optional state tensors exist, from the models' hyperparameters."""
        out = {}
        for state, key in cls.rule.optional.items():
            t = hparams[key]
            out[state] = bool((t != 0).any())
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        n = self.num_models
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if p.dim() == 0 or p.shape[0] != n:
                raise ValueError(
                    f"{name}: expected stacked parameters [N={n}, ...], got shape "
                    f"{tuple(p.shape)}; pass ModelBatch parameters, one config per model."
                )
        fixed = dict(param_group.pop("fixed_hparams", None) or {})
        unknown = sorted(set(fixed) - set(self.specs))
        if unknown:
            raise ValueError(
                f"{name}: fixed_hparams has unknown keys {unknown}; per-model ones are "
                f"{sorted(self.specs)}."
            )
        hp = getattr(self, "_new_hparams", None)
        if hp is None:
            hp = self.param_groups[0]["hparams"]
        lr = param_group.get("lr", 1.0)
        param_group["lr"] = torch.tensor(float(lr), dtype=HPARAM_DTYPE, device=hp["lr"].device)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        device = hp["lr"].device
        k = len(group["params"])
        group["hparams"] = {key: t.clone() for key, t in hp.items()}
        # Values every model holds in this group whatever its config says (e.g. no weight
        # decay on biases); set_hparams and reset_models keep them.
        group["fixed_hparams"] = fixed
        _apply_fixed(group["hparams"], fixed)
        group["step"] = torch.zeros(k, n, dtype=HPARAM_DTYPE, device=device)
        group["scalars"] = {
            s: self._scalar_init(init, group["hparams"], k) for s, init in self.rule.scalars
        }
        group["structure"] = self.structure(hp)

    def _scalar_init(self, init: float | str, hparams: Mapping[str, Tensor], k: int) -> Tensor:
        if isinstance(init, str):
            return hparams[init].to(HPARAM_DTYPE).expand(k, -1).clone()
        device = hparams["lr"].device
        return torch.full((k, self.num_models), float(init), dtype=HPARAM_DTYPE, device=device)

    # ------------------------------------------------------------------ hyperparameters

    @property
    def hparams(self) -> dict[str, Tensor]:
        """Param group 0's per-model hyperparameters, `{name: [N]}` (pairs: `[N, 2]`).

        Writing an entry in place (`opt.hparams["lr"][3] = 0.01`) takes effect
        at the next step.
        """
        return self.param_groups[0]["hparams"]

    def set_hparams(self, indices: int | Sequence[int] | Tensor, **values: Any) -> None:
        """Set hyperparameters of some models (validated), in every param group.

        Example:
            >>> opt.set_hparams([0, 3], lr=0.01, betas=(0.9, 0.99))
        """
        owner = f"{type(self).__name__}.set_hparams"
        unknown = sorted(set(values) - set(self.specs))
        if unknown:
            raise ValueError(
                f"{owner}: unknown hyperparameters {unknown}; per-model ones are "
                f"{sorted(self.specs)}."
            )
        idx = model_indices(owner, indices, self.num_models, "cpu")
        specs = {k: self.specs[k] for k in values}
        new = build_hparams(owner, specs, [values] * len(idx), what="value")
        self._assign(owner, idx, new)

    def _assign(self, owner: str, idx: Tensor, new: Mapping[str, Tensor]) -> None:
        # Validate every group before writing any, so a refused change leaves nothing half-set.
        staged = []
        for group in self.param_groups:
            live = group["hparams"]
            candidate = {k: t.clone() for k, t in live.items()}
            for k, t in new.items():
                candidate[k][idx] = t.to(candidate[k].device)
            _apply_fixed(candidate, group.get("fixed_hparams", {}))
            check_rules(owner, (*_finite(self.specs), *self.rules), candidate, what="model")
            wanted = self.structure(candidate)
            missing = [k for k, on in wanted.items() if on and not group["structure"].get(k)]
            if missing:
                option = self.rule.optional[missing[0]]
                raise ValueError(
                    f"{owner}: this optimizer was created without the state {option} needs "
                    f"({missing[0]!r}: no model used {option} at creation); create the "
                    f"optimizer with {option} enabled for at least one model."
                )
            staged.append((live, candidate))
        for live, candidate in staged:
            for k, t in candidate.items():
                live[k].copy_(t)

    def reset_models(
        self,
        indices: int | Sequence[int] | Tensor,
        configs: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Zero these models' optimizer state (moments, step counts) in place.

        Args:
            indices: model indices (or an `[N]` bool mask).
            configs: optional new hyperparameters, one dict per index, merged
                over the optimizer's base config.
        """
        owner = f"{type(self).__name__}.reset_models"
        idx = model_indices(owner, indices, self.num_models, "cpu")
        if configs is not None:
            if len(configs) != len(idx):
                raise ValueError(
                    f"{owner}: got {len(configs)} configs for {len(idx)} models; "
                    "pass one config per index."
                )
            full = [{**self._base_config, **dict(cfg)} for cfg in configs]
            unknown = sorted(
                {k for cfg in full for k in cfg}
                - set(self.specs)
                - set(self.shared)
                - {*IGNORED_OPTIONS, "differentiable"}
            )
            if unknown:
                raise ValueError(
                    f"{owner}: unknown keys {unknown}; accepted keys are {sorted(self.specs)}."
                )
            self._assign(owner, idx, build_hparams(owner, self.specs, full, what="config"))
        with torch.no_grad():
            for group in self.param_groups:
                dev_idx = idx.to(group["step"].device)
                group["step"][:, dev_idx] = 0
                k = len(group["params"])
                for (_name, init), table in zip(self.rule.scalars, group["scalars"].values()):
                    table[:, dev_idx] = self._scalar_init(init, group["hparams"], k)[:, dev_idx]
                for p in group["params"]:
                    for key, value in self.state.get(p, {}).items():
                        at = dev_idx.to(value.device)
                        value[at] = self._state_init(key, group, p)[at]

    # ------------------------------------------------------------------ state

    def _state_init(self, key: str, group: Mapping[str, Any], p: Tensor) -> Tensor:
        """A fresh state tensor for `key`, shaped (and strided) like `p`."""
        source = self.rule.init.get(key)
        if source is None:
            return torch.zeros_like(p, memory_format=torch.preserve_format)
        init = group["hparams"][source].to(p.device, torch.float64)
        if source == "lr":
            # Created at the parameter's first step, with that step's lr (as torch does).
            init = init * group["lr"].to(p.device)
        init = init.to(p.dtype)
        out = torch.empty_like(p, memory_format=torch.preserve_format)
        return out.copy_(per_model(init, p.dim()).expand_as(p))

    def _state_for(self, group: Mapping[str, Any], p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        for key in self.rule.state:
            if not group["structure"].get(key, True):
                continue
            t = state.get(key)
            if t is None:
                state[key] = self._state_init(key, group, p)
            elif t.stride() != p.stride() and t.shape == p.shape:
                # The parameter moved to its gradient's layout; its state follows once.
                state[key] = restrided(t, p.stride())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; hyperparameters and step tables are copied into the live tensors."""
        name = type(self).__name__
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            hp, got = group["hparams"], saved.get("hparams", {})
            if set(got) != set(hp) or any(tuple(got[k].shape) != tuple(hp[k].shape) for k in hp):
                raise ValueError(
                    f"{name}.load_state_dict: the saved hyperparameters "
                    f"{ {k: tuple(v.shape) for k, v in got.items()} } do not match this "
                    f"optimizer's { {k: tuple(v.shape) for k, v in hp.items()} }; load a state "
                    "dict of the same optimizer class and number of models."
                )
            saved_step = saved.get("step")
            if not isinstance(saved_step, Tensor) or saved_step.shape != group["step"].shape:
                raise ValueError(
                    f"{name}.load_state_dict: the saved step table has shape "
                    f"{tuple(saved_step.shape) if isinstance(saved_step, Tensor) else saved_step!r}, "
                    f"expected {tuple(group['step'].shape)} [parameters, models]; load a state "
                    "dict of the same optimizer over the same models."
                )
        live = [(g["hparams"], g["step"], g["scalars"], g["lr"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for group, (hp, step, scalars, lr) in zip(self.param_groups, live):
                for k, t in hp.items():
                    t.copy_(group["hparams"][k])
                step.copy_(group["step"])
                for k, t in scalars.items():
                    t.copy_(group["scalars"][k])
                lr.copy_(torch.as_tensor(group["lr"], dtype=lr.dtype))
                group["hparams"], group["step"], group["scalars"], group["lr"] = (
                    hp,
                    step,
                    scalars,
                    lr,
                )

    # ------------------------------------------------------------------ low precision

    @torch.no_grad()
    def low_precision_copies(
        self, dtype: torch.dtype, params: Iterable[Tensor] | None = None
    ) -> dict[Tensor, Tensor]:
        """bf16/fp16 parameter copies, for a forward under autocast without weight casts.

        Each copy is a leaf `[N, *shape]` that requires grad, laid out like its
        parameter. A forward that reads the copies (`ModelBatch.forward(...,
        weights=...)`) leaves its gradients on them; `step()` reads those
        low-precision gradients directly, updates the float32 parameters and
        writes the copies in the same kernel: no per-step cast of any weight
        or gradient. A parameter changed in place outside `step()` (a load, a
        replaced model) is copied again by `refresh_low_precision()`.

        Args:
            dtype: `torch.bfloat16` or `torch.float16`.
            params: the parameters to copy (of those this optimizer holds; others
                are ignored); default every one. A parameter without a copy keeps
                its float32 gradient and update.

        Returns:
            `{parameter: copy}`; the same copies on every call with the same
            dtype and parameters.
        """
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"{type(self).__name__}.low_precision_copies: dtype must be torch.bfloat16 or "
                f"torch.float16, got {dtype}."
            )
        held = [p for group in self.param_groups for p in group["params"]]
        if params is not None:
            wanted = {id(p) for p in params}
            held = [p for p in held if id(p) in wanted]
        existing = next(iter(self.low_precision.values()), None)
        if (
            existing is not None
            and existing.dtype == dtype
            and [id(p) for p in self.low_precision] == [id(p) for p in held]
        ):
            return self.low_precision
        self.low_precision = {}
        for p in held:
            copy = torch.empty_like(p, dtype=dtype).copy_(p)
            self.low_precision[p] = copy.requires_grad_()
        self._low_versions = {p: p._version for p in self.low_precision}
        return self.low_precision

    @torch.no_grad()
    def refresh_low_precision(self) -> None:
        """Copy again every parameter changed in place since its copy was written (host-side check)."""
        for p, copy in self.low_precision.items():
            if copy.stride() != p.stride():
                copy.data = restrided(p, p.stride(), copy.dtype)
                self._low_versions[p] = p._version
            elif p._version != self._low_versions.get(p):
                copy.copy_(p)
                self._low_versions[p] = p._version

    def gradients(self) -> list[Tensor]:
        """Every parameter's current gradient (its low-precision copy's, where it has one)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                g = self._grad(p)
                if g is not None:
                    out.append(g)
        return out

    def _grad(self, p: Tensor) -> Tensor | None:
        if p.grad is not None:
            return p.grad
        copy = self.low_precision.get(p)
        return None if copy is None else copy.grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for copy in self.low_precision.values():
            if copy.grad is not None:
                if set_to_none:
                    copy.grad = None
                else:
                    copy.grad.zero_()

    # ------------------------------------------------------------------ step

    def _follow_device(self, group: dict[str, Any], device: torch.device) -> None:
        """Move hyperparameters and tables to the parameters' device, in place (after `.to()`)."""
        if not isinstance(group["lr"], Tensor):
            # A float factor set by hand; a tensor is read by a captured step and filled in
            # place by torch's schedulers.
            group["lr"] = torch.tensor(float(group["lr"]), dtype=HPARAM_DTYPE, device=device)
        tensors = [
            *group["hparams"].values(),
            group["step"],
            *group["scalars"].values(),
            group["lr"],
        ]
        for t in tensors:
            if t.device != device:
                t.data = t.data.to(device)
        for p in group["params"]:
            for t in self.state.get(p, {}).values():
                if isinstance(t, Tensor) and t.device != p.device:
                    t.data = t.data.to(p.device)

    @torch.no_grad()
    def step(self, closure: Any = None, *, skip: Tensor | None = None) -> Any:
        """One step of every model in `active & ~skip`; the others stay bitwise unchanged.

        Args:
            closure: re-evaluates the loss (as in torch).
            skip: optional `[N]` bool, True for models that must not update
                this step (e.g. the grad scaler's found-inf flags).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        options = self._rule_options()
        for group in self.param_groups:
            params = group["params"]
            grads = [self._grad(p) for p in params]
            if all(g is None for g in grads):
                continue
            if any(g is not None and g.is_sparse for g in grads):
                raise ValueError(f"{name}: sparse gradients are not supported; use dense ones.")
            device = params[0].device
            self._follow_device(group, device)
            mask = update_mask(name, self._model_batch(), skip, self.num_models, device)
            slots = []
            for row, (p, g) in enumerate(zip(params, grads)):
                if g is None:
                    slots.append(ParamSlot(row, p, None, {}))
                    continue
                state = self._state_for(group, p)
                slots.append(ParamSlot(row, p, g, state, self.low_precision.get(p)))
            run_rule(
                self.rule,
                slots,
                group["hparams"],
                group["lr"],
                group["step"],
                group["scalars"],
                mask,
                options,
                group["structure"],
            )
        for p in self.low_precision:
            # The kernel wrote p without torch's version counter; the copy is current.
            self._low_versions[p] = p._version
        return loss


def _apply_fixed(hparams: Mapping[str, Tensor], fixed: Mapping[str, Any]) -> None:
    """Write a param group's fixed values into every model's entry, in place."""
    for key, value in fixed.items():
        t = hparams[key]
        t.copy_(torch.as_tensor(value, dtype=t.dtype, device=t.device).expand_as(t))


def _first_device(params: list[Any]) -> torch.device:
    for p in params:
        if isinstance(p, Tensor):
            return p.device
        if isinstance(p, Mapping):
            for q in p["params"]:
                return q.device
    return torch.device("cpu")


_FLOAT = HParam("float")
_BOOL = HParam("bool")
_PAIR = HParam("pair")

_BETAS = Rule(
    ("betas",),
    "0 <= beta < 1 for both betas",
    lambda h: ((h["betas"] >= 0) & (h["betas"] < 1)).all(dim=1),
)


class BatchAdam(BatchOptimizer):
    """Adam (amsgrad, maximize, optionally decoupled weight decay) with per-model hyperparameters.

    Per model: `lr`, `betas` (`[N, 2]`), `eps`, `weight_decay`, `amsgrad`,
    `maximize`. Shared: `decoupled_weight_decay`. Numerically equal to
    `torch.optim.Adam` run on each model alone.
    """

    rule = RULES["Adam"]
    torch_cls: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "betas": _PAIR, "eps": _FLOAT, "weight_decay": _FLOAT,
        "amsgrad": _BOOL, "maximize": _BOOL,
    }  # fmt: skip
    rules = (_nonneg("lr"), _nonneg("eps"), _BETAS, _nonneg("weight_decay"))
    shared: ClassVar[tuple[str, ...]] = ("decoupled_weight_decay",)

    @property
    def decoupled(self) -> bool:
        return bool(self.options.get("decoupled_weight_decay", False))


class BatchAdamW(BatchAdam):
    """AdamW (decoupled weight decay) with per-model hyperparameters; see `BatchAdam`."""

    torch_cls = torch.optim.AdamW
    shared = ()

    def _rule_options(self) -> dict[str, bool]:
        return {"decoupled": True}


class BatchSGD(BatchOptimizer):
    """SGD (momentum, dampening, nesterov, weight decay, maximize) with per-model hyperparameters."""

    rule = RULES["SGD"]
    torch_cls = torch.optim.SGD
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "momentum": _FLOAT, "dampening": _FLOAT, "weight_decay": _FLOAT,
        "nesterov": _BOOL, "maximize": _BOOL,
    }  # fmt: skip
    rules = (
        _nonneg("lr"),
        _nonneg("momentum"),
        _nonneg("weight_decay"),
        Rule(("dampening",), "0 <= dampening <= 1",
             lambda h: (h["dampening"] >= 0) & (h["dampening"] <= 1)),
        Rule(("nesterov", "momentum", "dampening"), "momentum > 0 and dampening = 0 with nesterov",
             lambda h: ~h["nesterov"] | ((h["momentum"] > 0) & (h["dampening"] == 0))),
    )  # fmt: skip


class BatchRMSprop(BatchOptimizer):
    """RMSprop (centered, momentum, weight decay, maximize) with per-model hyperparameters."""

    rule = RULES["RMSprop"]
    torch_cls = torch.optim.RMSprop
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "alpha": _FLOAT, "eps": _FLOAT, "weight_decay": _FLOAT,
        "momentum": _FLOAT, "centered": _BOOL, "maximize": _BOOL,
    }  # fmt: skip
    rules = tuple(_nonneg(k) for k in ("lr", "eps", "momentum", "weight_decay", "alpha"))


class BatchAdagrad(BatchOptimizer):
    """Adagrad (lr decay, initial accumulator, weight decay, maximize) with per-model hyperparameters."""

    rule = RULES["Adagrad"]
    torch_cls = torch.optim.Adagrad
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "lr_decay": _FLOAT, "weight_decay": _FLOAT,
        "initial_accumulator_value": _FLOAT, "eps": _FLOAT, "maximize": _BOOL,
    }  # fmt: skip
    rules = tuple(
        _nonneg(k) for k in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    )


class BatchAdamax(BatchOptimizer):
    """Adamax (infinity-norm Adam) with per-model hyperparameters."""

    rule = RULES["Adamax"]
    torch_cls = torch.optim.Adamax
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "betas": _PAIR, "eps": _FLOAT, "weight_decay": _FLOAT, "maximize": _BOOL,
    }  # fmt: skip
    rules = (_nonneg("lr"), _nonneg("eps"), _BETAS, _nonneg("weight_decay"))


class BatchNAdam(BatchOptimizer):
    """NAdam (Nesterov Adam, optionally decoupled weight decay) with per-model hyperparameters."""

    rule = RULES["NAdam"]
    torch_cls = torch.optim.NAdam
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "betas": _PAIR, "eps": _FLOAT, "weight_decay": _FLOAT,
        "momentum_decay": _FLOAT, "maximize": _BOOL,
    }  # fmt: skip
    rules = (
        _nonneg("lr"),
        _nonneg("eps"),
        _BETAS,
        _nonneg("weight_decay"),
        _nonneg("momentum_decay"),
    )
    shared: ClassVar[tuple[str, ...]] = ("decoupled_weight_decay",)


class BatchRAdam(BatchOptimizer):
    """RAdam (rectified Adam, optionally decoupled weight decay) with per-model hyperparameters."""

    rule = RULES["RAdam"]
    torch_cls = torch.optim.RAdam
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "betas": _PAIR, "eps": _FLOAT, "weight_decay": _FLOAT, "maximize": _BOOL,
    }  # fmt: skip
    rules = (_nonneg("lr"), _nonneg("eps"), _BETAS, _nonneg("weight_decay"))
    shared: ClassVar[tuple[str, ...]] = ("decoupled_weight_decay",)


class BatchAdadelta(BatchOptimizer):
    """Adadelta with per-model hyperparameters."""

    rule = RULES["Adadelta"]
    torch_cls = torch.optim.Adadelta
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "rho": _FLOAT, "eps": _FLOAT, "weight_decay": _FLOAT, "maximize": _BOOL,
    }  # fmt: skip
    rules = (
        _nonneg("lr"),
        _nonneg("eps"),
        _nonneg("weight_decay"),
        Rule(("rho",), "0 <= rho <= 1", lambda h: (h["rho"] >= 0) & (h["rho"] <= 1)),
    )


class BatchASGD(BatchOptimizer):
    """ASGD (averaged SGD) with per-model hyperparameters; the average is `state["ax"]`."""

    rule = RULES["ASGD"]
    torch_cls = torch.optim.ASGD
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "lambd": _FLOAT, "alpha": _FLOAT, "t0": _FLOAT, "weight_decay": _FLOAT,
        "maximize": _BOOL,
    }  # fmt: skip
    rules = (_nonneg("lr"), _nonneg("lambd"), _nonneg("weight_decay"))


class BatchRprop(BatchOptimizer):
    """Rprop with per-model hyperparameters (`lr` is each model's initial step size)."""

    rule = RULES["Rprop"]
    torch_cls = torch.optim.Rprop
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "etas": _PAIR, "step_sizes": _PAIR, "maximize": _BOOL,
    }  # fmt: skip
    rules = (
        _nonneg("lr"),
        Rule(("etas",), "0 < etaminus < 1 < etaplus",
             lambda h: (h["etas"][:, 0] > 0) & (h["etas"][:, 0] < 1) & (h["etas"][:, 1] > 1)),
        Rule(("step_sizes",), "0 <= step_size_min <= step_size_max",
             lambda h: (h["step_sizes"][:, 0] >= 0) & (h["step_sizes"][:, 0] <= h["step_sizes"][:, 1])),
    )  # fmt: skip


#: the vectorized twin of every elementwise torch optimizer.
BATCH_CLASSES: dict[type[torch.optim.Optimizer], type[BatchOptimizer]] = {
    c.torch_cls: c
    for c in (BatchSGD, BatchAdam, BatchAdamW, BatchRMSprop, BatchAdagrad, BatchAdamax,
              BatchNAdam, BatchRAdam, BatchAdadelta, BatchASGD, BatchRprop)
}  # fmt: skip
