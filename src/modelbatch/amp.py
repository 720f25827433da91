"""Per-model gradient scaling for mixed precision (fp16 autocast).

torch's `GradScaler` keeps one scale for the whole network: one overflow in
one model would skip every model's step and shrink every model's scale. Here
the scale, the growth tracker and the found-inf flags are `[N]`: an overflow
in model k skips only model k's update and backs off only model k's scale.

The scaling itself happens in backward: `ModelBatch.compute_loss` passes the
per-model losses `[N]` through `BatchGradScaler.attach`, an identity whose
backward multiplies model i's incoming gradient by `scale[i]`. Any scalar
built from those losses (their sum, their mean, a division by the number of
gradient-accumulation steps) therefore yields per-model scaled gradients, and
`scaler.scale(loss)` returns such a scalar unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from ._indices import model_indices
from .optim._clip import _norms
from .optim._hparams import per_model

__all__ = ["BatchGradScaler"]


class _Stage(Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


class _AttachScale(torch.autograd.Function):
    """Identity on `[N]` losses; backward multiplies the gradient by the `[N]` scale."""

    @staticmethod
    def forward(ctx: Any, losses: Tensor, scale: Tensor) -> Tensor:
        # Held by reference, not saved: backward reads the scale current at
        # backward time, which is the one unscale_ divides by.
        ctx.scale = scale
        return losses.view_as(losses)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return (grad * ctx.scale).to(grad.dtype), None


def _reaches_attach(t: Tensor) -> bool:
    """Whether `t`'s autograd graph passes through `_AttachScale` (breadth first:
    the scale sits a few nodes below a loss)."""
    attach_node = _AttachScale._backward_cls  # type: ignore[attr-defined]
    queue = deque([t.grad_fn])
    seen: set[Any] = set()
    while queue:
        fn = queue.popleft()
        if fn is None or fn in seen:
            continue
        if isinstance(fn, attach_node):
            return True
        seen.add(fn)
        queue.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


class BatchGradScaler:
    """A gradient scaler with one scale per model, with torch's `GradScaler` interface.

    Creating it registers it as `model_batch.grad_scaler`, so that
    `model_batch.compute_loss` attaches the per-model scale to the losses.
    Model i's scale follows exactly the trajectory torch's `GradScaler`
    would follow on model i alone.

    Args:
        model_batch: the ModelBatch whose gradients this scaler handles.
        init_scale: a float, or `[N]` (one initial scale per model).
        growth_factor: multiplies a model's scale after `growth_interval`
            consecutive steps without inf/nan in that model's gradients (> 1).
        backoff_factor: multiplies a model's scale when its gradients
            overflow (< 1).
        growth_interval: consecutive finite steps before growing.
        enabled: False makes every method a pass-through.

    State: `scale` `[N]` float32, `growth_tracker` `[N]` int32, found-inf
    flags `[N]` float32 per optimizer until `update()`.

    Example:
        >>> scaler = BatchGradScaler(mb)
        >>> with torch.autocast("cuda", dtype=torch.float16):
        ...     loss = mb.compute_loss(mb(x), y)
        >>> scaler.scale(loss).backward()
        >>> scaler.unscale_(opt)
        >>> norms = modelbatch.optim.clip_grad_norm_(mb, 1.0)
        >>> scaler.step(opt)  # model k with inf/nan gradients does not move
        >>> scaler.update()
        >>> scaler.get_scale().shape
        torch.Size([N])
    """

    def __init__(
        self,
        model_batch: Any,
        init_scale: float | Tensor = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        n = int(model_batch.num_models)
        self.num_models = n
        self._enabled = bool(enabled)
        owner = "BatchGradScaler"
        factors = _checked_factors(owner, growth_factor, backoff_factor, growth_interval)
        self._growth_factor, self._backoff_factor, self._growth_interval = factors
        device = model_batch.active.device
        scale = _checked_scale(
            owner, "init_scale", init_scale, n, "give one float, or one value per model"
        ).to(device)
        self._scale = scale.expand(n).clone()
        self._init_scale = self._scale.clone()
        self._growth_tracker = torch.zeros(n, dtype=torch.int32, device=device)
        self._per_optimizer: dict[int, dict[str, Any]] = {}
        self._attached = False
        self._step_accepts_skip: dict[type, bool] = {}
        model_batch.grad_scaler = self

    # ------------------------------------------------------------------ scaling

    def _to_device(self, device: torch.device) -> None:
        # The ModelBatch may have moved (`.to("cuda")`) after the scaler was made.
        if self._scale.device != device:
            self._scale = self._scale.to(device)
            self._growth_tracker = self._growth_tracker.to(device)

    def attach(self, losses: Tensor) -> Tensor:
        """Scale each model's gradient in backward by its own scale (called by `compute_loss`).

        Args:
            losses: per-model losses `[N]`.

        Returns:
            `losses`, unchanged in forward; in backward model i's gradient is
            multiplied by `scale[i]`.
        """
        if not self._enabled:
            return losses
        if losses.shape != (self.num_models,):
            raise ValueError(
                f"BatchGradScaler.attach: expected per-model losses [N={self.num_models}], got "
                f"shape {tuple(losses.shape)}."
            )
        self._to_device(losses.device)
        self._attached = True
        return _AttachScale.apply(losses, self._scale)

    def scale(self, outputs: Any) -> Any:
        """Per-model scaled losses for backward.

        Args:
            outputs: a scalar loss built from `ModelBatch.compute_loss` (returned
                unchanged: its gradients are already scaled per model), or
                per-model losses `[N]` (multiplied by the `[N]` scale unless they
                come from `compute_loss`), or a list/tuple of those.

        Returns:
            The scaled outputs, same structure.
        """
        if not self._enabled:
            return outputs
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"BatchGradScaler.scale: expected a Tensor or a list/tuple of Tensors, got "
                f"{type(outputs).__name__}."
            )
        attached = self._attached and outputs.grad_fn is not None and _reaches_attach(outputs)
        if attached:
            return outputs
        if outputs.shape == (self.num_models,):
            self._to_device(outputs.device)
            return (outputs * self._scale).to(outputs.dtype)
        raise ValueError(
            f"BatchGradScaler.scale: got a loss of shape {tuple(outputs.shape)} that does not come "
            f"from ModelBatch.compute_loss; a scalar cannot be scaled per model. Compute the loss "
            f"with ModelBatch.compute_loss (any reduction), or pass per-model losses "
            f"[N={self.num_models}]."
        )

    # ------------------------------------------------------------------ unscale and step

    def _state(self, optimizer: Any) -> dict[str, Any]:
        return self._per_optimizer.setdefault(
            id(optimizer), {"stage": _Stage.READY, "found_inf": None}
        )

    def unscale_(self, optimizer: Any) -> None:
        """Divide each model's gradients by its scale, in place, and record which overflowed.

        Call it at most once per optimizer between `update()`s, after all
        backward passes; clip (`modelbatch.optim.clip_grad_norm_`) after it.
        No host synchronization.
        """
        if not self._enabled:
            return
        state = self._state(optimizer)
        if state["stage"] is _Stage.UNSCALED:
            raise RuntimeError(
                "BatchGradScaler.unscale_: already called on this optimizer since the last "
                "update(); call it once per step, after all backward passes."
            )
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError(
                "BatchGradScaler.unscale_: called after step(); unscale before step(), or let "
                "step() unscale."
            )
        n = self.num_models
        # Gradients of low-precision weight copies are fp16 by design.
        low_precision = bool(getattr(optimizer, "low_precision", None))
        gradients = getattr(optimizer, "gradients", None)  # modelbatch optimizers
        if gradients is not None:
            grads = gradients()
        else:
            grads = [
                p.grad
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
        if grads:
            self._to_device(grads[0].device)
        # Reciprocal in float64 as torch does, so the unscaled values match it.
        inv_scale = self._scale.double().reciprocal().float()
        with torch.no_grad():
            for g in grads:
                if g.dim() == 0 or g.shape[0] != n:
                    raise ValueError(
                        f"BatchGradScaler.unscale_: a gradient of shape {tuple(g.shape)} has no "
                        f"leading model axis of length N={n}; the optimizer must hold the "
                        "ModelBatch's stacked parameters."
                    )
                if g.dtype == torch.float16 and not low_precision:
                    raise ValueError(
                        "BatchGradScaler.unscale_: gradients are float16; keep the parameters in "
                        "float32 and run the forward under torch.autocast(dtype=torch.float16)."
                    )
            # A model's max-abs norm over its gradients is inf/nan exactly when
            # one of its entries is (nan propagates through max): one reduction
            # per tensor, cheaper than isfinite().all(). Checked before unscaling,
            # as torch checks the scaled values.
            peak = _norms("BatchGradScaler.unscale_", grads, n, math.inf, self._scale.device)
            found_inf = (~torch.isfinite(peak)).to(torch.float32).to(self._scale.device)
            for g in grads:
                g.mul_(per_model(inv_scale.to(g.device), g.dim()))
        state["found_inf"] = found_inf
        state["stage"] = _Stage.UNSCALED

    def found_inf(self, optimizer: Any) -> Tensor | None:
        """The `[N]` float flags (1.0 = inf/nan) recorded by `unscale_` for this optimizer."""
        state = self._per_optimizer.get(id(optimizer))
        return None if state is None else state["found_inf"]

    def _accepts_skip(self, optimizer: Any) -> bool:
        cls = type(optimizer)
        if cls not in self._step_accepts_skip:
            params = inspect.signature(optimizer.step).parameters
            self._step_accepts_skip[cls] = "skip" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
            )
        return self._step_accepts_skip[cls]

    def step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """Unscale (if not done yet), then step every model whose gradients are finite.

        Calls `optimizer.step(*args, skip=found_inf, **kwargs)`: model k with
        inf/nan gradients is left bitwise unchanged; every other model steps.
        A `skip` `[N]` bool given here is combined with the found-inf flags.

        Returns:
            What `optimizer.step` returns.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs or args:
            raise RuntimeError(
                "BatchGradScaler.step: closures are not supported with gradient scaling; run "
                "the forward and backward before step()."
            )
        if not self._accepts_skip(optimizer):
            raise TypeError(
                f"BatchGradScaler.step: {type(optimizer).__name__}.step() takes no skip= argument, "
                "so an overflow in one model cannot skip only that model; use a modelbatch.optim "
                "optimizer."
            )
        state = self._state(optimizer)
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError(
                "BatchGradScaler.step: already called since the last update(); call update() "
                "once per step."
            )
        if state["stage"] is _Stage.READY:
            self.unscale_(optimizer)
        skip = state["found_inf"] > 0
        user_skip = kwargs.pop("skip", None)
        if user_skip is not None:
            skip = skip | torch.as_tensor(user_skip, dtype=torch.bool, device=skip.device)
        result = optimizer.step(skip=skip, **kwargs)
        state["stage"] = _Stage.STEPPED
        return result

    # ------------------------------------------------------------------ scale update

    def update(self, new_scale: float | Tensor | None = None) -> None:
        """Back off the scale of every model that overflowed, grow the others on schedule.

        Per model, exactly torch's `_amp_update_scale_`: on inf/nan the scale
        is multiplied by `backoff_factor` and the tracker reset; otherwise the
        tracker counts up and at `growth_interval` the scale is multiplied by
        `growth_factor` (if still finite) and the tracker reset.

        Args:
            new_scale: set the scale instead (a float or `[N]`).
        """
        if not self._enabled:
            return
        n = self.num_models
        if new_scale is not None:
            value = torch.as_tensor(new_scale, dtype=torch.float32).to(self._scale.device)
            if value.dim() and value.shape != (n,):
                raise ValueError(
                    f"BatchGradScaler.update: new_scale must be a float or have shape [N={n}], "
                    f"got shape {tuple(value.shape)}."
                )
            self._scale.copy_(value.expand(n))
        else:
            founds = [
                s["found_inf"] for s in self._per_optimizer.values() if s["found_inf"] is not None
            ]
            if not founds:
                raise RuntimeError(
                    "BatchGradScaler.update: no inf checks were recorded since the last update(); "
                    "call scaler.step(optimizer) (or unscale_) before update()."
                )
            found = founds[0]
            for other in founds[1:]:
                found = found + other.to(found.device)
            self._update_scale(found.to(self._scale.device) > 0)
        self._per_optimizer = {}
        self._attached = False

    def _update_scale(self, inf: Tensor) -> None:
        scale, tracker = self._scale, self._growth_tracker
        successful = tracker + 1
        grow = successful == self._growth_interval
        # float32 * float64 factor rounded to float32, as torch's kernel computes it.
        grown = (scale.double() * self._growth_factor).float()
        backed = (scale.double() * self._backoff_factor).float()
        new = torch.where(inf, backed, torch.where(grow & torch.isfinite(grown), grown, scale))
        tracker.copy_(torch.where(inf | grow, torch.zeros_like(successful), successful))
        scale.copy_(new)

    # ------------------------------------------------------------------ state

    def reset_models(self, indices: Any, init_scale: float | Tensor | None = None) -> None:
        """Give these models a fresh scale and growth tracker (a model replaced in place).

        Args:
            indices: model indices (int, sequence, `[K]` tensor or `[N]` bool mask).
            init_scale: their new scale (a float or `[K]`); by default the
                `init_scale` this scaler was created with.
        """
        n = self.num_models
        idx = model_indices("BatchGradScaler.reset_models", indices, n, self._scale.device)
        device = self._scale.device
        if init_scale is None:  # each model's own initial scale ([N], kept at creation)
            scale = self._init_scale.to(device)[idx]
        else:
            scale = torch.as_tensor(init_scale, dtype=torch.float32, device=device)
        self._scale[idx] = scale
        self._growth_tracker[idx] = 0

    def get_scale(self) -> Tensor:
        """The current per-model scales: `[N]` (ones when disabled). No host synchronization."""
        if not self._enabled:
            return torch.ones(self.num_models, device=self._scale.device)
        return self._scale.clone()

    def get_growth_tracker(self) -> Tensor:
        """Consecutive finite steps per model: `[N]` int32."""
        return self._growth_tracker.clone()

    def is_enabled(self) -> bool:
        """Whether scaling is on."""
        return self._enabled

    def state_dict(self) -> dict[str, Any]:
        """`scale` `[N]`, `_growth_tracker` `[N]` and the factors (empty when disabled).

        Call it after `update()`, as with torch's `GradScaler`.
        """
        if not self._enabled:
            return {}
        return {
            "scale": self._scale.clone(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._growth_tracker.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()` in place (the scale tensors keep their storage)."""
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError(
                "BatchGradScaler.load_state_dict: the state dict is empty, possibly because it "
                "was saved from a disabled scaler."
            )
        n = self.num_models
        owner = "BatchGradScaler.load_state_dict"
        # Everything is checked before anything is written: a bad state changes nothing.
        scale = _checked_scale(
            owner,
            "scale",
            state_dict["scale"],
            n,
            "the state comes from a scaler over a different number of models",
        )
        tracker = torch.as_tensor(state_dict["_growth_tracker"])
        if tracker.dim() and tracker.shape != (n,):
            raise ValueError(
                f"{owner}: '_growth_tracker' has shape {tuple(tracker.shape)}, expected "
                f"[N={n}]; the state comes from a scaler over a different number of models."
            )
        if tracker.is_floating_point() or bool((tracker < 0).any()):
            raise ValueError(
                f"{owner}: '_growth_tracker' must hold counts >= 0 (integers), got {tracker}."
            )
        factors = _checked_factors(
            owner,
            state_dict["growth_factor"],
            state_dict["backoff_factor"],
            state_dict["growth_interval"],
        )
        for target, value in ((self._scale, scale), (self._growth_tracker, tracker)):
            target.copy_(value.to(device=target.device, dtype=target.dtype).expand(n))
        self._growth_factor, self._backoff_factor, self._growth_interval = factors


def _checked_factors(
    owner: str, growth_factor: Any, backoff_factor: Any, growth_interval: Any
) -> tuple[float, float, int]:
    """The scaler's growth factor (> 1), backoff factor (in (0, 1)) and interval (>= 1)."""
    growth, backoff = float(growth_factor), float(backoff_factor)
    if not growth > 1.0 or not math.isfinite(growth):
        raise ValueError(f"{owner}: growth_factor must be > 1, got {growth_factor}; pass e.g. 2.0.")
    if not 0.0 < backoff < 1.0:
        raise ValueError(
            f"{owner}: backoff_factor must be in (0, 1), got {backoff_factor}; pass e.g. 0.5."
        )
    if int(growth_interval) < 1 or int(growth_interval) != growth_interval:
        raise ValueError(
            f"{owner}: growth_interval must be an integer >= 1, got {growth_interval}."
        )
    return growth, backoff, int(growth_interval)


def _checked_scale(owner: str, name: str, value: Any, n: int, hint: str) -> Tensor:
    """A loss scale: a positive finite float, or one per model `[N]` (float32, on the CPU).

    `hint` ends the message for a scale of the wrong shape.
    """
    scale = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
    if scale.dim() and scale.shape != (n,):
        raise ValueError(
            f"{owner}: {name} must be a float or have shape [N={n}], got shape "
            f"{tuple(scale.shape)}; {hint}."
        )
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        where = "" if not scale.dim() else f" (model {int(bad.nonzero()[0, 0])})"
        raise ValueError(f"{owner}: {name} must be finite and > 0, got {scale}{where}.")
    return scale
