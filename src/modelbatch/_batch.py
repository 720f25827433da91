"""ModelBatch: N models of one architecture as one module."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from ._buffers import BufferWatch, running_stat_buffers
from ._indices import model_indices
from ._inputs import (
    InputReading,
    PerModel,
    check_devices,
    explain_dtype_error,
    model_axis_dims,
    per_model_flags,
)
from ._layout import GradLayout
from ._metrics import format_table, per_model_rows
from ._stack import (
    build_stacked_tree,
    check_compatible,
    materialize,
    meta_skeleton,
    model_list,
    split_name,
    state_key_map,
)
from ._step import apply_update
from .nn._convert import restore_config, vmap_forward_context
from .nn._errors import explain_forward_error

__all__ = ["ModelBatch"]

LossFn = Callable[..., Tensor]


def _checked_optimizer_args(
    models: Sequence[nn.Module],
    optimizer_cls: Any,
    lr_list: Any,
    optimizer_kwargs: Mapping[str, Any] | None,
) -> list[float] | None:
    """`lr_list` as N floats, after checking the optimizer arguments of `ModelBatch`."""
    if optimizer_cls is None and (lr_list is not None or optimizer_kwargs):
        given = "lr_list" if lr_list is not None else "optimizer_kwargs"
        raise ValueError(
            f"ModelBatch: {given} was given without optimizer_cls; no optimizer is chosen "
            "for you. Pass optimizer_cls=torch.optim.Adam (or SGD, AdamW, ...), or leave "
            f"{given} out and build your optimizer over mb.parameters()."
        )
    if optimizer_cls is not None and not any(True for m in models[:1] for _ in m.parameters()):
        raise ValueError(
            f"ModelBatch: optimizer_cls={getattr(optimizer_cls, '__name__', optimizer_cls)} was "
            f"given, but the models ({type(models[0]).__name__}) have no parameters to train; "
            "leave optimizer_cls out."
        )
    if lr_list is None:
        return None
    n = len(models)
    if isinstance(lr_list, (Tensor, np.ndarray)):
        if lr_list.ndim != 1:
            raise TypeError(
                f"ModelBatch: lr_list must be N={n} numbers, got a {type(lr_list).__name__} of "
                f"shape {tuple(lr_list.shape)}; pass a 1-D tensor or a list of {n} floats."
            )
        values: list[Any] = lr_list.tolist()
    elif isinstance(lr_list, (str, bytes)) or not isinstance(lr_list, Sequence):
        raise TypeError(
            f"ModelBatch: lr_list must be a list of N={n} learning rates, one per model, got "
            f"{type(lr_list).__name__} {lr_list!r}; for one rate shared by all models pass "
            f"lr_list=[{lr_list!r}] * {n}."
        )
    else:
        values = list(lr_list)
    for i, lr in enumerate(values):
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.integer, np.floating)):
            raise TypeError(
                f"ModelBatch: lr_list[{i}] must be a number, got {type(lr).__name__} {lr!r}; "
                f"pass {n} floats, e.g. lr_list=[0.001] * {n}."
            )
    if len(values) != n:
        raise ValueError(
            f"ModelBatch: lr_list has {len(values)} entries, expected one per model (N={n})."
        )
    return [float(lr) for lr in values]


def _explain_loss_error(
    err: BaseException, outputs: Tensor, targets: Tensor, split: bool
) -> Exception | None:
    """A clearer error for a loss that failed on these targets' dtype or shape, or None."""
    message = str(err)
    first_line = message.strip().splitlines()[0] if message.strip() else type(err).__name__
    given = (
        f"outputs {tuple(outputs.shape)} {outputs.dtype} and "
        f"{'per-model' if split else 'shared'} targets {tuple(targets.shape)} {targets.dtype}"
    )
    if any(m in message for m in ("dtype", "scalar type", "Long", "Float", "Double")):
        if targets.is_floating_point() and outputs.shape[2:] != targets.shape[1 + split :]:
            fix = "class-index targets must be integers: pass targets.long()"
        else:
            fix = (
                "class-index targets must be int64 (targets.long()), value targets of the "
                "outputs' dtype (targets.to(outputs.dtype))"
            )
        return TypeError(
            f"ModelBatch.compute_loss: loss_fn failed on {given} ({first_line}); {fix}."
        )
    if any(m in message for m in ("size", "shape", "dimension")):
        return ValueError(
            f"ModelBatch.compute_loss: loss_fn failed on {given} ({first_line}); each model's "
            "targets must match its outputs [B, ...] as loss_fn expects."
        )
    return None


class ModelBatch(nn.Module):
    """N independent models of one architecture, trained as one.

    The models' parameters and buffers are stacked along a new leading axis
    (`[N, *shape]`) and registered on this module under `stacked.<name>`;
    `forward` runs every model with one `torch.vmap` over `functional_call`.
    The original modules are not kept: export them with `model(i)` or
    `get_model_states()`.

    Args:
        models: N >= 1 models of one class, with the same parameter names,
            shapes, dtypes, devices, training mode and configuration.
        loss_fn: per-model loss `loss_fn(output [B, ...], target [B, ...]) -> scalar`,
            applied with vmap. Defaults to `F.cross_entropy`.
        optimizer_cls: if given, the batch owns an optimizer of this class
            over the stacked parameters (`zero_grad()`, `step()`). Required
            with `lr_list` or `optimizer_kwargs`: no optimizer is chosen for you.
        lr_list: N learning rates, one per model (a list of numbers or a 1-D tensor).
        optimizer_kwargs: further optimizer arguments shared by all models.
        per_model_dropout: accept models that differ only in their Dropout
            `p`; each model then drops with its own rate.
        randomness: `"different"` (default): each model draws its own random
            numbers (dropout masks); `"same"`: all models draw the same ones,
            for a comparison where only the hyperparameters differ. Either way
            they change from step to step.
        history_size: how many `compute_loss` calls the loss history keeps.

    Example:
        >>> models = [nn.Linear(4, 3) for _ in range(8)]
        >>> mb = ModelBatch(models)
        >>> mb(torch.randn(16, 4)).shape
        torch.Size([8, 16, 3])

    Warning:
        Each input is either shared by all models (`[B, ...]`, the default)
        or split across them (`[N, B, ...]`), as `forward`'s `per_model`
        says. A buffer the forward re-assigns (`self.count = self.count + 1`)
        is written back into its stacked buffer, with the same shape and dtype.
    """

    active: Tensor
    _skeleton: nn.Module
    _export_skeleton: nn.Module

    def __init__(
        self,
        models: Sequence[nn.Module],
        loss_fn: LossFn | None = None,
        *,
        optimizer_cls: type[torch.optim.Optimizer] | None = None,
        lr_list: Sequence[float] | None = None,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        per_model_dropout: bool = False,
        randomness: str = "different",
        history_size: int = 10_000,
    ) -> None:
        super().__init__()
        from .nn._convert import prepare_models

        models = model_list(models)
        lr_list = _checked_optimizer_args(models, optimizer_cls, lr_list, optimizer_kwargs)
        check_compatible(models, ignore_dropout_p=per_model_dropout)
        original = models[0]
        models = prepare_models(models, per_model_dropout=per_model_dropout)
        self.num_models = len(models)
        tree, self._param_names, self._buffer_names = build_stacked_tree(models)
        self.stacked = tree
        ref = next(iter([*tree.parameters(), *tree.buffers()]), None)
        device = ref.device if ref is not None else torch.device("cpu")
        self.register_buffer("active", torch.ones(self.num_models, dtype=torch.bool, device=device))
        # Kept outside the module tree (object.__setattr__) so that .to(),
        # state_dict() and frameworks see only the stacked tensors.
        object.__setattr__(self, "_skeleton", meta_skeleton(models[0]))
        object.__setattr__(self, "_export_skeleton", meta_skeleton(original))
        self._state_keys = state_key_map(original)
        self._norm_stats = running_stat_buffers(self._skeleton)
        self._buffer_watch = BufferWatch()
        self._reading = InputReading()
        self.randomness = randomness
        self.train(original.training)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self.latest_losses: Tensor | None = None
        self._history: deque[Tensor] = deque(maxlen=history_size)
        self.grad_scaler: Any = None
        self._substitute: dict[str, Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._layout: GradLayout | None = None
        if optimizer_cls is not None:  # lr_list or optimizer_kwargs alone are refused above
            self._build_optimizer(optimizer_cls, lr_list, optimizer_kwargs)

    @property
    def randomness(self) -> str:
        """`"different"` (default): each model draws its own random numbers (dropout masks);
        `"same"`: every model draws the same ones, as `torch.vmap(randomness="same")`.

        Either way the draws change from one forward to the next. Settable.
        """
        return self._randomness

    @randomness.setter
    def randomness(self, value: str) -> None:
        if value not in ("different", "same"):
            raise ValueError(
                f"ModelBatch: randomness must be 'different' or 'same', got {value!r}."
            )
        self._randomness = value

    # ------------------------------------------------------------------ structure

    @property
    def skeleton(self) -> nn.Module:
        """Model 0's structure on the `meta` device (no memory), used by `functional_call`."""
        return self._skeleton

    def stacked_params(self) -> dict[str, Tensor]:
        """The stacked parameters by the user's names, each `[N, *shape]`."""
        params, _ = self._leaf_tables()
        return {name: table[leaf] for name, table, leaf in params}

    def stacked_buffers(self) -> dict[str, Tensor]:
        """The stacked buffers by the user's names, each `[N, *shape]`."""
        _, buffers = self._leaf_tables()
        return {name: table[leaf] for name, table, leaf in buffers}

    def _leaf_tables(self) -> tuple[list[tuple[str, dict, str]], list[tuple[str, dict, str]]]:
        """For each stacked parameter and buffer: (name, its owner's `_parameters` or
        `_buffers`, its key there); looked up once per `stacked` tree, not per forward."""
        cached = self.__dict__.get("_leaves_of")
        if cached is not None and cached[0] is self.stacked:
            return cached[1], cached[2]

        def table(name: str, kind: str) -> tuple[str, dict, str]:
            prefix, leaf = split_name(name)
            owner = self.stacked.get_submodule(prefix)
            if leaf not in getattr(owner, kind):
                raise AttributeError(f"ModelBatch: the stacked tree has no {kind[1:-1]} {name!r}")
            return name, getattr(owner, kind), leaf

        params = [table(name, "_parameters") for name in self._param_names]
        buffers = [table(name, "_buffers") for name in self._buffer_names]
        self.__dict__["_leaves_of"] = (self.stacked, params, buffers)
        return params, buffers

    def train(self, mode: bool = True) -> ModelBatch:
        super().train(mode)
        self._skeleton.train(mode)
        return self

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, model={type(self._export_skeleton).__name__}"

    # ------------------------------------------------------------------ forward

    def forward(self, *args: Any, per_model: PerModel = None, **kwargs: Any) -> Any:
        """Run every model on the inputs.

        Args:
            *args: the model's positional inputs, each shared by all models
                (`[B, ...]`) or split across them (`[N, B, ...]`, model i sees
                slice i), as `per_model` says.
            per_model: which inputs carry a leading model axis:

                - `None` (default): none; an input that looks like `[N, B, ...]`
                  given this way raises (see below).
                - `True` / `False`: every input tensor / none (always honoured).
                - a tuple with one entry per positional argument, e.g.
                  `(False, True)`; keyword inputs are then shared.
                - a dict from positions and keyword names to entries, e.g.
                  `{1: True, "mask": True}`; inputs not named are shared.

                An entry is a bool, or a pytree of bools shaped like its
                argument (as `torch.vmap`'s `in_dims`).
            **kwargs: the model's keyword inputs.

        Returns:
            The model's output with a leading model axis: `[N, B, ...]`
            (any pytree of tensors).

        Raises:
            ValueError: an input on another device than the models; a
                per-model input whose leading size is not N; with
                `per_model=None`, an input `[N, B, ...]` that the model would
                read as one shared batch (pass `per_model=True`, or
                `per_model=False` if it is a shared batch of N examples).
            TypeError: an input whose dtype the model cannot take (named).
        """
        n = self.num_models
        device = self.active.device
        leaves, spec = tree_flatten((args, kwargs))
        check_devices(leaves, device, args, kwargs)
        flags = per_model_flags(per_model, args, kwargs, spec, len(leaves))
        if per_model is None and not torch.compiler.is_compiling():
            self._reading.check_shared(self._skeleton, args, kwargs, leaves, n)
        in_dim = model_axis_dims(per_model, flags, args, kwargs, leaves, spec, n)
        self._reading.record(leaves, flags)

        params = self._substitute if self._substitute is not None else self.stacked_params()
        buffers = self.stacked_buffers()
        watch = self._buffer_watch
        guard = watch.some_retired(self.active)
        work = watch.working_copies(buffers, guard, self.training, self._norm_stats)
        state = {**params, **buffers, **work}
        versions = watch.versions(buffers)
        skeleton = self._skeleton

        def run_one(state_i: dict[str, Tensor], inputs: tuple[tuple, dict], *_: Any) -> Any:
            a, kw = inputs
            live = dict(state_i)  # functional_call writes re-assigned tensors back into it
            out = functional_call(skeleton, live, a, kw)
            return out, {k: v for k, v in live.items() if v is not state_i[k]}

        # A model without parameters or buffers still needs one tensor to map over.
        extra = () if state else (self.active,)
        vmapped = torch.vmap(
            run_one, in_dims=(0, in_dim, *(0 for _ in extra)), randomness=self._randomness
        )
        try:
            with vmap_forward_context(device):
                out, new = vmapped(state, (args, kwargs), *extra)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
            # vmap's own message names an aten op; say which of the user's layers failed.
            param_dtype = next((p.dtype for p in params.values() if p.is_floating_point()), None)
            clearer = explain_forward_error(err, skeleton) or explain_dtype_error(
                err, leaves, args, kwargs, param_dtype
            )
            if clearer is None:
                raise
            raise clearer from err
        watch.write_back(
            buffers,
            params,
            work,
            new,
            guard,
            self.active,
            versions,
            self.training,
            self._replace_buffer,
        )
        return out

    def _replace_buffer(self, name: str, value: Tensor) -> None:
        prefix, leaf = split_name(name)
        self.stacked.get_submodule(prefix)._buffers[leaf] = value

    @contextlib.contextmanager
    def substitute_weights(self, weights: Mapping[str, Tensor]) -> Iterator[None]:
        """Run forwards on other tensors in place of the stacked parameters (same names, shapes).

        The training step uses it for the low-precision copies its optimizer
        writes (`BatchOptimizer.low_precision_copies`); gradients then land on
        those tensors.
        """
        own = self.stacked_params()
        if set(weights) != set(own):
            raise ValueError(
                f"ModelBatch.substitute_weights: expected tensors for {sorted(own)}, got "
                f"{sorted(weights)}; pass one tensor per stacked parameter."
            )
        previous, self._substitute = self._substitute, dict(weights)
        try:
            yield
        finally:
            self._substitute = previous

    # ------------------------------------------------------------------ losses

    def _targets_per_model(self, outputs: Tensor, targets: Tensor, per_model: bool | None) -> bool:
        n = self.num_models
        if per_model is not None:
            if per_model and (targets.dim() == 0 or targets.shape[0] != n):
                raise ValueError(
                    f"ModelBatch: per_model=True expects targets [N={n}, B, ...], "
                    f"got shape {tuple(targets.shape)}."
                )
            return per_model
        batch = outputs.shape[1] if outputs.dim() > 1 else None
        looks_per_model = targets.dim() >= 2 and tuple(targets.shape[:2]) == (n, batch)
        looks_shared = targets.dim() >= 1 and targets.shape[0] == batch
        if looks_per_model and looks_shared and targets.dim() >= 2 and targets.shape[1] == n:
            raise ValueError(
                f"ModelBatch: cannot tell whether targets of shape {tuple(targets.shape)} are "
                f"shared or per model (N={n}, batch={batch}); pass per_model=True or False."
            )
        if (
            not looks_per_model
            and batch is not None
            and targets.dim() >= 1
            and targets.shape[0] != batch
        ):
            shape = tuple(targets.shape)
            if targets.dim() >= 2 and targets.shape[1] == batch:
                raise ValueError(
                    f"ModelBatch: targets of shape {shape} look per model (batch {batch} second) "
                    f"but hold {targets.shape[0]} models, expected N={n}; pass [N={n}, B={batch}, "
                    f"...] targets, or [B={batch}, ...] targets shared by all models."
                )
            raise ValueError(
                f"ModelBatch: targets of shape {shape} fit neither shared targets "
                f"[B={batch}, ...] nor per-model targets [N={n}, B={batch}, ...] for outputs "
                f"{tuple(outputs.shape)}; pass targets of one of these shapes (per_model=False "
                "hands any targets to the loss unchanged)."
            )
        return looks_per_model

    def per_model_losses(
        self,
        outputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn | None = None,
        per_model: bool | None = None,
    ) -> Tensor:
        """Each model's loss, `[N]`, with graph; retired models are not masked here."""
        fn = loss_fn if loss_fn is not None else self.loss_fn
        n = self.num_models
        if not isinstance(outputs, Tensor) or outputs.dim() == 0 or outputs.shape[0] != n:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise ValueError(
                f"ModelBatch.compute_loss: expected outputs [N={n}, B, ...] from this "
                f"ModelBatch, got {shape}."
            )
        split = self._targets_per_model(outputs, targets, per_model)
        if targets.dtype == torch.float64 and outputs.dtype in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
        ):
            # Often numpy's default dtype: the loss would silently run in float64, and
            # some losses (huber_loss) fail only in backward.
            if outputs.dim() >= 3 and targets.shape[int(split) :] == outputs.shape[1:-1]:
                raise TypeError(
                    f"ModelBatch.compute_loss: targets {tuple(targets.shape)} {targets.dtype} "
                    f"have the shape of class indices for outputs {tuple(outputs.shape)}; "
                    "class-index targets must be integers: pass targets.long()."
                )
            raise TypeError(
                f"ModelBatch.compute_loss: targets are float64, outputs {outputs.dtype}; pass "
                f"targets.to({outputs.dtype}) (targets.float() under autocast), or class "
                "indices as targets.long()."
            )
        ignore_index = _plain_cross_entropy(fn, outputs, targets, split)
        if ignore_index is not None:
            return _cross_entropy_per_model(outputs, targets, split, ignore_index)
        try:
            losses = torch.vmap(fn, in_dims=(0, 0 if split else None), randomness="different")(
                outputs, targets
            )
        except (RuntimeError, ValueError) as err:
            clearer = _explain_loss_error(err, outputs, targets, split)
            if clearer is None:
                raise
            raise clearer from err
        if losses.shape != (n,):
            raise ValueError(
                f"ModelBatch.compute_loss: loss_fn must reduce to one scalar per model, "
                f"got per-model shape {tuple(losses.shape[1:])}; use a loss with "
                "reduction='mean' or 'sum'."
            )
        return losses

    def compute_loss(
        self,
        outputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn | None = None,
        reduction: str = "sum",
        per_model: bool | None = None,
    ) -> Tensor:
        """Per-model losses, reduced so that backward gives each model its own gradient.

        Args:
            outputs: `[N, B, ...]` from `forward`.
            targets: shared `[B, ...]` or per model `[N, B, ...]`.
            loss_fn: overrides the loss given at construction.
            reduction: `"sum"` (scalar; each model's gradient is exactly its
                own loss's gradient), `"mean"` (scalar, the sum divided by N)
                or `"none"` (`[N]`).
            per_model: whether targets carry the model axis; inferred from
                the shapes when None.

        Returns:
            A scalar, or `[N]` for `reduction="none"`. Retired models contribute 0.
        """
        if reduction not in ("sum", "mean", "none"):
            raise ValueError(
                f"ModelBatch.compute_loss: reduction must be 'sum', 'mean' or 'none', "
                f"got {reduction!r}."
            )
        losses = self.mask_retired(self.per_model_losses(outputs, targets, loss_fn, per_model))
        self.record_losses(losses.detach())
        if self.grad_scaler is not None:
            losses = self.grad_scaler.attach(losses)
        if reduction == "sum":
            return losses.sum()
        if reduction == "mean":
            return losses.sum() / self.num_models
        return losses

    def mask_retired(self, losses: Tensor) -> Tensor:
        """`[N]` losses with the retired models' entries replaced by 0 (their gradient is 0)."""
        return torch.where(self.active, losses, torch.zeros_like(losses))

    def record_losses(self, losses: Tensor) -> None:
        """Make detached `[N]` losses the latest ones and append them to the history.

        `compute_loss` calls this; a training step that computes its losses
        another way (`modelbatch.compile_step`) calls it too.
        """
        self.latest_losses = losses
        self._history.append(losses)

    def loss_history(self) -> Tensor:
        """The per-model losses of the recorded `compute_loss` calls: `[T, N]`."""
        if not self._history:
            return torch.empty(0, self.num_models, device=self.active.device)
        return torch.stack(list(self._history))

    def clear_history(self) -> None:
        """Forget the recorded losses."""
        self._history.clear()

    # ------------------------------------------------------------------ metrics

    def accuracy(self, outputs: Tensor, targets: Tensor, per_model: bool | None = None) -> Tensor:
        """Per-model classification accuracy, `[N]` (outputs `[N, B, C]`, targets class indices)."""
        split = self._targets_per_model(outputs, targets, per_model)
        predictions = outputs.argmax(dim=-1)
        target = targets if split else targets.unsqueeze(0)
        return (predictions == target).float().mean(dim=tuple(range(1, predictions.dim())))

    def summary(self, **columns: Tensor | Sequence[Any]) -> list[dict[str, Any]]:
        """One row per model: index, active, latest loss and the given `[N]` columns."""
        base: dict[str, Tensor | Sequence[Any]] = {"active": self.active}
        if self.latest_losses is not None:
            base["loss"] = self.latest_losses
        return per_model_rows(
            {**base, **columns}, self.num_models, ids=getattr(self, "model_ids", None)
        )

    def format_summary(
        self, sort_by: str | None = None, top: int | None = None, **columns: Any
    ) -> str:
        """`summary` as a table a person can read, optionally sorted and cut to `top` rows."""
        return format_table(self.summary(**columns), sort_by=sort_by, top=top)

    # ------------------------------------------------------------------ active mask

    def retire(self, indices: int | Sequence[int] | Tensor) -> None:
        """Stop training these models: their loss is 0 and the optimizer leaves them unchanged."""
        self.active[
            model_indices("ModelBatch.retire", indices, self.num_models, self.active.device)
        ] = False

    def activate(self, indices: int | Sequence[int] | Tensor) -> None:
        """Train these models again."""
        self.active[
            model_indices("ModelBatch.activate", indices, self.num_models, self.active.device)
        ] = True

    # ------------------------------------------------------------------ export

    def get_model_states(self) -> list[dict[str, Tensor]]:
        """N ordinary state dicts; each loads into the user's class with `load_state_dict`."""
        return [self._model_state(i) for i in range(self.num_models)]

    def _model_state(self, i: int) -> dict[str, Tensor]:
        own = {**self.stacked_params(), **self.stacked_buffers()}
        return {k: own[name][i].detach().clone() for k, name in self._state_keys.items()}

    def load_model_states(self, states: Sequence[Mapping[str, Tensor]]) -> None:
        """Load N per-model state dicts (as from `get_model_states`) into the stack."""
        if len(states) != self.num_models:
            raise ValueError(
                f"ModelBatch.load_model_states: expected {self.num_models} state dicts, "
                f"got {len(states)}."
            )
        own = {**self.stacked_params(), **self.stacked_buffers()}
        keys = set(self._state_keys)
        for i, state in enumerate(states):
            if set(state.keys()) != keys:
                raise ValueError(
                    f"ModelBatch.load_model_states: state {i} has keys "
                    f"{sorted(set(state.keys()) ^ keys)} that do not match the model's."
                )
            for k, name in self._state_keys.items():
                if tuple(state[k].shape) != tuple(own[name].shape[1:]):
                    raise ValueError(
                        f"ModelBatch.load_model_states: state {i} has {k!r} of shape "
                        f"{tuple(state[k].shape)}, expected {tuple(own[name].shape[1:])}."
                    )
        with torch.no_grad():
            # Tied tensors appear under several keys and are written once, from their first key.
            for k, name in self._state_keys.items():
                if k == name or name not in self._state_keys:
                    own[name].copy_(torch.stack([s[k] for s in states]).to(own[name]))

    def model(self, i: int) -> nn.Module:
        """A fresh module of the user's class holding model i's weights and buffers."""
        if not -self.num_models <= i < self.num_models:
            raise IndexError(f"ModelBatch.model: index {i} out of range for N={self.num_models}.")
        i = i % self.num_models
        device = self.active.device
        module = materialize(self._export_skeleton, device)
        module.load_state_dict(self._model_state(i))
        # Non-persistent buffers are not in the state dict; to_empty left them uninitialized.
        stacked = self.stacked_buffers()
        with torch.no_grad():
            for name, buf in module.named_buffers():
                if name not in self._state_keys and name in stacked:
                    buf.copy_(stacked[name][i])
        # Per-model dropout rates live in non-persistent [N] buffers, not in the state dict.
        restore_config(module, self.stacked_buffers(), i)
        module.train(self.training)
        return module

    # ------------------------------------------------------------------ optimizer

    def _build_optimizer(
        self,
        optimizer_cls: type[torch.optim.Optimizer],
        lr_list: Sequence[float] | None,
        optimizer_kwargs: Mapping[str, Any] | None,
    ) -> torch.optim.Optimizer:

        kwargs = dict(optimizer_kwargs or {})
        configs = None
        if lr_list is not None:  # N floats (checked by _checked_optimizer_args)
            if "lr" in kwargs:
                raise ValueError(
                    "ModelBatch: give the learning rate in lr_list or in "
                    "optimizer_kwargs['lr'], not both."
                )
            configs = [{"lr": lr} for lr in lr_list]
        return self._own_optimizer(optimizer_cls, kwargs, configs)

    def _own_optimizer(
        self,
        optimizer_cls: type[torch.optim.Optimizer],
        kwargs: Mapping[str, Any],
        configs: Sequence[Mapping[str, Any]] | None,
    ) -> torch.optim.Optimizer:
        """Build the optimizer this batch owns, and learn its parameters' gradient layout."""
        from .optim import OptimizerFactory

        self.optimizer = OptimizerFactory(optimizer_cls, dict(kwargs)).create_optimizer(
            self, configs
        )
        self._layout = GradLayout(list(self.parameters()))
        return self.optimizer

    def step(self) -> None:
        """One optimizer step of every active model.

        With a `modelbatch.amp.BatchGradScaler` attached, this is the AMP
        recipe: `scaler.step(optimizer)` (unscale, skip the models whose
        gradients overflowed) then `scaler.update()`.
        """
        if self.optimizer is None:
            raise RuntimeError(
                "ModelBatch.step: this batch owns no optimizer; pass optimizer_cls (and "
                "lr_list) to ModelBatch, or step your own optimizer."
            )
        if self._layout is not None:
            self._layout.apply()
        apply_update(self.optimizer, scaler=self.grad_scaler)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the stacked parameters."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        else:
            super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_factory(
        cls,
        make: Callable[[], nn.Module],
        ids: int | Sequence[int] | Tensor,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        loss_fn: LossFn | None = None,
        init: str = "auto",
        seeded_dropout: bool = True,
        optimizer_cls: type[torch.optim.Optimizer] | None = None,
        configs: Sequence[Mapping[str, Any]] | None = None,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        chunk_elements: int = 1 << 26,
        build_device: torch.device | str | None = None,
    ) -> ModelBatch:
        """Build the models `ids` (or `range(n)`) of `make()` stacked on `device`, seeded by id.

        Model `id`'s weights, and its dropout masks, depend only on `(seed, id)`:
        a sweep sharded over processes (`modelbatch.distributed`) or built in
        pieces gives the same models as one built whole.

        Args:
            make: `() -> nn.Module`, the architecture (called once or twice
                with `init="fast"`, once per model with `init="exact"`).
            ids: the global model ids (distinct ints >= 0), or a count n.
            seed: the run's seed.
            device: where the stacked tensors live (default: where `make()` puts them).
            loss_fn: as for `ModelBatch`.
            init: `"fast"` draws every parameter of a known layer (Linear,
                Conv, ConvTranspose, Bilinear, Embedding, RNNs) for all
                models at once from torch's default init distribution, keyed
                by `(seed, id)`; `"exact"` calls `make()` under
                `torch.manual_seed(modelbatch.distributed.init_seeds(seed, ids)[k])`
                per model; `"auto"` is fast unless `make()` has an init the
                fast path does not know (then exact, with a warning).
            seeded_dropout: run torch dropout layers as `modelbatch.nn.Seeded*`
                twins, whose masks depend on `(seed, id, layer, step)` only.
            optimizer_cls: if given, the batch owns this optimizer (vectorized),
                with `configs[k]` (e.g. `{"lr": ...}`) for model `ids[k]`
                merged over `optimizer_kwargs`.
            chunk_elements: values drawn per piece, to bound temporary memory.
            build_device: where the values are drawn (default `device`): a GPU
                builds a CPU store fast, in pinned memory (see `ChunkedTrainer`).

        Returns:
            A ModelBatch with `model_ids` `[N]` (int64), which its `summary` shows.

        Example:
            >>> mb = ModelBatch.from_factory(lambda: nn.Linear(4, 3), range(10, 18), seed=1)
            >>> mb.stacked_params()["weight"].shape
            torch.Size([8, 3, 4])
        """
        from ._build import build_from_factory

        mb = build_from_factory(
            cls,
            make,
            ids,
            seed=seed,
            device=device,
            init=init,
            seeded_dropout=seeded_dropout,
            chunk_elements=chunk_elements,
            build_device=build_device,
            loss_fn=loss_fn,
        )
        if optimizer_cls is not None:
            mb._own_optimizer(
                optimizer_cls, optimizer_kwargs or {}, None if configs is None else list(configs)
            )
        elif configs is not None or optimizer_kwargs is not None:
            raise ValueError(
                "ModelBatch.from_factory: configs and optimizer_kwargs need optimizer_cls; "
                "pass optimizer_cls=torch.optim.Adam (say)."
            )
        return mb


def _plain_cross_entropy(fn: Any, outputs: Tensor, targets: Tensor, split: bool) -> int | None:
    """The `ignore_index` of a plain cross-entropy on class indices, else None.

    Plain: `F.cross_entropy` itself, or an `nn.CrossEntropyLoss` (exactly that
    class) with no class weights, no label smoothing and the mean reduction;
    targets are class indices `[B]` / `[N, B]` for outputs `[N, B, C]`.
    """
    if fn is F.cross_entropy:
        ignore_index = -100
    elif (
        type(fn) is nn.CrossEntropyLoss
        and fn.weight is None
        and fn.reduction == "mean"
        and fn.label_smoothing == 0.0
    ):
        ignore_index = fn.ignore_index
    else:
        return None
    expected = tuple(outputs.shape[:2]) if split else tuple(outputs.shape[1:2])
    plain = (
        outputs.dim() == 3
        and outputs.is_floating_point()
        and targets.dtype in (torch.int64, torch.int32)
        and tuple(targets.shape) == expected
    )
    return ignore_index if plain else None


def _cross_entropy_per_model(
    outputs: Tensor, targets: Tensor, split: bool, ignore_index: int
) -> Tensor:
    """The cross-entropy of each model, `[N]`, as one call over `[N * B, C]`.

    Under vmap cross-entropy's `nll_loss` has no batching rule and is decomposed
    op by op; over the flattened batch it is torch's own two kernels. Same math:
    the mean over each model's targets that are not `ignore_index`.
    """
    n, b = outputs.shape[:2]
    flat = targets.reshape(-1) if split else targets.repeat(n)
    losses = F.cross_entropy(
        outputs.reshape(n * b, -1), flat.long(), reduction="none", ignore_index=ignore_index
    )
    counted = (flat != ignore_index).view(n, b).sum(dim=1)
    return losses.view(n, b).sum(dim=1) / counted
