"""Per-model gradient clipping against torch.nn.utils applied to each model alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _reference import CountOps, grad, rel_err
from torch import nn

from modelbatch import ModelBatch
from modelbatch.optim import clip_grad_norm_, clip_grad_value_, per_model_grad_norm

N = 5


class _Net(nn.Module):
    """An MLP with a scalar temperature: stacked, that parameter is 1-D `[N]`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        self.temperature = nn.Parameter(torch.rand(()) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) / self.temperature


def _models(n: int = N, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [_Net() for _ in range(n)]


def _batched_and_separate(n: int = N, seed: int = 0):
    """A ModelBatch and n separate copies, both with gradients of one fresh random batch."""
    models = _models(n, seed)
    separate = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 6, generator=gen) * 3
    y = torch.randint(0, 3, (16,), generator=gen)
    mb.compute_loss(mb(x), y).backward()
    for m in separate:
        F.cross_entropy(m(x), y).backward()
    return mb, separate


def _assert_grads_match(mb: ModelBatch, separate: list[nn.Module], tol: float = 1e-6) -> None:
    stacked = mb.stacked_params()
    for i, m in enumerate(separate):
        for name, p in m.named_parameters():
            assert rel_err(grad(stacked[name])[i], grad(p)) <= tol, (i, name)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("per_model_max", [True, False])
def test_clip_grad_norm_matches_torch_per_model(norm_type: float, per_model_max: bool) -> None:
    mb, separate = _batched_and_separate()
    expected = torch.stack(
        [
            torch.nn.utils.get_total_norm([p.grad for p in m.parameters()], norm_type)
            for m in separate
        ]
    )
    # Limits below and above the norms so some models clip and some do not.
    max_norm: torch.Tensor | float
    if per_model_max:
        max_norm = expected * torch.tensor([0.1, 0.5, 0.9, 1.5, 3.0])
    else:
        max_norm = float(expected.median())
    norms = clip_grad_norm_(mb, max_norm, norm_type=norm_type)
    assert norms.shape == (N,)
    assert rel_err(norms, expected) <= 1e-6
    for i, m in enumerate(separate):
        limit = float(max_norm[i]) if isinstance(max_norm, torch.Tensor) else max_norm
        torch.nn.utils.clip_grad_norm_(m.parameters(), limit, norm_type=norm_type)
    _assert_grads_match(mb, separate)
    assert (
        rel_err(
            per_model_grad_norm(mb, norm_type),
            torch.stack(
                [
                    torch.nn.utils.get_total_norm([p.grad for p in m.parameters()], norm_type)
                    for m in separate
                ]
            ),
        )
        <= 1e-6
    )


def test_clip_grad_norm_on_iterable_of_stacked_tensors() -> None:
    mb, separate = _batched_and_separate()
    norms = clip_grad_norm_(list(mb.parameters()), 0.3, num_models=N)
    for m in separate:
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.3)
    assert norms.shape == (N,)
    _assert_grads_match(mb, separate)


@pytest.mark.parametrize("per_model_value", [True, False])
def test_clip_grad_value_matches_torch_per_model(per_model_value: bool) -> None:
    mb, separate = _batched_and_separate()
    values: torch.Tensor | float = (
        torch.tensor([0.01, 0.05, 0.1, 0.2, 10.0]) if per_model_value else 0.05
    )
    before = [grad(p).clone() for p in mb.parameters()]
    clip_grad_value_(mb, values)
    for i, m in enumerate(separate):
        limit = float(values[i]) if isinstance(values, torch.Tensor) else values
        torch.nn.utils.clip_grad_value_(m.parameters(), limit)
        # Exact on the very same gradient values: torch on model i's slices.
        slices = [nn.Parameter(torch.zeros_like(g[i])) for g in before]
        for s, g in zip(slices, before):
            s.grad = g[i].clone()
        torch.nn.utils.clip_grad_value_(slices, limit)
        for s, p in zip(slices, mb.parameters()):
            assert torch.equal(grad(p)[i], grad(s))
    _assert_grads_match(mb, separate)


def test_non_finite_norm_changes_only_that_model() -> None:
    mb, _ = _batched_and_separate()
    clean, _ = _batched_and_separate()
    k = 2
    mb.stacked_params()["body.0.weight"].grad[k, 0, 0] = float("inf")
    norms = clip_grad_norm_(mb, 0.5)
    reference = clip_grad_norm_(clean, 0.5)
    assert not torch.isfinite(norms[k])
    others = [i for i in range(N) if i != k]
    assert torch.equal(norms[others], reference[others])
    for p, q in zip(mb.parameters(), clean.parameters()):
        assert torch.equal(p.grad[others], q.grad[others])
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_: .*non-finite for models \[2\]"):
        clip_grad_norm_(mb, 0.5, error_if_nonfinite=True)


def test_bad_inputs_give_clear_errors() -> None:
    mb, _ = _batched_and_separate()
    with pytest.raises(
        ValueError, match=r"clip_grad_norm_: max_norm must be a float or have shape \[N=5\]"
    ):
        clip_grad_norm_(mb, torch.ones(3))
    with pytest.raises(ValueError, match="clip_grad_norm_: pass num_models=N"):
        clip_grad_norm_(list(mb.parameters()), 1.0)
    with pytest.raises(ValueError, match="clip_grad_value_: tensor 0 has shape"):
        clip_grad_value_([torch.zeros(3, 2)], 1.0, num_models=N)
    with pytest.raises(TypeError, match="clip_grad_norm_: expected a ModelBatch"):
        clip_grad_norm_(3, 1.0)
    with pytest.raises(ValueError, match="clip_grad_value_: clip_value must be >= 0"):
        clip_grad_value_(mb, -1.0)


@pytest.mark.parametrize(
    "clip",
    [
        lambda mb, n: clip_grad_norm_(mb, torch.rand(n) + 0.1),
        lambda mb, n: clip_grad_norm_(mb, 0.5, norm_type=math.inf),
        lambda mb, n: clip_grad_value_(mb, torch.rand(n)),
    ],
)
def test_launch_count_does_not_grow_with_n(clip) -> None:
    counts = []
    for n in (2, 40):
        mb, _ = _batched_and_separate(n)
        with CountOps() as ops:
            clip(mb, n)
        counts.append(ops.count)
    assert counts[0] == counts[1]
