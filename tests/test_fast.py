"""compile_step and evaluate: the eager fallback on the CPU, the CUDA-graph path on a GPU."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelbatch import ModelBatch
from modelbatch.fast import EvalResult, compile_step, evaluate

N = 4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_models(n: int = N, seed: int = 0, bn: bool = False) -> list[nn.Module]:
    torch.manual_seed(seed)
    if bn:
        return [
            nn.Sequential(
                nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
            )
            for _ in range(n)
        ]
    return [nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(n)]


def quiet_step(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_step(*args, **kwargs)


def assert_close_to(mb: ModelBatch, refs: list[nn.Module], rtol: float, atol: float) -> None:
    for i, ref in enumerate(refs):
        got = mb.model(i).state_dict()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=rtol, atol=atol, msg=f"model {i} {k}")


# ---------------------------------------------------------------------- CPU (eager fallback)


@pytest.mark.parametrize(("per_model", "clip"), [(False, False), (True, False), (False, True)])
def test_eager_fallback_matches_separate_models(per_model: bool, clip: bool) -> None:
    from modelbatch.optim import OptimizerFactory

    models = make_models()
    refs = copy.deepcopy(models)
    mb = ModelBatch(models)
    configs: list[dict[str, Any]] = [
        {"lr": 0.01 * (i + 1), "weight_decay": 0.05 * i} for i in range(N)
    ]
    opt = OptimizerFactory(torch.optim.Adam).create_optimizer(mb, configs)
    max_norms = [0.05, 0.2, 1.0, 5.0]
    step = quiet_step(mb, opt, per_model=per_model, max_norm=max_norms if clip else None)
    ref_opts = [torch.optim.Adam(m.parameters(), **c) for m, c in zip(refs, configs)]
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        b = 10 if t < 5 else 7  # a last batch of another size
        shape = (N, b) if per_model else (b,)
        x = torch.randn(*shape, 6, generator=gen)
        y = torch.randint(0, 3, shape, generator=gen)
        losses = step(x, y)
        for i, (m, o) in enumerate(zip(refs, ref_opts)):
            xi, yi = (x[i], y[i]) if per_model else (x, y)
            o.zero_grad()
            loss = F.cross_entropy(m(xi), yi)
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(m.parameters(), max_norms[i])
            o.step()
            torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-6, atol=0)
    assert_close_to(mb, refs, rtol=1e-5, atol=1e-7)


def test_cpu_fallback_says_why_once() -> None:
    mb = ModelBatch(make_models())
    with pytest.warns(UserWarning, match=r"compile_step: running the eager step.*CUDA"):
        step = compile_step(mb, torch.optim.SGD(mb.parameters(), lr=0.1))
    assert step.mode == "eager" and step.reason is not None and "CUDA" in step.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            step(torch.randn(5, 6), torch.randint(0, 3, (5,)))


def test_losses_stay_on_device_and_are_recorded() -> None:
    mb = ModelBatch(make_models())
    step = quiet_step(mb, torch.optim.SGD(mb.parameters(), lr=0.1))
    first = step(torch.randn(5, 6), torch.randint(0, 3, (5,)))
    second = step(torch.randn(5, 6), torch.randint(0, 3, (5,)))
    expected = torch.stack([first, second])
    assert first.shape == (N,) and first.dtype == torch.float32 and not first.requires_grad
    assert mb.latest_losses is second
    torch.testing.assert_close(mb.loss_history(), expected, rtol=0, atol=0)


def test_retired_model_is_untouched_and_others_train() -> None:
    mb = ModelBatch(make_models())
    step = quiet_step(mb, torch.optim.SGD(mb.parameters(), lr=0.1))
    mb.retire(2)
    before = {k: v.clone() for k, v in mb.stacked_params().items()}
    losses = step(torch.randn(5, 6), torch.randint(0, 3, (5,)))
    assert losses[2].item() == 0.0
    for k, v in mb.stacked_params().items():
        assert torch.equal(v[2], before[k][2]), k
        assert not torch.equal(v[0], before[k][0]), k


def test_step_of_a_batch_that_owns_its_optimizer_leaves_no_layout_hooks() -> None:
    # The batch's own layout hooks (for mb.step()) are taken over by the compiled
    # step, not doubled: after the first step every hook is gone.
    mb = ModelBatch(make_models(), lr_list=[0.01] * N, optimizer_cls=torch.optim.Adam)
    assert mb._layout is not None and len(mb._layout._hooks) == 4
    step = quiet_step(mb, mb.optimizer)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    step(x, y)
    assert mb._layout.done and mb._layout._hooks == []
    assert all(not p._backward_hooks for p in mb.parameters())


def test_grad_layout_moves_parameters_without_changing_a_value() -> None:
    # The relayout itself is exact: every parameter and gradient keeps its values.
    from modelbatch._layout import GradLayout

    mb = ModelBatch(make_models())
    params = list(mb.parameters())
    layout = GradLayout(params)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    mb.compute_loss(mb(x), y).backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in params if p.grad is not None]
    strides = [p.stride() for p in params]
    layout.apply()
    assert layout.done and len(before) == len(params)
    assert any(p.stride() != s for p, s in zip(params, strides))  # something moved
    for p, (value, g) in zip(params, before):
        assert p.grad is not None
        assert torch.equal(p, value) and torch.equal(p.grad, g)
        assert p.grad.stride() == p.stride()


def test_relayout_keeps_values_and_training() -> None:
    from modelbatch._step import TrainStep
    from modelbatch.optim import OptimizerFactory

    models = make_models()
    twins = []
    for relayout in (False, True):
        mb = ModelBatch(copy.deepcopy(models))
        opt = OptimizerFactory(torch.optim.Adam).create_optimizer(
            mb, [{"lr": 0.01 * (i + 1)} for i in range(N)]
        )
        twins.append((mb, opt, TrainStep(mb, opt, relayout=relayout)))
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))] * 4
    for x, y in batches:
        for _, _, step in twins:
            step(x, y)
    (mb_a, _, _), (mb_b, opt_b, _) = twins
    weight_a, weight_b = mb_a.stacked_params()["0.weight"], mb_b.stacked_params()["0.weight"]
    # vmap's weight gradient arrives transposed: the relaid-out weight takes that layout.
    assert weight_b.stride() != weight_a.stride() == weight_a.contiguous().stride()
    assert opt_b.state[weight_b]["exp_avg"].stride() == weight_b.stride()
    assert weight_b.grad is not None and weight_b.grad.stride() == weight_b.stride()
    for (k, a), b in zip(mb_a.stacked_params().items(), mb_b.stacked_params().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=k)


def test_bad_arguments_are_named() -> None:
    mb = ModelBatch(make_models())
    with pytest.raises(TypeError, match="compile_step: expected a ModelBatch"):
        compile_step(nn.Linear(2, 2), torch.optim.SGD(mb.parameters(), lr=0.1))  # type: ignore[arg-type]
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="compile_step: the optimizer holds a parameter"):
        compile_step(mb, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="compile_step: mode must be"):
        compile_step(mb, torch.optim.SGD(mb.parameters(), lr=0.1), mode="fastest")
    with pytest.raises(ValueError, match="compile_step: warmup must be >= 1"):
        compile_step(mb, torch.optim.SGD(mb.parameters(), lr=0.1), warmup=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="compile_step: mode='graph' is impossible"):
            compile_step(mb, torch.optim.SGD(mb.parameters(), lr=0.1), mode="graph")


@pytest.mark.parametrize("per_model", [False, True])
def test_evaluate_matches_each_model(per_model: bool) -> None:
    models = make_models(bn=True)
    mb = ModelBatch(models)
    mb.train()
    gen = torch.Generator().manual_seed(3)
    shapes = [(N, 9), (N, 4)] if per_model else [(9,), (4,)]
    loader = [
        (torch.randn(*s, 6, generator=gen), torch.randint(0, 3, s, generator=gen)) for s in shapes
    ]
    result = evaluate(mb, loader, per_model=per_model)
    assert isinstance(result, EvalResult) and mb.training
    assert result.accuracy is not None
    for i in range(N):
        ref = mb.model(i).eval()
        with torch.no_grad():
            outs = [(ref(x[i] if per_model else x), y[i] if per_model else y) for x, y in loader]
        total = sum(F.cross_entropy(o, y, reduction="sum") for o, y in outs)
        hits = sum((o.argmax(-1) == y).sum() for o, y in outs)
        torch.testing.assert_close(result.loss[i], total / 13, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result.accuracy[i], hits.float() / 13, rtol=0, atol=0)


def test_evaluate_regression_has_no_accuracy_and_rejects_bad_loaders() -> None:
    torch.manual_seed(0)
    mb = ModelBatch([nn.Linear(3, 1) for _ in range(N)], loss_fn=F.mse_loss)
    result = evaluate(mb, [(torch.randn(5, 3), torch.randn(5, 1))])
    assert result.accuracy is None and result.loss.shape == (N,)
    with pytest.raises(ValueError, match="evaluate: expected the loader to yield"):
        evaluate(mb, [torch.randn(5, 3)])
    with pytest.raises(ValueError, match="evaluate: the loader yielded no batches"):
        evaluate(mb, [])


# ---------------------------------------------------------------------- CUDA graph path


def _twin_steps(
    bn: bool = False,
    dtype: torch.dtype | None = None,
    cls: type = torch.optim.Adam,
):
    from modelbatch.optim import OptimizerFactory

    models = [m.cuda() for m in make_models(bn=bn)]
    configs = [{"lr": 0.01 * (i + 1), "weight_decay": 0.1 * i} for i in range(N)]
    twins = []
    for mode in ("eager", "graph"):
        mb = ModelBatch(copy.deepcopy(models))
        opt = OptimizerFactory(cls).create_optimizer(mb, configs)
        step = quiet_step(mb, opt, autocast_dtype=dtype, mode=mode)
        twins.append((mb, opt, step))
    return twins


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    ("dtype", "cls"),
    [
        (None, torch.optim.Adam),
        (None, torch.optim.AdamW),
        (None, torch.optim.SGD),
        (None, torch.optim.NAdam),
        (torch.bfloat16, torch.optim.Adam),
    ],
)
def test_graph_step_equals_eager_step(dtype: torch.dtype | None, cls: type) -> None:
    (mb_e, opt_e, eager), (mb_g, opt_g, graph) = _twin_steps(dtype=dtype, cls=cls)
    assert graph.mode == "graph" and eager.mode == "eager"
    gen = torch.Generator(device="cuda").manual_seed(0)
    for epoch in range(4):
        for b in (32, 32, 32, 20):  # the last batch of each epoch is smaller
            x = torch.randn(b, 6, device="cuda", generator=gen)
            y = torch.randint(0, 3, (b,), device="cuda", generator=gen)
            le, lg = eager(x, y), graph(x, y)
            torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)
        if epoch == 1:
            # Hyperparameters and the active mask are tensors: no re-capture.
            for opt in (opt_e, opt_g):
                opt.hparams["lr"][0] = 0.003
            mb_e.retire(1)
            mb_g.retire(1)
    assert graph.num_graphs == 2
    for (k, a), b in zip(mb_e.stacked_params().items(), mb_g.stacked_params().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(mb_g.latest_losses[1], torch.zeros((), device="cuda"))


@pytest.mark.gpu
@cuda
def test_graph_replay_does_not_sync_and_draws_fresh_dropout() -> None:
    _, (mb, opt, step) = _twin_steps(bn=True)
    x = torch.randn(16, 6, device="cuda")
    y = torch.randint(0, 3, (16,), device="cuda")
    for _ in range(3):  # warm-up and capture
        step(x, y)
    # lr 0 (in place: no re-capture) keeps the weights, so only the masks can differ.
    opt.hparams["lr"].zero_()
    mean_before = mb.stacked_buffers()["1.running_mean"].clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = step(x, y)
        second = step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.num_graphs == 1
    assert not torch.equal(first, second)  # same weights, new dropout masks
    assert not torch.equal(mean_before, mb.stacked_buffers()["1.running_mean"])


def test_lr_factor_is_a_tensor_that_torch_schedulers_fill_in_place() -> None:
    """A captured step reads the factor; torch's schedulers must update that very tensor."""
    from modelbatch.optim import OptimizerFactory

    runs = []
    for by_scheduler in (False, True):
        mb = ModelBatch(make_models())
        configs = [{"lr": 0.01 * (i + 1)} for i in range(N)]
        opt = OptimizerFactory(torch.optim.Adam).create_optimizer(mb, configs)
        factor = opt.param_groups[0]["lr"]
        assert isinstance(factor, torch.Tensor) and factor.dim() == 0
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        gen = torch.Generator().manual_seed(0)
        base = opt.hparams["lr"].clone()
        for t in range(5):
            if not by_scheduler:
                # The same schedule written into the per-model rates by hand.
                opt.param_groups[0]["lr"].fill_(1.0)
                opt.hparams["lr"].copy_(base * 0.7**t)
            x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            mb.compute_loss(mb(x), y).backward()
            opt.step()
            if by_scheduler:
                sched.step()
        if by_scheduler:
            assert opt.param_groups[0]["lr"] is factor  # updated in place
            assert float(factor) == pytest.approx(0.7**5)
        runs.append([p.detach().clone() for p in mb.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.gpu
@cuda
def test_graph_step_follows_a_per_step_torch_schedule_without_recapture() -> None:
    (mb_e, opt_e, eager), (mb_g, opt_g, graph) = _twin_steps()
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.8) for o in (opt_e, opt_g)]
    gen = torch.Generator(device="cuda").manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a re-capture would warn
        for _ in range(8):
            x = torch.randn(32, 6, device="cuda", generator=gen)
            y = torch.randint(0, 3, (32,), device="cuda", generator=gen)
            torch.testing.assert_close(graph(x, y), eager(x, y), rtol=1e-5, atol=1e-6)
            for sched in scheds:
                sched.step()
    assert graph.num_graphs == 1
    for (k, a), b in zip(mb_e.stacked_params().items(), mb_g.stacked_params().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


def test_low_precision_copies_leave_frozen_parameters_alone() -> None:
    # The optimizer holds no frozen parameter, so it makes no copy of one: the step
    # runs the frozen layer on its own weights and trains the rest on copies.
    from modelbatch._step import TrainStep
    from modelbatch.optim import OptimizerFactory

    models = make_models()
    for m in models:
        for p in m.get_submodule("0").parameters():
            p.requires_grad_(False)
    mb = ModelBatch(models)
    opt = OptimizerFactory(torch.optim.Adam).create_optimizer(mb, [{"lr": 0.01}] * N)
    step = TrainStep(mb, opt, autocast_dtype=torch.bfloat16)
    frozen = {k: t.clone() for k, t in mb.stacked_params().items() if k.startswith("0.")}
    trained = mb.stacked_params()["2.weight"].clone()
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        assert torch.isfinite(step(x, y)).all()
    for k, t in frozen.items():
        assert torch.equal(mb.stacked_params()[k], t), k
    assert not torch.equal(mb.stacked_params()["2.weight"], trained)
    assert set(opt.low_precision) == {p for p in mb.parameters() if p.requires_grad}


class GRUHead(nn.Module):
    """A GRU over [B, 5, 3], LayerNorm on its last state, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.gru(x)[0][:, -1]))


AUTOCAST_MODELS = {
    # name: (model, input shape, the parameters with low-precision copies on the CPU)
    "conv_bn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
            nn.Linear(4 * 6 * 6, 3),
        ),
        (2, 6, 6),
        {"4.weight", "4.bias"},
    ),
    "grouped_reflect": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
        ),
        (2, 6, 6),
        {"4.weight", "4.bias"},
    ),
    "gru_ln": (
        lambda: GRUHead(),
        (5, 3),
        {"gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0",
         "head.weight", "head.bias"},
    ),
    "transposed_ln": (
        lambda: nn.Sequential(
            nn.ConvTranspose1d(2, 3, 2), nn.LayerNorm(7), nn.Flatten(), nn.Linear(3 * 7, 3),
        ),
        (2, 6),
        {"3.weight", "3.bias"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(AUTOCAST_MODELS))
def test_low_precision_copies_follow_autocast_on_the_cpu(name: str) -> None:
    # The copies are of the weights autocast runs in low precision: a norm layer's
    # weights stay float32 (a bf16 BatchNorm weight beside float32 running statistics
    # is refused by batch_norm), and on the CPU, where torch's vmap rule for
    # convolutions does not autocast, so do a convolution's (grouped, reflect-padded
    # and transposed ones run torch's own rule). The recurrent layers ModelBatch puts in
    # place of torch's get copies. Training follows autocast's (bf16 tier).
    from modelbatch._step import TrainStep
    from modelbatch.optim import OptimizerFactory

    make, shape, expected = AUTOCAST_MODELS[name]
    torch.manual_seed(0)
    models = [make() for _ in range(N)]
    # SGD: an update proportional to the gradient, so the bf16 tier bounds the difference.
    configs = [{"lr": 0.01 * (i + 1), "momentum": 0.9} for i in range(N)]
    runs = []
    for low in (False, True):
        mb = ModelBatch(copy.deepcopy(models))
        opt = OptimizerFactory(torch.optim.SGD).create_optimizer(mb, configs)
        runs.append((mb, TrainStep(mb, opt, autocast_dtype=torch.bfloat16, low_precision=low)))
    mb, step = runs[1]
    names = mb.stacked_params()
    assert {k for k, p in names.items() if p in step.optimizer.low_precision} == expected
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        x, y = torch.randn(8, *shape, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for _, s in runs:
            assert torch.isfinite(s(x, y)).all()
        norm = names["norm.weight" if name == "gru_ln" else "1.weight"]
        assert norm.grad is not None and norm.grad.dtype == torch.float32
    for (k, a), b in zip(runs[0][0].stacked_params().items(), runs[1][0].stacked_params().values()):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3, msg=k)  # the bf16 tier


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.SGD])
def test_low_precision_copies_are_written_by_the_update_and_train_like_autocast(cls) -> None:
    from modelbatch._step import TrainStep
    from modelbatch.optim import OptimizerFactory

    models = make_models()
    configs = [{"lr": 0.01 * (i + 1)} for i in range(N)]
    runs = []
    for low in (False, True):
        mb = ModelBatch(copy.deepcopy(models))
        opt = OptimizerFactory(cls).create_optimizer(mb, configs)
        runs.append((mb, opt, TrainStep(mb, opt, autocast_dtype=torch.bfloat16, low_precision=low)))
    gen = torch.Generator().manual_seed(3)
    for t in range(6):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        losses = [step(x, y) for _, _, step in runs]
        if t == 0:
            # On the CPU, autocast leaves a vmapped linear layer in fp32 while the copies
            # make it run in bf16: the bf16 tier.
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)
        mb, opt, _ = runs[1]
        for p in mb.parameters():
            copy_ = opt.low_precision[p]
            assert copy_.dtype == torch.bfloat16 and p.grad is None and copy_.grad is not None
            assert torch.equal(copy_.detach(), p.detach().to(torch.bfloat16))
        if t == 3:
            # A parameter changed outside the step: its copy is written again before use.
            with torch.no_grad():
                for mb_, _, _ in runs:
                    mb_.stacked_params()["0.weight"][1].mul_(0.5)
    for (k, a), b in zip(runs[0][0].stacked_params().items(), runs[1][0].stacked_params().values()):
        # bf16 gradients (not rounded to fp32 before the update): the bf16 tier.
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3, msg=k)
