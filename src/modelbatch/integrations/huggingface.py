"""HuggingFace `Trainer` for a ModelBatch: N models trained by one stock training loop.

`BatchTrainer` is a `transformers.Trainer` whose model is a `ModelBatch`. It keeps
every per-model guarantee of the library inside Trainer's loop:

- the loss Trainer backpropagates is the sum of the N per-model losses, so each
  model gets exactly its own gradient; Trainer divides it by the number of
  gradient accumulation steps as usual;
- the optimizer is a vectorized one with per-model hyperparameters
  (`modelbatch.optim.OptimizerFactory`); Trainer's lr scheduler drives the
  shared schedule factor `group["lr"]`, so model i's lr is `factor * lr_i`;
- `max_grad_norm` clips each model by its own norm (`modelbatch.optim.clip_grad_norm_`);
- under fp16 the grad scaler is the per-model `modelbatch.amp.BatchGradScaler`:
  one model's overflow skips only that model's step;
- Trainer logs the loss as the mean over the active models (train and eval),
  with best / median / worst and the best model's index; the full per-model
  table goes to a CSV file in the output dir (`PerModelCSVCallback`), and the
  last evaluation's per-model values stay in `BatchTrainer.eval_per_model`;
- weight decay skips biases and LayerNorm weights, as the stock Trainer's
  parameter groups do;
- checkpoints hold the stacked weights (`model.safetensors`), resume works, and
  `export_model` / `load_model_state` give back model i as an ordinary module or
  state dict.

Importing this module imports `transformers` (install with `pip install "torch-modelbatch[hf]"`).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._batch import ModelBatch
from .._metrics import aggregate, log_tensorboard, per_model_rows, write_csv

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "modelbatch.integrations.huggingface needs transformers and accelerate; install them "
        'with `pip install "torch-modelbatch[hf]"` (or `pip install transformers accelerate`).'
    ) from error

__all__ = [
    "BatchTrainer",
    "PerModelCSVCallback",
    "export_model",
    "load_model_state",
]

# Trainer arguments that map onto optimizer hyperparameters shared by all models,
# unless a per-model config overrides them.
_ARGS_TO_HPARAMS = {
    "lr": lambda a: a.learning_rate,
    "weight_decay": lambda a: a.weight_decay,
    "betas": lambda a: (a.adam_beta1, a.adam_beta2),
    "eps": lambda a: a.adam_epsilon,
}


def _unwrap_optimizer(optimizer: Any) -> Any:
    # accelerate wraps the optimizer in an AcceleratedOptimizer that keeps the real one in `.optimizer`.
    while type(optimizer).__name__ == "AcceleratedOptimizer":
        optimizer = optimizer.optimizer
    return optimizer


class _AcceleratorScaler:
    """Presents a per-model `BatchGradScaler` where accelerate expects a torch `GradScaler`.

    accelerate calls `scaler.scale(loss).backward()`, `scaler.step(optimizer, closure)`
    and `scaler.update()`, and Trainer saves `scaler.state_dict()` in checkpoints.
    The step always reaches the optimizer (with the per-model skip mask), so
    Trainer never sees a skipped step and its shared schedule advances.
    """

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss)

    def step(self, optimizer: Any, closure: Any = None) -> Any:
        if closure is not None:
            raise ValueError(
                "BatchTrainer: the per-model grad scaler does not take an optimizer closure; "
                "use an optimizer that steps without one."
            )
        return self.scaler.step(_unwrap_optimizer(optimizer))

    def unscale_(self, optimizer: Any) -> None:
        self.scaler.unscale_(_unwrap_optimizer(optimizer))

    def __getattr__(self, name: str) -> Any:
        if name == "scaler":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.scaler, name)


class BatchTrainer(Trainer):
    """A `transformers.Trainer` that trains the N models of a `ModelBatch` at once.

    The inputs of each batch (a dict, as Trainer's collators produce) are shared by
    all models; the entry `label_key` holds the targets and is not passed to the
    models. Model outputs may be a tensor `[N, B, ...]`, or a dict / `ModelOutput`
    whose `output_key` entry is (as for `PreTrainedModel`s). The loss of model i is
    `model_batch.loss_fn(output_i, labels)` (default cross-entropy, the loss
    `*ForSequenceClassification` models use for integer labels).

    Args:
        model: the ModelBatch to train.
        args: `transformers.TrainingArguments`. `learning_rate` is only the
            default per-model lr for configs that give none; Trainer's lr
            scheduler (`lr_scheduler_type`, warmup) shapes a factor shared by all
            models, starting at 1.0: model i's lr at step t is `factor(t) * lr_i`,
            and the logged `learning_rate` is that factor.
        optimizer_cls: the torch optimizer class, vectorized by
            `modelbatch.optim.OptimizerFactory`.
        configs: N dicts of per-model hyperparameters (`lr`, `weight_decay`,
            `betas`, ...), merged over `base_config`.
        base_config: hyperparameters shared by all models. Defaults come from
            `args` (`learning_rate`, `weight_decay`, `adam_beta1/2`,
            `adam_epsilon`) where `optimizer_cls` accepts them.
        grad_scaler: a `modelbatch.amp.BatchGradScaler` for this batch; by default
            the one already attached to it, or a new one when `args.fp16` gives
            Trainer a grad scaler.
        label_key: the input entry with the targets.
        output_key: the entry of a dict-like model output with the predictions.
        per_model_csv: file name (in `args.output_dir`) of the per-model log
            table; None writes no table.
        **kwargs: any other `transformers.Trainer` argument.

    Attributes:
        last_grad_norms: `[N]` pre-clip gradient norms of the last step (None before).
        eval_per_model: the last evaluation's per-model metrics, `{"loss": [N],
            "accuracy": [N]}` (accuracy for class logits only); the logged
            `eval_loss` is their mean over the active models.

    Example:
        >>> mb = ModelBatch([make_model() for _ in range(8)])
        >>> trainer = BatchTrainer(mb, TrainingArguments("out", max_steps=100),
        ...                        configs=[{"lr": lr} for lr in lrs], train_dataset=ds)
        >>> trainer.train()
        >>> trainer.per_model_losses().shape
        torch.Size([8])

    Weight decay follows the stock Trainer: biases and LayerNorm weights are
    exempt (override `get_decay_parameter_names` to change the rule); every
    other parameter of model i decays with its own `weight_decay`.
    """

    _window_loss: Tensor  # [N] float64, per-model loss summed since the last log
    _window_steps: float
    _eval_loss: Tensor  # [N] float64, per-model eval loss summed over samples
    _eval_count: int
    _eval_correct: Tensor | None  # [N] correct predictions, for class logits

    def __init__(
        self,
        model: ModelBatch,
        args: Any = None,
        *,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
        configs: Sequence[Mapping[str, Any]] | None = None,
        base_config: Mapping[str, Any] | None = None,
        grad_scaler: Any = None,
        label_key: str = "labels",
        output_key: str = "logits",
        per_model_csv: str | None = "per_model_log.csv",
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, ModelBatch):
            raise TypeError(
                f"BatchTrainer: expected model to be a modelbatch.ModelBatch, got "
                f"{type(model).__name__}; stack your models first with ModelBatch(models)."
            )
        if configs is not None and len(configs) != model.num_models:
            raise ValueError(
                f"BatchTrainer: configs has {len(configs)} entries, expected one per model "
                f"(N={model.num_models})."
            )
        # Checked before Trainer.__init__, which already acts on them.
        smoothing = 0.0 if args is None else float(args.label_smoothing_factor)
        if smoothing:
            raise ValueError(
                f"BatchTrainer: label_smoothing_factor={smoothing} is not "
                "applied; give the ModelBatch a loss_fn with label smoothing instead, e.g. "
                "functools.partial(F.cross_entropy, label_smoothing=0.1)."
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "BatchTrainer: compute_loss_func is not used; the loss is the ModelBatch's "
                "loss_fn applied per model. Pass your loss as ModelBatch(models, loss_fn=...)."
            )
        # Set before Trainer.__init__, which calls create_accelerator_and_postprocess.
        self.model_batch = model
        self.optimizer_cls = optimizer_cls
        self.configs = [dict(c) for c in configs] if configs is not None else None
        self.base_config = dict(base_config or {})
        if grad_scaler is not None and model.grad_scaler not in (None, grad_scaler):
            raise ValueError(
                "BatchTrainer: grad_scaler differs from the scaler already attached to the "
                "ModelBatch; pass that one, or none."
            )
        # A scaler attached to the batch scales every loss: it must also unscale and step.
        self.grad_scaler = grad_scaler if grad_scaler is not None else model.grad_scaler
        self.label_key = label_key
        self.output_key = output_key
        self._stacked_ids = {id(p) for p in model.parameters()}
        self.last_grad_norms: Tensor | None = None
        self.eval_per_model: dict[str, Tensor] = {}
        self._reset_train_window()
        self._reset_eval_window()
        self._table: tuple[str, list[dict[str, Any]]] | None = None
        self._pending_eval: tuple[str, list[dict[str, Any]]] | None = None
        super().__init__(model=model, args=args, **kwargs)
        self._refuse_unsupported_args()
        # ModelBatch.forward takes **kwargs, which Trainer reads as "the model normalizes
        # the loss over the accumulated batch itself" and then skips its division by the
        # accumulation steps. Our loss is a per-batch mean per model: Trainer must divide.
        self.model_accepts_loss_kwargs = False
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = False
        self.label_names = [label_key]
        if per_model_csv is not None:
            self.add_callback(PerModelCSVCallback(self, per_model_csv))

    # ------------------------------------------------------------------ setup

    def _refuse_unsupported_args(self) -> None:
        # Settings the stock loop would apply and this one would not: refuse them
        # rather than train silently without them.
        args = self.args
        optim = str(getattr(args.optim, "value", args.optim))
        # The defaults of the supported transformers versions: the user chose nothing.
        if optim not in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
            raise ValueError(
                f"BatchTrainer: args.optim={optim!r} is not used; the optimizer is "
                "optimizer_cls with per-model configs. Pass e.g. optimizer_cls=torch.optim.SGD."
            )
        if (
            args.n_gpu > 1
            or args.world_size > 1
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
        ):
            raise ValueError(
                f"BatchTrainer: expected one process on one device, got n_gpu={args.n_gpu}, "
                f"world_size={args.world_size}; run on a single device (e.g. "
                "CUDA_VISIBLE_DEVICES=0), without DeepSpeed or FSDP."
            )

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        accelerator = self.accelerator
        torch_scaler = accelerator.scaler
        if self.grad_scaler is None and torch_scaler is not None:
            # fp16: replace accelerate's global scaler, whose one overflow skips every model.
            from ..amp import BatchGradScaler

            self.grad_scaler = BatchGradScaler(
                self.model_batch,
                init_scale=torch_scaler._init_scale,
                growth_factor=torch_scaler._growth_factor,
                backoff_factor=torch_scaler._backoff_factor,
                growth_interval=torch_scaler._growth_interval,
            )
        if self.grad_scaler is not None:
            self.model_batch.grad_scaler = self.grad_scaler
            accelerator.scaler = _AcceleratorScaler(self.grad_scaler)
        # Trainer clips (and, without clipping, measures the norm) through
        # accelerator.clip_grad_norm_ with one global norm; route our parameters to
        # the per-model version. Patching the accelerator holds across Trainer versions.
        self._global_clip = accelerator.clip_grad_norm_
        accelerator.clip_grad_norm_ = self._clip_grad_norm_per_model

    def _clip_grad_norm_per_model(
        self, parameters: Any, max_norm: float, norm_type: float = 2.0
    ) -> Tensor:
        params = list(parameters)
        if not params or any(id(p) not in self._stacked_ids for p in params):
            return self._global_clip(params, max_norm, norm_type)
        from ..optim import clip_grad_norm_

        if self.grad_scaler is not None and self.optimizer is not None:
            # Unscale before clipping, as in the torch AMP recipe.
            self.grad_scaler.unscale_(_unwrap_optimizer(self.optimizer))
        norms = clip_grad_norm_(self.model_batch, max_norm, float(norm_type))
        self.last_grad_norms = norms.detach()
        mb = self.model_batch
        # Trainer logs one number: the largest pre-clip norm among the active models.
        return torch.where(mb.active, norms.detach(), torch.zeros_like(norms)).amax()

    def _optimizer_defaults(self) -> dict[str, Any]:
        try:
            accepted = set(inspect.signature(self.optimizer_cls.__init__).parameters)
        except (TypeError, ValueError):
            accepted = {"lr"}
        return {k: get(self.args) for k, get in _ARGS_TO_HPARAMS.items() if k in accepted}

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The vectorized optimizer with per-model hyperparameters.

        Two param groups, as the stock Trainer makes them: the parameters
        `get_decay_parameter_names` names (by default all but biases and
        LayerNorm weights) decay with each model's `weight_decay`; the others
        get weight decay 0 for every model.
        """
        if self.optimizer is None:
            mb = self.model_batch
            if self.configs is None and not self.base_config and mb.optimizer is not None:
                self.optimizer = mb.optimizer
            else:
                from ..optim import VECTORIZED, BatchOptimizer, OptimizerFactory

                base = {**self._optimizer_defaults(), **self.base_config}
                configs = self.configs or [{} for _ in range(mb.num_models)]
                cls = self.optimizer_cls
                batch_cls = cls if issubclass(cls, BatchOptimizer) else VECTORIZED.get(cls)
                decay, no_decay = self._decay_groups()
                if batch_cls is not None and no_decay and "weight_decay" in batch_cls.specs:
                    fixed = {"weight_decay": 0.0}
                    groups = [{"params": decay}, {"params": no_decay, "fixed_hparams": fixed}]
                    self.optimizer = batch_cls(groups, configs, model_batch=mb, base_config=base)
                else:
                    self.optimizer = OptimizerFactory(cls, base).create_optimizer(mb, configs)
        return self.optimizer

    def _decay_groups(self) -> tuple[list[Tensor], list[Tensor]]:
        # HF's rule, by name and layer type, on model 0's structure: the stacked
        # parameters carry the same names.
        mb = self.model_batch
        names = set(self.get_decay_parameter_names(mb.skeleton))
        params = [(n, p) for n, p in mb.stacked_params().items() if p.requires_grad]
        decay = [p for n, p in params if n in names]
        return decay, [p for n, p in params if n not in names]

    def _set_signature_columns_if_needed(self) -> None:
        # Column pruning of `datasets` data must follow the user's model, not
        # ModelBatch.forward(*args, **kwargs).
        if self._signature_columns is None:
            forward = self.model_batch.skeleton.forward
            columns = list(inspect.signature(forward).parameters)
            columns += sorted({"label", "label_ids", self.label_key})
            self._signature_columns = columns  # type: ignore[assignment]

    # ------------------------------------------------------------------ loss

    def _predictions(self, outputs: Any) -> Tensor:
        if isinstance(outputs, Tensor):
            return outputs
        if isinstance(outputs, Mapping):
            if self.output_key not in outputs:
                raise ValueError(
                    f"BatchTrainer: the model output has no {self.output_key!r} entry "
                    f"(keys: {list(outputs.keys())}); pass output_key= naming the predictions."
                )
            return outputs[self.output_key]
        if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
            return outputs[0]
        raise TypeError(
            f"BatchTrainer: expected the model output to be a tensor, a dict or a tuple, "
            f"got {type(outputs).__name__}."
        )

    def _split_inputs(self, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        if self.label_key not in inputs:
            raise ValueError(
                f"BatchTrainer: the batch has no {self.label_key!r} entry (keys: "
                f"{list(inputs.keys())}); pass label_key= naming the targets."
            )
        kwargs = {k: v for k, v in inputs.items() if k != self.label_key}
        return kwargs, inputs[self.label_key]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        """The sum over models of each model's loss; with outputs, also `losses` `[N]` and `logits`."""
        model_inputs, labels = self._split_inputs(inputs)
        outputs = model(**model_inputs)
        predictions = self._predictions(outputs)
        mb = self.model_batch
        loss = mb.compute_loss(predictions, labels, reduction="sum", per_model=False)
        latest = cast(Tensor, mb.latest_losses)  # [N], set by compute_loss
        if mb.training:
            steps = getattr(self, "current_gradient_accumulation_steps", None) or max(
                self.args.gradient_accumulation_steps, 1
            )
            self._window_loss = self._window_loss.to(loss.device) + latest / steps
            self._window_steps += 1.0 / steps
        if return_outputs:
            return loss, {"loss": loss, "losses": latest, "logits": predictions}
        return loss

    # ------------------------------------------------------------------ evaluation

    def prediction_step(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Loss (sum over models) and predictions `[B, N, ...]`: batch first, so that
        Trainer's concatenation across batches gives `[num_samples, N, ...]`."""
        inputs = self._prepare_inputs(dict(inputs))
        mb = self.model_batch
        labels = inputs.get(self.label_key)
        model_inputs = {k: v for k, v in inputs.items() if k != self.label_key}
        loss = None
        with torch.no_grad(), self.compute_loss_context_manager():
            predictions = self._predictions(model(**model_inputs)).detach()
            if labels is not None:
                # per_model_losses, not compute_loss: evaluation must not enter the
                # training loss history.
                losses = mb.per_model_losses(predictions, labels, per_model=False)
                losses = mb.mask_retired(losses).detach()
                loss = losses.sum()
                batch = labels.shape[0]
                self._eval_loss = self._eval_loss.to(losses.device) + losses.double() * batch
                self._eval_count += batch
                if predictions.dim() == 3 and not labels.is_floating_point():
                    correct = (predictions.argmax(dim=-1) == labels.unsqueeze(0)).sum(dim=1)
                    prev = self._eval_correct
                    self._eval_correct = (
                        correct if prev is None else prev.to(correct.device) + correct
                    )
        if prediction_loss_only:
            return loss, None, None
        return loss, predictions.movedim(0, 1), labels

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._reset_eval_window()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._eval_count == 0:
            return output
        mb = self.model_batch
        columns = {"loss": self._eval_loss / self._eval_count}
        if self._eval_correct is not None:
            columns["accuracy"] = self._eval_correct.double() / self._eval_count
        metrics = dict(output.metrics or {})
        self.eval_per_model = {name: values.detach().clone() for name, values in columns.items()}
        # Trainer's own eval loss would be the sum over models; report the mean
        # over the active models, comparable with one model's loss.
        metrics[f"{prefix}_loss"] = _active_mean(columns["loss"], mb.active)
        for name, values in columns.items():
            agg = aggregate(values, mb.active, higher_is_better=name == "accuracy")
            metrics[f"{prefix}_{name}_best"] = agg["best"]
            metrics[f"{prefix}_{name}_median"] = agg["median"]
            metrics[f"{prefix}_{name}_worst"] = agg["worst"]
            if name == "loss":
                metrics[f"{prefix}_best_model"] = agg["best_model"]
        self._pending_eval = (prefix, self._rows(prefix, columns))
        return output._replace(metrics=metrics)

    # ------------------------------------------------------------------ logging

    def _window_zeros(self) -> Tensor:
        # On the batch's device: an accumulator on the CPU would be copied to the
        # GPU (a host sync) at the first step of every window.
        mb = self.model_batch
        return torch.zeros(mb.num_models, dtype=torch.float64, device=mb.active.device)

    def _reset_train_window(self) -> None:
        self._window_loss = self._window_zeros()
        self._window_steps = 0.0

    def _reset_eval_window(self) -> None:
        self._eval_loss = self._window_zeros()
        self._eval_count = 0
        self._eval_correct = None

    def per_model_losses(self) -> Tensor:
        """Each model's latest training loss, `[N]` (0 for retired models)."""
        latest = self.model_batch.latest_losses
        if latest is None:
            return torch.full((self.model_batch.num_models,), math.nan)
        return latest

    def _rows(self, split: str, columns: Mapping[str, Tensor]) -> list[dict[str, Any]]:
        mb = self.model_batch
        rows = per_model_rows({"active": mb.active, **columns}, mb.num_models)
        return [{"split": split, **row} for row in rows]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add per-model aggregates to Trainer's logs and stage the per-model table.

        Training logs gain `loss_best`, `loss_median`, `loss_worst` and `best_model`
        (over the active models, averaged over the steps since the last log);
        `loss` is the mean over the active models (Trainer's would be their sum).
        """
        self._table = None
        mb = self.model_batch
        if "loss" in logs and self._window_steps > 0:
            per_model = self._window_loss / self._window_steps
            agg = aggregate(per_model, mb.active)
            logs["loss"] = _active_mean(per_model, mb.active)
            logs["loss_best"] = agg["best"]
            logs["loss_median"] = agg["median"]
            logs["loss_worst"] = agg["worst"]
            logs["best_model"] = agg["best_model"]
            logs["active_models"] = agg["active"]
            columns = {"loss": per_model}
            if self.last_grad_norms is not None:
                columns["grad_norm"] = self.last_grad_norms
            self._table = ("train", self._rows("train", columns))
            self._reset_train_window()
        elif self._pending_eval is not None and f"{self._pending_eval[0]}_loss" in logs:
            self._table = self._pending_eval
            self._pending_eval = None
        super().log(logs, *args, **kwargs)
        self._table = None

    def per_model_table(self) -> tuple[str, list[dict[str, Any]]] | None:
        """The per-model rows of the log event in progress (for callbacks), or None."""
        return self._table

    # ------------------------------------------------------------------ checkpoints

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        # Stock Trainer loads non-PreTrainedModel weights with strict=False, which
        # would resume silently from fresh weights on any key mismatch.
        path = os.path.join(resume_from_checkpoint, "model.safetensors")
        target = self.model_batch if model is None else model
        if isinstance(target, ModelBatch) and os.path.isfile(path):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
            try:
                target.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise ValueError(
                    f"BatchTrainer: the checkpoint {path} does not match this ModelBatch "
                    f"({error}); resume with the same architecture and number of models."
                ) from error
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def _active_mean(values: Tensor, active: Tensor) -> float:
    """Mean of `values` `[N]` over the active models (NaN when none is active)."""
    on = active.to(values.device)
    count = int(on.sum())
    if count == 0:
        return math.nan
    return float(torch.where(on, values.double(), 0.0).sum()) / count


class PerModelCSVCallback(TrainerCallback):
    """Appends the per-model table of every log event to a CSV file in the output dir.

    With `report_to="tensorboard"` the table also goes to Trainer's TensorBoard
    writer: one scalar series per model and column, under `per_model/<split>/`
    (`per_model/eval/loss/model_3`).

    Columns: `step`, `epoch`, `split` (`train` or the eval prefix), `model`,
    `active`, `loss`, `grad_norm`, `accuracy` (empty where a split has none).
    Trainer's own `log_history` gets only the aggregates, never N entries per step.
    """

    columns = ("step", "epoch", "split", "model", "active", "loss", "grad_norm", "accuracy")

    def __init__(self, trainer: BatchTrainer, filename: str = "per_model_log.csv") -> None:
        self.trainer = trainer
        self.filename = filename

    def path(self, args: Any) -> str:
        return os.path.join(args.output_dir, self.filename)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        table = self.trainer.per_model_table()
        if table is None or not state.is_world_process_zero:
            return
        stamp = {"step": state.global_step, "epoch": state.epoch}
        write_csv(self.path(args), table[1], self.columns, **stamp)
        for writer in self._tensorboard_writers():
            split = table[0]
            log_tensorboard(writer, table[1], state.global_step, prefix=f"per_model/{split}/")

    def _tensorboard_writers(self) -> list[Any]:
        # With report_to="tensorboard", Trainer's TensorBoardCallback holds a
        # SummaryWriter: the per-model table goes there too, one series per model.
        callbacks = self.trainer.callback_handler.callbacks
        writers = [getattr(c, "tb_writer", None) for c in callbacks]
        return [w for w in writers if w is not None and hasattr(w, "add_scalar")]


# ---------------------------------------------------------------------- export


def export_model(source: ModelBatch | BatchTrainer, i: int) -> nn.Module:
    """Model i as a module of the user's class (a `PreTrainedModel` keeps `save_pretrained`).

    Args:
        source: a ModelBatch or the BatchTrainer training one.
        i: the model index.

    Example:
        >>> export_model(trainer, 3).save_pretrained("best_model")
    """
    mb = source.model_batch if isinstance(source, BatchTrainer) else source
    if not isinstance(mb, ModelBatch):
        raise TypeError(
            f"export_model: expected a ModelBatch or a BatchTrainer, got {type(source).__name__}."
        )
    module = mb.model(i)
    # The state dict does not carry non-persistent buffers (e.g. BERT's position_ids);
    # copy every buffer so the exported module computes what model i computed.
    own = dict(module.named_buffers())
    with torch.no_grad():
        for name, buf in mb.stacked_buffers().items():
            # Buffers the library added (per-model dropout rates) are not the user's.
            if name in own:
                own[name].copy_(buf[i])
    return module


def load_model_state(checkpoint_dir: str | os.PathLike[str], i: int) -> dict[str, Tensor]:
    """Model i's plain `state_dict` from a BatchTrainer checkpoint, reading only its slices.

    Args:
        checkpoint_dir: a Trainer checkpoint folder (with `model.safetensors`).
        i: the model index.

    Returns:
        `{name: tensor}` with the user's parameter and buffer names, ready for
        `load_state_dict` of the user's class (no modelbatch needed to use it).
    """
    from safetensors import safe_open

    path = os.path.join(os.fspath(checkpoint_dir), "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"load_model_state: expected a checkpoint folder with model.safetensors, "
            f"found none at {path}."
        )
    prefix = "stacked."
    state: dict[str, Tensor] = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 - safe_open has no __iter__
        if not keys:
            raise ValueError(f"load_model_state: {path} holds no ModelBatch weights (stacked.*).")
        n = f.get_slice(keys[0]).get_shape()[0]
        if not -n <= i < n:
            raise IndexError(f"load_model_state: index {i} out of range for N={n} models.")
        for key in keys:
            state[key[len(prefix) :]] = f.get_slice(key)[i % n : i % n + 1][0].clone()
    return state
