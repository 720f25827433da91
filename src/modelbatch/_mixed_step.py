"""The training step of a MixedBatch: every group in one call, one CUDA graph on CUDA.

Warm-up, capture and replay are `modelbatch.fast`'s (`_Replayed`), shared
with `compile_step`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ._mixed_optim import MixedOptimizer
from ._step import TrainStep
from .fast import _Replayed, device_max_norm

__all__ = ["MixedStep", "compile_mixed_step"]

LossFn = Callable[..., Tensor]


class MixedStep(_Replayed):
    """A training step over every group of a MixedBatch; built by `compile_mixed_step`.

    Attributes:
        mode: `"graph"` or `"eager"`, what the step runs.
        reason: why the step runs eagerly, or None.
        num_graphs: how many input shapes have a captured graph.
    """

    def __init__(
        self,
        mixed: Any,
        optimizer: MixedOptimizer,
        loss_fn: LossFn | None = None,
        *,
        max_norm: float | Tensor | None = None,
        per_model: bool = False,
        mode: str = "auto",
        warmup: int = 2,
        max_graphs: int = 4,
        relayout: bool = True,
    ) -> None:
        from .mixed import MixedBatch
        from .optim import BatchOptimizer

        if not isinstance(mixed, MixedBatch):
            raise TypeError(
                f"compile_mixed_step: expected a MixedBatch, got {type(mixed).__name__}; for "
                "one architecture use modelbatch.compile_step."
            )
        if not isinstance(optimizer, MixedOptimizer) or optimizer.mixed is not mixed:
            raise TypeError(
                "compile_mixed_step: expected the MixedOptimizer of this MixedBatch, got "
                f"{type(optimizer).__name__}; build it with MixedOptimizer(mixed, cls, configs)."
            )
        if mode not in ("auto", "graph", "eager"):
            raise ValueError(
                f"compile_mixed_step: mode must be 'auto', 'graph' or 'eager', got {mode!r}."
            )
        if warmup < 1:
            raise ValueError(f"compile_mixed_step: warmup must be >= 1, got {warmup}.")
        self.mixed = mixed
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.per_model = per_model
        self.warmup = warmup
        self.max_graphs = max_graphs
        device = mixed._order.device
        max_norm = device_max_norm("compile_mixed_step", max_norm, mixed.num_models, device)
        self.max_norm = max_norm
        # Forward, per-model losses and retired-model masking: the one training step's.
        self._train = TrainStep(mixed, optimizer, loss_fn, per_model=per_model, relayout=relayout)
        self._init_graphs()
        self.reason: str | None = None
        if mode == "eager":
            self.reason = "mode='eager' was asked for"
        elif device.type != "cuda":
            self.reason = f"CUDA graphs need a CUDA device and the models are on {device}"
        elif not all(isinstance(o, BatchOptimizer) for o in optimizer.optimizers):
            self.reason = "only modelbatch's vectorized optimizers are captured"
        self.mode = "eager" if self.reason is not None else "graph"
        if self.mode == "eager" and mode == "graph":
            raise RuntimeError(f"compile_mixed_step: mode='graph' is impossible: {self.reason}.")
        if self.mode == "eager" and mode == "auto":
            warnings.warn(
                f"compile_mixed_step: running the eager step, because {self.reason}.", stacklevel=3
            )

    owner = "compile_mixed_step"

    def _leaves(self) -> list[Tensor]:
        return self._train.leaves

    def _body(self, inputs: Any, targets: Tensor) -> Tensor:
        """Forward of every group, `[N]` losses, one backward, masking, clipping, update."""
        mixed = self.mixed
        losses = self._train.forward_loss(inputs, targets)
        losses.sum().backward()
        self._train.relayout()
        mixed.mask_padding_grads()
        if self.max_norm is not None:
            mixed.clip_grad_norm_(self.max_norm)
        self.optimizer.step()
        mixed.zero_padding()
        return losses.detach()

    def __call__(self, inputs: Any, targets: Tensor) -> Tensor:
        """One training step of every active model; per-model losses `[N]` (user order, on device)."""
        if self.mode == "eager":
            losses = self._eager(inputs, targets)
        else:
            losses = self._graph_step(inputs, targets)
        self.mixed.record_losses(losses)
        return losses


def compile_mixed_step(
    mixed: Any,
    optimizer: MixedOptimizer,
    loss_fn: LossFn | None = None,
    *,
    max_norm: float | Tensor | None = None,
    per_model: bool = False,
    mode: str = "auto",
    warmup: int = 2,
    max_graphs: int = 4,
    relayout: bool = True,
) -> MixedStep:
    """The training step of a MixedBatch, `step(x, y) -> losses [N]`, one CUDA graph on CUDA.

    One call runs every group's forward, the per-model losses as one `[N]`
    vector in the user's model order (retired models give 0), one backward,
    the padding masks on the gradients, per-model clipping, every group's
    optimizer update and the re-zeroing of padding. On CUDA the whole step
    is captured once per input shape and replayed (as `modelbatch.compile_step`
    does for one ModelBatch); elsewhere it runs eagerly and warns once.

    Args:
        mixed: the MixedBatch.
        optimizer: its `MixedOptimizer`.
        loss_fn: per-model loss; defaults to the batch's.
        max_norm: clip each model's gradient norm to this (a float or `[N]`).
        per_model: inputs and targets carry the model axis `[N, B, ...]`.
        mode: `"auto"`, `"graph"` (raise if impossible) or `"eager"`.
        warmup: eager steps per input shape before capture.
        max_graphs: most input shapes captured.
        relayout: as for `compile_step` (parameters in their gradients' layout).

    Example:
        >>> step = compile_mixed_step(mb, MixedOptimizer(mb, torch.optim.Adam))
        >>> step(torch.randn(16, 4), torch.randint(0, 3, (16,))).shape
        torch.Size([N])
    """
    return MixedStep(
        mixed,
        optimizer,
        loss_fn,
        max_norm=max_norm,
        per_model=per_model,
        mode=mode,
        warmup=warmup,
        max_graphs=max_graphs,
        relayout=relayout,
    )
