"""OptimizerFactory: one optimizer over a ModelBatch's stacked parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._hparams import per_model
from ._optimizers import (
    BatchAdagrad,
    BatchAdam,
    BatchAdamW,
    BatchOptimizer,
    BatchRMSprop,
    BatchSGD,
    update_mask,
)

__all__ = ["OptimizerFactory", "VECTORIZED", "ELEMENTWISE", "NOT_SEPARABLE"]

#: torch classes with a vectorized twin that takes per-model hyperparameters.
VECTORIZED: dict[type[torch.optim.Optimizer], type[BatchOptimizer]] = {
    torch.optim.SGD: BatchSGD,
    torch.optim.Adam: BatchAdam,
    torch.optim.AdamW: BatchAdamW,
    torch.optim.RMSprop: BatchRMSprop,
    torch.optim.Adagrad: BatchAdagrad,
}

#: torch classes whose update is elementwise (per-tensor state is scalar or
#: shaped like the parameter): run as they are over the stacked tensors when
#: every model shares their hyperparameters.
ELEMENTWISE: tuple[type[torch.optim.Optimizer], ...] = tuple(
    getattr(torch.optim, name)
    for name in ("Adamax", "NAdam", "RAdam", "ASGD", "Adadelta", "Rprop")
    if hasattr(torch.optim, name)
)

#: classes that are not separable over a stacked tensor, and why.
NOT_SEPARABLE: dict[str, str] = {
    "LBFGS": "its line search and curvature history use dot products and norms over all "
    "parameters at once, so one step would mix the models",
    "Adafactor": "it factors second moments over a tensor's last two dims and scales updates "
    "by the RMS of the whole tensor, so a stacked tensor would mix the models",
    "Muon": "it orthogonalizes each whole 2-D update matrix, which a stacked [N, out, in] "
    "tensor is not",
    "SparseAdam": "it needs sparse gradients and stacked parameters get dense ones (use Adam)",
}


def _names(classes: Any) -> str:
    return ", ".join(f"torch.optim.{c.__name__}" for c in classes)


class OptimizerFactory:
    """Builds one optimizer over a ModelBatch, with one hyperparameter config per model.

    SGD, Adam, AdamW, RMSprop and Adagrad get vectorized implementations whose
    hyperparameters may differ in every key per model. Other elementwise torch
    optimizers (Adamax, NAdam, RAdam, ASGD, Adadelta, Rprop) run as they are over
    the stacked tensors when every model shares their hyperparameters.

    Args:
        optimizer_cls: a `torch.optim` class (or a `modelbatch.optim.Batch*` class).
        base_config: hyperparameters shared by all models; each model's
            config is merged over it.

    Example:
        >>> factory = OptimizerFactory(torch.optim.Adam, {"weight_decay": 1e-4})
        >>> opt = factory.create_optimizer(mb, [{"lr": 10.0 ** -k} for k in range(mb.num_models)])
        >>> opt.hparams["lr"].shape
        torch.Size([N])
    """

    def __init__(
        self,
        optimizer_cls: type[torch.optim.Optimizer],
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not (
            isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
        ):
            raise TypeError(
                f"OptimizerFactory: expected a torch.optim.Optimizer class, got "
                f"{optimizer_cls!r}; pass e.g. torch.optim.Adam (the class, not an instance)."
            )
        name = optimizer_cls.__name__
        supported = _names(VECTORIZED)
        if name in NOT_SEPARABLE and getattr(torch.optim, name, None) is optimizer_cls:
            raise ValueError(
                f"OptimizerFactory: torch.optim.{name} is not supported: "
                f"{NOT_SEPARABLE[name]}. Use one of {supported}."
            )
        if not (
            issubclass(optimizer_cls, BatchOptimizer)
            or optimizer_cls in VECTORIZED
            or optimizer_cls in ELEMENTWISE
        ):
            raise ValueError(
                f"OptimizerFactory: cannot tell whether {name} updates each element on its own "
                f"(separable over the stacked model axis). Use one of {supported} (per-model "
                f"hyperparameters) or {_names(ELEMENTWISE)} (shared hyperparameters)."
            )
        self.optimizer_cls = optimizer_cls
        self.base_config = dict(base_config or {})

    def create_optimizer(
        self, model_batch: Any, configs: Sequence[Mapping[str, Any]] | None = None
    ) -> torch.optim.Optimizer:
        """One optimizer over `model_batch`'s stacked parameters.

        Args:
            model_batch: the ModelBatch; its `active` mask is honoured at every step.
            configs: N dicts, one per model, merged over `base_config`
                (None: every model uses `base_config`).

        Returns:
            A `BatchOptimizer` (per-model `hparams`) or, for the elementwise
            fallback classes, the torch class itself honouring the mask.
        """
        n = model_batch.num_models
        configs = [{} for _ in range(n)] if configs is None else [dict(c) for c in configs]
        if len(configs) != n:
            raise ValueError(
                f"OptimizerFactory.create_optimizer: got {len(configs)} configs for "
                f"N={n} models; pass one dict per model."
            )
        cls = self.optimizer_cls
        params = list(model_batch.parameters())
        batch_cls = cls if issubclass(cls, BatchOptimizer) else VECTORIZED.get(cls)
        if batch_cls is not None:
            try:
                return batch_cls(
                    params, configs, model_batch=model_batch, base_config=self.base_config
                )
            except (ValueError, TypeError) as error:
                # Re-raise at the public entry, under the name the user called.
                prefix = f"{batch_cls.__name__}: "
                if str(error).startswith(prefix):
                    message = "OptimizerFactory: " + str(error)[len(prefix) :]
                    raise type(error)(message) from None
                raise
        full = [{**self.base_config, **c} for c in configs]
        for i, cfg in enumerate(full):
            if cfg != full[0]:
                keys = sorted(k for k in set(cfg) | set(full[0]) if cfg.get(k) != full[0].get(k))
                raise ValueError(
                    f"OptimizerFactory: config {i} differs from config 0 in {keys}, but "
                    f"torch.optim.{cls.__name__} runs with one set of hyperparameters for all "
                    f"models. Per-model values need one of {_names(VECTORIZED)}; or give every "
                    "model the same values (use base_config)."
                )
        return _masked_class(cls)(params, full[0], model_batch=model_batch, num_models=n)


class _MaskedTorchOptimizer:
    """Mixin that runs an elementwise torch optimizer over stacked tensors, honouring the mask.

    The torch class updates every model; afterwards the models outside
    `active & ~skip` get their parameters and per-model state restored from a
    snapshot, so they are bitwise unchanged. Scalar state (step counts of
    NAdam, RAdam, ASGD ...) is shared by all models and does advance.
    """

    def __init__(
        self, params: Any, config: Mapping[str, Any], *, model_batch: Any, num_models: int
    ) -> None:
        self.num_models = num_models
        self._model_batch = model_batch
        super().__init__(params, **config)  # type: ignore[call-arg]

    def _per_model(self, t: Any, p: Tensor) -> bool:
        return isinstance(t, Tensor) and t.shape == p.shape

    @torch.no_grad()
    def step(self, closure: Any = None, *, skip: Tensor | None = None) -> Any:
        name = type(self).__name__
        params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
        state = self.state  # type: ignore[attr-defined]
        device = params[0].device if params else torch.device("cpu")
        mask = update_mask(name, self._model_batch, skip, self.num_models, device)
        saved = {
            p: (p.clone(), {k: v.clone() for k, v in state[p].items() if self._per_model(v, p)})
            for p in params
        }
        loss = self._torch_step(closure)
        for p, (p_old, state_old) in saved.items():
            keep = per_model(~mask, p.dim())
            p.copy_(torch.where(keep, p_old, p))
            for k, v in state[p].items():
                if self._per_model(v, p):
                    old = state_old.get(k)
                    if old is None:  # created by this step: a held model keeps the fresh value
                        old = self._fresh(k, p)
                    v.copy_(torch.where(keep, old, v))
        return loss

    def _torch_step(self, closure: Any) -> Any:
        # The torch class's own step. Torch patches a class's step with a hook
        # wrapper once an instance exists; that layer is skipped here because
        # the hooks already run around this (patched) step.
        mro = type(self).__mro__
        start = mro.index(_MaskedTorchOptimizer) + 1
        fn = next(c.__dict__["step"] for c in mro[start:] if "step" in c.__dict__)
        if getattr(fn, "hooked", False):
            fn = fn.__wrapped__
        return fn(self, closure)

    def _fresh(self, key: str, p: Tensor) -> Tensor:
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))  # type: ignore[attr-defined]
        if isinstance(self, getattr(torch.optim, "Rprop", ())) and key == "step_size":
            return torch.full_like(p, float(group["lr"]))
        return torch.zeros_like(p)

    def reset_models(self, indices: Any, configs: Any = None) -> None:
        raise ValueError(
            f"{type(self).__name__}.reset_models: the torch fallback shares scalar state "
            f"(step counts) across models, so one model cannot be reset; use one of "
            f"{_names(VECTORIZED)}."
        )


_MASKED_CLASSES: dict[type, type] = {}


def _masked_class(cls: type[torch.optim.Optimizer]) -> type:
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"Batch{cls.__name__}", (_MaskedTorchOptimizer, cls), {})
    return _MASKED_CLASSES[cls]
