"""Vectorized optimizers over stacked parameters, with per-model hyperparameters.

Thin `torch.optim.Optimizer` shells around the pure math in `_functional.py`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._indices import model_indices
from . import _functional as F
from ._hparams import HPARAM_DTYPE, HParam, Rule, build_hparams, check_rules, per_model

__all__ = [
    "BatchOptimizer",
    "BatchSGD",
    "BatchAdam",
    "BatchAdamW",
    "BatchRMSprop",
    "BatchAdagrad",
    "update_mask",
]

#: Options torch optimizers take that choose an implementation, not the math:
#: accepted and ignored (the vectorized implementation is always used).
IGNORED_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


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


class BatchOptimizer(torch.optim.Optimizer):
    """Base of the vectorized optimizers: N models' hyperparameters as `[N]` tensors.

    Every param group holds `group["hparams"]` (`{name: [N] tensor}`, `betas`
    as `[N, 2]`, flags as `[N]` bool), `group["step"]` (per-model step counts,
    `[N]`) and `group["lr"]`, a float factor (1.0 at creation) that multiplies
    every model's own lr: torch LR schedulers drive it.

    Args:
        params: stacked parameters `[N, *shape]` (or param groups of them).
        configs: N dicts of hyperparameters, one per model, merged over
            `base_config` and the torch class's defaults.
        model_batch: the ModelBatch whose `active` mask `step()` honours
            (read at every step); None updates every model.
        base_config: hyperparameters shared by all models.
        compile: run each parameter's update as one `torch.compile`d kernel
            (same math, one pass over memory instead of about eight; the
            first step compiles, a few seconds per parameter rank).

    Warning:
        Writing `hparams` tensors directly is not validated; `set_hparams`
        is. Buffers a flag needs (amsgrad, momentum, centered) exist only if
        some model had the flag on at creation.
    """

    torch_cls: ClassVar[type[torch.optim.Optimizer]]
    specs: ClassVar[dict[str, HParam]]
    rules: ClassVar[tuple[Rule, ...]]
    #: options that must be equal for every model (they choose the math).
    shared: ClassVar[tuple[str, ...]] = ()
    #: how many parameter-sized scratch tensors one update overwrites.
    scratch_count: ClassVar[int] = 1

    def __init__(
        self,
        params: Iterable[Any],
        configs: Sequence[Mapping[str, Any]],
        *,
        model_batch: Any = None,
        base_config: Mapping[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        name = type(self).__name__
        base = {**self.default_config(), **dict(base_config or {})}
        configs = [dict(cfg) for cfg in configs]
        if not configs:
            raise ValueError(f"{name}: expected one config per model, got none.")
        accepted = sorted([*self.specs, *self.shared, *IGNORED_OPTIONS])
        for i, cfg in enumerate([base, *configs]):
            unknown = sorted(set(cfg) - set(accepted))
            if unknown:
                where = "base_config" if i == 0 else f"config {i - 1}"
                raise ValueError(
                    f"{name}: {where} has unknown keys {unknown}; accepted keys are {accepted}."
                )
        full = [{**base, **cfg} for cfg in configs]
        if any(cfg.get("differentiable") for cfg in full):
            raise ValueError(f"{name}: differentiable=True is not supported; drop it.")
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
        self._model_batch = model_batch
        # Scratch tensors per parameter, reused every step; not optimizer state.
        self._scratch: dict[Tensor, list[Tensor]] = {}
        self.compiled = bool(compile)
        self._update_fn: Any = None
        device = _first_device(param_list)
        self._new_hparams = build_hparams(name, self.specs, full, device)
        check_rules(name, self.rules, self._new_hparams)
        super().__init__(param_list, {"lr": 1.0})
        del self._new_hparams

    # ------------------------------------------------------------------ construction

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """The torch class's defaults for the keys this optimizer accepts."""
        sig = inspect.signature(cls.torch_cls.__init__).parameters
        keys = [*cls.specs, *cls.shared]
        return {k: sig[k].default for k in keys if k in sig}

    @classmethod
    def structure(cls, hparams: Mapping[str, Tensor]) -> dict[str, bool]:
        """Which optional state buffers the models need (e.g. `{"amsgrad": True}`)."""
        return {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        n = self.num_models
        for p in param_group["params"] if isinstance(param_group["params"], list) else []:
            if p.dim() == 0 or p.shape[0] != n:
                raise ValueError(
                    f"{name}: expected stacked parameters [N={n}, ...], got shape "
                    f"{tuple(p.shape)}; pass ModelBatch parameters, one config per model."
                )
        hp = getattr(self, "_new_hparams", None)
        if hp is None:
            hp = self.param_groups[0]["hparams"]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["hparams"] = {k: t.clone() for k, t in hp.items()}
        group["step"] = torch.zeros(n, dtype=HPARAM_DTYPE, device=hp["lr"].device)
        group["structure"] = self.structure(hp)

    # ------------------------------------------------------------------ hyperparameters

    @property
    def hparams(self) -> dict[str, Tensor]:
        """Param group 0's per-model hyperparameters, `{name: [N]}` (`betas`: `[N, 2]`).

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
            check_rules(owner, self.rules, candidate, what="model")
            wanted = self.structure(candidate)
            missing = [k for k, on in wanted.items() if on and not group["structure"].get(k)]
            if missing:
                raise ValueError(
                    f"{owner}: this optimizer was created without the state {missing[0]} "
                    f"needs (no model used it at creation); create the optimizer with "
                    f"{missing[0]} enabled for at least one model."
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
                - set(IGNORED_OPTIONS)
            )
            if unknown:
                raise ValueError(
                    f"{owner}: unknown keys {unknown}; accepted keys are {sorted(self.specs)}."
                )
            self._assign(owner, idx, build_hparams(owner, self.specs, full, what="config"))
        for group in self.param_groups:
            dev_idx = idx.to(group["step"].device)
            group["step"][dev_idx] = 0
            for p in group["params"]:
                for key, value in self.state.get(p, {}).items():
                    at = dev_idx.to(value.device)
                    value[at] = self._state_init(key, group, p)[at]

    # ------------------------------------------------------------------ state

    def _state_keys(self, group: Mapping[str, Any]) -> list[str]:
        raise NotImplementedError

    def _state_init(self, key: str, group: Mapping[str, Any], p: Tensor) -> Tensor:
        """A fresh state tensor for `key`, shaped like `p` (zeros unless overridden)."""
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; hyperparameters and step counts are copied into the live tensors."""
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
        live = [(g["hparams"], g["step"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for group, (hp, step) in zip(self.param_groups, live):
                for k, t in hp.items():
                    t.copy_(group["hparams"][k])
                step.copy_(group["step"])
                group["hparams"], group["step"] = hp, step

    # ------------------------------------------------------------------ step

    def _follow_device(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Move hyperparameters and state to the parameters' device, in place (after `.to()`)."""
        device = params[0].device
        if group["step"].device != device:
            for t in [*group["hparams"].values(), group["step"]]:
                t.data = t.data.to(device)
        for p in params:
            for t in self.state.get(p, {}).values():
                if isinstance(t, Tensor) and t.device != p.device:
                    t.data = t.data.to(p.device)

    def _coefficients(self, group: dict[str, Any], mask: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _kernel(self) -> Callable[..., None]:
        """The update of one parameter: `fn(param, grad, state, c, scratch)` (see `_functional`)."""
        raise NotImplementedError

    def _update(self) -> Callable[..., None]:
        if self._update_fn is None:
            fn = self._kernel()
            # dynamic=True: one graph per parameter rank, not one per shape.
            self._update_fn = torch.compile(fn, dynamic=True) if self.compiled else fn
        return self._update_fn

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
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise ValueError(f"{name}: sparse gradients are not supported.")
            self._follow_device(group, params)
            mask = update_mask(name, self._model_batch, skip, self.num_models, params[0].device)
            coefficients = self._coefficients(group, mask)
            update = self._update()
            by_dtype: dict[torch.dtype, dict[str, Tensor]] = {}
            for p in params:
                state = self.state[p]
                if not state:
                    for key in self._state_keys(group):
                        state[key] = self._state_init(key, group, p)
                c = by_dtype.get(p.dtype)
                if c is None:
                    c = by_dtype[p.dtype] = _cast(coefficients, p.dtype)
                if self.compiled:
                    # Inside one compiled kernel temporaries cost nothing; a scratch
                    # buffer would be an output the kernel must write.
                    scratch: list[Tensor | None] = [None] * self.scratch_count
                else:
                    scratch = _LazyScratch(p, self.scratch_count, self._scratch)  # type: ignore[assignment]
                # A compiled update sees a plain tensor: torch.compile specializes on
                # the shape of each nn.Parameter, but not on that of a detached view.
                update(p.detach() if self.compiled else p, p.grad, state, c, scratch)
        return loss


class _LazyScratch(Sequence):
    """Parameter-sized scratch tensors, allocated on first use and kept for later steps.

    An update that never reads them (the fused update of `compile_step`) costs
    no memory for them.
    """

    def __init__(self, param: Tensor, count: int, cache: dict[Tensor, list[Tensor]]) -> None:
        self._param, self._count, self._cache = param, count, cache

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):  # type: ignore[override]
        buffers = self._cache.get(self._param)
        if buffers is None or buffers[0].device != self._param.device:
            p = self._param
            buffers = self._cache[p] = [torch.empty_like(p) for _ in range(self._count)]
        return buffers[i]


def _cast(coefficients: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The `[N]` float coefficients in `dtype`, cast in one op (stacked) rather than one each."""
    floats = [k for k, v in coefficients.items() if v.is_floating_point()]
    packed = torch.stack([coefficients[k] for k in floats]).to(dtype)
    return {**coefficients, **dict(zip(floats, packed.unbind(0)))}


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


class BatchAdam(BatchOptimizer):
    """Adam (optionally amsgrad, maximize, decoupled weight decay) with per-model hyperparameters.

    Per model: `lr`, `betas` (`[N, 2]`), `eps`, `weight_decay`, `amsgrad`,
    `maximize`. Shared: `decoupled_weight_decay`. Numerically equal to
    `torch.optim.Adam` run on each model alone.
    """

    torch_cls: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "betas": _PAIR, "eps": _FLOAT, "weight_decay": _FLOAT,
        "amsgrad": _BOOL, "maximize": _BOOL,
    }  # fmt: skip
    rules = (
        _nonneg("lr"),
        _nonneg("eps"),
        Rule(("betas",), "0 <= beta < 1 for both betas",
             lambda h: ((h["betas"] >= 0) & (h["betas"] < 1)).all(dim=1)),
        _nonneg("weight_decay"),
    )  # fmt: skip
    shared: ClassVar[tuple[str, ...]] = ("decoupled_weight_decay",)

    @property
    def decoupled(self) -> bool:
        return bool(self.options.get("decoupled_weight_decay", False))

    @classmethod
    def structure(cls, hparams: Mapping[str, Tensor]) -> dict[str, bool]:
        return {"amsgrad": bool(hparams["amsgrad"].any())}

    def _state_keys(self, group: Mapping[str, Any]) -> list[str]:
        keys = ["exp_avg", "exp_avg_sq"]
        return [*keys, "max_exp_avg_sq"] if group["structure"]["amsgrad"] else keys

    def _coefficients(self, group: dict[str, Any], mask: Tensor) -> dict[str, Tensor]:
        return F.adam_coefficients(
            group["hparams"], group["step"], mask, group["lr"], self.decoupled
        )

    def _kernel(self) -> Callable[..., None]:
        return functools.partial(F.adam_update, decoupled=self.decoupled)


class BatchAdamW(BatchAdam):
    """AdamW (decoupled weight decay) with per-model hyperparameters; see `BatchAdam`."""

    torch_cls = torch.optim.AdamW
    shared = ()

    @property
    def decoupled(self) -> bool:
        return True


class BatchSGD(BatchOptimizer):
    """SGD (momentum, dampening, nesterov, weight decay, maximize) with per-model hyperparameters."""

    torch_cls = torch.optim.SGD
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "momentum": _FLOAT, "dampening": _FLOAT, "weight_decay": _FLOAT,
        "nesterov": _BOOL, "maximize": _BOOL,
    }  # fmt: skip
    rules = (
        _nonneg("lr"),
        _nonneg("momentum"),
        _nonneg("weight_decay"),
        Rule(("nesterov", "momentum", "dampening"), "momentum > 0 and dampening = 0 with nesterov",
             lambda h: ~h["nesterov"] | ((h["momentum"] > 0) & (h["dampening"] == 0))),
    )  # fmt: skip

    @classmethod
    def structure(cls, hparams: Mapping[str, Tensor]) -> dict[str, bool]:
        return {"momentum": bool((hparams["momentum"] != 0).any())}

    def _state_keys(self, group: Mapping[str, Any]) -> list[str]:
        return ["momentum_buffer"] if group["structure"]["momentum"] else []

    def _coefficients(self, group: dict[str, Any], mask: Tensor) -> dict[str, Tensor]:
        return F.sgd_coefficients(group["hparams"], group["step"], mask, group["lr"])

    def _kernel(self) -> Callable[..., None]:
        return F.sgd_update


class BatchRMSprop(BatchOptimizer):
    """RMSprop (centered, momentum, weight decay, maximize) with per-model hyperparameters."""

    torch_cls = torch.optim.RMSprop
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "alpha": _FLOAT, "eps": _FLOAT, "weight_decay": _FLOAT,
        "momentum": _FLOAT, "centered": _BOOL, "maximize": _BOOL,
    }  # fmt: skip
    rules = tuple(_nonneg(k) for k in ("lr", "eps", "momentum", "weight_decay", "alpha"))
    scratch_count = 2

    @classmethod
    def structure(cls, hparams: Mapping[str, Tensor]) -> dict[str, bool]:
        return {
            "momentum": bool((hparams["momentum"] != 0).any()),
            "centered": bool(hparams["centered"].any()),
        }

    def _state_keys(self, group: Mapping[str, Any]) -> list[str]:
        keys = ["square_avg"]
        if group["structure"]["centered"]:
            keys.append("grad_avg")
        if group["structure"]["momentum"]:
            keys.append("momentum_buffer")
        return keys

    def _coefficients(self, group: dict[str, Any], mask: Tensor) -> dict[str, Tensor]:
        return F.rmsprop_coefficients(group["hparams"], group["step"], mask, group["lr"])

    def _kernel(self) -> Callable[..., None]:
        return F.rmsprop_update


class BatchAdagrad(BatchOptimizer):
    """Adagrad (lr decay, initial accumulator, weight decay, maximize) with per-model hyperparameters."""

    torch_cls = torch.optim.Adagrad
    specs: ClassVar[dict[str, HParam]] = {
        "lr": _FLOAT, "lr_decay": _FLOAT, "weight_decay": _FLOAT,
        "initial_accumulator_value": _FLOAT, "eps": _FLOAT, "maximize": _BOOL,
    }  # fmt: skip
    rules = tuple(
        _nonneg(k) for k in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    )
    scratch_count = 2

    def _state_keys(self, group: Mapping[str, Any]) -> list[str]:
        return ["sum"]

    def _state_init(self, key: str, group: Mapping[str, Any], p: Tensor) -> Tensor:
        init = group["hparams"]["initial_accumulator_value"].to(p.device, p.dtype)
        return per_model(init, p.dim()).expand_as(p).clone(memory_format=torch.preserve_format)

    def _coefficients(self, group: dict[str, Any], mask: Tensor) -> dict[str, Tensor]:
        return F.adagrad_coefficients(group["hparams"], group["step"], mask, group["lr"])

    def _kernel(self) -> Callable[..., None]:
        return F.adagrad_update
