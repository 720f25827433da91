"""ModelBatch: N models of one architecture as one module."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from ._indices import model_indices
from ._layout import GradLayout
from ._metrics import format_table, per_model_rows
from ._stack import (
    build_stacked_tree,
    check_compatible,
    materialize,
    meta_skeleton,
    state_key_map,
)
from ._step import apply_update
from .nn._convert import restore_config, vmap_forward_context
from .nn._errors import explain_forward_error

__all__ = ["ModelBatch"]

LossFn = Callable[..., Tensor]


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
            over the stacked parameters (`zero_grad()`, `step()`).
        lr_list: N learning rates, one per model (needs `optimizer_cls`).
        optimizer_kwargs: further optimizer arguments shared by all models.
        per_model_dropout: accept models that differ only in their Dropout
            `p`; each model then drops with its own rate.
        history_size: how many `compute_loss` calls the loss history keeps.

    Example:
        >>> models = [nn.Linear(4, 3) for _ in range(8)]
        >>> mb = ModelBatch(models)
        >>> mb(torch.randn(16, 4)).shape
        torch.Size([8, 16, 3])

    Warning:
        Every tensor leaf of the inputs is either shared by all models
        (`[B, ...]`, the default) or split across them (`[N, B, ...]`,
        with `per_model=True`); mixing the two in one call is not supported.
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
        history_size: int = 10_000,
    ) -> None:
        super().__init__()
        from .nn._convert import prepare_models

        check_compatible(models, ignore_dropout_p=per_model_dropout)
        models = list(models)
        original = models[0]
        models = prepare_models(models, per_model_dropout=per_model_dropout)
        self.num_models = len(models)
        tree, self._param_names, self._buffer_names = build_stacked_tree(models)
        self.stacked = tree
        ref_param = next(iter(tree.parameters()), None)
        device = ref_param.device if ref_param is not None else torch.device("cpu")
        self.register_buffer("active", torch.ones(self.num_models, dtype=torch.bool, device=device))
        # Kept outside the module tree (object.__setattr__) so that .to(),
        # state_dict() and frameworks see only the stacked tensors.
        object.__setattr__(self, "_skeleton", meta_skeleton(models[0]))
        object.__setattr__(self, "_export_skeleton", meta_skeleton(original))
        self._state_keys = state_key_map(original)
        self.train(original.training)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self.latest_losses: Tensor | None = None
        self._history: deque[Tensor] = deque(maxlen=history_size)
        self.grad_scaler: Any = None
        self._substitute: dict[str, Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._layout: GradLayout | None = None
        if optimizer_cls is not None or lr_list is not None:
            self.optimizer = self._build_optimizer(optimizer_cls, lr_list, optimizer_kwargs)
            self._layout = GradLayout(list(self.parameters()))

    # ------------------------------------------------------------------ structure

    @property
    def skeleton(self) -> nn.Module:
        """Model 0's structure on the `meta` device (no memory), used by `functional_call`."""
        return self._skeleton

    def stacked_params(self) -> dict[str, Tensor]:
        """The stacked parameters by the user's names, each `[N, *shape]`."""
        return {name: self.stacked.get_parameter(name) for name in self._param_names}

    def stacked_buffers(self) -> dict[str, Tensor]:
        """The stacked buffers by the user's names, each `[N, *shape]`."""
        return {name: self.stacked.get_buffer(name) for name in self._buffer_names}

    def train(self, mode: bool = True) -> ModelBatch:
        super().train(mode)
        self._skeleton.train(mode)
        return self

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, model={type(self._export_skeleton).__name__}"

    # ------------------------------------------------------------------ forward

    def forward(self, *args: Any, per_model: bool = False, **kwargs: Any) -> Any:
        """Run every model on the inputs.

        Args:
            *args: the model's positional inputs. Shared by all models
                (`[B, ...]`) by default; with `per_model=True` every tensor
                is `[N, B, ...]` and model i sees slice i.
            per_model: whether the inputs carry a leading model axis.
            **kwargs: the model's keyword inputs, shared or split like `args`.

        Returns:
            The model's output with a leading model axis: `[N, B, ...]`
            (any pytree of tensors).
        """
        n = self.num_models
        if per_model:
            leaves, _ = tree_flatten((args, kwargs))
            for leaf in leaves:
                if isinstance(leaf, Tensor) and (leaf.dim() == 0 or leaf.shape[0] != n):
                    raise ValueError(
                        f"ModelBatch.forward: per_model=True expects every input tensor to be "
                        f"[N={n}, B, ...], got shape {tuple(leaf.shape)}; pass per_model=False "
                        "for inputs shared by all models."
                    )
            in_dim: Any = tree_map(lambda x: 0 if isinstance(x, Tensor) else None, (args, kwargs))
        else:
            in_dim = None
        weights = self._substitute if self._substitute is not None else self.stacked_params()
        state = {**weights, **self.stacked_buffers()}
        skeleton = self._skeleton

        def run_one(state_i: dict[str, Tensor], inputs: tuple[tuple, dict]) -> Any:
            a, kw = inputs
            return functional_call(skeleton, state_i, a, kw)

        vmapped = torch.vmap(run_one, in_dims=(0, in_dim), randomness="different")
        try:
            with vmap_forward_context(self.active.device):
                return vmapped(state, (args, kwargs))
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
            # vmap's own message names an aten op; say which of the user's layers failed.
            clearer = explain_forward_error(err, skeleton)
            if clearer is None:
                raise
            raise clearer from err

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
        losses = torch.vmap(fn, in_dims=(0, 0 if split else None), randomness="different")(
            outputs, targets
        )
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
        optimizer_cls: type[torch.optim.Optimizer] | None,
        lr_list: Sequence[float] | None,
        optimizer_kwargs: Mapping[str, Any] | None,
    ) -> torch.optim.Optimizer:
        from .optim import OptimizerFactory

        if optimizer_cls is None:
            optimizer_cls = torch.optim.Adam
        kwargs = dict(optimizer_kwargs or {})
        configs = None
        if lr_list is not None:
            lrs = [float(lr) for lr in lr_list]
            if len(lrs) != self.num_models:
                raise ValueError(
                    f"ModelBatch: lr_list has {len(lrs)} entries, expected one per model "
                    f"(N={self.num_models})."
                )
            if "lr" in kwargs:
                raise ValueError(
                    "ModelBatch: give the learning rate in lr_list or in "
                    "optimizer_kwargs['lr'], not both."
                )
            configs = [{"lr": lr} for lr in lrs]
        return OptimizerFactory(optimizer_cls, kwargs).create_optimizer(self, configs)

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
            from .optim import OptimizerFactory

            factory = OptimizerFactory(optimizer_cls, dict(optimizer_kwargs or {}))
            mb.optimizer = factory.create_optimizer(mb, None if configs is None else list(configs))
        elif configs is not None or optimizer_kwargs is not None:
            raise ValueError(
                "ModelBatch.from_factory: configs and optimizer_kwargs need optimizer_cls; "
                "pass optimizer_cls=torch.optim.Adam (say)."
            )
        return mb
