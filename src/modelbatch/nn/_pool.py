"""Pooling over the model axis without copying the activations.

torch's vmap rules for pooling fold the model axis into the batch axis
(`[N * B, C, ...]`); an input whose model axis sits behind the batch axis,
`[B, N, C, ...]` (the output of the dense and grouped convolutions), is then
copied first. Pooling treats every channel alike, so the model axis can just
as well fold into the channels (`[B, N * C, ...]`), a view of that layout.
The twins below fold it wherever that is free, and into the batch otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch._C._functorch import is_batchedtensor

from ._twins import VmapOnly, _Twin

__all__ = [
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
]


def _mergeable(t: Tensor, dim: int) -> bool:
    """Whether dims `dim` and `dim + 1` of `t` flatten into one without a copy."""
    return t.stride(dim) == t.stride(dim + 1) * t.shape[dim + 1] or t.shape[dim + 1] == 1


class _FoldedPool(VmapOnly):
    """`pool(x)`; under vmap the model axis folds into channels or batch, whichever is a view."""

    @staticmethod
    def forward(x: Tensor, pool: Callable[[Tensor], Any], batched: bool) -> Any:  # type: ignore[override]
        return pool(x)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, pool: Callable, batched: bool) -> Any:
        n = info.batch_size
        front = x.movedim(in_dims[0], 0)  # [N, B, C, ...] or, unbatched per model, [N, C, ...]
        if not batched:
            out = pool(front)  # the model axis is the batch
            return out, (0, 0) if isinstance(out, tuple) else 0
        behind = x.movedim(in_dims[0], 1)  # [B, N, C, ...]
        if _mergeable(behind, 1) or not _mergeable(front, 0):
            out = pool(behind.flatten(1, 2))
            if isinstance(out, tuple):
                return tuple(o.unflatten(1, (n, -1)) for o in out), (1, 1)
            return out.unflatten(1, (n, -1)), 1
        out = pool(front.flatten(0, 1))
        if isinstance(out, tuple):
            return tuple(o.unflatten(0, (n, -1)) for o in out), (0, 0)
        return out.unflatten(0, (n, -1)), 0


class _Pool(_Twin):
    """Routes torch's pooling forward through `_FoldedPool` when the input is batched."""

    dims = 2
    torch_cls: Any = nn.MaxPool2d

    def _pool(self, input: Tensor) -> Any:
        return self.torch_cls.forward(self, input)

    def forward(self, input: Tensor) -> Any:
        if (
            torch.compiler.is_compiling()
            or not is_batchedtensor(input)
            or input.dim() not in (self.dims + 1, self.dims + 2)
        ):
            return self._pool(input)
        return _FoldedPool.apply(input, self._pool, input.dim() == self.dims + 2)


class MaxPool1d(_Pool, nn.MaxPool1d):
    """`torch.nn.MaxPool1d` that pools N models' `[B, N, C, L]` activations without a copy."""

    dims = 1
    torch_cls = nn.MaxPool1d


class MaxPool2d(_Pool, nn.MaxPool2d):
    """`torch.nn.MaxPool2d` that pools N models' `[B, N, C, H, W]` activations without a copy."""

    dims = 2
    torch_cls = nn.MaxPool2d


class MaxPool3d(_Pool, nn.MaxPool3d):
    """`torch.nn.MaxPool3d` that pools N models' activations without a copy."""

    dims = 3
    torch_cls = nn.MaxPool3d


class AvgPool1d(_Pool, nn.AvgPool1d):
    """`torch.nn.AvgPool1d` that pools N models' activations without a copy."""

    dims = 1
    torch_cls = nn.AvgPool1d


class AvgPool2d(_Pool, nn.AvgPool2d):
    """`torch.nn.AvgPool2d` that pools N models' activations without a copy."""

    dims = 2
    torch_cls = nn.AvgPool2d


class AvgPool3d(_Pool, nn.AvgPool3d):
    """`torch.nn.AvgPool3d` that pools N models' activations without a copy."""

    dims = 3
    torch_cls = nn.AvgPool3d


class AdaptiveAvgPool1d(_Pool, nn.AdaptiveAvgPool1d):
    """`torch.nn.AdaptiveAvgPool1d` that pools N models' activations without a copy."""

    dims = 1
    torch_cls = nn.AdaptiveAvgPool1d


class AdaptiveAvgPool2d(_Pool, nn.AdaptiveAvgPool2d):
    """`torch.nn.AdaptiveAvgPool2d` that pools N models' activations without a copy."""

    dims = 2
    torch_cls = nn.AdaptiveAvgPool2d


class AdaptiveAvgPool3d(_Pool, nn.AdaptiveAvgPool3d):
    """`torch.nn.AdaptiveAvgPool3d` that pools N models' activations without a copy."""

    dims = 3
    torch_cls = nn.AdaptiveAvgPool3d


TORCH_TWINS: dict[type[nn.Module], Any] = {
    c.torch_cls: c
    for c in (MaxPool1d, MaxPool2d, MaxPool3d, AvgPool1d, AvgPool2d, AvgPool3d,
              AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d)
}  # fmt: skip
