"""The recurrence of LSTM, GRU and RNN over a whole sequence, for N models at once.

The input projection of every step (`x W_ih^T + b`) is computed before, as
one matmul. What is left is the loop over time; `scan` runs it as one
`autograd.Function` with a hand-written backward:

- forward, per step: one batched GEMM `h W_hh^T` (`[N, B, H] @ [N, H, G]`)
  and one elementwise cell function (gates, state update);
- backward, per step: one elementwise cell function and one batched GEMM
  `dgates W_hh` (the direct term of `dh` added in the GEMM); the weight
  gradient of `W_hh` (and `b_hh`) is ONE GEMM over all steps at the end.

Under `torch.vmap` the vmap rule hands the stacked `[N, ...]` tensors to the
same code, so N models are one GEMM per step. On CUDA the cell functions are
compiled with `torch.compile` into one kernel each (at their first use);
elsewhere, or where compilation fails, they run as plain torch ops.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any, TypeGuard

import torch
from torch import Tensor
from torch._C._functorch import is_batchedtensor

from ._twins import VmapOnly

__all__ = ["scan"]

# ---------------------------------------------------------------------- cell functions
# Pure elementwise functions of one step, `[N, B, *]` each; gate order is torch's.


def _lstm_step(xg: Tensor, hg: Tensor, c: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One LSTM step from its input and hidden gate terms: h, c and the activated gates."""
    i, f, g, o = (xg + hg).chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c, [i, f, g, o]


def _lstm_fwd(xg: Tensor, hg: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    h, c, gates = _lstm_step(xg, hg, c)
    return h, c, torch.cat(gates, dim=-1)


def _lstm_bwd(
    dy: Tensor, dh: Tensor, dc: Tensor, act: Tensor, c_prev: Tensor, c: Tensor, dgates: Tensor
) -> Tensor:
    """Writes d pre-activation gates `[N, B, 4H]` into `dgates`; -> dc_prev."""
    i, f, g, o = act.chunk(4, dim=-1)
    dh = dy + dh
    tc = torch.tanh(c)
    dc = dc + dh * o * (1 - tc * tc)
    gates = [
        dc * g * i * (1 - i),
        dc * c_prev * f * (1 - f),
        dc * i * (1 - g * g),
        dh * tc * o * (1 - o),
    ]
    dgates.copy_(torch.cat(gates, dim=-1))
    return dc * f


def _gru_step(xg: Tensor, hg: Tensor, h: Tensor) -> tuple[Tensor, list[Tensor]]:
    """One GRU step from its input and hidden gate terms: h and the activated gates."""
    xr, xz, xn = xg.chunk(3, dim=-1)
    hr, hz, hn = hg.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return n + z * (h - n), [r, z, n]


def _gru_fwd(xg: Tensor, hg: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    h, gates = _gru_step(xg, hg, h)
    return h, torch.cat(gates, dim=-1)


def _gru_bwd(
    dy: Tensor, dh: Tensor, act: Tensor, hg: Tensor, h: Tensor, dxg: Tensor, dhg: Tensor
) -> Tensor:
    """Writes d xg and d hg (`[N, B, 3H]`) into `dxg`, `dhg`; -> the direct term of dh_prev."""
    r, z, n = act.chunk(3, dim=-1)
    hn = hg.chunk(3, dim=-1)[2]
    dh = dy + dh
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dxg.copy_(torch.cat([dr, dz, dn], dim=-1))
    dhg.copy_(torch.cat([dr, dz, dn * r], dim=-1))
    return dh * z


def _tanh_fwd(xg: Tensor, hg: Tensor) -> Tensor:
    return torch.tanh(xg + hg)


def _tanh_bwd(dy: Tensor, dh: Tensor, h: Tensor, dpre: Tensor) -> None:
    dpre.copy_((dy + dh) * (1 - h * h))


def _relu_fwd(xg: Tensor, hg: Tensor) -> Tensor:
    return torch.relu(xg + hg)


def _relu_bwd(dy: Tensor, dh: Tensor, h: Tensor, dpre: Tensor) -> None:
    dpre.copy_(torch.where(h > 0, dy + dh, torch.zeros_like(h)))


_compiled: dict[tuple[Callable, torch.dtype], Callable | None] = {}
_COMPILE_DEVICES = ("cuda",)  # elsewhere the cell functions run as plain torch ops


def _own_code(fn: Callable) -> Callable:
    """`fn` with a code object of its own.

    torch.compile keeps its compiled variants, and its limit on their number
    (`torch._dynamo.config.recompile_limit`, 8), per code object: past it, the
    function silently runs as plain ops. One process that trains in float32
    and bfloat16, at several numbers of models, needs more variants of one cell
    than that; one code object per dtype gives each its own budget.
    """
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _fused(fn: Callable, like: Tensor) -> Callable:
    """`fn` compiled into one kernel on CUDA (once per process and dtype), else `fn` itself."""
    if like.device.type not in _COMPILE_DEVICES or torch.compiler.is_compiling():
        return fn
    key = (fn, like.dtype)
    if key not in _compiled:
        _compiled[key] = torch.compile(_own_code(fn), fullgraph=True)
    compiled = _compiled[key]
    if compiled is None:
        return fn

    def call(*args: Tensor) -> Any:
        try:
            return compiled(*args)
        except Exception as err:  # no Triton, no compiler: the plain ops are the same math
            _compiled[key] = None
            warnings.warn(
                f"modelbatch.nn: compiling the recurrent cell failed ({type(err).__name__}: "
                f"{err}); running it as separate torch ops.",
                stacklevel=3,
            )
            return fn(*args)

    return call


# ---------------------------------------------------------------------- the scan


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _Scan(torch.autograd.Function):
    """The loop over time on plain `[N, ...]` tensors; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mode: str,
        reverse: bool,
        xg: Tensor,  # [N, T, B, G]: x W_ih^T + b, every step
        h0: Tensor,  # [N, B, H]
        c0: Tensor,  # [N, B, H] (LSTM) or an unused placeholder
        w_hh: Tensor,  # [N, G, H]
        b_hh: Tensor | None,  # [N, G] (GRU) or None
    ) -> tuple[Tensor, Tensor, Tensor]:
        steps = list(range(xg.shape[1]))[::-1] if reverse else list(range(xg.shape[1]))
        w_t = w_hh.transpose(1, 2)
        bias = None if b_hh is None else b_hh.unsqueeze(1)
        h, c = h0, c0
        hs: list[Tensor] = []
        acts: list[Tensor] = []  # per processed step: activated gates (LSTM, GRU)
        extra: list[Tensor] = []  # per processed step: c (LSTM) or h W_hh^T + b_hh (GRU)
        if mode == "LSTM":
            lstm = _fused(_lstm_fwd, xg)
            for t in steps:
                h, c, act = lstm(xg[:, t], torch.bmm(h, w_t), c)
                hs.append(h)
                acts.append(act)
                extra.append(c)
        elif mode == "GRU":
            gru = _fused(_gru_fwd, xg)
            for t in steps:
                hg = torch.bmm(h, w_t) if bias is None else torch.baddbmm(bias, h, w_t)
                h, act = gru(xg[:, t], hg, h)
                hs.append(h)
                acts.append(act)
                extra.append(hg)
        else:
            simple = _fused(_tanh_fwd if mode == "RNN_TANH" else _relu_fwd, xg)
            for t in steps:
                h = simple(xg[:, t], torch.bmm(h, w_t))
                hs.append(h)
        ys = torch.stack(hs[::-1] if reverse else hs, dim=1)
        ctx.mode, ctx.steps, ctx.reverse, ctx.has_bias = mode, steps, reverse, b_hh is not None
        ctx.dtypes = (xg.dtype, h0.dtype, c0.dtype, w_hh.dtype)
        ctx.autocast = (xg.device.type, *_autocast_state(xg.device.type))
        ctx.acts, ctx.extra = acts, extra
        ctx.save_for_backward(h0, c0, w_hh, ys)
        if mode != "LSTM":
            c = h0.new_zeros(h0.shape[0])
            ctx.mark_non_differentiable(c)
        return ys, h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dys: Tensor, dh: Tensor, dc: Tensor) -> Any:  # type: ignore[override]
        h0, c0, w_hh, ys = ctx.saved_tensors
        # Plain tensors for the compiled cells: a saved output or a state that requires
        # grad would make one more compiled variant.
        h0, ys = h0.detach(), ys.detach()
        mode, steps, acts, extra = ctx.mode, ctx.steps, ctx.acts, ctx.extra
        device_type, enabled, dtype = ctx.autocast
        xg_dtype, h_dtype, c_dtype, w_dtype = ctx.dtypes
        hs = [ys[:, t] for t in steps]  # h after each processed step

        def h_prev(k: int) -> Tensor:
            return h0 if k == 0 else hs[k - 1]

        # The cell functions write each step's gate gradients into slices of these
        # buffers `[N, T, B, G]` (in time order): no stack of T tensors afterwards.
        n, length, batch, gates = ys.shape[0], ys.shape[1], ys.shape[2], w_hh.shape[1]
        dxg = ys.new_empty(n, length, batch, gates, dtype=xg_dtype)
        dhg = dxg  # the W_hh GEMM's gradient: the same as xg's but for GRU
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            if mode == "LSTM":
                lstm = _fused(_lstm_bwd, ys)
                for k in range(len(steps) - 1, -1, -1):
                    t = steps[k]
                    c_prev = c0 if k == 0 else extra[k - 1]
                    dc = lstm(dys[:, t], dh, dc, acts[k], c_prev, extra[k], dxg[:, t])
                    dh = torch.bmm(dxg[:, t], w_hh)
            elif mode == "GRU":
                dhg = ys.new_empty(n, length, batch, gates, dtype=dtype if enabled else w_dtype)
                gru = _fused(_gru_bwd, ys)
                for k in range(len(steps) - 1, -1, -1):
                    t = steps[k]
                    direct = gru(dys[:, t], dh, acts[k], extra[k], h_prev(k), dxg[:, t], dhg[:, t])
                    dh = torch.baddbmm(direct, dhg[:, t], w_hh)
            else:
                simple = _fused(_tanh_bwd if mode == "RNN_TANH" else _relu_bwd, ys)
                for k in range(len(steps) - 1, -1, -1):
                    t = steps[k]
                    simple(dys[:, t], dh, hs[k], dxg[:, t])
                    dh = torch.bmm(dxg[:, t], w_hh)
            # Every step's W_hh gradient in one GEMM: sum_t dhg_t^T h_{t-1}, where h_{t-1}
            # is a slice of the outputs (h0 for the first step processed).
            first = length - 1 if ctx.reverse else 0
            dw = torch.bmm(dhg[:, first].transpose(1, 2), h0)
            if length > 1:
                rest, prev = (dhg[:, :-1], ys[:, 1:]) if ctx.reverse else (dhg[:, 1:], ys[:, :-1])
                a = rest.flatten(1, 2).transpose(1, 2)  # [N, G, (T-1) * B]
                dw = torch.baddbmm(dw, a, prev.flatten(1, 2))
            db = dhg.sum((1, 2)) if ctx.has_bias else None
        dc0 = dc.to(c_dtype) if mode == "LSTM" else None
        db = None if db is None else db.to(w_dtype)
        return None, None, dxg, dh.to(h_dtype), dc0, dw.to(w_dtype), db


class _BatchedScan(VmapOnly):
    """`_Scan` under `torch.vmap`: the rule hands the stacked tensors to `_Scan` itself."""

    @staticmethod
    def forward(*args: Any) -> Any:  # type: ignore[override]
        raise RuntimeError("modelbatch.nn: _BatchedScan runs only under torch.vmap; use scan().")

    @staticmethod
    def vmap(info: Any, in_dims: tuple, mode: str, reverse: bool, *tensors: Any) -> Any:
        n = info.batch_size

        def stacked(t: Tensor | None, dim: int | None) -> Tensor | None:
            if t is None:
                return None
            return t.movedim(dim, 0) if dim is not None else t.expand(n, *t.shape)

        xg, h0, c0, w_hh, b_hh = (stacked(t, d) for t, d in zip(tensors, in_dims[2:]))
        # One memory layout for the state at every step: one compiled cell, not two.
        h0, c0 = h0.contiguous(), c0.contiguous()  # type: ignore[union-attr]
        out = _Scan.apply(mode, reverse, xg, h0, c0, w_hh, b_hh)
        return out, (0, 0, 0)


def scan(
    mode: str,
    reverse: bool,
    xg: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer over the sequence.

    Args:
        mode: `"LSTM"`, `"GRU"`, `"RNN_TANH"` or `"RNN_RELU"`.
        reverse: run from the last step to the first.
        xg: `[T, B, G]`, the input projection of every step (`G` = gates x H);
            for LSTM and RNN it includes both biases, for GRU only `b_ih`.
        h0, c0: `[B, H]` (c0 for LSTM only, else None).
        w_hh: `[G, H]`; b_hh: `[G]` for GRU (kept inside the reset product), else None.

    Returns:
        `(outputs [T, B, H], h_T [B, H], c_T [B, H] or None)`.
    """
    placeholder = c0 if c0 is not None else h0.new_zeros(())
    tensors: tuple[Tensor | None, ...] = (xg, h0, placeholder, w_hh, b_hh)
    device_type = xg.device.type
    low = torch.get_autocast_dtype(device_type)
    if torch.is_autocast_enabled(device_type) and low in (torch.bfloat16, torch.float16):
        # As torch's own recurrent kernels under autocast: the whole recurrence in the
        # low precision, every input cast once here rather than the state at every step.
        tensors = tuple(t.to(low) if _autocast_eligible(t) else t for t in tensors)
        with torch.autocast(device_type, enabled=False):
            return _run(mode, reverse, tensors)
    return _run(mode, reverse, tensors)


def _autocast_eligible(t: Tensor | None) -> TypeGuard[Tensor]:
    """What autocast casts: floating tensors other than float64."""
    return t is not None and t.is_floating_point() and t.dtype != torch.float64


def _run(
    mode: str, reverse: bool, tensors: tuple[Tensor | None, ...]
) -> tuple[Tensor, Tensor, Tensor | None]:
    if any(t is not None and is_batchedtensor(t) for t in tensors):
        ys, h, c = _BatchedScan.apply(mode, reverse, *tensors)
    else:
        one = [None if t is None else t.unsqueeze(0) for t in tensors]
        ys, h, c = (t.squeeze(0) for t in _Scan.apply(mode, reverse, *one))
    return ys, h, c if mode == "LSTM" else None
