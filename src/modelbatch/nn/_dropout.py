"""Dropout layers whose rate is a tensor, so that N stacked models each drop with their own p.

torch's dropout takes `p` as a Python float, the same for every model under
vmap. Here `p` is a (non-persistent) buffer: stacked by `ModelBatch` to `[N]`
like any buffer, so inside the vmapped forward each model sees its own scalar
`p`. Masks come from `torch.rand` under vmap's `randomness="different"`: they
differ per model and per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AlphaDropout",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "FeatureAlphaDropout",
    "dropout_p",
]

# SELU's alpha * scale, as in torch's alpha dropout.
_ALPHA = 1.7580993408473766


def dropout_p(p: float | Tensor, name: str) -> Tensor:
    """`p` as a float32 tensor, checked to lie in [0, 1]."""
    t = torch.as_tensor(p, dtype=torch.float32).detach().clone()
    if t.dim() != 0 or not bool((t >= 0).all() & (t <= 1).all()):
        raise ValueError(f"modelbatch.nn.{name}: p must be a number in [0, 1], got {p}.")
    return t


class _TensorDropout(nn.Module):
    """Base class: `p` is a 0-dim float32 buffer (`[N]` once stacked)."""

    p: Tensor
    feature = False
    alpha = False
    batched_dim = 2  # input dims of a batched input for feature dropout (1d: 3, 2d: 4, 3d: 5)

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        # Non-persistent: a model's rate is configuration, not part of its state dict.
        self.register_buffer("p", dropout_p(p, type(self).__name__), persistent=False)
        # Accepted for compatibility; the result is always a new tensor.
        self.inplace = inplace

    @classmethod
    def from_torch(cls, module: Any, device: Any = None) -> _TensorDropout:
        """The tensor-rate twin of a torch dropout module (same p, same train/eval mode)."""
        twin = cls(float(module.p), inplace=bool(getattr(module, "inplace", False)))
        twin.p = twin.p.to(device)
        twin.train(module.training)
        return twin

    def extra_repr(self) -> str:
        p = float(self.p) if self.p.numel() == 1 and not self.p.is_meta else "tensor"
        return f"p={p}, inplace={self.inplace}"

    def _noise_shape(self, x: Tensor) -> tuple[int, ...]:
        if not self.feature:
            return tuple(x.shape)
        if x.dim() < 2:
            raise ValueError(
                f"modelbatch.nn.{type(self).__name__}: expected an input with a channel "
                f"dimension, got shape {tuple(x.shape)}."
            )
        # An unbatched input [C, *spatial] drops whole channels; a batched one
        # [B, C, *spatial] drops each sample's channels independently.
        channels = 1 if x.dim() == self.batched_dim - 1 else 2
        return tuple(x.shape[:channels]) + (1,) * (x.dim() - channels)

    def _uniform(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """The mask's uniform draws in [0, 1); subclasses may draw them another way."""
        return torch.rand(shape, device=device)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: `x` `[B, ...]` -> `[B, ...]`; identity in eval mode."""
        if not self.training:
            return x
        p = self.p
        keep = (self._uniform(self._noise_shape(x), x.device) >= p).to(x.dtype)
        if self.alpha:
            # torch's alpha dropout: kept x -> a*x + a*alpha*p, dropped -> a*alpha*(p - 1).
            a = torch.where(p < 1, ((_ALPHA * _ALPHA * p + 1) * (1 - p)).rsqrt(), 0.0)
            b = (keep - 1) * (_ALPHA * a).to(x.dtype) + (_ALPHA * a * p).to(x.dtype)
            return torch.where(p < 1, x * (keep * a.to(x.dtype)) + b, 0.0).to(x.dtype)
        scale = torch.where(p < 1, 1.0 / (1.0 - p), 0.0).to(x.dtype)
        return x * (keep * scale)


class Dropout(_TensorDropout):
    """`torch.nn.Dropout` with a tensor rate `p` (per model once stacked).

    Example:
        >>> drop = Dropout(0.25)
        >>> drop(torch.randn(8, 16)).shape
        torch.Size([8, 16])
    """


class Dropout1d(_TensorDropout):
    """`torch.nn.Dropout1d` (whole channels of `[B, C, L]` or `[C, L]`) with a tensor rate."""

    feature = True
    batched_dim = 3


class Dropout2d(_TensorDropout):
    """`torch.nn.Dropout2d` (whole channels of `[B, C, H, W]`) with a tensor rate.

    Like torch, a 3-D input is read as `[B, C, L]` (channel-wise 1-D dropout).
    """

    feature = True
    batched_dim = 3  # torch treats a 3-D input as batched [B, C, L]


class Dropout3d(_TensorDropout):
    """`torch.nn.Dropout3d` (whole channels of `[B, C, D, H, W]` or `[C, D, H, W]`)."""

    feature = True
    batched_dim = 5


class AlphaDropout(_TensorDropout):
    """`torch.nn.AlphaDropout` (keeps SELU's mean and variance) with a tensor rate."""

    alpha = True


class FeatureAlphaDropout(_TensorDropout):
    """`torch.nn.FeatureAlphaDropout` (alpha dropout of whole channels) with a tensor rate."""

    feature = True
    alpha = True
    batched_dim = 2  # torch always reads the input as [B, C, *spatial]


TORCH_TWINS: dict[type[nn.Module], type[_TensorDropout]] = {
    nn.Dropout: Dropout,
    nn.Dropout1d: Dropout1d,
    nn.Dropout2d: Dropout2d,
    nn.Dropout3d: Dropout3d,
    nn.AlphaDropout: AlphaDropout,
    nn.FeatureAlphaDropout: FeatureAlphaDropout,
}
