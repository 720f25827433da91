"""Which models a call means: indices or a boolean mask, checked once."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["model_indices"]


def model_indices(owner: str, indices: Any, n: int, device: Any = None) -> Tensor:
    """Model indices `[K]` (int64, in `[0, n)`, on `device`) from an int, a sequence,
    a `[K]` index tensor (negative indices count from the end) or an `[N]` bool mask.

    Not for a per-step path: the range check reads the indices on the host.
    """
    idx = torch.as_tensor(indices, device=device).reshape(-1)
    if idx.dtype == torch.bool:
        if idx.numel() != n:
            raise ValueError(f"{owner}: a boolean mask must have N={n} entries, got {idx.numel()}.")
        return idx.nonzero().reshape(-1)
    if idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"{owner}: model indices must be integers, got dtype {idx.dtype}.")
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise IndexError(f"{owner}: model indices must be in [0, {n}), got {idx.tolist()}.")
    return idx.long() % n
