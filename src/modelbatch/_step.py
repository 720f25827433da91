"""The training step, written once: forward, per-model loss, backward, unscale, clip, update.

`ModelBatch.step()` (the quick-start loop's update), `compile_step` (which
captures a `TrainStep` into a CUDA graph), and the integrations all run these
functions. Nothing here synchronizes the host with the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._layout import GradLayout, restrided
from ._stack import split_name
from .nn._cells import _CellBase
from .nn._rnn import _RNNBase

__all__ = ["TrainStep", "apply_update"]

LossFn = Callable[..., Tensor]


def apply_update(
    optimizer: torch.optim.Optimizer,
    *,
    scaler: Any = None,
    max_norm: float | Tensor | None = None,
    params: Sequence[Tensor] | None = None,
    num_models: int | None = None,
) -> None:
    """After backward: unscale (AMP), clip each model's gradient norm, step, update the scale.

    Args:
        optimizer: the optimizer over the stacked parameters.
        scaler: a per-model grad scaler (`modelbatch.amp.BatchGradScaler`), or None.
        max_norm: clip each model's gradients to this norm (a float or `[N]`), or None.
        params: the stacked parameters whose gradients are clipped (needed with `max_norm`).
        num_models: N (needed with `max_norm`).
    """
    scaling = scaler is not None and scaler.is_enabled()
    if max_norm is not None:
        if scaling:
            scaler.unscale_(optimizer)
        from .optim import clip_grad_norm_

        clip_grad_norm_(list(params or []), max_norm, num_models=num_models)
    if scaling:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _as_args(x: Any) -> tuple:
    """Positional inputs: a tuple or list as they are, anything else as one argument."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


# Modules whose weights torch.autocast casts to its low precision (torch's, and the
# recurrent layers ModelBatch substitutes for torch's).
_AUTOCAST_CASTS = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.RNNBase,
    nn.RNNCellBase,
    _RNNBase,
    _CellBase,
    nn.MultiheadAttention,
)


def _matmul_weights(tree: nn.Module, names: dict[str, Tensor], device_type: str) -> list[str]:
    """The names in `names` whose owning module in `tree` autocast runs in low precision.

    On the CPU torch's vmap rule for convolutions does not autocast: a
    convolution's weights there stay float32, as its input does.
    """
    casts: tuple[type[nn.Module], ...] = _AUTOCAST_CASTS
    if device_type == "cpu":
        casts = tuple(c for c in casts if c is not nn.modules.conv._ConvNd)
    return [name for name in names if isinstance(tree.get_submodule(split_name(name)[0]), casts)]


class TrainStep:
    """One training step of every active model: `step(inputs, targets) -> losses [N]`.

    Args:
        model_batch: the models (a `ModelBatch`, or a `MixedBatch` for `forward_loss`).
        optimizer: an optimizer over `model_batch.parameters()` (a torch or
            modelbatch optimizer, or a `MixedOptimizer`).
        loss_fn: per-model loss; defaults to the batch's.
        scaler: a per-model grad scaler; defaults to the batch's own.
        max_norm: clip each model's gradient norm to this (a float or `[N]` tensor).
        autocast_dtype: run forward and loss under `torch.autocast` with this dtype.
        per_model: inputs and targets carry the model axis `[N, B, ...]`.
        relayout: store each parameter in its gradient's memory layout after
            the first backward (see `modelbatch._layout`).
        low_precision: under a bf16/fp16 `autocast_dtype` with a modelbatch
            optimizer, run the forward on low-precision weight copies that the
            optimizer writes in its update kernel (`BatchOptimizer.low_precision_copies`),
            so no weight or gradient is cast per step. False casts under
            autocast as torch does.
    """

    def __init__(
        self,
        model_batch: Any,
        optimizer: Any,
        loss_fn: LossFn | None = None,
        *,
        scaler: Any = None,
        max_norm: float | Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
        per_model: bool = False,
        relayout: bool = True,
        low_precision: bool = True,
    ) -> None:
        self.model_batch = model_batch
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scaler = scaler if scaler is not None else model_batch.grad_scaler
        self.max_norm = max_norm
        self.autocast_dtype = autocast_dtype
        self.per_model = per_model
        self.params = [p for p in model_batch.parameters() if p.requires_grad]
        self._weights: dict[str, Tensor] | None = None
        leaves = self.params
        make_copies = getattr(optimizer, "low_precision_copies", None)
        if low_precision and autocast_dtype in (torch.bfloat16, torch.float16) and make_copies:
            names = model_batch.stacked_params()
            # Copies only of the weights autocast runs in low precision (matmuls,
            # convolutions, recurrent cells): a norm layer's weights stay float32, as
            # under autocast. A parameter without a copy (those, a frozen one, one the
            # optimizer does not hold) stays as it is, and autocast casts it as torch does.
            device_type = model_batch.active.device.type
            cast = [names[n] for n in _matmul_weights(model_batch.skeleton, names, device_type)]
            copies = make_copies(autocast_dtype, cast)
            self._weights = {name: copies.get(p, p) for name, p in names.items()}
            leaves = [copies.get(p, p) for p in self.params]
        # What backward writes gradients to: the parameters, or their low-precision copies.
        self.leaves = leaves
        # A batch that owns its optimizer learns the layout in `mb.step()` with hooks of
        # its own: one set of hooks is enough, so this step takes it over (or, when
        # backward writes to copies, removes it: the parameters then get no gradient).
        pending = getattr(model_batch, "_layout", None)
        if not relayout:
            self._layout: GradLayout | None = None
        elif pending is not None and not pending.done and self._weights is None:
            self._layout = pending
        else:
            if pending is not None:
                pending.remove()
            self._layout = GradLayout(leaves)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = self.model_batch.active.device.type
        # The weight-cast cache must be off under graph capture (torch's advice),
        # and costs nothing measurable eagerly.
        return torch.autocast(device_type, dtype=self.autocast_dtype, cache_enabled=False)

    def forward_loss(self, inputs: Any, targets: Tensor) -> Tensor:
        """Per-model losses `[N]` (float32, with graph; retired models give 0)."""
        mb = self.model_batch
        args = _as_args(inputs)
        weights = contextlib.nullcontext()
        if self._weights is not None:
            self.optimizer.refresh_low_precision()  # type: ignore[attr-defined]
            weights = mb.substitute_weights(self._weights)
        with self.autocast(), weights:
            outputs = mb(*args, per_model=self.per_model)
            losses = mb.per_model_losses(
                outputs, targets, self.loss_fn, per_model=self.per_model or None
            )
        return mb.mask_retired(losses.float())

    def backward_update(self, losses: Tensor) -> None:
        """Backward of the per-model losses (scaled per model under AMP), then the update."""
        scaled = self.scaler.attach(losses) if self.scaler is not None else losses
        scaled.sum().backward()
        self.relayout()
        apply_update(
            self.optimizer,
            scaler=self.scaler,
            max_norm=self.max_norm,
            params=self.leaves,
            num_models=self.model_batch.num_models,
        )

    def relayout(self) -> None:
        """After the first backward: the leaves take their gradients' layout (once)."""
        if self._layout is not None and not self._layout.done:
            self._layout.apply()
            if self._weights is not None:
                self._follow_copies()

    @torch.no_grad()
    def _follow_copies(self) -> None:
        """After the copies took their gradients' layout, the float32 parameters take it too."""
        copies = self.optimizer.low_precision  # type: ignore[attr-defined]
        for p, copy in copies.items():
            if copy.stride() != p.stride():
                p.data = restrided(p.data, copy.stride())

    def __call__(self, inputs: Any, targets: Tensor) -> Tensor:
        """Zero the gradients, run the step, return the detached per-model losses `[N]`."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.forward_loss(inputs, targets)
        self.backward_update(losses)
        return losses.detach()
