"""PyTorch Lightning integration: a `LightningModule` that trains a whole ModelBatch.

Lightning drives the loop (data, precision, checkpoints, loggers); this module
routes the parts Lightning does globally by default to their per-model
versions:

- `configure_optimizers` builds one vectorized optimizer with a
  hyperparameter set per model (`modelbatch.optim.OptimizerFactory`) and an
  optional schedule.
- `configure_gradient_clipping` clips each model's gradient norm on its own
  (`modelbatch.optim.clip_grad_norm_`), never one norm over all N models.
- `precision="16-mixed"` gets the per-model grad scaler
  (`modelbatch.amp.BatchGradScaler`) in place of torch's global one, so one
  model's overflow skips only that model's step.
- `self.log` receives aggregates over the active models; the per-model table
  goes to the logger: `log_table` where the logger has one (W&B), else one
  scalar series per model under `per_model/` for TensorBoard, and a
  `per_model.csv` in its `log_dir`.

Requires `pip install "torch-modelbatch[lightning]"`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._batch import ModelBatch
from .._metrics import log_tensorboard, write_csv

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision
except ImportError:  # pragma: no cover - exercised only without lightning
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.plugins.precision import (  # type: ignore[no-redef,assignment]
            MixedPrecision,
        )
    except ImportError as exc:
        raise ImportError(
            "modelbatch.integrations.lightning: PyTorch Lightning is not installed; "
            'install it with `pip install "torch-modelbatch[lightning]"` (or `pip install lightning`).'
        ) from exc

__all__ = ["BatchLightningModule", "batch_precision_plugin"]

SchedulerFn = Callable[[torch.optim.Optimizer], Any]


def batch_precision_plugin(
    model_batch: ModelBatch, precision: str = "16-mixed", device: str = "cuda"
) -> MixedPrecision:
    """A Lightning mixed-precision plugin whose grad scaler is per model.

    `BatchLightningModule` installs the per-model scaler by itself when the
    Trainer runs with `precision="16-mixed"`; this plugin is for modules of
    your own or to pick the autocast device explicitly.

    Args:
        model_batch: the batch whose losses the scaler scales.
        precision: `"16-mixed"` (per-model scaler) or `"bf16-mixed"` (no scaler).
        device: the autocast device type, `"cuda"` or `"cpu"`.

    Returns:
        A plugin for `Trainer(plugins=[...])`.

    Example:
        >>> trainer = L.Trainer(plugins=[batch_precision_plugin(mb, "16-mixed")])
    """
    if precision == "bf16-mixed":
        return MixedPrecision("bf16-mixed", device)
    if precision != "16-mixed":
        raise ValueError(
            f"batch_precision_plugin: precision must be '16-mixed' or 'bf16-mixed', got "
            f"{precision!r}; for full precision pass no plugin."
        )
    from ..amp import BatchGradScaler

    # BatchGradScaler has torch GradScaler's interface (duck-typed, not a subclass).
    scaler: Any = BatchGradScaler(model_batch)
    return MixedPrecision("16-mixed", device, scaler=scaler)


class BatchLightningModule(pl.LightningModule):
    """Train the N models of a ModelBatch with a Lightning `Trainer`.

    Each batch from the dataloader is `(inputs, targets)`: shared by all
    models (`[B, ...]`) or, with `per_model_inputs=True`, one slice per model
    (`[N, B, ...]`). The training loss is the sum of the per-model losses, so
    each model's gradient is exactly that of its own loss.

    Args:
        model_batch: the N models to train.
        configs: N dicts of optimizer hyperparameters, one per model
            (e.g. `{"lr": 1e-3, "weight_decay": 0.01}`); keys missing from a
            dict come from `base_config`.
        optimizer_cls: the torch optimizer whose vectorized version runs
            (`torch.optim.AdamW`, `torch.optim.SGD`, ...).
        base_config: hyperparameters shared by all models.
        scheduler: `optimizer -> scheduler`, called once in
            `configure_optimizers`; a torch LRScheduler or a
            `modelbatch.optim` per-model schedule.
        scheduler_interval: `"step"` or `"epoch"`.
        max_grad_norm: per-model gradient-norm clipping, a float or `[N]`;
            used when the Trainer has no `gradient_clip_val`.
        per_model_inputs: whether the dataloader yields `[N, B, ...]` batches.
        loss_fn: overrides the batch's loss function.

    Attributes:
        val_metrics: per-model validation metrics of the last validation
            epoch, `{"loss": [N], "acc": [N]}` ("acc" for class targets only).
        grad_norms: `[N]` per-model gradient norms before the last clipping.
        per_model_table: the rows last sent to the logger.

    Example:
        >>> module = BatchLightningModule(mb, [{"lr": 1e-3}, {"lr": 3e-3}])
        >>> L.Trainer(max_steps=20, gradient_clip_val=1.0).fit(module, loader)
        >>> module.model_batch.model(1)  # model 1, trained with lr 3e-3

    Warning:
        `gradient_clip_algorithm="norm"` (Lightning's default) clips each
        model by its own norm; `"value"` clamps elementwise, which is per model
        by nature.
    """

    def __init__(
        self,
        model_batch: ModelBatch,
        configs: Sequence[Mapping[str, Any]] | None = None,
        *,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
        base_config: Mapping[str, Any] | None = None,
        scheduler: SchedulerFn | None = None,
        scheduler_interval: str = "step",
        max_grad_norm: float | Tensor | None = None,
        per_model_inputs: bool = False,
        loss_fn: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model_batch, ModelBatch):
            raise TypeError(
                "BatchLightningModule: expected a modelbatch.ModelBatch, got "
                f"{type(model_batch).__name__}; wrap your models with ModelBatch(models) first."
            )
        n = model_batch.num_models
        if configs is None:
            configs = [{} for _ in range(n)]
        configs = [dict(c) for c in configs]
        if len(configs) != n:
            raise ValueError(
                f"BatchLightningModule: expected one optimizer config per model (N={n}), got "
                f"{len(configs)}; pass a list of N dicts such as [{{'lr': 1e-3}}, ...]."
            )
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                "BatchLightningModule: scheduler_interval must be 'step' or 'epoch', got "
                f"{scheduler_interval!r}."
            )
        self.model_batch = model_batch
        self.configs = configs
        self.optimizer_cls = optimizer_cls
        self.base_config = dict(base_config or {})
        self.scheduler_fn = scheduler
        self.scheduler_interval = scheduler_interval
        self.max_grad_norm = max_grad_norm
        self.per_model_inputs = per_model_inputs
        self.loss_fn = loss_fn
        self.val_metrics: dict[str, Tensor] = {}
        self.grad_norms: Tensor | None = None
        self.per_model_table: list[dict[str, Any]] = []
        self._val_sums: dict[str, Tensor] = {}
        self._val_count = 0

    # ------------------------------------------------------------------ forward and steps

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Every model's output, `[N, B, ...]`."""
        return self.model_batch(*args, per_model=self.per_model_inputs, **kwargs)

    def _split(self, batch: Any) -> tuple[Any, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "BatchLightningModule: expected each batch to be (inputs, targets), got "
                f"{type(batch).__name__}; override training_step for other batch layouts."
            )
        return batch[0], batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Sum of the per-model losses; logs `train/loss` (mean over active models) and range."""
        inputs, targets = self._split(batch)
        outputs = self(inputs)
        loss = self.model_batch.compute_loss(
            outputs, targets, self.loss_fn, reduction="sum", per_model=self.per_model_inputs
        )
        losses = self.model_batch.latest_losses
        assert losses is not None
        self._log_aggregates("train/loss", losses, lower_is_better=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulates per-model validation loss (and accuracy for class targets)."""
        inputs, targets = self._split(batch)
        outputs = self(inputs)
        mb = self.model_batch
        losses = mb.per_model_losses(outputs, targets, self.loss_fn, self.per_model_inputs)
        size = targets.shape[1] if self.per_model_inputs else targets.shape[0]
        sums = {"loss": losses.detach().float() * size}
        if not targets.is_floating_point() and outputs.dim() == targets.dim() + 1 + int(
            not self.per_model_inputs
        ):
            sums["acc"] = mb.accuracy(outputs, targets, self.per_model_inputs) * size
        for key, value in sums.items():
            self._val_sums[key] = self._val_sums.get(key, 0) + value
        self._val_count += size

    def on_validation_epoch_start(self) -> None:
        self._val_sums, self._val_count = {}, 0

    def on_validation_epoch_end(self) -> None:
        if not self._val_count:
            return
        self.val_metrics = {k: v / self._val_count for k, v in self._val_sums.items()}
        self._log_aggregates("val/loss", self.val_metrics["loss"], lower_is_better=True)
        if "acc" in self.val_metrics:
            self._log_aggregates("val/acc", self.val_metrics["acc"], lower_is_better=False)

    def _log_aggregates(
        self, name: str, values: Tensor, *, lower_is_better: bool, prog_bar: bool = False
    ) -> None:
        # Masked reductions rather than boolean indexing: no host sync per step.
        active = self.model_batch.active
        values = values.detach().float()
        count = active.sum().clamp(min=1)
        mean = torch.where(active, values, torch.zeros_like(values)).sum() / count
        worst = torch.inf if lower_is_better else -torch.inf
        masked = torch.where(active, values, torch.full_like(values, worst))
        best = masked.min() if lower_is_better else masked.max()
        self.log(name, mean, prog_bar=prog_bar)
        self.log(f"{name}_best", best)

    # ------------------------------------------------------------------ optimization

    def configure_optimizers(self) -> Any:
        """One vectorized optimizer with the per-model configs, and the schedule if given."""
        from ..optim import OptimizerFactory

        factory = OptimizerFactory(self.optimizer_cls, self.base_config)
        optimizer = factory.create_optimizer(self.model_batch, self.configs)
        if self.scheduler_fn is None:
            return optimizer
        scheduler = self.scheduler_fn(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # Overridden so that modelbatch's per-model schedules, which are not
        # torch LRSchedulers, pass Lightning's scheduler check.
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each model's gradient by its own norm (after AMP unscaling, as Lightning orders it)."""
        max_norm = gradient_clip_val if gradient_clip_val is not None else self.max_grad_norm
        if max_norm is None:
            return
        from ..optim import clip_grad_norm_, clip_grad_value_

        if gradient_clip_algorithm == "value":
            # Elementwise clamping never mixes models; ours also takes an [N] bound.
            clip_grad_value_(self.model_batch, max_norm)
            return
        if not isinstance(max_norm, Tensor) and max_norm <= 0:
            return
        self.grad_norms = clip_grad_norm_(self.model_batch, max_norm)

    def setup(self, stage: str) -> None:
        """Give Lightning's 16-mixed precision plugin the per-model grad scaler."""
        from ..amp import BatchGradScaler

        plugin = self.trainer.precision_plugin
        attached = self.model_batch.grad_scaler
        if not isinstance(plugin, MixedPrecision) or plugin.precision != "16-mixed":
            if attached is not None:
                # compute_loss would scale every loss and nothing would unscale.
                raise ValueError(
                    "BatchLightningModule: the ModelBatch has a grad scaler attached, but the "
                    f"Trainer runs precision={getattr(plugin, 'precision', None)!r}, which never "
                    "unscales; use precision='16-mixed' (or plugins=[batch_precision_plugin(mb)]), "
                    "or set model_batch.grad_scaler = None."
                )
            return
        if isinstance(plugin.scaler, BatchGradScaler) and plugin.scaler is attached:
            return
        # torch's GradScaler skips every model's step when any one model
        # overflows. Lightning makes none on CPU; fp16 gradients underflow
        # there too, so the per-model one is installed on every device. A
        # scaler the user already attached to the batch is kept (its settings).
        scaler: Any = attached if isinstance(attached, BatchGradScaler) else None
        if scaler is None:
            scaler = BatchGradScaler(self.model_batch)  # torch GradScaler's interface
        plugin.scaler = scaler

    # ------------------------------------------------------------------ the per-model table

    def per_model_rows(self) -> list[dict[str, Any]]:
        """One row per model: active, latest train loss, lr, the per-model configs, val metrics."""
        columns: dict[str, Any] = {}
        optimizer = self._optimizer()
        if optimizer is not None:
            hparams = getattr(optimizer, "hparams", {})
            factor = optimizer.param_groups[0].get("lr", 1.0)
            for key, value in hparams.items():
                # Numeric [N] hyperparameters only: flags (amsgrad, ...) and
                # betas [N, 2] would crowd the table.
                if (
                    isinstance(value, Tensor)
                    and value.is_floating_point()
                    and value.shape == (self.model_batch.num_models,)
                ):
                    if key == "lr" and not isinstance(factor, Tensor):
                        value = value * factor
                    columns[key] = value
        for key, value in self.val_metrics.items():
            columns[f"val_{key}"] = value
        return self.model_batch.summary(**columns)

    def _optimizer(self) -> torch.optim.Optimizer | None:
        if self._trainer is None or not self.trainer.optimizers:
            return None
        return self.trainer.optimizers[0]

    def on_train_epoch_end(self) -> None:
        self.per_model_table = self.per_model_rows()
        if self.logger is None or not self.trainer.is_global_zero:
            return
        rows = self.per_model_table
        stamp = {"epoch": self.current_epoch, "step": self.global_step}
        log_table = getattr(self.logger, "log_table", None)
        if callable(log_table):
            columns = [*stamp, *rows[0]]
            log_table(
                key="per_model",
                columns=columns,
                data=[[*stamp.values(), *r.values()] for r in rows],
            )
            return
        experiment = getattr(self.logger, "experiment", None)
        if callable(getattr(experiment, "add_scalar", None)):
            # TensorBoard: one scalar series per model and column.
            log_tensorboard(experiment, rows, self.global_step, prefix="per_model/")
        log_dir = getattr(self.logger, "log_dir", None)
        if log_dir is None:
            return
        write_csv(os.path.join(log_dir, "per_model.csv"), rows, None, **stamp)
