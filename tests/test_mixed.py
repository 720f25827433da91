"""MixedBatch: models of several architectures against the same models trained alone."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from _reference import BATCH, CLASSES, IN, make_batches, train_one_by_one
from torch import Tensor, nn

from modelbatch import MixedBatch, MixedOptimizer, compile_mixed_step

TOL = 1e-5  # multi-step fp32 training (AGENTS.md tier)


def mlp(width: int, depth: int, act: type[nn.Module] = nn.Sigmoid) -> nn.Sequential:
    """depth hidden layers of `width`; Sigmoid(0) = 0.5, so padded units are not silent."""
    layers: list[nn.Module] = [nn.Linear(IN, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, CLASSES))
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """Another class: a user module with named submodules (stacks on its own)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, width)
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)))


def make(specs: list[tuple[int, int]], seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [mlp(w, d) for w, d in specs]


def configs(n: int, optimizer: str) -> list[dict]:
    if optimizer == "sgd":
        return [
            {"lr": 0.05 * (1 + i % 3), "momentum": 0.9, "weight_decay": 0.01 * i} for i in range(n)
        ]
    return [{"lr": 1e-2 * (1 + i % 3), "weight_decay": 0.05 * (i % 4)} for i in range(n)]


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def train_mixed(
    mb: MixedBatch, opt: MixedOptimizer, batches: list, max_norm: float | None = None
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager step on the CPU warns once
        step = compile_mixed_step(mb, opt, per_model=True, max_norm=max_norm)
    for x, y in batches:
        step(x, y)


def assert_same_models(mb: MixedBatch, models: list[nn.Module], tol: float = TOL) -> None:
    for i, ref in enumerate(models):
        got = mb.model(i)
        assert type(got) is type(ref)
        ref_state, got_state = ref.state_dict(), got.state_dict()
        assert ref_state.keys() == got_state.keys()
        for k, r in ref_state.items():
            g = got_state[k]
            assert g.shape == r.shape, (i, k)
            err = float((g - r).abs().max() / r.abs().max().clamp_min(1e-12))
            assert err <= tol, (i, k, err)


def assert_padding_zero(mb: MixedBatch, opt: MixedOptimizer) -> int:
    """Padded weights and their optimizer state are exactly 0; returns how many were checked.

    Each mask is in its parameter's layout (a mixed-layout masked_fill_ runs torch's slow
    strided kernel).
    """
    checked = 0
    for g, entries in enumerate(mb.padding_masks()):
        for p, pad in entries:
            assert pad.stride() == p.stride()
            assert bool((p[pad] == 0).all())
            for value in opt.optimizers[g].state[p].values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    assert bool((value[pad] == 0).all())
                    checked += 1
    return checked


# ---------------------------------------------------------------------- equality


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_width_padding_trains_each_model_as_alone(optimizer: str) -> None:
    specs = [(4, 1), (12, 1), (8, 1), (12, 1), (6, 1)]
    models = make(specs)
    mb = MixedBatch(models, max_waste=1.0)
    assert [g.kind for g in mb._plan] == ["padded"]
    cfg = configs(len(models), optimizer)
    opt = MixedOptimizer(mb, OPTIMIZERS[optimizer], cfg)
    batches = make_batches(len(models), 20)
    train_mixed(mb, opt, batches)
    assert_same_models(mb, train_one_by_one(models, OPTIMIZERS[optimizer], cfg, batches))
    assert assert_padding_zero(mb, opt) > 0


def test_depth_masking_trains_each_model_as_alone() -> None:
    specs = [(8, 1), (8, 3), (8, 2), (8, 3), (8, 1)]
    models = make(specs)
    mb = MixedBatch(models, max_waste=1.0)
    assert [g.kind for g in mb._plan] == ["depth-masked"]
    cfg = configs(len(models), "adam")
    opt = MixedOptimizer(mb, torch.optim.Adam, cfg)
    batches = make_batches(len(models), 20)
    train_mixed(mb, opt, batches)
    assert_same_models(mb, train_one_by_one(models, torch.optim.Adam, cfg, batches))
    # The blocks a model does not have: weights, moments all exactly 0.
    assert assert_padding_zero(mb, opt) > 0


@pytest.mark.parametrize(
    "specs",
    [
        [(4, 1), (10, 3), (7, 2), (10, 1), (5, 3), (10, 2)],
        # The widest model is the shallowest: the gated blocks are padded to its width.
        [(12, 1), (6, 3), (8, 2), (6, 3)],
    ],
)
def test_width_and_depth_with_clipping_as_alone(specs: list[tuple[int, int]]) -> None:
    models = make(specs)
    mb = MixedBatch(models, max_waste=1.0)
    assert [g.kind for g in mb._plan] == ["padded + depth-masked"]
    cfg = configs(len(models), "adamw")
    opt = MixedOptimizer(mb, torch.optim.AdamW, cfg)
    batches = make_batches(len(models), 20)
    train_mixed(mb, opt, batches, max_norm=0.3)

    refs = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.AdamW(m.parameters(), **c) for m, c in zip(refs, cfg)]
    for x, y in batches:
        for i, (m, o) in enumerate(zip(refs, opts)):
            o.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.3)
            o.step()
    assert_same_models(mb, refs)
    assert assert_padding_zero(mb, opt) > 0


def test_grouping_of_different_classes_as_alone() -> None:
    torch.manual_seed(0)
    models: list[nn.Module] = [mlp(8, 2), Tower(5), mlp(8, 2), Tower(7), Tower(5), mlp(4, 1)]
    mb = MixedBatch(models, max_waste=0.0)
    assert len(mb._plan) == 4  # mlp(8,2) x2, Tower(5) x2, Tower(7), mlp(4,1)
    assert {g.kind for g in mb._plan} == {"stacked"}
    cfg = configs(len(models), "adam")
    opt = MixedOptimizer(mb, torch.optim.Adam, cfg)
    batches = make_batches(len(models), 20)
    train_mixed(mb, opt, batches)
    assert_same_models(mb, train_one_by_one(models, torch.optim.Adam, cfg, batches))


def test_conv_channels_padded_as_alone() -> None:
    torch.manual_seed(0)

    def net(c: int) -> nn.Sequential:
        return nn.Sequential(
            # No bias before BatchNorm: its gradient is rounding noise that Adam would amplify.
            nn.Conv2d(1, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.Sigmoid(),
            nn.Conv2d(c, c, 3),
            nn.Flatten(),
            nn.Linear(c * 4 * 4, CLASSES),
        )

    models = [net(c) for c in (2, 5, 3, 5)]
    mb = MixedBatch(models, max_waste=1.0)
    assert [g.kind for g in mb._plan] == ["padded"]
    cfg = configs(len(models), "adam")
    opt = MixedOptimizer(mb, torch.optim.Adam, cfg)
    g = torch.Generator().manual_seed(3)
    batches = [
        (
            torch.randn(len(models), BATCH, 1, 6, 6, generator=g),
            torch.randint(0, CLASSES, (len(models), BATCH), generator=g),
        )
        for _ in range(10)
    ]
    train_mixed(mb, opt, batches)
    refs = train_one_by_one(models, torch.optim.Adam, cfg, batches)
    assert_same_models(mb, refs)  # BatchNorm running stats included
    assert assert_padding_zero(mb, opt) > 0


def test_forward_in_user_order_equals_each_model() -> None:
    models = make([(4, 1), (9, 2), (4, 1), (6, 3), (16, 1)])
    x = torch.randn(BATCH, IN)
    for max_waste in (0.0, 0.4, 1.0):
        mb = MixedBatch(models, max_waste=max_waste)
        out = mb(x)
        assert out.shape == (5, BATCH, CLASSES)
        for i, m in enumerate(models):
            torch.testing.assert_close(out[i], m(x), rtol=1e-6, atol=1e-6)


def test_one_loss_vector_and_one_backward() -> None:
    models = make([(4, 1), (9, 2), (4, 1)])
    mb = MixedBatch(models, max_waste=0.0)
    x, y = torch.randn(BATCH, IN), torch.randint(0, CLASSES, (BATCH,))
    losses = mb.compute_loss(mb(x), y, reduction="none")
    assert losses.shape == (3,)
    for i, m in enumerate(models):
        torch.testing.assert_close(losses[i], F.cross_entropy(m(x), y), rtol=1e-6, atol=1e-6)
    losses.sum().backward()
    assert all(p.grad is not None for p in mb.parameters())
    assert mb.latest_losses is not None and mb.loss_history().shape == (1, 3)


# ---------------------------------------------------------------------- plan


def test_plan_follows_max_waste() -> None:
    models = make([(w, d) for w in (4, 8, 16) for d in (1, 2)])
    assert len(MixedBatch(models, max_waste=0.0)._plan) == 6
    assert len(MixedBatch(models, max_waste=1.0)._plan) == 1
    mid = MixedBatch(models, max_waste=0.5)
    assert 1 < len(mid._plan) < 6
    assert all(g.waste <= 0.5 for g in mid._plan)
    text = mid.plan
    assert "max_waste=0.5" in text and "waste" in text
    assert sorted(i for g in mid._plan for i in g.members) == list(range(6))


def test_identical_models_stack_without_padding() -> None:
    models = make([(8, 2)] * 4)
    mb = MixedBatch(models)
    assert [g.kind for g in mb._plan] == ["stacked"]
    assert mb.padding_masks() == [[]]


def test_forward_that_reads_padding_is_refused() -> None:
    class Center(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x - x.mean(-1, keepdim=True)  # a reduction over the hidden size

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(IN, w), Center(), nn.Linear(w, CLASSES)) for w in (4, 8)]
    mb = MixedBatch(models, max_waste=1.0)
    with pytest.raises(ValueError, match="MixedBatch: padding changes model 0's output"):
        mb(torch.randn(BATCH, IN))
    safe = MixedBatch(models, max_waste=0.0)
    assert safe(torch.randn(BATCH, IN)).shape == (2, BATCH, CLASSES)


def test_different_output_sizes_are_refused_at_first_forward() -> None:
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(IN, 8), nn.ReLU(), nn.Linear(8, k)) for k in (3, 5)]
    mb = MixedBatch(models, max_waste=1.0)
    with pytest.raises(ValueError, match=r"shape \(16, 5\) vs \(16, 3\)"):
        mb(torch.randn(BATCH, IN))
    separate = MixedBatch(models, max_waste=0.0)
    with pytest.raises(
        ValueError, match=r"MixedBatch.forward: model 1 \(Sequential\[8,5\]\) gives"
    ):
        separate(torch.randn(BATCH, IN))
    assert [o.shape[-1] for o in separate.forward_groups(torch.randn(BATCH, IN))] == [3, 5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_waste": 1.5}, "MixedBatch: max_waste must be in"),
        ({"labels": ["a"]}, "MixedBatch: got 1 labels for 2 models"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MixedBatch(make([(4, 1), (8, 1)]), **kwargs)


def test_bad_models() -> None:
    with pytest.raises(ValueError, match="MixedBatch: expected at least one model"):
        MixedBatch([])
    with pytest.raises(TypeError, match="MixedBatch: expected a sequence of models"):
        MixedBatch(Tower(4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MixedOptimizer: got 1 configs for N=2"):
        MixedOptimizer(MixedBatch(make([(4, 1), (8, 1)])), torch.optim.Adam, [{}])


# ---------------------------------------------------------------------- lifecycle, export


def test_retired_models_stand_still_bitwise() -> None:
    models = make([(4, 1), (9, 2), (4, 1), (6, 3)])
    mb = MixedBatch(models, max_waste=1.0)
    opt = MixedOptimizer(mb, torch.optim.Adam, configs(4, "adam"))
    batches = make_batches(4, 3)
    train_mixed(mb, opt, batches[:1])
    before = [mb.model(i).state_dict() for i in range(4)]
    mb.retire([1, 2])
    assert mb.active.tolist() == [True, False, False, True]
    train_mixed(mb, opt, batches[1:])
    after = [mb.model(i).state_dict() for i in range(4)]
    for i in range(4):
        same = all(torch.equal(before[i][k], after[i][k]) for k in before[i])
        assert same == (i in (1, 2))
    mb.activate(1)
    assert mb.active.tolist() == [True, True, False, True]


def test_export_gives_the_users_modules() -> None:
    torch.manual_seed(0)
    models: list[nn.Module] = [mlp(4, 1), Tower(6), mlp(12, 3)]
    mb = MixedBatch(models, max_waste=1.0)
    for i, m in enumerate(models):
        got = mb.model(i)
        assert type(got) is type(m)
        assert [(k, v.shape) for k, v in got.state_dict().items()] == [
            (k, v.shape) for k, v in m.state_dict().items()
        ]
        for k, v in m.state_dict().items():
            assert torch.equal(got.state_dict()[k], v)
    states = mb.get_model_states()
    fresh = mlp(12, 3)
    fresh.load_state_dict(states[2])
    assert mb.labels()[1] == "Tower[6,3]"
    assert mb.summary()[2]["arch"] == "Sequential[12,12,12,3]"


def test_hparams_in_user_order_and_set_hparams() -> None:
    models = make([(4, 1), (9, 2), (4, 1)])
    mb = MixedBatch(models, max_waste=0.0)
    opt = MixedOptimizer(mb, torch.optim.Adam, [{"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3}])
    assert torch.allclose(opt.hparams["lr"], torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    opt.set_hparams([1, 2], lr=0.5)
    assert torch.allclose(opt.hparams["lr"], torch.tensor([0.1, 0.5, 0.5], dtype=torch.float64))


def test_state_dict_round_trip_resumes_exactly() -> None:
    specs = [(4, 1), (10, 3), (7, 2), (10, 1)]
    cfg = configs(4, "adam")
    batches = make_batches(4, 10)

    mb = MixedBatch(make(specs), max_waste=1.0)
    opt = MixedOptimizer(mb, torch.optim.Adam, cfg)
    train_mixed(mb, opt, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": mb.state_dict(), "optimizer": opt.state_dict()}, buffer)
    train_mixed(mb, opt, batches[5:])

    resumed = MixedBatch(make(specs, seed=99), max_waste=1.0)  # other weights, same plan
    resumed_opt = MixedOptimizer(resumed, torch.optim.Adam, cfg)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    train_mixed(resumed, resumed_opt, batches[5:])
    for a, b in zip(mb.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_step_equals_eager_step_on_cuda() -> None:
    specs = [(4, 1), (10, 3), (7, 2), (10, 1), (16, 2)]
    cfg = configs(5, "adam")
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(5, 8)]
    results = []
    for mode in ("eager", "graph"):
        mb = MixedBatch([m.cuda() for m in make(specs)], max_waste=1.0)
        opt = MixedOptimizer(mb, torch.optim.Adam, cfg)
        step = compile_mixed_step(mb, opt, per_model=True, mode=mode)
        for x, y in batches:
            step(x, y)
        assert step.mode == mode
        results.append([mb.model(i).state_dict() for i in range(5)])
    for a, b in zip(*results):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # fused update rounding


def test_reset_models_and_skip_use_global_indices() -> None:
    models = make([(4, 1), (9, 2), (4, 1)])
    mb = MixedBatch(models, max_waste=0.0)
    opt = MixedOptimizer(mb, torch.optim.Adam, [{"lr": 0.1}] * 3)
    train_mixed(mb, opt, make_batches(3, 2))
    opt.reset_models([2, 0], configs=[{"lr": 0.5}, {"lr": 0.7}])
    assert opt.hparams["lr"].tolist() == pytest.approx([0.7, 0.1, 0.5])
    g, j = mb.group_of(2)
    for state in opt.optimizers[g].state.values():
        assert bool((state["exp_avg"][j] == 0).all())
    before = [mb.model(i).state_dict() for i in range(3)]
    x, y = make_batches(3, 1)[0]
    opt.zero_grad()
    mb.compute_loss(mb(x, per_model=True), y, per_model=True).backward()
    opt.step(skip=torch.tensor([False, True, False]))
    after = [mb.model(i).state_dict() for i in range(3)]
    changed = [any(not torch.equal(before[i][k], after[i][k]) for k in before[i]) for i in range(3)]
    assert changed == [True, False, True]


def test_padding_is_zeroed_after_the_update_even_when_it_would_not_stay_zero() -> None:
    # eps=0: Adam's update of a padded element is 0 / 0 = nan; only re-zeroing keeps it 0.
    models = make([(4, 2), (9, 1), (6, 2)])
    mb = MixedBatch(models, max_waste=1.0)
    cfg = [{"lr": 1e-2, "eps": 0.0}] * 3
    opt = MixedOptimizer(mb, torch.optim.Adam, cfg)
    batches = make_batches(3, 5)
    train_mixed(mb, opt, batches)
    for entries in mb.padding_masks():
        for p, pad in entries:
            assert bool((p[pad] == 0).all())
    assert_same_models(mb, train_one_by_one(models, torch.optim.Adam, cfg, batches))
