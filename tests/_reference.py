"""Reference helpers: N batched models against the same N models trained one by one."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from modelbatch import ModelBatch
from modelbatch.optim import BatchSGD

IN, HIDDEN, CLASSES, BATCH = 6, 8, 3, 16
Opt = TypeVar("Opt", bound=torch.optim.Optimizer)


def make_models(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[nn.Sequential]:
    """N small MLPs (Linear-Tanh-Linear), each with its own random init."""
    torch.manual_seed(seed)
    return [
        nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).to(dtype)
        for _ in range(n)
    ]


def make_batches(
    n: int, steps: int, seed: int = 1, dtype: torch.dtype = torch.float32
) -> list[tuple[Tensor, Tensor]]:
    """Fresh random per-model data for each step: x `[N, B, IN]`, y `[N, B]`."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, BATCH, IN, generator=g, dtype=dtype),
            torch.randint(0, CLASSES, (n, BATCH), generator=g),
        )
        for _ in range(steps)
    ]


def train_one_by_one(
    models: Sequence[nn.Module],
    optimizer_cls: type[torch.optim.Optimizer],
    configs: Sequence[Mapping[str, Any]],
    batches: Sequence[tuple[Tensor, Tensor]],
    before_step: Callable[[int, list[torch.optim.Optimizer]], None] | None = None,
    accumulate: int = 1,
) -> list[nn.Module]:
    """Train copies of the models, each alone with its own torch optimizer.

    `before_step(t, optimizers)` runs before step t (to change hyperparameters).
    With `accumulate=k`, each batch is split into k backward calls before one step.
    """
    models = [copy.deepcopy(m) for m in models]
    opts = [optimizer_cls(m.parameters(), **cfg) for m, cfg in zip(models, configs)]
    for t, (x, y) in enumerate(batches):
        if before_step is not None:
            before_step(t, opts)
        for i, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            for xs, ys in zip(x[i].chunk(accumulate), y[i].chunk(accumulate)):
                F.cross_entropy(m(xs), ys).backward()
            opt.step()
    return models


def train_batched(
    mb: ModelBatch,
    opt: Opt,
    batches: Sequence[tuple[Tensor, Tensor]],
    before_step: Callable[[int, Opt], None] | None = None,
    accumulate: int = 1,
) -> None:
    """Train a ModelBatch on the same per-model batches with one optimizer."""
    for t, (x, y) in enumerate(batches):
        if before_step is not None:
            before_step(t, opt)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(accumulate, dim=1), y.chunk(accumulate, dim=1)):
            mb.compute_loss(mb(xs, per_model=True), ys, per_model=True).backward()
        opt.step()


def grad(t: Tensor) -> Tensor:
    """`t.grad`, asserted present (a backward that skipped `t` fails here)."""
    assert t.grad is not None, "expected a gradient, got None"
    return t.grad


def latest_losses(mb: ModelBatch) -> Tensor:
    """`mb.latest_losses` `[N]`, asserted present (compute_loss has run)."""
    assert mb.latest_losses is not None, "expected losses, compute_loss has not run"
    return mb.latest_losses


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the tensor's scale."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def max_rel_diff(mb: ModelBatch, models: Sequence[nn.Module]) -> float:
    """Largest per-model, per-tensor `max|a - b| / max|b|` between the stack and the models."""
    worst = 0.0
    for name, stacked in mb.stacked_params().items():
        for i, m in enumerate(models):
            ref = m.get_parameter(name).detach()
            err = (stacked[i].detach() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
            worst = max(worst, float(err))
    return worst


def make_sgd(params: Any, lrs: list[float], model_batch: Any = None) -> BatchSGD:
    """The vectorized SGD with model i's lr = lrs[i] (stacked params or a ModelBatch)."""
    if isinstance(params, ModelBatch):
        params, model_batch = params.parameters(), params
    return BatchSGD(params, [{"lr": lr} for lr in lrs], model_batch=model_batch)


def snapshot(mb: ModelBatch, opt: torch.optim.Optimizer | None = None) -> dict[str, Tensor]:
    """Clones of every stacked parameter (and optimizer state tensor), by name."""
    out = {f"p.{k}": v.detach().clone() for k, v in mb.stacked_params().items()}
    if opt is not None:
        names = {id(p): k for k, p in mb.stacked_params().items()}
        for p, state in opt.state.items():
            for key, v in state.items():
                if isinstance(v, Tensor) and v.dim() > 0:
                    out[f"s.{names[id(p)]}.{key}"] = v.detach().clone()
    return out


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched inside the `with` block (one per kernel launch or fewer).

    With `only`, counts just those overloads (e.g. `torch.ops.aten.bmm.default`).
    """

    def __init__(self, *only: Any) -> None:
        super().__init__()
        self.only = set(only)
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.only or func in self.only:
            self.count += 1
        return func(*args, **(kwargs or {}))
