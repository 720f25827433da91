"""Every update rule of the vectorized optimizers, each written once.

A rule is two pure functions, in the spirit of optax's `(init, update)` pairs:

- `coefficients(step, *scalars, *hparams) -> (*coefficients, *new_scalars)`
  turns one model's hyperparameters, the parameter's step count (already
  advanced for this step) and its per-parameter scalar state (NAdam's
  `mu_product`, ASGD's `eta` and `mu`) into the numbers this step needs. It
  runs in float64, once per (parameter tensor, model).
- `update(p, g, *state, *coefficients, *flags) -> (p, *state)` updates the
  elements of one model's parameter, out of place, in float32.

Both are written with arithmetic and the functions of the global `ops` only
(`sqrt`, `where`, `maximum`, `minimum`, `abs`, `exp`, `log`), so that one
source runs two ways (`_executor`): with `ops` = torch, over `[K, N]`
coefficient tables and `[N, *shape]` tensors (CPU, exact); and, on CUDA, with
`ops` rebound to `triton.language`, inlined into one generated Triton kernel
over every parameter tensor (`_kernels`). Flags are compile-time booleans
that say which optional state exists (e.g. `max_exp_avg_sq` only if some model
uses amsgrad); a missing state is passed as a placeholder and returned as is.

Every rule reproduces the operation order of torch.optim's single-tensor
implementation (`torch/optim/<name>.py`, `_single_tensor_<name>`), with each
per-model option (maximize, amsgrad, nesterov, centered) a 0/1 hyperparameter
selected with `where`, so that model i matches torch on model i alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch as ops

__all__ = ["UpdateRule", "RULES"]


@dataclass(frozen=True, eq=False)
class UpdateRule:
    """One optimizer's math and the names that tie it to its state.

    Attributes:
        name: the torch class's name (`"Adam"`).
        hparams: the coefficient function's hyperparameter arguments, in order;
            each is `(key, column)`: `group["hparams"][key]` (`[N]`) or its
            column (`betas` is `[N, 2]`).
        state: per-element state tensors `[N, *shape]`, in `update`'s order.
        scalars: per-(parameter, model) scalar state besides the step count,
            with its initial value (a number, or the name of a hyperparameter).
        coefficients: see the module docstring.
        num_coefficients: how many coefficients `coefficients` returns before
            the new scalars.
        update: see the module docstring.
        optional: for each optional state, the hyperparameter whose non-zero
            value (in any model) makes it exist; `update` takes one flag each.
        init: initial value of a state tensor other than 0: the name of a
            hyperparameter (broadcast per model).
        options: shared (not per-model) options that change the math, passed
            to `update` and `coefficients` as trailing compile-time values.
    """

    name: str
    hparams: tuple[tuple[str, int | None], ...]
    state: tuple[str, ...]
    coefficients: Callable
    num_coefficients: int
    update: Callable
    scalars: tuple[tuple[str, float | str], ...] = ()
    optional: dict[str, str] = field(default_factory=dict)
    init: dict[str, str] = field(default_factory=dict)
    options: tuple[str, ...] = ()


def _lerp(start, end, weight):
    return ops.lerp(start, end, weight)


def _lerp_formula(start, end, weight):
    # torch.lerp's formula, stable at both ends: `_lerp` where ops has no lerp (Triton).
    return ops.where(
        weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight)
    )


def _mul_add(x, a, b):
    # x + a * b as torch's addcmul (one op; on the CPU its kernel fuses the multiply-add).
    return ops.addcmul(x, a, b)


def _mul_add_formula(x, a, b):
    # `_mul_add` where ops has no addcmul (Triton): the compiler contracts it likewise.
    return x + a * b


def _pow(base, exponent):
    # base ** exponent, as torch.optim's Python `beta ** step`.
    return ops.pow(base, exponent)


def _pow_formula(base, exponent):
    # `_pow` where ops has no pow (Triton), for base >= 0 and exponent > 0, in float64.
    return ops.where(
        base > 0.0, ops.exp(exponent * ops.log(ops.where(base > 0.0, base, 1.0))), 0.0 * base
    )


def _signed(g, p, sign, wd):
    # maximize (sign -1), then L2 weight decay added to the gradient, in torch's order;
    # like torch's `if weight_decay != 0`, a model without weight decay skips the term.
    g = g * sign
    return ops.where(wd != 0.0, _mul_add(g, p, wd), g)


def _decayed(p, g, sign, decay, wd):
    # maximize, decoupled weight decay on the weights (decay), coupled on the gradient (wd).
    g = g * sign
    p = p * decay
    return p, ops.where(wd != 0.0, _mul_add(g, p, wd), g)


def _moments(m, v, g, w1, beta2, w2):
    # Adam's first and second moments, as torch's lerp_ and mul_().addcmul_().
    return _lerp(m, g, w1), _mul_add(v * beta2, w2 * g, g)


def _round32(x):
    # torch keeps some scalar state (NAdam's mu_product, ASGD's eta and mu) as float32 tensors.
    return x.to(ops.float32).to(ops.float64)


# ---------------------------------------------------------------------- Adam, AdamW


def _adam_coefficients(step, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled):
    bias1 = 1.0 - _pow(beta1, step)
    bias2_sqrt = ops.sqrt(1.0 - _pow(beta2, step))
    sign = 1.0 - 2.0 * maximize
    decay = 1.0 - lr * weight_decay * decoupled
    wd = weight_decay * (1.0 - decoupled)
    return (lr / bias1, bias2_sqrt, eps, wd, 1.0 - beta1, beta2, 1.0 - beta2, sign, amsgrad, decay)


def _adam_update(
    p, g, m, v, vmax, step_size, bias2_sqrt, eps, wd, w1, beta2, w2, sign, amsgrad, decay, HAS_MAX
):
    p, g = _decayed(p, g, sign, decay, wd)
    m, v = _moments(m, v, g, w1, beta2, w2)
    if HAS_MAX:
        # Models without amsgrad keep max_exp_avg_sq equal to exp_avg_sq.
        vmax = ops.maximum(vmax * amsgrad, v)
        source = vmax
    else:
        source = v
    denom = ops.sqrt(source) / bias2_sqrt + eps
    p = p + (-step_size) * m / denom
    return p, m, v, vmax


ADAM = UpdateRule(
    name="Adam",
    hparams=(
        ("lr", None),
        ("betas", 0),
        ("betas", 1),
        ("eps", None),
        ("weight_decay", None),
        ("amsgrad", None),
        ("maximize", None),
    ),
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    coefficients=_adam_coefficients,
    num_coefficients=10,
    update=_adam_update,
    optional={"max_exp_avg_sq": "amsgrad"},
    options=("decoupled",),
)


# ---------------------------------------------------------------------- SGD


def _sgd_coefficients(step, lr, momentum, dampening, weight_decay, nesterov, maximize):
    # Torch starts the momentum buffer as a copy of the first gradient.
    first = ops.where(step == 1.0, 1.0, 0.0)
    sign = 1.0 - 2.0 * maximize
    has_momentum = ops.where(momentum != 0.0, 1.0, 0.0)
    keep = momentum * (1.0 - first)
    take = ops.where(first > 0.0, 1.0, 1.0 - dampening)
    return (lr, weight_decay, sign, has_momentum, keep, take, nesterov * has_momentum, momentum)


def _sgd_update(p, g, buf, lr, wd, sign, has_momentum, keep, take, nesterov, momentum, HAS_BUF):
    g = _signed(g, p, sign, wd)
    if HAS_BUF:
        new_buf = _mul_add(buf * keep, g, take)
        buf = ops.where(has_momentum > 0.0, new_buf, buf)
        step_dir = ops.where(nesterov > 0.0, _mul_add(g, buf, momentum), buf)
        g = ops.where(has_momentum > 0.0, step_dir, g)
    p = _mul_add(p, g, -lr)
    return p, buf


SGD = UpdateRule(
    name="SGD",
    hparams=(
        ("lr", None),
        ("momentum", None),
        ("dampening", None),
        ("weight_decay", None),
        ("nesterov", None),
        ("maximize", None),
    ),
    state=("momentum_buffer",),
    coefficients=_sgd_coefficients,
    num_coefficients=8,
    update=_sgd_update,
    optional={"momentum_buffer": "momentum"},
)


# ---------------------------------------------------------------------- RMSprop


def _rmsprop_coefficients(step, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    sign = 1.0 - 2.0 * maximize
    return (lr, alpha, 1.0 - alpha, eps, weight_decay, momentum, centered, sign)


def _rmsprop_update(
    p,
    g,
    square_avg,
    grad_avg,
    buf,
    lr,
    alpha,
    w,
    eps,
    wd,
    momentum,
    centered,
    sign,
    HAS_CENTERED,
    HAS_BUF,
):
    g = _signed(g, p, sign, wd)
    square_avg = _mul_add(square_avg * alpha, w * g, g)
    if HAS_CENTERED:
        new_avg = _lerp(grad_avg, g, w)
        grad_avg = ops.where(centered > 0.0, new_avg, grad_avg)
        var = ops.where(centered > 0.0, _mul_add(square_avg, -grad_avg, grad_avg), square_avg)
        avg = ops.sqrt(var) + eps
    else:
        avg = ops.sqrt(square_avg) + eps
    if HAS_BUF:
        new_buf = buf * momentum + g / avg
        buf = ops.where(momentum > 0.0, new_buf, buf)
        p = ops.where(momentum > 0.0, _mul_add(p, buf, -lr), p + (-lr) * g / avg)
    else:
        p = p + (-lr) * g / avg
    return p, square_avg, grad_avg, buf


RMSPROP = UpdateRule(
    name="RMSprop",
    hparams=(
        ("lr", None),
        ("alpha", None),
        ("eps", None),
        ("weight_decay", None),
        ("momentum", None),
        ("centered", None),
        ("maximize", None),
    ),
    state=("square_avg", "grad_avg", "momentum_buffer"),
    coefficients=_rmsprop_coefficients,
    num_coefficients=8,
    update=_rmsprop_update,
    optional={"grad_avg": "centered", "momentum_buffer": "momentum"},
)


# ---------------------------------------------------------------------- Adagrad


def _adagrad_coefficients(step, lr, lr_decay, weight_decay, eps, maximize):
    clr = lr / (1.0 + (step - 1.0) * lr_decay)
    return (clr, weight_decay, eps, 1.0 - 2.0 * maximize)


def _adagrad_update(p, g, total, clr, wd, eps, sign):
    g = _signed(g, p, sign, wd)
    total = _mul_add(total, g, g)
    std = ops.sqrt(total) + eps
    p = p + (-clr) * g / std
    return p, total


ADAGRAD = UpdateRule(
    name="Adagrad",
    hparams=(
        ("lr", None),
        ("lr_decay", None),
        ("weight_decay", None),
        ("eps", None),
        ("maximize", None),
    ),
    state=("sum",),
    coefficients=_adagrad_coefficients,
    num_coefficients=4,
    update=_adagrad_update,
    init={"sum": "initial_accumulator_value"},
)


# ---------------------------------------------------------------------- Adamax


def _adamax_coefficients(step, lr, beta1, beta2, eps, weight_decay, maximize):
    clr = lr / (1.0 - _pow(beta1, step))
    return (clr, 1.0 - beta1, beta2, eps, weight_decay, 1.0 - 2.0 * maximize)


def _adamax_update(p, g, m, u, clr, w1, beta2, eps, wd, sign):
    g = _signed(g, p, sign, wd)
    m = _lerp(m, g, w1)
    u = ops.maximum(u * beta2, ops.abs(g) + eps)
    p = p + (-clr) * m / u
    return p, m, u


ADAMAX = UpdateRule(
    name="Adamax",
    hparams=(
        ("lr", None),
        ("betas", 0),
        ("betas", 1),
        ("eps", None),
        ("weight_decay", None),
        ("maximize", None),
    ),
    state=("exp_avg", "exp_inf"),
    coefficients=_adamax_coefficients,
    num_coefficients=6,
    update=_adamax_update,
)


# ---------------------------------------------------------------------- NAdam


def _nadam_coefficients(
    step, mu_product, lr, beta1, beta2, eps, weight_decay, momentum_decay, maximize, decoupled
):
    bias2 = 1.0 - _pow(beta2, step)
    mu = beta1 * (1.0 - 0.5 * _pow((24.0 + 0.0 * step) / 25.0, step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * _pow((24.0 + 0.0 * step) / 25.0, (step + 1.0) * momentum_decay))
    mu_product = _round32(_round32(mu_product) * _round32(mu))
    mu_product_next = mu_product * mu_next
    grad_rate = -lr * (1.0 - mu) / (1.0 - mu_product)
    avg_rate = (-lr * mu_next) / (1.0 - mu_product_next)
    decay = 1.0 - lr * weight_decay * decoupled
    wd = weight_decay * (1.0 - decoupled)
    sign = 1.0 - 2.0 * maximize
    w1 = 1.0 - beta1
    w2 = 1.0 - beta2
    return (grad_rate, avg_rate, bias2, eps, wd, decay, w1, beta2, w2, sign, mu_product)


def _nadam_update(p, g, m, v, grad_rate, avg_rate, bias2, eps, wd, decay, w1, beta2, w2, sign):
    p, g = _decayed(p, g, sign, decay, wd)
    m, v = _moments(m, v, g, w1, beta2, w2)
    denom = ops.sqrt(v / bias2) + eps
    p = p + grad_rate * g / denom
    p = p + avg_rate * m / denom
    return p, m, v


NADAM = UpdateRule(
    name="NAdam",
    hparams=(
        ("lr", None),
        ("betas", 0),
        ("betas", 1),
        ("eps", None),
        ("weight_decay", None),
        ("momentum_decay", None),
        ("maximize", None),
    ),
    state=("exp_avg", "exp_avg_sq"),
    scalars=(("mu_product", 1.0),),
    coefficients=_nadam_coefficients,
    num_coefficients=10,
    update=_nadam_update,
    options=("decoupled",),
)


# ---------------------------------------------------------------------- RAdam


def _radam_coefficients(step, lr, beta1, beta2, eps, weight_decay, maximize, decoupled):
    beta2_t = _pow(beta2, step)
    bias1 = 1.0 - _pow(beta1, step)
    bias2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / bias2
    rectified = ops.where(rho_t > 5.0, 1.0, 0.0)
    safe_rho = ops.where(rho_t > 5.0, rho_t, 5.0)
    rect = ops.sqrt(
        (safe_rho - 4.0)
        * (safe_rho - 2.0)
        * rho_inf
        / ((rho_inf - 4.0) * (rho_inf - 2.0) * safe_rho)
    )
    decay = 1.0 - lr * weight_decay * decoupled
    wd = weight_decay * (1.0 - decoupled)
    sign = 1.0 - 2.0 * maximize
    return (
        lr,
        bias1,
        ops.sqrt(bias2),
        rect,
        rectified,
        eps,
        wd,
        decay,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        sign,
    )


def _radam_update(
    p, g, m, v, lr, bias1, bias2_sqrt, rect, rectified, eps, wd, decay, w1, beta2, w2, sign
):
    p, g = _decayed(p, g, sign, decay, wd)
    m, v = _moments(m, v, g, w1, beta2, w2)
    corrected = m / bias1
    adaptive = bias2_sqrt / (ops.sqrt(v) + eps)
    step_rect = corrected * lr * adaptive * rect
    step_plain = corrected * lr
    p = p - ops.where(rectified > 0.0, step_rect, step_plain)
    return p, m, v


RADAM = UpdateRule(
    name="RAdam",
    hparams=(
        ("lr", None),
        ("betas", 0),
        ("betas", 1),
        ("eps", None),
        ("weight_decay", None),
        ("maximize", None),
    ),
    state=("exp_avg", "exp_avg_sq"),
    coefficients=_radam_coefficients,
    num_coefficients=12,
    update=_radam_update,
    options=("decoupled",),
)


# ---------------------------------------------------------------------- Adadelta


def _adadelta_coefficients(step, lr, rho, eps, weight_decay, maximize):
    return (lr, rho, 1.0 - rho, eps, weight_decay, 1.0 - 2.0 * maximize)


def _adadelta_update(p, g, square_avg, acc_delta, lr, rho, w, eps, wd, sign):
    g = _signed(g, p, sign, wd)
    square_avg = _mul_add(square_avg * rho, w * g, g)
    std = ops.sqrt(square_avg + eps)
    delta = ops.sqrt(acc_delta + eps) / std * g
    acc_delta = _mul_add(acc_delta * rho, w * delta, delta)
    p = _mul_add(p, delta, -lr)
    return p, square_avg, acc_delta


ADADELTA = UpdateRule(
    name="Adadelta",
    hparams=(
        ("lr", None),
        ("rho", None),
        ("eps", None),
        ("weight_decay", None),
        ("maximize", None),
    ),
    state=("square_avg", "acc_delta"),
    coefficients=_adadelta_coefficients,
    num_coefficients=6,
    update=_adadelta_update,
)


# ---------------------------------------------------------------------- ASGD


def _asgd_coefficients(step, eta, mu, lr, lambd, alpha, t0, weight_decay, maximize):
    # This step uses the eta and mu of the previous one, then both advance.
    # Like torch's lazily created state, a parameter's first step uses the lr of that step.
    eta = _round32(ops.where(step == 1.0, lr, eta))
    mu = ops.where(step == 1.0, 1.0 + 0.0 * mu, mu)
    new_eta = _round32(lr / _pow(1.0 + lambd * lr * step, alpha + 0.0 * step))
    new_mu = _round32(1.0 / ops.maximum(step - t0, 1.0 + 0.0 * step))
    decay = 1.0 - lambd * eta
    sign = 1.0 - 2.0 * maximize
    return (decay, eta, mu, weight_decay, sign, new_eta, new_mu)


def _asgd_update(p, g, ax, decay, eta, mu, wd, sign):
    g = _signed(g, p, sign, wd)
    p = p * decay
    p = _mul_add(p, g, -eta)
    ax = ops.where(mu != 1.0, ax + (p - ax) * mu, p)
    return p, ax


ASGD = UpdateRule(
    name="ASGD",
    hparams=(
        ("lr", None),
        ("lambd", None),
        ("alpha", None),
        ("t0", None),
        ("weight_decay", None),
        ("maximize", None),
    ),
    state=("ax",),
    scalars=(("eta", "lr"), ("mu", 1.0)),
    coefficients=_asgd_coefficients,
    num_coefficients=5,
    update=_asgd_update,
)


# ---------------------------------------------------------------------- Rprop


def _rprop_coefficients(step, etaminus, etaplus, step_size_min, step_size_max, maximize):
    return (etaminus, etaplus, step_size_min, step_size_max, 1.0 - 2.0 * maximize)


def _rprop_update(p, g, prev, step_size, etaminus, etaplus, lo, hi, sign):
    g = g * sign
    product = g * prev
    factor = ops.where(product > 0.0, etaplus, ops.where(product < 0.0, etaminus, 1.0))
    step_size = ops.minimum(ops.maximum(step_size * factor, lo), hi)
    g = ops.where(factor == etaminus, 0.0 * g, g)
    direction = ops.where(g > 0.0, 1.0, ops.where(g < 0.0, -1.0, 0.0 * g))
    p = p - direction * step_size
    return p, g, step_size


RPROP = UpdateRule(
    name="Rprop",
    hparams=(("etas", 0), ("etas", 1), ("step_sizes", 0), ("step_sizes", 1), ("maximize", None)),
    state=("prev", "step_size"),
    coefficients=_rprop_coefficients,
    num_coefficients=5,
    update=_rprop_update,
    init={"step_size": "lr"},
)


#: every rule by torch class name.
RULES: dict[str, UpdateRule] = {
    r.name: r for r in (ADAM, SGD, RMSPROP, ADAGRAD, ADAMAX, NADAM, RADAM, ADADELTA, ASGD, RPROP)
}
