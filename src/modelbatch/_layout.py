"""Parameters stored in the memory layout their gradients arrive in.

Under vmap a linear layer's weight gradient arrives transposed (`[N, in, out]`
in memory for an `[N, out, in]` weight). Autograd then copies it into the
parameter's layout at every step, a strided copy as large as the weights.
Recording the layout of the first gradients and giving each parameter (and
its gradient) that layout once makes the copy disappear: values, shapes and
names are unchanged, only `param.stride()` may change. Optimizer state
follows the parameter's layout at its next step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["GradLayout", "model_major", "restrided"]


def model_major(shape: torch.Size, stride: tuple[int, ...]) -> bool:
    """Dense, with the model axis outermost (each model's slice one block of memory)."""
    order = sorted(range(len(shape)), key=lambda d: (-stride[d], d))
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and stride[d] != expected:
            return False
        expected *= shape[d]
    return order[0] == 0 or shape[0] == 1


def restrided(t: Tensor, stride: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
    """A copy of `t` laid out with `stride` (and optionally another dtype)."""
    out = torch.empty_strided(t.shape, stride, dtype=dtype or t.dtype, device=t.device)
    return out.copy_(t)


class GradLayout:
    """Learns the gradients' layouts at the first backward and moves the parameters once.

    Args:
        params: the stacked parameters.

    Call `apply()` after the first backward (before the optimizer step);
    later calls do nothing.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._params = [p for p in params if p.requires_grad]
        self._layouts: dict[int, tuple[int, ...]] = {}
        self._hooks = [p.register_hook(self._recorder(id(p))) for p in self._params]
        self.done = False

    def _recorder(self, key: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self._layouts.setdefault(key, grad.stride())

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def apply(self) -> None:
        """Move each parameter (and its current gradient) to its gradient's layout, once."""
        if self.done or not self._layouts:
            return
        self.done = True
        self.remove()
        for p in self._params:
            stride = self._layouts.get(id(p))
            if stride is None or stride == p.stride() or not model_major(p.shape, stride):
                continue
            p.data = restrided(p.data, stride)
            if p.grad is not None:
                p.grad = restrided(p.grad, stride)
