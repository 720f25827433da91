"""Per-model hyperparameters: `[N]` tensors, their validation and their broadcast."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["HParam", "Rule", "per_model", "build_hparams", "check_rules", "format_value"]

#: dtype of float hyperparameters and step counts: the user's Python floats are
#: kept exactly, and derived scalars (bias corrections) are computed as precisely
#: as torch computes them on the host.
HPARAM_DTYPE = torch.float64


@dataclass(frozen=True)
class HParam:
    """How one hyperparameter is stored.

    Attributes:
        kind: "float" (`[N]` float64), "bool" (`[N]` bool) or "pair" (`[N, 2]`
            float64, e.g. Adam's `betas`).
    """

    kind: str


@dataclass(frozen=True)
class Rule:
    """A per-model constraint on the hyperparameters.

    Attributes:
        keys: the hyperparameters the message shows.
        expected: what a valid model has, e.g. `"lr >= 0"`.
        valid: `hparams -> [N] bool`, True where the model satisfies the rule.
    """

    keys: tuple[str, ...]
    expected: str
    valid: Callable[[Mapping[str, Tensor]], Tensor]


def per_model(t: Tensor, ndim: int) -> Tensor:
    """View a per-model tensor `[N]` as `[N, 1, ..., 1]` with `ndim` dims, to broadcast.

    Example:
        >>> per_model(torch.ones(5), 3).shape
        torch.Size([5, 1, 1])
    """
    return t.view(t.shape[0], *([1] * (ndim - 1)))


def _convert(owner: str, what: str, i: int, key: str, value: Any, kind: str) -> Any:
    try:
        if kind == "bool":
            if isinstance(value, Tensor):
                value = value.item()
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise TypeError
            return bool(value)
        if kind == "pair":
            pair = tuple(float(v) for v in value)
            if len(pair) != 2:
                raise TypeError
            return pair
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        expected = {"bool": "True or False", "pair": "a pair of numbers", "float": "a number"}
        raise TypeError(
            f"{owner}: {what} {i} has {key}={value!r}; expected {expected[kind]}."
        ) from None


def build_hparams(
    owner: str,
    specs: Mapping[str, HParam],
    configs: Sequence[Mapping[str, Any]],
    device: torch.device | str | None = None,
    what: str = "config",
) -> dict[str, Tensor]:
    """Stack N complete config dicts into per-model tensors (no validation of ranges).

    Args:
        owner: the public name errors start with.
        specs: the accepted keys and how each is stored.
        configs: N dicts holding every key of `specs`.
        device: where the tensors live (the parameters' device).
        what: how errors name an entry ("config" or "model").

    Returns:
        `{key: [N] or [N, 2] tensor}`.
    """
    out: dict[str, Tensor] = {}
    for key, spec in specs.items():
        values = [
            _convert(owner, what, i, key, cfg[key], spec.kind) for i, cfg in enumerate(configs)
        ]
        dtype = torch.bool if spec.kind == "bool" else HPARAM_DTYPE
        out[key] = torch.tensor(values, dtype=dtype, device=device)
    return out


def format_value(t: Tensor) -> str:
    """One model's value for an error message: `0.1`, `True`, `(0.9, 1.5)`."""
    if t.dim() == 0:
        return repr(t.item())
    return repr(tuple(t.tolist()))


def check_rules(
    owner: str,
    rules: Sequence[Rule],
    hparams: Mapping[str, Tensor],
    names: Sequence[int] | None = None,
    what: str = "config",
) -> None:
    """Raise a ValueError naming the first model that breaks a rule.

    Args:
        owner: the public name errors start with.
        rules: the constraints.
        hparams: `[N]` tensors.
        names: what to call entry j in the message (default j itself).
        what: how errors name an entry ("config" or "model").
    """
    for rule in rules:
        bad = ~rule.valid(hparams)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            i = names[j] if names is not None else j
            shown = ", ".join(f"{k}={format_value(hparams[k][j])}" for k in rule.keys)
            raise ValueError(f"{owner}: {what} {i} has {shown}; expected {rule.expected}.")
