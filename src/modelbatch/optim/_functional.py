"""Pure update math of the vectorized optimizers, over stacked tensors.

Each optimizer is two functions:

- `<name>_coefficients(hparams, step, mask, lr_factor, ...)` turns the per-model
  hyperparameters (`[N]` tensors), the per-model step counts (`[N]`, advanced in
  place for the models that update) and the update mask (`[N]` bool) into the
  `[N]` coefficient vectors of this step. It runs once per step and param group.
- `<name>_update(param, grad, state, c, scratch)` updates one stacked parameter
  `[N, *shape]` and its state in place with a fixed number of ops, every
  coefficient broadcast as `[N, 1, ...]`. `scratch` holds one or two tensors
  shaped like the parameter that the update may overwrite: kept between steps,
  they spare a fresh allocation (and, on CPU, its page faults) per step.

Models outside the mask are left bitwise unchanged: their gradient is replaced
by 0 (so NaN or inf cannot leak into their state) and their coefficients make
every in-place op an exact no-op (decay 1, rate 0, step count not advanced).

`maximize` costs no extra pass: the gradient's sign is folded into the weight
decay coefficient (`u = g + sign * wd * p = sign * (sign * g + wd * p)`), so the
first-moment state of a maximizing model holds the negated torch state and the
step coefficients carry the sign back. Squares are unaffected.

Steps with a per-model step size are written `p += m / D` with
`D = sqrt(v) * A + B`: one op builds D from `sqrt(v)`, and a model that must not
move gets `A = 0, B = inf`, so its increment is exactly 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._hparams import per_model

__all__ = [
    "adam_coefficients",
    "adam_update",
    "sgd_coefficients",
    "sgd_update",
    "rmsprop_coefficients",
    "rmsprop_update",
    "adagrad_coefficients",
    "adagrad_update",
]

Coefficients = dict[str, Tensor]
_INF = float("inf")


def _advance(step: Tensor, mask: Tensor) -> None:
    """Count one more step for the models that update (in place)."""
    step.add_(mask.to(step.dtype))


def _sign(hp: Mapping[str, Tensor]) -> Tensor:
    """+1 for minimizing models, -1 for maximizing ones: `[N]`."""
    return 1.0 - 2.0 * hp["maximize"].to(hp["lr"].dtype)


def _denominator(mask: Tensor, scale: Tensor, eps: Tensor, rate: Tensor) -> Coefficients:
    """`A`, `B` of `D = sqrt(v) * A + B` for `p += m / D` with `D = (sqrt(v)/scale + eps)/rate`.

    Models outside the mask, and models whose rate is 0, get `A = 0, B = inf`
    so that `m / D` is exactly 0.
    """
    live = mask & (rate != 0)
    safe = torch.where(live, rate, torch.ones_like(rate))
    a = torch.where(live, 1.0 / (scale * safe), torch.zeros_like(rate))
    b = torch.where(live, eps / safe, torch.full_like(rate, _INF))
    return {"A": a, "B": b}


def _masked_grad(grad: Tensor, param: Tensor, c: Coefficients, out: Tensor) -> Tensor:
    """`sign * (sign * g + wd * p)` for updating models, exactly 0 for the others, into `out`."""
    nd = param.dim()
    torch.addcmul(grad, param, per_model(c["wd"], nd), out=out)
    # After the decay term, so that not even an inf weight of a held model reaches its state.
    return torch.where(per_model(c["mask"], nd), out, c["zero"], out=out)


# ---------------------------------------------------------------------- Adam / AdamW


def adam_coefficients(
    hp: Mapping[str, Tensor], step: Tensor, mask: Tensor, lr_factor: float | Tensor, decoupled: bool
) -> Coefficients:
    """Coefficients of one Adam (or AdamW, `decoupled=True`) step; advances `step`."""
    _advance(step, mask)
    zero = torch.zeros_like(hp["lr"])
    sign = _sign(hp)
    lr = hp["lr"] * lr_factor
    beta1, beta2 = hp["betas"].unbind(1)
    bias1 = 1.0 - beta1**step
    bias2_sqrt = (1.0 - beta2**step).sqrt()
    # Torch's step size is -lr / bias1; the sign folds maximize back in.
    rate = torch.where(mask, -lr * sign / torch.where(mask, bias1, 1.0), zero)
    c = _denominator(mask, bias2_sqrt, hp["eps"], rate)
    c["w1"] = torch.where(mask, 1.0 - beta1, zero)
    c["w2"] = torch.where(mask, 1.0 - beta2, zero)
    c["amsgrad"] = hp["amsgrad"].to(lr.dtype)
    c.update(mask=mask, zero=zero.new_zeros(()))
    if decoupled:
        c["wd"] = zero
        c["decay"] = torch.where(mask, 1.0 - lr * hp["weight_decay"], 1.0)
    else:
        c["wd"] = hp["weight_decay"] * sign
    return c


def adam_update(
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Tensor],
    c: Coefficients,
    decoupled: bool,
    scratch: Sequence[Tensor],
) -> None:
    """One Adam/AdamW step of a stacked parameter `[N, *shape]`.

    State: `exp_avg`, `exp_avg_sq` and, when any model uses amsgrad,
    `max_exp_avg_sq`, each `[N, *shape]`.
    """
    nd = param.dim()
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if decoupled:
        param.mul_(per_model(c["decay"], nd))
        u = torch.where(per_model(c["mask"], nd), grad, c["zero"], out=scratch[0])
    else:
        u = _masked_grad(grad, param, c, scratch[0])
    exp_avg.lerp_(u, per_model(c["w1"], nd))
    u.mul_(u)
    exp_avg_sq.lerp_(u, per_model(c["w2"], nd))
    source = exp_avg_sq
    max_sq = state.get("max_exp_avg_sq")
    if max_sq is not None:
        # Models without amsgrad keep max_exp_avg_sq equal to exp_avg_sq.
        max_sq.mul_(per_model(c["amsgrad"], nd))
        torch.maximum(max_sq, exp_avg_sq, out=max_sq)
        source = max_sq
    torch.sqrt(source, out=u)
    torch.addcmul(per_model(c["B"], nd), u, per_model(c["A"], nd), out=u)
    param.addcdiv_(exp_avg, u)


# ---------------------------------------------------------------------- SGD


def sgd_coefficients(
    hp: Mapping[str, Tensor], step: Tensor, mask: Tensor, lr_factor: float | Tensor
) -> Coefficients:
    """Coefficients of one SGD step; advances `step`."""
    first = step == 0
    _advance(step, mask)
    zero = torch.zeros_like(hp["lr"])
    one = torch.ones_like(zero)
    sign = _sign(hp)
    momentum, nesterov = hp["momentum"], hp["nesterov"]
    rate = torch.where(mask, -hp["lr"] * lr_factor * sign, zero)
    # Torch starts the momentum buffer as a copy of the first gradient, and a
    # model without momentum uses its gradient as is (dampening ignored).
    plain = first | (momentum == 0)
    return {
        "mask": mask,
        "zero": zero.new_zeros(()),
        "wd": hp["weight_decay"] * sign,
        "rate": rate,
        "momentum": torch.where(mask, torch.where(first, zero, momentum), one),
        "dampening": torch.where(mask, torch.where(plain, one, 1.0 - hp["dampening"]), zero),
        "rate_buf": rate * torch.where(nesterov, momentum, one),
        "rate_grad": torch.where(nesterov, rate, zero),
    }


def sgd_update(
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Tensor],
    c: Coefficients,
    scratch: Sequence[Tensor],
) -> None:
    """One SGD step of a stacked parameter; state `momentum_buffer` `[N, *shape]` if any model uses momentum."""
    nd = param.dim()
    u = _masked_grad(grad, param, c, scratch[0])
    buf = state.get("momentum_buffer")
    if buf is None:
        param.addcmul_(u, per_model(c["rate"], nd))
        return
    buf.mul_(per_model(c["momentum"], nd)).addcmul_(u, per_model(c["dampening"], nd))
    param.addcmul_(buf, per_model(c["rate_buf"], nd))
    param.addcmul_(u, per_model(c["rate_grad"], nd))


# ---------------------------------------------------------------------- RMSprop


def rmsprop_coefficients(
    hp: Mapping[str, Tensor], step: Tensor, mask: Tensor, lr_factor: float | Tensor
) -> Coefficients:
    """Coefficients of one RMSprop step; advances `step`."""
    _advance(step, mask)
    zero = torch.zeros_like(hp["lr"])
    one = torch.ones_like(zero)
    sign = _sign(hp)
    rate = torch.where(mask, -hp["lr"] * lr_factor * sign, zero)
    weight = torch.where(mask, 1.0 - hp["alpha"], zero)
    c = _denominator(mask, one, hp["eps"], rate)
    c.update(
        mask=mask,
        zero=zero.new_zeros(()),
        wd=hp["weight_decay"] * sign,
        rate=rate,
        weight=weight,
        # grad_avg stays 0 for models that are not centered, so sqrt(v - 0) = sqrt(v).
        weight_centered=torch.where(hp["centered"], weight, zero),
        # eps 1 keeps the denominator positive for frozen models (their increment is 0 anyway).
        eps=torch.where(mask, hp["eps"], one),
        momentum=torch.where(mask, hp["momentum"], one),
    )
    return c


def rmsprop_update(
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Tensor],
    c: Coefficients,
    scratch: Sequence[Tensor],
) -> None:
    """One RMSprop step of a stacked parameter.

    State: `square_avg`, plus `grad_avg` if any model is centered and
    `momentum_buffer` if any model uses momentum, each `[N, *shape]`.
    """
    nd = param.dim()
    u = _masked_grad(grad, param, c, scratch[0])
    grad_avg = state.get("grad_avg")
    if grad_avg is not None:
        grad_avg.lerp_(u, per_model(c["weight_centered"], nd))
    avg = torch.mul(u, u, out=scratch[1])
    state["square_avg"].lerp_(avg, per_model(c["weight"], nd))
    if grad_avg is not None:
        torch.addcmul(state["square_avg"], grad_avg, grad_avg, value=-1, out=avg)
        avg.sqrt_()
    else:
        torch.sqrt(state["square_avg"], out=avg)
    buf = state.get("momentum_buffer")
    if buf is None:
        torch.addcmul(per_model(c["B"], nd), avg, per_model(c["A"], nd), out=avg)
        param.addcdiv_(u, avg)
        return
    avg.add_(per_model(c["eps"], nd))
    buf.mul_(per_model(c["momentum"], nd)).addcdiv_(u, avg)
    param.addcmul_(buf, per_model(c["rate"], nd))


# ---------------------------------------------------------------------- Adagrad


def adagrad_coefficients(
    hp: Mapping[str, Tensor], step: Tensor, mask: Tensor, lr_factor: float | Tensor
) -> Coefficients:
    """Coefficients of one Adagrad step; advances `step`."""
    _advance(step, mask)
    zero = torch.zeros_like(hp["lr"])
    sign = _sign(hp)
    clr = hp["lr"] * lr_factor / (1.0 + (step - 1.0) * hp["lr_decay"])
    rate = torch.where(mask, -clr * sign, zero)
    c = _denominator(mask, torch.ones_like(zero), hp["eps"], rate)
    c.update(mask=mask, zero=zero.new_zeros(()), wd=hp["weight_decay"] * sign)
    return c


def adagrad_update(
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Tensor],
    c: Coefficients,
    scratch: Sequence[Tensor],
) -> None:
    """One Adagrad step of a stacked parameter; state `sum` `[N, *shape]`."""
    nd = param.dim()
    u = _masked_grad(grad, param, c, scratch[0])
    state["sum"].addcmul_(u, u)
    std = torch.sqrt(state["sum"], out=scratch[1])
    torch.addcmul(per_model(c["B"], nd), std, per_model(c["A"], nd), out=std)
    param.addcdiv_(u, std)
