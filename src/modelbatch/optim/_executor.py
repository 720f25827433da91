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

import torch
from torch import Tensor

from ._hparams import per_model
from ._rules import UpdateRule

__all__ = ["ParamSlot", "run_rule", "hparam_column"]


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
    rows = [s.row for s in live_slots]
    small = sum(s.param.numel() for s in live_slots) <= _FLATTEN_LIMIT
    dtypes = {(s.param.dtype, s.grad.dtype) for s in live_slots if s.grad is not None}
    # Only on the CPU: comparing the coefficient rows would be a host sync on a device.
    if (
        mask.device.type == "cpu"
        and len(live_slots) > 1
        and small
        and len(dtypes) == 1
        and bool((coefficients[:, rows] == coefficients[:, rows[:1]]).all())
    ):
        # Small tensors cost their op launches, not their bytes: one pass over their concatenation.
        update_flat(rule, live_slots, coefficients[:, rows[0]], mask, flags)
        return
    for slot in live_slots:
        update_tensor(rule, slot, coefficients[:, slot.row], mask, flags)


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
    shape = steps.shape
    return torch.stack(
        [
            torch.as_tensor(c, dtype=torch.float64).expand(shape)
            for c in out[: rule.num_coefficients]
        ]
    )


#: at most this many elements in a group are updated as one concatenated tensor (torch path;
#: measured on CPU: faster below, slower above, where the extra copies cost more than launches).
_FLATTEN_LIMIT = 1 << 16


def update_flat(
    rule: UpdateRule,
    slots: Sequence[ParamSlot],
    coefficients: Tensor,
    mask: Tensor,
    flags: Mapping[str, bool],
) -> None:
    """`update_tensor` over the concatenation of several parameters with equal coefficients."""
    n = slots[0].param.shape[0]
    present = [name for name in rule.state if flags.get(name, True)]

    def cat(tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(n, -1) for t in tensors], dim=1)

    flat_state = {name: cat([s.state[name] for s in slots]) for name in present}
    grads = [s.grad for s in slots if s.grad is not None]
    merged = ParamSlot(0, cat([s.param for s in slots]), cat(grads), flat_state)
    update_tensor(rule, merged, coefficients, mask, flags)
    sizes = [s.param[0].numel() for s in slots]
    for role, flat in [("param", merged.param), *flat_state.items()]:
        targets = [s.param if role == "param" else s.state[role] for s in slots]
        pieces = [piece.view_as(t) for piece, t in zip(flat.split(sizes, dim=1), targets)]
        torch._foreach_copy_(targets, pieces)
    for s in slots:
        if s.low_precision is not None:
            s.low_precision.copy_(s.param)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def update_tensor(
    rule: UpdateRule,
    slot: ParamSlot,
    coefficients: Tensor,
    mask: Tensor,
    flags: Mapping[str, bool],
) -> None:
    """The rule's update of one parameter with torch ops; `coefficients` is `[C, N]`."""
    p, g = slot.param, slot.grad
    assert g is not None
    nd = p.dim()
    math = _opmath(p.dtype)
    c = coefficients.to(math).view(coefficients.shape[0], -1, *([1] * (nd - 1))).unbind(0)
    state = [slot.state.get(name) for name in rule.state]
    inputs = [t.to(math) if t is not None else None for t in state]
    present = [flags.get(name, True) for name in rule.state]
    out = rule.update(
        p.to(math),
        g.to(math),
        *inputs,
        *c,
        *(flags[name] for name in rule.state if name in rule.optional),
    )
    everyone = mask.device.type == "cpu" and bool(mask.all())
    keep = per_model(mask, nd)
    targets: list[tuple[Tensor, Tensor]] = [(p, out[0])]
    targets += [(t, new) for t, new, on in zip(state, out[1:], present) if on and t is not None]
    for dst, new in targets:
        dst.copy_(new if everyone else torch.where(keep, new, dst))
    if slot.low_precision is not None:
        slot.low_precision.copy_(p)
