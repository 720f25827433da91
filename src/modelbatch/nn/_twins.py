"""BatchNorm, RReLU and Bilinear twins for the cases torch cannot batch under `torch.vmap`.

- `BatchNorm*d(momentum=None)` (cumulative average) computes its factor with
  `float(num_batches_tracked)`, a Python read of a tensor that vmap refuses;
  the twins compute the factor as a tensor, so each model uses its own count.
- `RReLU` calls `aten::rrelu`, which has no batching rule; the twin draws its
  slopes with `torch.rand_like`.
- `Bilinear` calls `aten::bilinear`, which vmap runs one model at a time (its
  fallback); the twin is one `einsum`.

With an exponential `momentum` the BatchNorm twins are torch's own forward.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Bilinear", "RReLU"]

_M = TypeVar("_M", bound=nn.Module)


def _twin(module: nn.Module, cls: type[_M]) -> _M:
    """A module of class `cls` sharing `module`'s parameters, buffers and attributes."""
    twin = copy.copy(module)
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    twin._modules = dict(module._modules)
    twin.__class__ = cls
    return twin  # type: ignore[return-value]


class _Twin(nn.Module):
    @classmethod
    def from_torch(cls: type[_M], module: nn.Module) -> _M:
        """The twin of a torch module of the class this one mirrors, sharing its tensors."""
        return _twin(module, cls)


class _CumulativeBatchNorm(_Twin, nn.modules.batchnorm._BatchNorm):
    def forward(self, input: Tensor) -> Tensor:
        if self.momentum is not None or not (self.training and self.track_running_stats):
            return super().forward(input)
        self._check_input_dim(input)
        assert self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
        factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)  # type: ignore[union-attr]
        dims = [0, *range(2, input.dim())]
        with torch.no_grad():
            mean = input.mean(dims).to(self.running_mean.dtype)
            var = input.var(dims, correction=1).to(self.running_var.dtype)
            self.running_mean.mul_(1 - factor).add_(factor * mean)
            self.running_var.mul_(1 - factor).add_(factor * var)
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)


class BatchNorm1d(_CumulativeBatchNorm, nn.BatchNorm1d):
    """`torch.nn.BatchNorm1d` whose `momentum=None` (cumulative average) runs under vmap."""


class BatchNorm2d(_CumulativeBatchNorm, nn.BatchNorm2d):
    """`torch.nn.BatchNorm2d` whose `momentum=None` (cumulative average) runs under vmap."""


class BatchNorm3d(_CumulativeBatchNorm, nn.BatchNorm3d):
    """`torch.nn.BatchNorm3d` whose `momentum=None` (cumulative average) runs under vmap."""


class RReLU(_Twin, nn.RReLU):
    """`torch.nn.RReLU` that runs under vmap: random slopes per element, model and step.

    Eval mode is torch's exactly (`leaky_relu` with slope `(lower + upper) / 2`).
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return F.leaky_relu(input, (self.lower + self.upper) / 2)
        slope = torch.rand_like(input) * (self.upper - self.lower) + self.lower
        return torch.where(input >= 0, input, input * slope)


class Bilinear(_Twin, nn.Bilinear):
    """`torch.nn.Bilinear` as one `einsum`, which vmap batches without a per-model loop.

    Shapes:
        `x1 [*, in1]`, `x2 [*, in2]` -> `[*, out]`.
    """

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:
        out = torch.einsum("...i,oij,...j->...o", input1, self.weight, input2)
        return out if self.bias is None else out + self.bias
