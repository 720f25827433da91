"""How K members' outputs `[K, B, ...]` become one ensemble prediction.

Pure tensor functions, no host synchronization and no data-dependent control
flow: they run eagerly, under `torch.compile` and inside `torch.export`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["COMBINES", "ensemble_classify", "ensemble_log_probs", "ensemble_regress"]

COMBINES = ("probs", "logits", "vote")


def _check(owner: str, outputs: Tensor, weights: Tensor | None) -> None:
    if not isinstance(outputs, Tensor) or outputs.dim() < 2:
        got = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(
            f"{owner}: expected member outputs [K, B, ...] with a leading member axis, got {got}."
        )
    if weights is not None and tuple(weights.shape) != (outputs.shape[0],):
        raise ValueError(
            f"{owner}: weights must be [K={outputs.shape[0]}], one per member, got shape "
            f"{tuple(weights.shape)}."
        )


def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return values.mean(dim=0)
    w = weights.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
    return (w * values).sum(dim=0)


def ensemble_classify(
    outputs: Tensor, weights: Tensor | None = None, *, combine: str = "probs"
) -> Tensor:
    """Combine the members' logits `[K, B, ..., C]` into one prediction `[B, ..., C]`.

    Args:
        outputs: the members' logits, classes on the last axis.
        weights: `[K]` member weights summing to 1 (uniform by default).
        combine: `"probs"`, the (weighted) mean of the members' softmax
            probabilities; `"logits"`, the mean of their logits; `"vote"`,
            the (weighted) fraction of members whose top class is each class
            (its argmax is the majority vote, ties to the lower class).

    Example:
        >>> ensemble_classify(torch.randn(8, 32, 10)).shape
        torch.Size([32, 10])
    """
    _check("ensemble_classify", outputs, weights)
    if combine == "probs":
        member = outputs.softmax(dim=-1)
    elif combine == "logits":
        member = outputs
    elif combine == "vote":
        top = outputs.argmax(dim=-1, keepdim=True)
        member = torch.zeros_like(outputs).scatter_(-1, top, 1.0)
    else:
        raise ValueError(f"ensemble_classify: combine must be one of {COMBINES}, got {combine!r}.")
    return _weighted_mean(member, weights)


def ensemble_log_probs(outputs: Tensor, weights: Tensor | None = None) -> Tensor:
    """The log of the (weighted) mean of the members' probabilities: `[K, B, ..., C]` -> `[B, ..., C]`.

    Computed as a log-sum-exp of the members' log-softmax, so it stays finite
    where a mean of probabilities would underflow (what an NLL needs).
    """
    _check("ensemble_log_probs", outputs, weights)
    return mix_log_probs(outputs.log_softmax(dim=-1), weights)


def mix_log_probs(log_probs: Tensor, weights: Tensor | None = None) -> Tensor:
    """`ensemble_log_probs` from the members' log-probabilities `[K, B, ..., C]`."""
    if weights is None:
        return torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
    w = weights.to(log_probs.dtype).view(-1, *([1] * (log_probs.dim() - 1)))
    return torch.logsumexp(log_probs + w.log(), dim=0)


def ensemble_regress(outputs: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The (weighted) mean and variance across members: `[K, B, ...]` -> two `[B, ...]`.

    The variance is the members' spread around the ensemble mean,
    `sum_k w_k (y_k - mean)^2` (1/K each by default: the population variance,
    as deep ensembles report it).

    Example:
        >>> mean, var = ensemble_regress(torch.randn(8, 32, 1))
        >>> mean.shape, var.shape
        (torch.Size([32, 1]), torch.Size([32, 1]))
    """
    _check("ensemble_regress", outputs, weights)
    mean = _weighted_mean(outputs, weights)
    return mean, _weighted_mean((outputs - mean).square(), weights)
