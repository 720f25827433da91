"""Dropout whose masks depend only on (the model's seed, the call count, the element).

Under `torch.vmap(..., randomness="different")` torch's dropout draws one
tensor of random numbers for the whole model axis from the global generator,
so model i's mask depends on N, on i's position in the batch and on what drew
random numbers before. The layers here draw their uniforms from a
counter-based hash of `(seed, count, element)`: `seed` and `count` are
per-model buffers (`[N]` once stacked), `count` goes up by one at every
training forward. Model i's masks are then the same whatever N, whatever the
shard or chunk it lives in and whatever else used the generator: what sharding
the model axis over processes (`modelbatch.distributed`) and chunking it
through one GPU need.

The masks are equal in distribution to torch's (each element kept with
probability 1 - p, independently), not bitwise equal: they come from another
generator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._dropout import (
    AlphaDropout,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    FeatureAlphaDropout,
    _TensorDropout,
)

__all__ = [
    "SEEDED_TWINS",
    "SeededAlphaDropout",
    "SeededDropout",
    "SeededDropout1d",
    "SeededDropout2d",
    "SeededDropout3d",
    "SeededFeatureAlphaDropout",
    "hash_uniform",
    "mix32",
]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def mix32(x: Tensor) -> Tensor:
    """A bijection on 32-bit values held in int64 (Wellons' low-bias hash), in place when possible.

    Both multipliers are below 2**31, so no product of a 32-bit value
    overflows int64 (no reliance on wrap-around), and each round is ten
    elementwise ops.
    """
    x = x ^ (x >> 16)
    x.mul_(0x21F0AAAD).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x735A2D97).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 15)


def hash_uniform(key: Tensor, numel: int, device: Any = None) -> Tensor:
    """Uniform draws in [0, 1) (float32, 24 random bits) from 32-bit keys and element positions.

    Args:
        key: int64 keys in `[0, 2**32)`, any shape `[*K]` (a 0-dim per-model
            key under vmap).
        numel: how many draws per key.

    Returns:
        `[*K, numel]`; entry `(k, j)` depends only on `key[k]` and `j`.
    """
    pos = torch.arange(numel, device=device if device is not None else key.device)
    element = mix32((pos + _GOLDEN) & _M32)
    h = mix32(element ^ key.unsqueeze(-1))
    return (h >> 8).to(torch.float32).mul_(2.0**-24)


class _Seeded(_TensorDropout):
    """A tensor-rate dropout whose uniforms come from `hash_uniform(seed, count)`."""

    seed: Tensor
    count: Tensor

    def __init__(self, p: float = 0.5, inplace: bool = False, seed: int = 0) -> None:
        super().__init__(p, inplace)
        # Non-persistent like `p`: the exported model's state dict stays torch's;
        # modelbatch checkpoints save every stacked buffer, these included.
        self.register_buffer("seed", torch.tensor(int(seed) & _M32), persistent=False)
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64), persistent=False)

    @classmethod
    def from_torch(cls, module: Any, device: Any = None, seed: int = 0) -> _Seeded:  # type: ignore[override]
        """The seeded twin of a torch dropout module (same p, same train/eval mode)."""
        twin = cls(float(module.p), inplace=bool(getattr(module, "inplace", False)), seed=seed)
        twin.to(device)
        twin.train(module.training)
        return twin

    def _uniform(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        key = mix32(self.seed ^ mix32(self.count & _M32))
        # In place, so that the stacked [N] counter advances under vmap (and in a CUDA graph).
        self.count.add_(1)
        return hash_uniform(key, numel, device).reshape(shape)


class SeededDropout(_Seeded, Dropout):
    """`torch.nn.Dropout` with per-model rate and masks from `hash_uniform(seed, count)`.

    Example:
        >>> drop = SeededDropout(0.25, seed=7)
        >>> drop(torch.randn(8, 16)).shape
        torch.Size([8, 16])
    """


class SeededDropout1d(_Seeded, Dropout1d):
    """`torch.nn.Dropout1d` with seeded masks (see `SeededDropout`)."""


class SeededDropout2d(_Seeded, Dropout2d):
    """`torch.nn.Dropout2d` with seeded masks (see `SeededDropout`)."""


class SeededDropout3d(_Seeded, Dropout3d):
    """`torch.nn.Dropout3d` with seeded masks (see `SeededDropout`)."""


class SeededAlphaDropout(_Seeded, AlphaDropout):
    """`torch.nn.AlphaDropout` with seeded masks (see `SeededDropout`)."""


class SeededFeatureAlphaDropout(_Seeded, FeatureAlphaDropout):
    """`torch.nn.FeatureAlphaDropout` with seeded masks (see `SeededDropout`)."""


SEEDED_TWINS: dict[type[nn.Module], type[_Seeded]] = {
    nn.Dropout: SeededDropout,
    nn.Dropout1d: SeededDropout1d,
    nn.Dropout2d: SeededDropout2d,
    nn.Dropout3d: SeededDropout3d,
    nn.AlphaDropout: SeededAlphaDropout,
    nn.FeatureAlphaDropout: SeededFeatureAlphaDropout,
}
