"""The benchmark arms: each builds a step `step(x, y)` over N models of one architecture.

- sequential: N separate `nn.Module`s and N `torch.optim.Adam`, the ordinary loop.
- eager: `ModelBatch` with the library's step run eagerly.
- fast: the same step through `modelbatch.fast.compile_step` (one CUDA graph).
- ideal: the MLP written by hand as `torch.baddbmm` over stacked weights with one
  fused Adam, captured in a CUDA graph the same way (MLPs only).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelbatch import ModelBatch
from modelbatch.fast import compile_step

LR = 1e-3
Step = Callable[[Tensor, Tensor], Any]


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def library_optimizer(mb: ModelBatch, n: int) -> tuple[torch.optim.Optimizer, str]:
    """The library's vectorized Adam with a different lr for every model (`[N]`)."""
    from modelbatch.optim import OptimizerFactory

    lrs = torch.linspace(0.5 * LR, 2 * LR, n).tolist()
    opt = OptimizerFactory(torch.optim.Adam).create_optimizer(mb, [{"lr": lr} for lr in lrs])
    return opt, f"modelbatch.optim.{type(opt).__name__} (per-model lr)"


# ---------------------------------------------------------------------- sequential


def sequential_step(
    make: Callable[[], nn.Module], n: int, device: torch.device, dtype: torch.dtype | None
) -> tuple[Step, list]:
    models = [make().to(device) for _ in range(n)]
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in models]

    def step(x: Tensor, y: Tensor) -> None:
        for m, o in zip(models, opts):
            o.zero_grad(set_to_none=True)
            with autocast(dtype):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()

    return step, [models, opts]


# ---------------------------------------------------------------------- modelbatch


def build_batch(make: Callable[[], nn.Module], n: int, device: torch.device) -> ModelBatch:
    # Built on the device: initialising thousands of models on the CPU would dominate the run.
    with torch.device(device):
        models = [make() for _ in range(n)]
    return ModelBatch(models)


def modelbatch_step(
    mb: ModelBatch, dtype: torch.dtype | None, mode: str, **options: Any
) -> tuple[Step, list, str]:
    opt, name = library_optimizer(mb, mb.num_models)
    step = compile_step(mb, opt, autocast_dtype=dtype, mode=mode, **options)
    return step, [opt, step], name


# ---------------------------------------------------------------------- ideal


class _IdealMLP:
    """The MLP as batched matmuls over `[N, in, out]` weights, one fused Adam, one CUDA graph."""

    def __init__(self, sizes: tuple[int, ...], n: int, device: torch.device, dtype: Any) -> None:
        self.n = n
        self.dtype = dtype
        self.weights: list[Tensor] = []
        self.biases: list[Tensor] = []
        for a, b in itertools.pairwise(sizes):
            bound = 1 / math.sqrt(a)
            w = (torch.rand(n, a, b, device=device) * 2 - 1) * bound
            bias = (torch.rand(n, 1, b, device=device) * 2 - 1) * bound
            self.weights.append(w.requires_grad_())
            self.biases.append(bias.requires_grad_())
        self.params = self.weights + self.biases
        self.opt = torch.optim.Adam(self.params, lr=LR, fused=True, capturable=True)
        self.graph: Any = None

    def body(self, x: Tensor, y: Tensor) -> Tensor:
        n, b = self.n, x.shape[0]
        with autocast(self.dtype):
            h = x.unsqueeze(0).expand(n, *x.shape)
            last = len(self.weights) - 1
            for i, (w, bias) in enumerate(zip(self.weights, self.biases)):
                h = torch.baddbmm(bias, h, w)
                if i < last:
                    h = torch.relu(h)
            losses = (
                F.cross_entropy(h.float().reshape(n * b, -1), y.repeat(n), reduction="none")
                .view(n, b)
                .mean(1)
            )
        losses.sum().backward()
        self.opt.step()
        return losses.detach()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.opt.zero_grad(set_to_none=True)
                    self.body(x, y)
            torch.cuda.current_stream().wait_stream(side)
            self.static_x, self.static_y = x.clone(), y.clone()
            self.opt.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_losses = self.body(self.static_x, self.static_y)
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.static_losses.clone()


def ideal_step(
    sizes: tuple[int, ...], n: int, device: torch.device, dtype: torch.dtype | None
) -> tuple[Step, list]:
    ideal = _IdealMLP(sizes, n, device, dtype)
    return ideal, [ideal]


# ---------------------------------------------------------------------- timing


def time_step(
    step: Step,
    batches: list[tuple[Tensor, Tensor]],
    *,
    warmup: int = 5,
    repeats: int = 5,
    target_ms: float = 60.0,
    max_iters: int = 200,
) -> dict[str, float]:
    """Median ms per step over `repeats` timed runs (CUDA events), after warm-up.

    Each repeat runs enough steps to last about `target_ms`, cycling over the batches.
    """
    k = len(batches)
    for i in range(warmup):
        step(*batches[i % k])
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(2):
        step(*batches[i % k])
    end.record()
    end.synchronize()
    probe = start.elapsed_time(end) / 2
    iters = max(2, min(max_iters, math.ceil(target_ms / max(probe, 1e-3))))
    times = []
    for _ in range(repeats):
        start.record()
        for i in range(iters):
            step(*batches[i % k])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "iters": iters,
        "repeats": repeats,
    }
