"""Greedy ensemble selection with replacement (Caruana et al., ICML 2004)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._calibration import ClassificationSums
from ._indices import model_indices

__all__ = ["Selection", "greedy_selection"]

_HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "brier": False, "ece": False, "mse": False}
_CLASSIFICATION = ("accuracy", "nll", "brier", "ece")


class Selection(NamedTuple):
    """The outcome of `greedy_selection`.

    Attributes:
        indices: `[K]` the distinct models of the chosen ensemble, ascending.
        weights: `[K]` their weights (how often each was picked / ensemble size), sum 1.
        counts: `[K]` how often each was picked.
        order: `[T]` the model added at each step (the sorted initialization first).
        curve: `[T]` the validation metric of the ensemble after each step.
        size: how many picks the chosen ensemble has: the prefix of `order`
            with the best validation metric (the first, if several tie).
    """

    indices: Tensor
    weights: Tensor
    counts: Tensor
    order: Tensor
    curve: Tensor
    size: int


def _scorer(metric: Any, task: str, n_bins: int) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(metric):
        return metric
    if task == "regression":
        if metric != "mse":
            raise ValueError(
                f"greedy_selection: task='regression' supports metric='mse' or a callable, "
                f"got {metric!r}."
            )

        def mse(pred: Tensor, targets: Tensor) -> Tensor:
            return (pred - targets.to(pred)).square().flatten(1).mean(dim=1)

        return mse
    if metric not in _CLASSIFICATION:
        raise ValueError(
            f"greedy_selection: metric must be one of {_CLASSIFICATION} or a callable "
            f"for task='classification', got {metric!r}."
        )

    def score(probs: Tensor, targets: Tensor) -> Tensor:
        sums = ClassificationSums(n_bins)
        sums.update(probs.log(), targets)
        return sums.compute()[metric]

    return score


@torch.no_grad()
def greedy_selection(
    outputs: Tensor,
    targets: Tensor,
    *,
    steps: int = 50,
    metric: str | Callable[[Tensor, Tensor], Tensor] = "nll",
    higher_is_better: bool | None = None,
    task: str = "classification",
    init: int = 0,
    candidates: Any = None,
    n_bins: int = 15,
) -> Selection:
    """Greedy forward selection with replacement from N trained models (Caruana et al., 2004).

    Each step adds the model (possibly one already in) whose addition gives
    the best validation metric of the averaged ensemble; the result is the
    best prefix of that sequence. All N candidates of a step are scored in
    one vectorized evaluation, in float64.

    Args:
        outputs: the models' validation outputs `[N, B, C]` (logits) for
            classification, `[N, B, ...]` for regression.
        targets: `[B]` class indices, or `[B, ...]` regression targets.
        steps: how many models to add after the initialization.
        metric: `"nll"`, `"brier"`, `"ece"`, `"accuracy"` (classification),
            `"mse"` (regression), or a callable `(ensembles [M, B, ...],
            targets) -> [M]` that scores M candidate ensembles (mean
            probabilities for classification, mean outputs for regression).
        higher_is_better: for a callable metric (default False).
        task: `"classification"` (members averaged as probabilities) or
            `"regression"` (outputs averaged).
        init: start from the `init` best single models, each once (Caruana's
            sorted initialization).
        candidates: the models to choose from: indices or an `[N]` bool mask
            (e.g. `model_batch.active`); all N by default.
        n_bins: calibration bins for `metric="ece"`.

    Returns:
        A `Selection`: `indices`, `weights`, `counts`, `order`, `curve`, `size`.

    Example:
        >>> sel = greedy_selection(torch.randn(16, 100, 10), torch.randint(0, 10, (100,)))
        >>> sel.weights.sum().item(), sel.curve.shape
        (1.0, torch.Size([50]))
    """
    if task not in ("classification", "regression"):
        raise ValueError(
            f"greedy_selection: task must be 'classification' or 'regression', got {task!r}."
        )
    if not isinstance(outputs, Tensor) or outputs.dim() < 2:
        raise ValueError(
            "greedy_selection: expected outputs [N, B, ...] with a leading model axis, got "
            f"{tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__}."
        )
    if steps < 0 or init < 0 or steps + init == 0:
        raise ValueError(
            f"greedy_selection: need steps >= 0, init >= 0 and at least one pick, got "
            f"steps={steps}, init={init}."
        )
    n = outputs.shape[0]
    pool = (
        torch.arange(n, device=outputs.device)
        if candidates is None
        else model_indices("greedy_selection", candidates, n, outputs.device)
    )
    if pool.numel() == 0:
        raise ValueError("greedy_selection: no candidate models; pass at least one.")
    if task == "classification":
        members = outputs.index_select(0, pool).double().softmax(dim=-1)
    else:
        members = outputs.index_select(0, pool).double()
    score = _scorer(metric, task, n_bins)
    higher = _HIGHER_IS_BETTER.get(metric, False) if isinstance(metric, str) else False
    if higher_is_better is not None:
        higher = higher_is_better

    def best(values: Tensor) -> int:
        return int(values.argmax() if higher else values.argmin())

    total = torch.zeros_like(members[0])
    picks: list[int] = []
    curve: list[float] = []
    if init > 0:
        single = score(members, targets).tolist()
        ranked = sorted(range(len(pool)), key=lambda j: (-single[j] if higher else single[j], j))
        for j in ranked[:init]:
            total += members[j]
            picks.append(j)
            curve.append(float(score((total / len(picks)).unsqueeze(0), targets)[0]))
    for _ in range(steps):
        values = score((total + members) / (len(picks) + 1), targets)
        j = best(values)
        total += members[j]
        picks.append(j)
        curve.append(float(values[j]))
    curve_t = torch.tensor(curve, dtype=torch.float64)
    size = best(curve_t) + 1
    order = pool[torch.tensor(picks, dtype=torch.long, device=outputs.device)]
    indices, counts = order[:size].unique(return_counts=True)
    return Selection(
        indices=indices,
        weights=counts.double() / size,
        counts=counts,
        order=order,
        curve=curve_t,
        size=size,
    )
