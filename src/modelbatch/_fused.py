"""Speed helpers of the captured step: the fused Adam update and the gradient-layout fix.

Private to `modelbatch.fast`; each helper runs while warming up or capturing,
never per replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

_COMPILED: dict[str, Callable] = {}


def _adam_update_fused(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], c: dict[str, Tensor], decoupled: bool
) -> None:
    """`modelbatch.optim`'s Adam/AdamW update as one expression, for `torch.compile`.

    The same math as `adam_update` (lerp moments, `p += m / (sqrt(v) * A + B)`,
    held models' gradient replaced by 0), written without `out=` and in-place
    intermediates so that Inductor emits one kernel per parameter tensor: it
    reads p, g, m, v once and writes p, m, v once. Tensors come as `[N, numel]`
    views, so one compiled kernel serves every parameter, size and N.
    """

    def per_model(key: str) -> Tensor:
        return c[key].view(-1, 1)

    live = per_model("mask")
    if decoupled:
        start = param * per_model("decay")
        u = torch.where(live, grad, 0.0)
    else:
        start = param
        u = torch.where(live, grad + param * per_model("wd"), 0.0)
    m = torch.lerp(state["exp_avg"], u, per_model("w1"))
    v = torch.lerp(state["exp_avg_sq"], u * u, per_model("w2"))
    source = v
    max_sq = state.get("max_exp_avg_sq")
    if max_sq is not None:
        source = torch.maximum(max_sq * per_model("amsgrad"), v)
        max_sq.copy_(source)
    denom = torch.sqrt(source) * per_model("A") + per_model("B")
    param.copy_(start + m / denom)
    state["exp_avg"].copy_(m)
    state["exp_avg_sq"].copy_(v)


def _fuse(optimizer: torch.optim.Optimizer) -> bool:
    """Run a modelbatch Adam/AdamW's per-tensor update compiled; whether it could.

    Eagerly the update is about eight elementwise ops per parameter tensor, each
    a full pass over `[N, *shape]` memory; compiled, one kernel per tensor.
    Compiled once per process and bound on this instance only. Other optimizers
    run their eager update inside the graph.
    """
    from .optim import BatchAdam

    if not isinstance(optimizer, BatchAdam):
        return False
    fn = _COMPILED.get("adam")
    if fn is None:
        fn = _COMPILED["adam"] = torch.compile(_adam_update_fused, dynamic=True)
    decoupled = optimizer.decoupled
    # The optimizer's own per-parameter update (compiled or not): the fallback
    # for tensors the fused kernel does not cover.
    fallback = optimizer._update()

    def update(p: Tensor, grad: Tensor, state: dict, c: dict, scratch: Any) -> None:
        # Python runs here only while warming up and capturing, never on replay.
        tensors = [p, grad, *state.values()]
        order = _memory_order(p.shape, p.stride()) if _model_major(p.shape, p.stride()) else None
        if order is None or not all(
            t.stride() == p.stride() and t.dtype == torch.float32 for t in tensors
        ):
            fallback(p, grad, state, c, scratch)
            return
        # Elementwise math does not care about element order: every tensor is
        # viewed [N, numel] in its (shared) memory order.
        flat = {k: _flat(v, order) for k, v in state.items()}
        with _fixed_matmul_flags():
            fn(_flat(p, order), _flat(grad, order), flat, c, decoupled)

    # step() fetches the per-parameter update through optimizer._update(), which
    # returns this cached function.
    optimizer._update_fn = update
    return True


def _adopt_grad_layouts(
    params: Sequence[Tensor], layouts: dict[int, tuple[int, ...]], optimizer: torch.optim.Optimizer
) -> None:
    """Store each parameter in the memory layout its incoming gradient has.

    Under vmap a linear layer's weight gradient arrives transposed (`[N, in, out]`
    in memory for an `[N, out, in]` weight); autograd then copies it into the
    parameter's layout at every step, a strided copy as large as the weights
    (a fifth of an MLP 784-512-512-10 step at N = 1024 on an H100). Giving the parameter, its grad and
    its optimizer state that layout once makes the copy disappear; values,
    shapes and names are unchanged.
    """
    with torch.no_grad():
        for p in params:
            stride = layouts.get(id(p))
            if stride is None or stride == p.stride() or not _model_major(p.shape, stride):
                continue

            def moved(t: Tensor, stride: tuple[int, ...] = stride) -> Tensor:
                out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
                return out.copy_(t)

            p.data = moved(p.data)
            if p.grad is not None:
                p.grad = moved(p.grad)
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.data = moved(value.data)


def _stride_recorder(layouts: dict[int, tuple[int, ...]], key: int) -> Callable:
    def hook(grad: Tensor) -> None:
        layouts[key] = grad.stride()

    return hook


def _memory_order(shape: torch.Size, stride: tuple[int, ...]) -> list[int] | None:
    """The dims from outermost to innermost in memory, if `stride` lays `shape` out densely."""
    order = sorted(range(len(shape)), key=lambda d: (-stride[d], d))
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and stride[d] != expected:
            return None
        expected *= shape[d]
    return order


def _model_major(shape: torch.Size, stride: tuple[int, ...]) -> bool:
    """Dense, with the model axis outermost (each model's slice is one block of memory)."""
    order = _memory_order(shape, stride)
    return order is not None and (order[0] == 0 or shape[0] == 1)


def _flat(t: Tensor, order: list[int]) -> Tensor:
    """`t` as `[N, numel]` in memory order (a view, no copy)."""
    return t.permute(order).view(t.shape[0], -1)


@contextlib.contextmanager
def _fixed_matmul_flags() -> Any:
    """TF32 flags at their defaults while the (matmul-free) fused update runs.

    torch.compile guards on the global TF32 flags; without this a TF32 run
    compiles and uses a second variant of the same pointwise kernel.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
