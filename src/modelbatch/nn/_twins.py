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
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_batchedtensor

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


class VmapOnly(torch.autograd.Function):
    """A Function whose work is its vmap rule: differentiated only through what that rule runs.

    Subclasses define `forward` (the unbatched meaning, or a refusal) and the
    `vmap` staticmethod; a backward outside vmap is refused with the class's name.
    """

    generate_vmap_rule = False

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @classmethod
    def backward(cls, ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        raise RuntimeError(f"modelbatch.nn: {cls.__name__} is differentiated under vmap only.")


class _BatchedBatchNorm(VmapOnly):
    """`F.batch_norm` whose vmap rule runs N models' BatchNorm as ONE with N x C channels.

    torch's own rule calls the kernel without weight and bias (ones and zeros
    of N x C channels) and applies each model's affine afterwards as a
    separate multiply and add, with four more full-size passes in the
    backward. Here the stacked weight, bias and running statistics are the
    kernel's own: one kernel forward, one backward. An input that arrives as
    `[B, N, C, ...]` (the dense and grouped convolutions' output) needs no
    copy at all.
    """

    @staticmethod
    def forward(x: Tensor, *args: Any) -> Tensor:  # type: ignore[override]
        return F.batch_norm(x, *args)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple,
        x: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> Any:
        n = info.batch_size
        xb = x.movedim(in_dims[0], 1).flatten(1, 2)  # [B, N * C, *S]
        stats: list[Tensor | None] = []
        copies: list[tuple[Tensor, Tensor]] = []
        for t, dim in zip((running_mean, running_var), in_dims[1:3]):
            if t is None:
                stats.append(None)
                continue
            stacked = t.movedim(dim, 0)
            if stacked.is_contiguous():  # a view: the kernel updates the buffer itself
                stats.append(stacked.view(-1))
            else:
                flat = stacked.reshape(-1).clone()
                copies.append((stacked, flat))
                stats.append(flat)
        affine = [
            None if t is None else t.movedim(d, 0).reshape(-1)
            for t, d in zip((weight, bias), in_dims[3:5])
        ]
        out = F.batch_norm(xb, stats[0], stats[1], affine[0], affine[1], training, momentum, eps)
        with torch.no_grad():
            for stacked, flat in copies:
                stacked.copy_(flat.view_as(stacked))
        return out.unflatten(1, (n, -1)), 1


def _all_batched(*tensors: Tensor | None) -> bool:
    return all(t is None or is_batchedtensor(t) for t in tensors)


class _CumulativeBatchNorm(_Twin, nn.modules.batchnorm._BatchNorm):
    def forward(self, input: Tensor) -> Tensor:
        if self.momentum is not None or not (self.training and self.track_running_stats):
            return self._forward(input)
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

    def _forward(self, input: Tensor) -> Tensor:
        """torch's forward, with the batched kernel under vmap."""
        tensors = (self.running_mean, self.running_var, self.weight, self.bias)
        batched = is_batchedtensor(input) and _all_batched(*tensors)
        if not batched or input.dim() < 2 or torch.compiler.is_compiling():
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        tracking = self.training and self.track_running_stats
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return _BatchedBatchNorm.apply(
            input,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


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
