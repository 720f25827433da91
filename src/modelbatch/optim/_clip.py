"""Per-model gradient clipping over stacked parameters.

Every gradient is `[N, *shape]`; model i's gradient is slice i of each. The
norms here are reduced over dims `1..` of each tensor, so one kernel sequence
per parameter tensor clips every model by its own norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._hparams import per_model

__all__ = ["clip_grad_norm_", "clip_grad_value_", "per_model_grad_norm"]


def _stacked_params(name: str, parameters: Any, num_models: int | None) -> tuple[list[Tensor], int]:
    """The stacked tensors and N from a ModelBatch or an iterable of `[N, ...]` tensors."""
    # A ModelBatch, recognised by its interface (the optimizer core imports nothing of it).
    if isinstance(parameters, torch.nn.Module) and hasattr(parameters, "num_models"):
        n = int(parameters.num_models)  # type: ignore[arg-type]
        if num_models is not None and num_models != n:
            raise ValueError(
                f"{name}: num_models={num_models} does not match the ModelBatch's N={n}; "
                "leave num_models out when passing a ModelBatch."
            )
        return list(parameters.parameters()), n
    if isinstance(parameters, Tensor):
        params = [parameters]
    elif isinstance(parameters, Iterable):
        params = list(parameters)
    else:
        raise TypeError(
            f"{name}: expected a ModelBatch or an iterable of stacked [N, ...] tensors, "
            f"got {type(parameters).__name__}."
        )
    if num_models is None:
        raise ValueError(
            f"{name}: pass num_models=N with an iterable of stacked tensors (each [N, ...]), "
            "or pass the ModelBatch itself."
        )
    for i, p in enumerate(params):
        if p.dim() == 0 or p.shape[0] != num_models:
            raise ValueError(
                f"{name}: tensor {i} has shape {tuple(p.shape)}, expected a leading model axis "
                f"of length N={num_models}; pass the stacked parameters (ModelBatch.parameters())."
            )
    return params, num_models


def _per_model_value(name: str, arg: str, value: Any, n: int, like: Tensor) -> Tensor | float:
    """A float stays a float; anything else becomes an `[N]` tensor on `like`'s device."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    t = torch.as_tensor(value, device=like.device)
    if t.shape != (n,):
        raise ValueError(
            f"{name}: {arg} must be a float or have shape [N={n}], got shape {tuple(t.shape)}; "
            "give one value per model."
        )
    return t if t.is_floating_point() else t.float()


@torch.no_grad()
def per_model_grad_norm(
    parameters: Any,
    norm_type: float = 2.0,
    *,
    num_models: int | None = None,
) -> Tensor:
    """Each model's gradient norm over all of its parameters.

    Args:
        parameters: a `ModelBatch`, or an iterable of stacked tensors `[N, ...]`
            (with `num_models`).
        norm_type: the p of the p-norm; `float("inf")` for the max norm.
        num_models: N, needed only for an iterable of tensors.

    Returns:
        norms: `[N]`, model i's norm as `torch.nn.utils.get_total_norm` gives
        for model i's gradients alone. No host synchronization.
    """
    params, n = _stacked_params("per_model_grad_norm", parameters, num_models)
    return _norms("per_model_grad_norm", _grads(params), n, float(norm_type), _device(params))


def _grads(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _device(params: Sequence[Tensor]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def _norms(
    name: str, grads: Sequence[Tensor], n: int, norm_type: float, device: torch.device
) -> Tensor:
    """Each model's norm over all its gradients `[N]`; zeros on `device` when there are none."""
    if not grads:
        return torch.zeros(n, device=device)
    for g in grads:
        if g.is_sparse:
            raise TypeError(f"{name}: sparse gradients are not supported; use dense parameters.")
    # Norm of per-tensor norms, the composition torch's clip_grad_norm_ uses, so
    # model i's result matches torch on model i alone.
    per_tensor = [
        torch.linalg.vector_norm(g.reshape(g.shape[0], -1), norm_type, dim=1).to(grads[0].device)
        for g in grads
    ]
    return torch.linalg.vector_norm(torch.stack(per_tensor), norm_type, dim=0)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Any,
    max_norm: float | Tensor | Sequence[float],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    *,
    num_models: int | None = None,
) -> Tensor:
    """Clip each model's gradients by its own total norm, in place.

    Model i's gradients are scaled by `min(max_norm_i / (norm_i + 1e-6), 1)`,
    exactly what `torch.nn.utils.clip_grad_norm_` does to model i alone. A
    non-finite norm in one model changes only that model's gradients.

    Args:
        parameters: a `ModelBatch`, or an iterable of stacked tensors `[N, ...]`
            (with `num_models`).
        max_norm: a float for every model, or `[N]` (one per model).
        norm_type: the p of the p-norm; `float("inf")` for the max norm.
        error_if_nonfinite: raise if any model's norm is nan or inf (this
            synchronizes with the device).
        num_models: N, needed only for an iterable of tensors.

    Returns:
        norms: `[N]`, each model's norm before clipping. No host
        synchronization unless `error_if_nonfinite`.

    Example:
        >>> norms = clip_grad_norm_(model_batch, max_norm=torch.tensor([0.5, 1.0, 2.0]))
        >>> norms.shape
        torch.Size([3])
    """
    params, n = _stacked_params("clip_grad_norm_", parameters, num_models)
    norm_type = float(norm_type)
    grads = _grads(params)
    norms = _norms("clip_grad_norm_", grads, n, norm_type, _device(params))
    if error_if_nonfinite and not bool(torch.isfinite(norms).all()):
        bad = (~torch.isfinite(norms)).nonzero().reshape(-1).tolist()
        raise RuntimeError(
            f"clip_grad_norm_: the gradient norm of order {norm_type} is non-finite for models "
            f"{bad}; pass error_if_nonfinite=False to scale them by the non-finite norm anyway."
        )
    if not grads:
        return norms
    limit = _per_model_value("clip_grad_norm_", "max_norm", max_norm, n, norms)
    # reciprocal() * max_norm is how torch evaluates max_norm / (norm + 1e-6).
    coef = torch.clamp((norms + 1e-6).reciprocal() * limit, max=1.0)
    for g in grads:
        g.mul_(per_model(coef.to(g.device), g.dim()))
    return norms


@torch.no_grad()
def clip_grad_value_(
    parameters: Any,
    clip_value: float | Tensor | Sequence[float],
    *,
    num_models: int | None = None,
) -> None:
    """Clamp each model's gradients to `[-clip_value_i, clip_value_i]`, in place.

    Args:
        parameters: a `ModelBatch`, or an iterable of stacked tensors `[N, ...]`
            (with `num_models`).
        clip_value: a float for every model, or `[N]` (one per model).
        num_models: N, needed only for an iterable of tensors.
    """
    params, n = _stacked_params("clip_grad_value_", parameters, num_models)
    grads = _grads(params)
    if not grads:
        return
    limit = _per_model_value("clip_grad_value_", "clip_value", clip_value, n, grads[0])
    if isinstance(limit, float):
        if math.isnan(limit) or limit < 0:
            raise ValueError(
                f"clip_grad_value_: clip_value must be >= 0, got {limit}; pass a non-negative bound."
            )
        for g in grads:
            g.clamp_(min=-limit, max=limit)
        return
    for g in grads:
        bound = per_model(limit.to(device=g.device, dtype=g.dtype), g.dim())
        g.clamp_(min=-bound, max=bound)
