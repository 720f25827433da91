"""Convolutions over the model axis, lowered to the fastest form for the shape.

Under `torch.vmap` a convolution whose weight carries the model axis becomes
one grouped convolution with N groups, which runs far below the tensor
cores' rate. The `Conv1d/2d/3d` twins route their convolution through
`_BatchedConv`, an `autograd.Function` whose vmap rule sees the whole
stacked weight `[N, C_out, C_in, *k]` and the input, and picks:

| lowering | input | what runs |
| --- | --- | --- |
| `"dense"` | shared `[B, C_in, *S]` | ONE dense convolution with `N * C_out` output channels |
| `"dense_cl"` | shared | the same in channels-last memory format (2d, 3d) |
| `"grouped"` | per model | grouped convolution, N groups (what vmap does) |
| `"grouped_cl"` | per model | the same in channels-last memory format (2d, 3d) |
| `"bmm"` | per model | patches `[N, C_in*K, B*L]` (implicit GEMM) and one `bmm` |
| `"bmm_cl"` | per model | patches `[N, B*L, C_in*K]` and one `bmm` (channels-last result) |

The vmap rule is made of ordinary differentiable torch ops on the stacked
tensors, so the backward is theirs: for the shared input the weight
gradient is one dense convolution weight-gradient.

On CUDA the candidates for a shape are timed once (forward and backward, a
few runs each) at its first use outside graph capture and compilation, and
the fastest is cached for the process. On the CPU the choice is fixed:
`"dense"` for a shared input, `"grouped"` otherwise. `conv_lowering(name)`
forces one lowering.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_batchedtensor

from ._twins import _Twin

__all__ = ["Conv1d", "Conv2d", "Conv3d", "conv_lowering"]

LOWERINGS = ("dense", "dense_cl", "grouped", "grouped_cl", "bmm", "bmm_cl")
# Tie-break order: a candidate must beat the ones before it by this much to be picked,
# so that timing noise does not flip the choice from one process to the next.
_MARGIN = 0.05
_forced: list[str] = []
_cache: dict[tuple, str] = {}
_MEASURED_DEVICES = ("cuda",)  # elsewhere the choice is fixed

Spec = tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...]]  # stride, pads, dil


@contextlib.contextmanager
def conv_lowering(name: str) -> Iterator[None]:
    """Force how batched convolutions run inside the block (default: `"auto"`).

    Args:
        name: `"auto"`, `"dense"`, `"dense_cl"`, `"grouped"`, `"grouped_cl"`,
            `"bmm"` or `"bmm_cl"`. The dense forms need a shared input; with a
            per-model input they run as `"grouped"`.

    Example:
        >>> from modelbatch import ModelBatch
        >>> mb = ModelBatch([nn.Sequential(nn.Conv2d(1, 4, 3)) for _ in range(3)])
        >>> with conv_lowering("bmm"):
        ...     mb(torch.randn(2, 1, 8, 8)).shape
        torch.Size([3, 2, 4, 6, 6])
    """
    if name not in ("auto", *LOWERINGS):
        raise ValueError(
            f"modelbatch.nn.conv_lowering: expected one of {('auto', *LOWERINGS)}, got {name!r}."
        )
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def chosen_lowerings() -> dict[tuple, str]:
    """The lowerings picked so far in this process, by shape key (a copy)."""
    return dict(_cache)


# ---------------------------------------------------------------------- the lowerings


def _pad_args(pads: Sequence[tuple[int, int]]) -> tuple[list[int], tuple[int, ...] | None]:
    """F.pad arguments for asymmetric padding, or the conv's own symmetric padding."""
    if all(lo == hi for lo, hi in pads):
        return [], tuple(lo for lo, _ in pads)
    flat: list[int] = []
    for lo, hi in reversed(pads):
        flat += [lo, hi]
    return flat, None


def _conv_nd(nd: int) -> Callable[..., Tensor]:
    return (F.conv1d, F.conv2d, F.conv3d)[nd - 1]


def _channels_last(t: Tensor) -> Tensor:
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _dense(
    x: Tensor, w: Tensor, b: Tensor | None, spec: Spec, channels_last: bool = False
) -> tuple[Tensor, int]:
    """Shared x `[B, C_in, *S]`: one convolution with `N * C_out` channels -> `[B, N, C_out, *L]`."""
    return _all_models(x, w, b, spec, 1, channels_last), 1


def _grouped(
    x: Tensor, w: Tensor, b: Tensor | None, spec: Spec, channels_last: bool = False
) -> tuple[Tensor, int]:
    """x `[N, B, C_in, *S]`: one grouped convolution with N groups -> `[B, N, C_out, *L]`."""
    xg = x.transpose(0, 1).flatten(1, 2)
    return _all_models(xg, w, b, spec, w.shape[0], channels_last), 1


def _all_models(
    x: Tensor, w: Tensor, b: Tensor | None, spec: Spec, groups: int, channels_last: bool
) -> Tensor:
    """One convolution of `[B, groups * C_in, *S]` with every model's filters -> `[B, N, C_out, *L]`."""
    stride, pads, dil = spec
    n, nd = w.shape[0], w.dim() - 3
    flat, padding = _pad_args(pads)
    if flat:
        x, padding = F.pad(x, flat), (0,) * nd
    wd = w.flatten(0, 1)
    if channels_last:
        x, wd = _channels_last(x), _channels_last(wd)
    bias = None if b is None else b.flatten()
    out = _conv_nd(nd)(x, wd, bias, stride, padding, dil, groups=groups)
    return out.unflatten(1, (n, -1))


def _patches(x: Tensor, k: Sequence[int], spec: Spec) -> Tensor:
    """x `[N, B, C, *S]` -> the views `[N, B, C, *L, *k]` of every output position's window."""
    stride, pads, dil = spec
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]
    if any(flat):
        x = F.pad(x, flat)
    for i, (size, s, d) in enumerate(zip(k, stride, dil)):
        x = x.unfold(3 + i, d * (size - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    return x


def _bmm(
    x: Tensor, w: Tensor, b: Tensor | None, spec: Spec, rows_out: bool = True
) -> tuple[Tensor, int]:
    """x `[N, B, C_in, *S]`: patches and one batched GEMM over the model axis -> `[N, B, C_out, *L]`.

    `rows_out`: the GEMM is `w [N, C_out, C_in*K] @ cols [N, C_in*K, B*L]`; else
    `cols [N, B*L, C_in*K] @ w^T`, whose result is channels-last.
    """
    n, c_out, nd = w.shape[0], w.shape[1], w.dim() - 3
    k = w.shape[3:]
    p = _patches(x, k, spec)  # [N, B, C, *L, *k]
    batch, length = p.shape[1], p.shape[3 : 3 + nd]
    wk = w.flatten(2)  # [N, C_out, C_in*K]
    window = tuple(range(3 + nd, 3 + 2 * nd))
    spatial = tuple(range(3, 3 + nd))
    if rows_out:
        cols = p.permute(0, 2, *window, 1, *spatial).reshape(n, wk.shape[2], -1)
        if b is None:
            out = torch.bmm(wk, cols)
        else:
            out = torch.baddbmm(b.unsqueeze(-1), wk, cols)
        return out.view(n, c_out, batch, *length).transpose(1, 2), 0
    cols = p.permute(0, 1, *spatial, 2, *window).reshape(n, -1, wk.shape[2])
    if b is None:
        out = torch.bmm(cols, wk.transpose(1, 2))
    else:
        out = torch.baddbmm(b.unsqueeze(1), cols, wk.transpose(1, 2))
    return out.view(n, batch, *length, c_out).movedim(-1, 2), 0


def _run(name: str, x: Tensor, shared: bool, w: Tensor, b: Tensor | None, spec: Spec) -> Any:
    if name in ("dense", "dense_cl") and shared:
        return _dense(x, w, b, spec, channels_last=name == "dense_cl" and w.dim() > 4)
    if shared:
        x = x.expand(w.shape[0], *x.shape)
    if name == "bmm":
        return _bmm(x, w, b, spec)
    if name == "bmm_cl":
        return _bmm(x, w, b, spec, rows_out=False)
    return _grouped(x, w, b, spec, channels_last=name == "grouped_cl" and w.dim() > 3 + 1)


# ---------------------------------------------------------------------- the choice


def _effective_dtype(t: Tensor) -> torch.dtype:
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def _candidates(shared: bool, nd: int) -> tuple[str, ...]:
    if shared:
        return ("dense", "dense_cl") if nd > 1 else ("dense",)
    return ("grouped", "grouped_cl", "bmm", "bmm_cl") if nd > 1 else ("grouped", "bmm", "bmm_cl")


def _default(shared: bool, device: torch.device, nd: int) -> str:
    if shared:
        return "dense"
    return "grouped_cl" if device.type == "cuda" and nd > 1 else "grouped"


def _time_candidate(
    name: str, x: Tensor, shared: bool, w: Tensor, b: Tensor | None, spec: Spec
) -> float:
    """Median ms of forward + backward of one lowering on fresh tensors of the same shapes."""
    # A generator of its own: timing must not move the global stream (dropout masks).
    gen = torch.Generator(x.device).manual_seed(0)

    def fresh(t: Tensor, grad: bool) -> Tensor:
        # The same memory layout as the real input: it decides whether a candidate copies.
        out = torch.empty_like(t, memory_format=torch.preserve_format)
        return out.normal_(generator=gen).requires_grad_(grad)

    xs, ws = fresh(x, x.requires_grad), fresh(w, True)
    bs = None if b is None else fresh(b, True)
    inputs = [t for t in (xs, ws, bs) if t is not None and t.requires_grad]
    cuda = x.device.type == "cuda"
    samples = []
    with torch.enable_grad():
        for i in range(4):
            if cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            out, _ = _run(name, xs, shared, ws, bs, spec)
            torch.autograd.grad(out, inputs, out.detach())
            if cuda:
                torch.cuda.synchronize(x.device)
            if i:  # the first run warms up (cuDNN's algorithm choice, allocations)
                samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _measurable(x: Tensor) -> bool:
    """Whether timing may run now: never inside graph capture or compilation."""
    if torch.compiler.is_compiling():
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def choose(x: Tensor, shared: bool, w: Tensor, b: Tensor | None, spec: Spec) -> str:
    """The lowering for this call: forced, cached, measured now, or the fixed default."""
    nd = w.dim() - 3
    if _forced and _forced[-1] != "auto":
        return _forced[-1]
    if x.device.type not in _MEASURED_DEVICES:
        return _default(shared, x.device, nd)
    key = (
        str(x.device),
        shared,
        tuple(x.shape),
        tuple(x.stride()),
        tuple(w.shape),
        b is not None,
        spec,
        _effective_dtype(x),
        x.requires_grad,
    )
    if key in _cache:
        return _cache[key]
    candidates = _candidates(shared, nd)
    if len(candidates) == 1:
        _cache[key] = candidates[0]
        return candidates[0]
    if not _measurable(x):
        return _default(shared, x.device, nd)
    times = {}
    for name in candidates:
        try:
            times[name] = _time_candidate(name, x, shared, w, b, spec)
        except torch.OutOfMemoryError:
            times[name] = float("inf")
    best = candidates[0]
    for name in candidates[1:]:
        if times[name] < times[best] * (1 - _MARGIN):
            best = name
    _cache[key] = best
    return best


# ---------------------------------------------------------------------- the op


def _spec(module: nn.modules.conv._ConvNd) -> Spec:
    nd = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = ((0, 0),) * nd
        else:  # "same": torch puts the odd element on the right
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            pads = tuple((t // 2, t - t // 2) for t in totals)
    else:
        pads = tuple((p, p) for p in module.padding)
    return tuple(module.stride), pads, tuple(module.dilation)


class _BatchedConv(torch.autograd.Function):
    """A convolution whose vmap rule lowers N models' convolutions to one fast form."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, spec: Spec) -> Tensor:  # type: ignore[override]
        stride, pads, dil = spec
        flat, padding = _pad_args(pads)
        if flat:
            x, padding = F.pad(x, flat), (0,) * len(stride)
        return _conv_nd(w.dim() - 2)(x, w, b, stride, padding, dil)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, w, b, spec = inputs
        ctx.save_for_backward(x, w)
        ctx.spec, ctx.has_bias = spec, b is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # type: ignore[override]
        x, w = ctx.saved_tensors
        stride, pads, dil = ctx.spec
        flat, padding = _pad_args(pads)
        xp = F.pad(x, flat) if flat else x
        padding = padding or (0,) * len(stride)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad,
            xp,
            w,
            [w.shape[0]] if ctx.has_bias else None,
            list(stride),
            list(padding),
            list(dil),
            False,
            [0] * len(stride),
            1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias],
        )
        if gx is not None and flat:
            index = [slice(None), slice(None)]
            index += [slice(lo, xp.shape[2 + i] - hi) for i, (lo, hi) in enumerate(pads)]
            gx = gx[tuple(index)]
        return gx, gw, gb if ctx.has_bias else None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, w: Tensor, b: Tensor | None, spec: Spec) -> Any:
        x_dim, w_dim, b_dim = in_dims[:3]
        n = info.batch_size
        if w_dim is None:  # shared weights: the model axis folds into the batch
            xb = x.movedim(x_dim, 0)
            out = _BatchedConv.apply(xb.flatten(0, 1), w, b, spec)
            return out.unflatten(0, (n, -1)), 0
        w = w.movedim(w_dim, 0)
        if b is not None:
            b = b.movedim(b_dim, 0) if b_dim is not None else b.expand(n, *b.shape)
        shared = x_dim is None
        if not shared:
            x = x.movedim(x_dim, 0)
        name = choose(x, shared, w, b, spec)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # As torch's own vmap rule: on the CPU a batched convolution is not autocast
            # (and the CPU's batched batch_norm refuses a bfloat16 input with float stats).
            with torch.autocast("cpu", enabled=False):
                return _run(name, x, shared, w, b, spec)
        return _run(name, x, shared, w, b, spec)


# ---------------------------------------------------------------------- the twins


class _Conv(_Twin, nn.modules.conv._ConvNd):
    def forward(self, input: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if (
            self.padding_mode != "zeros"
            or self.groups != 1
            or torch.compiler.is_compiling()  # inductor fuses torch's own form itself
            or not is_batchedtensor(weight)
            or input.dim() not in (len(self.kernel_size) + 1, len(self.kernel_size) + 2)
        ):
            return self._conv_forward(input, weight, bias)  # type: ignore[operator]
        if (
            weight.dtype in (torch.bfloat16, torch.float16)
            and input.dtype != weight.dtype
            and torch.is_autocast_enabled(input.device.type)
        ):
            # Low-precision weight copies under autocast: the convolution runs in their
            # dtype, as autocast runs torch's own (the CPU's vmap rule would not cast).
            input = input.to(weight.dtype)
        if input.dim() == len(self.kernel_size) + 1:  # unbatched [C, *S]
            return _BatchedConv.apply(input.unsqueeze(0), weight, bias, _spec(self)).squeeze(0)
        return _BatchedConv.apply(input, weight, bias, _spec(self))


class Conv1d(_Conv, nn.Conv1d):
    """`torch.nn.Conv1d` whose convolution over stacked models runs in the fastest form.

    Outside vmap, and with `groups > 1` or a padding mode other than zeros,
    it is torch's own forward.
    """


class Conv2d(_Conv, nn.Conv2d):
    """`torch.nn.Conv2d` whose convolution over stacked models runs in the fastest form.

    Outside vmap, and with `groups > 1` or a padding mode other than zeros,
    it is torch's own forward.
    """


class Conv3d(_Conv, nn.Conv3d):
    """`torch.nn.Conv3d` whose convolution over stacked models runs in the fastest form.

    Outside vmap, and with `groups > 1` or a padding mode other than zeros,
    it is torch's own forward.
    """


TORCH_TWINS: dict[type[nn.Module], Any] = {
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
}
