"""MixedOptimizer: the optimizers of a MixedBatch behind one interface with global model indices.

Today every group of a MixedBatch gets its own optimizer from
`OptimizerFactory`; `_create` and `MixedOptimizer.step` are the only places
that build and step them, so that one optimizer over every group's stacked
tensors can take their place without touching anything else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._indices import model_indices

__all__ = ["MixedOptimizer"]


def _create(
    mixed: Any,
    optimizer_cls: type[torch.optim.Optimizer],
    configs: Sequence[Mapping[str, Any]],
    base_config: Mapping[str, Any] | None,
) -> list[torch.optim.Optimizer]:
    """One optimizer per group, each model with its own config (the only place they are built)."""
    from .optim import OptimizerFactory

    factory = OptimizerFactory(optimizer_cls, base_config)
    return [
        factory.create_optimizer(mb, [configs[i] for i in mixed.members(g).tolist()])
        for g, mb in enumerate(mixed.groups)
    ]


class MixedOptimizer:
    """Per-model optimizers over every group of a `MixedBatch`, indexed by global model id.

    Args:
        mixed: the MixedBatch.
        optimizer_cls: a `torch.optim` class (as for `OptimizerFactory`).
        configs: N dicts, one per model in the user's order, merged over
            `base_config` (None: every model uses `base_config`).
        base_config: hyperparameters shared by all models.

    Example:
        >>> opt = MixedOptimizer(mb, torch.optim.Adam, [{"lr": 1e-3}] * mb.num_models)
        >>> opt.hparams["lr"].shape
        torch.Size([N])
    """

    def __init__(
        self,
        mixed: Any,
        optimizer_cls: type[torch.optim.Optimizer],
        configs: Sequence[Mapping[str, Any]] | None = None,
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        n = mixed.num_models
        configs = [{} for _ in range(n)] if configs is None else [dict(c) for c in configs]
        if len(configs) != n:
            raise ValueError(
                f"MixedOptimizer: got {len(configs)} configs for N={n} models; pass one dict "
                "per model, in the order the models were given."
            )
        self.mixed = mixed
        self.num_models = n
        self.optimizers: list[Any] = _create(mixed, optimizer_cls, configs, base_config)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every group optimizer's param groups (torch LR schedulers drive their `lr`)."""
        return [pg for opt in self.optimizers for pg in opt.param_groups]

    def step(self, *, skip: Tensor | None = None) -> None:
        """One step of every model in `active & ~skip` (`skip`: `[N]` bool, global order)."""
        if skip is not None and tuple(skip.shape) != (self.num_models,):
            raise ValueError(
                f"MixedOptimizer.step: skip must be [N={self.num_models}] bool, got shape "
                f"{tuple(skip.shape)}; pass one flag per model."
            )
        for g, opt in enumerate(self.optimizers):
            if skip is None:
                opt.step()
            else:
                opt.step(skip=skip[self.mixed.members(g)])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    @property
    def hparams(self) -> dict[str, Tensor]:
        """Every model's hyperparameters, `{name: [N]}` in the user's order.

        A gathered copy: writing into it changes nothing; use `set_hparams`.
        """
        order = self.mixed._order
        merged = {}
        for k in self.optimizers[0].hparams:
            cat = torch.cat([opt.hparams[k] for opt in self.optimizers])
            merged[k] = cat[order.to(cat.device)]
        return merged

    def _local(self, owner: str, indices: Any) -> list[Tensor]:
        return [m.nonzero().reshape(-1).cpu() for m in self.mixed._split(owner, indices)]

    def set_hparams(self, indices: int | Sequence[int] | Tensor, **values: Any) -> None:
        """Set hyperparameters of some models (global indices), validated."""
        for opt, local in zip(self.optimizers, self._local("MixedOptimizer.set_hparams", indices)):
            if len(local):
                opt.set_hparams(local, **values)

    def reset_models(
        self,
        indices: int | Sequence[int] | Tensor,
        configs: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Zero these models' optimizer state (and optionally set their configs, one per index)."""
        owner = "MixedOptimizer.reset_models"
        idx = self.mixed._split(owner, indices)
        order = model_indices(owner, indices, self.num_models, "cpu").tolist()
        if configs is not None and len(configs) != len(order):
            raise ValueError(
                f"{owner}: got {len(configs)} configs for {len(order)} models; pass one "
                "config per index."
            )
        for g, (opt, local) in enumerate(zip(self.optimizers, idx)):
            chosen = local.nonzero().reshape(-1).cpu()
            if not len(chosen):
                continue
            sub = None
            if configs is not None:
                globals_ = self.mixed.members(g)[chosen].tolist()
                sub = [configs[order.index(i)] for i in globals_]
            opt.reset_models(chosen, sub)

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        saved = state_dict.get("groups", [])
        if len(saved) != len(self.optimizers):
            raise ValueError(
                f"MixedOptimizer.load_state_dict: the state has {len(saved)} groups, this "
                f"optimizer {len(self.optimizers)}; load a state saved from a MixedBatch built "
                "from the same models and max_waste."
            )
        for opt, state in zip(self.optimizers, saved):
            opt.load_state_dict(state)
