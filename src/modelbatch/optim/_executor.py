"""The one executor of the update rules (`_rules`): a step of every model over a param group.

One call updates every parameter of a param group in two stages:

1. Coefficients: each parameter's per-model step count (a `[K, N]` table for
   the K parameters of the group) advances where the model updates and the
   parameter has a gradient, and the rule's coefficient function turns the
   `[N]` hyperparameters into a `[C, K, N]` float64 table.
2. Update: the rule's update function over every element.

On CUDA both stages are generated Triton kernels (`_kernels`): one launch for
the coefficients and one for the update of up to `_kernels.MAX_SLOTS`
parameter tensors, so the launch count depends on neither N nor the number
of tensors. Elsewhere, and for tensors the kernel cannot take (float64,
layouts where the model axis is not outermost), the same functions run with
torch ops, one parameter at a time.

Models outside the mask are left bitwise unchanged: the kernel does not touch
their memory, and the torch path selects their old values with `where`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._hparams import per_model
from ._plan import plan_for
from ._rules import UpdateRule

__all__ = ["ParamSlot", "StepCoefficients", "run_rule", "hparam_column", "update_tensor"]


@dataclass
class ParamSlot:
    """One parameter tensor of a group, as the executor sees it.

    Attributes:
        row: the parameter's row in the group's `[K, N]` tables.
        param: `[N, *shape]`, updated in place.
        grad: `[N, *shape]`, or None: the parameter and its state are left as
            they are and its step count does not advance.
        state: the rule's state tensors by name (missing optional ones absent).
        low_precision: an optional copy of the parameter in a lower precision
            (`[N, *shape]`, bf16 or fp16) that the update writes too.
    """

    row: int
    param: Tensor
    grad: Tensor | None
    state: Mapping[str, Tensor]
    low_precision: Tensor | None = None


def hparam_column(hparams: Mapping[str, Tensor], key: str, column: int | None) -> Tensor:
    """A rule's hyperparameter argument: `hparams[key]` `[N]` or its column of an `[N, 2]` pair."""
    t = hparams[key]
    return t if column is None else t[:, column]


def run_rule(
    rule: UpdateRule,
    slots: Sequence[ParamSlot],
    hparams: Mapping[str, Tensor],
    lr_factor: Tensor,
    steps: Tensor,
    scalars: Mapping[str, Tensor],
    mask: Tensor,
    options: Mapping[str, bool],
    flags: Mapping[str, bool],
) -> None:
    """One step of every model in `mask` for the parameters of one group.

    Args:
        rule: the update rule.
        slots: every parameter of the group, in row order.
        hparams: the group's per-model hyperparameters (`[N]`, pairs `[N, 2]`).
        lr_factor: 0-dim float64, the shared factor on every model's lr.
        steps: `[K, N]` float64 step counts, advanced in place.
        scalars: the rule's per-(parameter, model) scalar state, `[K, N]` each.
        mask: `[N]` bool, the models that update.
        options: the rule's shared options (e.g. `decoupled`).
        flags: for each optional state, whether it exists.
    """
    live_slots = [s for s in slots if s.grad is not None]
    if not live_slots:
        return
    from . import _kernels

    if _kernels.available(mask.device):
        _kernels.run(rule, slots, hparams, lr_factor, steps, scalars, mask, options, flags)
        return
    has_grad = torch.tensor([s.grad is not None for s in slots], device=steps.device)
    coefficients = coefficient_table(
        rule, hparams, lr_factor, steps, scalars, mask, has_grad, options
    )
    table = StepCoefficients(rule, flags, coefficients, mask)
    for slot in live_slots:
        update_tensor(rule, slot, table, slot.row, flags)


def coefficient_table(
    rule: UpdateRule,
    hparams: Mapping[str, Tensor],
    lr_factor: Tensor,
    steps: Tensor,
    scalars: Mapping[str, Tensor],
    mask: Tensor,
    has_grad: Tensor,
    options: Mapping[str, bool],
) -> Tensor:
    """Advance steps and scalar state where live; the coefficients `[C, K, N]` (float64)."""
    live = has_grad.view(-1, 1) & mask.view(1, -1)
    steps.add_(live.to(steps.dtype))
    args = []
    for key, column in rule.hparams:
        value = hparam_column(hparams, key, column).to(torch.float64)
        if key == "lr":
            value = value * lr_factor
        args.append(value.view(1, -1))
    old = [scalars[name] for name, _ in rule.scalars]
    out = rule.coefficients(steps, *old, *args, *(float(options[o]) for o in rule.options))
    for table, new in zip(old, out[rule.num_coefficients :]):
        table.copy_(torch.where(live, new, table))
    coefficients = [torch.as_tensor(c, dtype=torch.float64) for c in out[: rule.num_coefficients]]
    return torch.stack(torch.broadcast_tensors(steps, *coefficients)[1:])


class StepCoefficients:
    """One step's coefficients `[C, K, N]` of a group, and the plan's values from them.

    The plan's coefficient-only values (stacked, `[V, K, N]`) and fold
    decisions are computed once per math dtype, over every row; fold decisions
    only on the CPU (reading them is a host sync elsewhere).
    """

    def __init__(
        self, rule: UpdateRule, flags: Mapping[str, bool], table: Tensor, mask: Tensor
    ) -> None:
        self.plan = plan_for(rule, [flags[name] for name in rule.state if name in rule.optional])
        self.table = table
        self.mask = mask
        #: fold decisions and `everyone` are read on the CPU only (a host sync elsewhere).
        self.cpu = mask.device.type == "cpu"
        #: every model updates.
        self.everyone = self.cpu and bool(mask.all())
        self._values: dict[torch.dtype, tuple[list[tuple[list[int], Tensor]], tuple[Any, ...]]] = {}

    def values(self, dtype: torch.dtype) -> tuple[list[tuple[list[int], Tensor]], tuple[Any, ...]]:
        """The derived coefficients in `dtype`, and the fold decisions.

        The coefficients come stacked by their own dtype (conditions are bool):
        a list of (positions among the plan's coefficients, `[V, K, N]`).
        """
        out = self._values.get(dtype)
        if out is None:
            values, decisions = self.plan.coefficient_values(self.table.to(dtype), fold=self.cpu)
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i, v in enumerate(values):
                by_dtype.setdefault(v.dtype, []).append(i)
            shape = self.table.shape[1:]
            stacks = [
                (where, torch.stack([values[i].expand(shape) for i in where]))
                for where in by_dtype.values()
            ]
            out = self._values[dtype] = (stacks, decisions)
        return out

    def row(
        self, dtype: torch.dtype, row: int, like: Tensor
    ) -> tuple[list[Tensor], tuple[Any, ...]]:
        """The derived coefficients of `row`, each `[N, 1, ...]` to broadcast against `like`."""
        stacks, decisions = self.values(dtype)
        ones = [1] * (like.dim() - 1)
        out: list[Any] = [None] * sum(len(where) for where, _ in stacks)
        for where, stacked in stacks:
            views = stacked[:, row].view(stacked.shape[0], like.shape[0], *ones).unbind(0)
            for i, v in zip(where, views):
                out[i] = v
        return out, decisions


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def update_tensor(
    rule: UpdateRule,
    slot: ParamSlot,
    table: StepCoefficients,
    row: int,
    flags: Mapping[str, bool],
) -> None:
    """The rule's update of one parameter with torch ops, coefficients from `table`'s `row`."""
    p, g = slot.param, slot.grad
    assert g is not None
    math = _opmath(p.dtype)
    coefficients, decisions = table.row(math, row, p)
    state = [slot.state.get(name) for name in rule.state]
    dsts = [p, *(t if flags.get(name, True) else None for name, t in zip(rule.state, state))]
    everyone = table.everyone
    in_place = everyone and all(t is None or t.dtype == math for t in dsts)
    inputs = [t if t is None or t.dtype == math else t.to(math) for t in (p, g, *state)]
    # The generated forward itself: nn.Module.__call__ costs more than some of its ops here.
    out = table.plan.specialised(decisions, in_place).forward(*inputs, *coefficients)
    keep = None if everyone else per_model(table.mask, p.dim())
    for dst, new in zip(dsts, out):
        if dst is None or new is None or new is dst:
            continue
        if keep is None:
            dst.copy_(new)
        else:
            torch.where(keep, new.to(dst.dtype), dst, out=dst)
    if slot.low_precision is not None:
        slot.low_precision.copy_(p)
