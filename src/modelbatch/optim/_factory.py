"""OptimizerFactory: one optimizer over a ModelBatch's stacked parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._optimizers import BATCH_CLASSES, BatchOptimizer

__all__ = ["OptimizerFactory", "VECTORIZED", "NOT_SEPARABLE"]

#: every elementwise torch optimizer and its vectorized twin with per-model hyperparameters.
VECTORIZED: dict[type[torch.optim.Optimizer], type[BatchOptimizer]] = dict(BATCH_CLASSES)

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

    Every elementwise torch optimizer (SGD, Adam, AdamW, Adamax, NAdam, RAdam,
    RMSprop, Adagrad, Adadelta, ASGD, Rprop) has a vectorized twin whose
    hyperparameters may differ in every key per model.

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
        if not (issubclass(optimizer_cls, BatchOptimizer) or optimizer_cls in VECTORIZED):
            raise ValueError(
                f"OptimizerFactory: cannot tell whether {name} updates each element on its own "
                f"(separable over the stacked model axis). Use one of {supported}, or a "
                "modelbatch.optim.BatchOptimizer subclass with its own update rule."
            )
        if isinstance(base_config, Mapping):
            base_config = dict(base_config)
        elif base_config is not None:
            raise TypeError(
                f"OptimizerFactory: base_config must be a dict of hyperparameters, got "
                f"{type(base_config).__name__}; pass e.g. {{'weight_decay': 1e-4}}."
            )
        self.optimizer_cls = optimizer_cls
        self.base_config = dict(base_config or {})

    def create_optimizer(
        self, model_batch: Any, configs: Sequence[Mapping[str, Any]] | None = None
    ) -> BatchOptimizer:
        """One optimizer over `model_batch`'s stacked parameters.

        Args:
            model_batch: the ModelBatch; its `active` mask is honoured at every step.
            configs: N dicts, one per model, merged over `base_config`
                (None: every model uses `base_config`).

        Returns:
            A `BatchOptimizer` with per-model `hparams`.
        """
        n = model_batch.num_models
        configs = [{} for _ in range(n)] if configs is None else [dict(c) for c in configs]
        if len(configs) != n:
            raise ValueError(
                f"OptimizerFactory.create_optimizer: got {len(configs)} configs for "
                f"N={n} models; pass one dict per model."
            )
        cls = self.optimizer_cls
        batch_cls = cls if issubclass(cls, BatchOptimizer) else VECTORIZED[cls]
        params = [p for p in model_batch.parameters() if p.requires_grad]
        try:
            return batch_cls(params, configs, model_batch=model_batch, base_config=self.base_config)
        except (ValueError, TypeError) as error:
            # Re-raise at the public entry, under the name the user called.
            prefix = f"{batch_cls.__name__}: "
            if str(error).startswith(prefix):
                message = "OptimizerFactory: " + str(error)[len(prefix) :]
                raise type(error)(message) from None
            raise
