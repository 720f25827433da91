"""Vectorized optimizers: equivalence with torch.optim, isolation, launch count, state."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from _reference import (
    grad,
    make_batches,
    make_models,
    max_rel_diff,
    snapshot,
    train_batched,
    train_one_by_one,
)
from torch import nn
from torch.optim import SGD, Adagrad, Adam, AdamW, RMSprop
from torch.optim.lr_scheduler import LRScheduler

from modelbatch import ModelBatch
from modelbatch.optim import BatchAdam, BatchOptimizer, OptimizerFactory

N, STEPS, TOL = 5, 30, 1e-5

# The tensors here are tiny: intra-op threads only add contention on a shared machine.
torch.set_num_threads(1)

# Every model differs from the others in every hyperparameter that applies.
VECTORIZED_CASES = [
    pytest.param(
        SGD,
        [
            {"lr": 0.1},
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "weight_decay": 1e-2},
            {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
            {"lr": 0.01, "momentum": 0.3, "maximize": True},
        ],
        id="SGD",
    ),
    pytest.param(
        Adam,
        [
            {"lr": 1e-2},
            {"lr": 3e-3, "betas": (0.8, 0.99)},
            {"lr": 1e-3, "amsgrad": True, "weight_decay": 0.1},
            {"lr": 5e-3, "eps": 1e-3, "maximize": True},
            {"lr": 2e-2, "betas": (0.5, 0.9), "amsgrad": True, "eps": 1e-6},
        ],
        id="Adam",
    ),
    pytest.param(
        AdamW,
        [
            {"lr": 1e-2},
            {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.8, 0.95)},
            {"lr": 1e-3, "amsgrad": True, "weight_decay": 0.0},
            {"lr": 5e-3, "maximize": True, "eps": 1e-4},
            {"lr": 2e-2, "betas": (0.5, 0.9), "weight_decay": 0.5},
        ],
        id="AdamW",
    ),
    pytest.param(
        RMSprop,
        [
            {"lr": 1e-2},
            {"lr": 3e-3, "centered": True, "alpha": 0.9},
            {"lr": 1e-3, "momentum": 0.9, "eps": 1e-6},
            {"lr": 2e-3, "alpha": 0.8, "centered": True, "momentum": 0.5, "weight_decay": 0.1},
            {"lr": 1e-3, "maximize": True, "eps": 1e-4},
        ],
        id="RMSprop",
    ),
    pytest.param(
        Adagrad,
        [
            {"lr": 0.1},
            {"lr": 0.03, "lr_decay": 0.01},
            {"lr": 0.1, "initial_accumulator_value": 0.5},
            {"lr": 0.05, "weight_decay": 0.1, "eps": 1e-3},
            {"lr": 0.01, "maximize": True, "lr_decay": 0.1},
        ],
        id="Adagrad",
    ),
    pytest.param(
        torch.optim.Adamax,
        [
            {"lr": 1e-2, "weight_decay": 1e-2},
            {"lr": 2e-3, "betas": (0.8, 0.99)},
            {"lr": 5e-3, "maximize": True},
            {"lr": 1e-2, "eps": 1e-4},
            {"lr": 3e-2},
        ],
        id="Adamax",
    ),
    pytest.param(
        torch.optim.NAdam,
        [
            {"lr": 5e-3},
            {"lr": 1e-2, "momentum_decay": 0.01},
            {"lr": 2e-3, "weight_decay": 0.1},
            {"lr": 1e-3, "betas": (0.7, 0.95), "maximize": True},
            {"lr": 4e-3, "eps": 1e-5},
        ],
        id="NAdam",
    ),
    pytest.param(
        torch.optim.RAdam,
        [
            {"lr": 1e-2},
            {"lr": 3e-3, "betas": (0.8, 0.9)},
            {"lr": 1e-3, "weight_decay": 0.1},
            {"lr": 5e-3, "maximize": True},
            {"lr": 2e-2, "eps": 1e-4},
        ],
        id="RAdam",
    ),
    pytest.param(
        torch.optim.ASGD,
        [
            {"lr": 1e-2},
            {"lr": 3e-2, "lambd": 1e-3},
            {"lr": 1e-2, "t0": 3},
            {"lr": 5e-3, "alpha": 0.5, "weight_decay": 0.1},
            {"lr": 2e-2, "maximize": True},
        ],
        id="ASGD",
    ),
    pytest.param(
        torch.optim.Adadelta,
        [
            {"lr": 0.5},
            {"lr": 1.0, "rho": 0.8},
            {"lr": 0.3, "eps": 1e-4},
            {"lr": 0.5, "weight_decay": 0.1},
            {"lr": 1.0, "maximize": True},
        ],
        id="Adadelta",
    ),
    pytest.param(
        torch.optim.Rprop,
        [
            {"lr": 1e-3},
            {"lr": 1e-2, "etas": (0.3, 1.5)},
            {"lr": 2e-3, "step_sizes": (1e-5, 0.1)},
            {"lr": 1e-3, "maximize": True},
            {"lr": 5e-3},
        ],
        id="Rprop",
    ),
]

ALL_CASES = [
    *VECTORIZED_CASES,
    pytest.param(
        Adam,
        [
            {"lr": 1e-3 * (i + 1), "weight_decay": 0.1 * i, "decoupled_weight_decay": True}
            for i in range(N)
        ],
        id="Adam-decoupled",
    ),
]


def _build(
    cls: type[torch.optim.Optimizer], configs: Sequence[Mapping[str, Any]], seed: int = 0
) -> tuple[ModelBatch, Any]:
    # Any: a BatchOptimizer, or a torch optimizer masked by the factory (both have
    # hparams, reset_models and step(skip=...)).
    mb = ModelBatch(make_models(N, seed))
    return mb, OptimizerFactory(cls).create_optimizer(mb, configs)


# ---------------------------------------------------------------------- equivalence


# fp32 to the suite's multi-step tolerance; fp64 shows the math is the same, not just close.
DTYPES = [
    pytest.param(torch.float32, TOL, id="fp32"),
    pytest.param(torch.float64, 1e-12, id="fp64"),
]


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
@pytest.mark.parametrize(("cls", "configs"), ALL_CASES)
def test_matches_torch_one_by_one(cls, configs, dtype, tol):
    models, batches = make_models(N, dtype=dtype), make_batches(N, STEPS, dtype=dtype)
    reference = train_one_by_one(models, cls, configs, batches)
    mb = ModelBatch(models)
    opt = OptimizerFactory(cls).create_optimizer(mb, configs)
    train_batched(mb, opt, batches)
    assert mb.stacked_params()["0.weight"].dtype == dtype
    assert max_rel_diff(mb, reference) <= tol
    # the run moved the weights, so the comparison above can fail
    assert max_rel_diff(mb, models) > 1e-3


@pytest.mark.parametrize(("cls", "configs"), VECTORIZED_CASES)
def test_gradient_accumulation(cls, configs):
    models, batches = make_models(N), make_batches(N, 10)
    reference = train_one_by_one(models, cls, configs, batches, accumulate=2)
    mb, opt = _build(cls, configs)
    train_batched(mb, opt, batches, accumulate=2)
    assert max_rel_diff(mb, reference) <= TOL


def test_hparams_changed_mid_training_take_effect():
    configs = [{"lr": 1e-2 * (i + 1), "betas": (0.9, 0.999)} for i in range(N)]
    models, batches = make_models(N), make_batches(N, 20)

    def change_reference(t, opts):
        if t == 10:
            opts[2].param_groups[0]["lr"] = 0.1
            opts[3].param_groups[0]["betas"] = (0.5, 0.9)
            opts[0].param_groups[0]["weight_decay"] = 0.2

    def change_batched(t, opt):
        if t == 10:
            opt.hparams["lr"][2] = 0.1
            opt.set_hparams(3, betas=(0.5, 0.9))
            opt.set_hparams([0], weight_decay=0.2)

    reference = train_one_by_one(models, Adam, configs, batches, change_reference)
    mb, opt = _build(Adam, configs)
    train_batched(mb, opt, batches, change_batched)
    assert max_rel_diff(mb, reference) <= TOL


@pytest.mark.parametrize(
    "factor", [lambda t: 0.9**t, lambda t: min(1.0, t / 5)], ids=["decay", "warmup-from-0"]
)
@pytest.mark.parametrize(("cls", "configs"), VECTORIZED_CASES)
def test_torch_lr_scheduler_scales_every_models_lr(cls, configs, factor):
    models, batches = make_models(N), make_batches(N, 15)
    ref_scheds: list[torch.optim.lr_scheduler.LRScheduler] = []

    def ref_hook(t, opts):
        if t == 0:
            ref_scheds.extend(torch.optim.lr_scheduler.LambdaLR(o, factor) for o in opts)
        else:
            for s in ref_scheds:
                s.step()

    reference = train_one_by_one(models, cls, configs, batches, ref_hook)
    mb, opt = _build(cls, configs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    train_batched(mb, opt, batches, lambda t, o: sched.step() if t > 0 else None)
    assert opt.param_groups[0]["lr"] == pytest.approx(factor(14))
    assert max_rel_diff(mb, reference) <= TOL


@pytest.mark.parametrize(("cls", "configs"), VECTORIZED_CASES)
def test_reset_models_matches_a_fresh_optimizer(cls, configs):
    models, batches = make_models(N), make_batches(N, 16)
    new_config = {"lr": 0.02}

    def ref_hook(t, opts):
        if t == 8:
            opts[1] = cls(opts[1].param_groups[0]["params"], **new_config)

    reference = train_one_by_one(models, cls, configs, batches, ref_hook)
    mb, opt = _build(cls, configs)
    train_batched(
        mb, opt, batches, lambda t, o: o.reset_models([1], [new_config]) if t == 8 else None
    )
    assert max_rel_diff(mb, reference) <= TOL


def test_model_batch_builds_through_the_factory():
    lrs = [0.1, 0.05, 0.02, 0.01, 0.2]
    models, batches = make_models(N), make_batches(N, 10)
    configs = [{"lr": lr, "momentum": 0.9, "nesterov": True} for lr in lrs]
    reference = train_one_by_one(models, SGD, configs, batches)
    mb = ModelBatch(
        models,
        lr_list=lrs,
        optimizer_cls=SGD,
        optimizer_kwargs={"momentum": 0.9, "nesterov": True},
    )
    assert isinstance(mb.optimizer, BatchOptimizer)
    assert torch.equal(mb.optimizer.hparams["lr"], torch.tensor(lrs, dtype=torch.float64))
    for x, y in batches:
        mb.zero_grad()
        mb.compute_loss(mb(x, per_model=True), y, per_model=True).backward()
        mb.step()
    assert max_rel_diff(mb, reference) <= TOL
    with pytest.raises(ValueError, match="not both"):
        ModelBatch(models, lr_list=lrs, optimizer_cls=SGD, optimizer_kwargs={"lr": 0.1})


# ---------------------------------------------------------------------- isolation (bitwise)


def _others_equal(a, b, k):
    for name in a:
        if name.startswith("p."):
            keep = [i for i in range(N) if i != k]
            assert torch.equal(a[name][keep], b[name][keep]), name


@pytest.mark.parametrize(("cls", "configs"), VECTORIZED_CASES)
def test_nan_inputs_of_one_model_leave_the_others_bitwise_unchanged(cls, configs):
    batches, k = make_batches(N, 8), 2
    poisoned = [(x.clone(), y) for x, y in batches]
    for x, _ in poisoned[3:]:
        x[k] = float("nan")
    runs = []
    for data in (batches, poisoned):
        mb, opt = _build(cls, configs)
        train_batched(mb, opt, data)
        runs.append(snapshot(mb))
    assert torch.isnan(runs[1]["p.0.weight"][k]).all()
    _others_equal(runs[0], runs[1], k)


@pytest.mark.parametrize(("cls", "configs"), VECTORIZED_CASES)
def test_huge_lr_of_one_model_leaves_the_others_bitwise_unchanged(cls, configs):
    batches, k = make_batches(N, 8), 1
    huge = copy.deepcopy(configs)
    huge[k]["lr"] = 1e30
    runs = []
    for cfgs in (configs, huge):
        mb, opt = _build(cls, cfgs)
        train_batched(mb, opt, batches)
        runs.append(snapshot(mb))
    assert not torch.equal(runs[0]["p.0.weight"][k], runs[1]["p.0.weight"][k])
    _others_equal(runs[0], runs[1], k)


@pytest.mark.parametrize("how", ["retire", "skip"])
@pytest.mark.parametrize(("cls", "configs"), ALL_CASES)
def test_held_model_is_bitwise_frozen_even_with_nan_grads(cls, configs, how):
    batches, k = make_batches(N, 8), 3
    free_mb, free_opt = _build(cls, configs)
    train_batched(free_mb, free_opt, batches)
    free = snapshot(free_mb)

    mb, opt = _build(cls, configs)
    held_at = 0 if how == "retire" and cls in (torch.optim.Rprop, Adagrad) else 4
    frozen: dict[str, torch.Tensor] = {}
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        mb.compute_loss(mb(x, per_model=True), y, per_model=True).backward()
        skip = None
        if t >= held_at:
            for p in mb.parameters():
                grad(p)[k] = float("nan")
            if how == "retire":
                mb.retire(k)
            else:
                skip = torch.zeros(N, dtype=torch.bool)
                skip[k] = True
            if not frozen:
                frozen = {key: v[k].clone() for key, v in snapshot(mb, opt).items()}
        opt.step(skip=skip)
    after = snapshot(mb, opt)
    for key, v in frozen.items():
        assert torch.equal(after[key][k], v), key
    _others_equal(free, after, k)


# ---------------------------------------------------------------------- launch count


def _ops_in_one_step(cls, configs, n):
    torch.manual_seed(0)
    mb = ModelBatch(make_models(n))
    opt = OptimizerFactory(cls).create_optimizer(mb, [configs[i % len(configs)] for i in range(n)])
    x = torch.randn(n, 4, 6)
    y = torch.randint(0, 3, (n, 4))
    for _ in range(2):  # the first step creates the state
        opt.zero_grad()
        mb.compute_loss(mb(x, per_model=True), y, per_model=True).backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
    return [e.name for e in prof.events()]


@pytest.mark.parametrize(("cls", "configs"), ALL_CASES)
def test_operator_count_does_not_depend_on_n(cls, configs):
    small, large = _ops_in_one_step(cls, configs, 8), _ops_in_one_step(cls, configs, 512)
    assert len(small) > 0
    assert sorted(small) == sorted(large)


# ---------------------------------------------------------------------- state dict


@pytest.mark.parametrize(("cls", "configs"), VECTORIZED_CASES)
def test_state_dict_round_trip_continues_bitwise(cls, configs):
    batches = make_batches(N, 20)
    mb, opt = _build(cls, configs)
    train_batched(mb, opt, batches[:10])
    weights = copy.deepcopy(mb.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    train_batched(mb, opt, batches[10:])
    uninterrupted = snapshot(mb, opt)

    other = list(reversed(configs))  # the loaded values must replace these
    mb2, opt2 = _build(cls, other, seed=7)
    live = {k: v for k, v in opt2.hparams.items()}
    mb2.load_state_dict(weights)
    opt2.load_state_dict(saved)
    for key, t in opt2.hparams.items():
        assert t is live[key]  # loaded in place
        assert torch.equal(t, saved["param_groups"][0]["hparams"][key])
    train_batched(mb2, opt2, batches[10:])
    resumed = snapshot(mb2, opt2)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_state_dict_of_another_size_is_refused():
    _, opt = _build(Adam, [{}] * N)
    mb3 = ModelBatch(make_models(3))
    opt3 = OptimizerFactory(Adam).create_optimizer(mb3)
    with pytest.raises(ValueError, match=r"BatchAdam.load_state_dict: .*same optimizer class"):
        opt3.load_state_dict(opt.state_dict())


# ---------------------------------------------------------------------- layout and API


def test_hparams_live_in_the_param_group():
    configs = [{"lr": 0.1 * (i + 1), "betas": (0.9, 0.99 - 0.01 * i)} for i in range(N)]
    _, opt = _build(Adam, configs)
    group = opt.param_groups[0]
    assert isinstance(opt, BatchAdam) and isinstance(opt, BatchOptimizer)
    assert opt.hparams is group["hparams"]
    assert group["lr"] == 1.0
    assert opt.hparams["betas"].shape == (N, 2)
    assert opt.hparams["amsgrad"].dtype == torch.bool
    assert opt.hparams["lr"].tolist() == pytest.approx([0.1 * (i + 1) for i in range(N)])


def test_unused_fused_and_foreach_options_are_accepted():
    _, opt = _build(Adam, [{"lr": 1e-3, "foreach": True, "fused": False}] * N)
    assert isinstance(opt, BatchAdam)


@pytest.mark.parametrize(
    ("cls", "configs", "error", "message"),
    [
        (Adam, [{"lr": 0.1}] * 3 + [{"lr": -0.1}] + [{}], ValueError,
         r"^OptimizerFactory: config 3 has lr=-0.1; expected lr >= 0\.$"),
        (Adam, [{"lr": math.nan}] + [{}] * 4, ValueError, r"config 0 has lr=nan"),
        (Adam, [{}] * 4 + [{"betas": (0.9, 1.5)}], ValueError,
         r"config 4 has betas=\(0.9, 1.5\); expected 0 <= beta < 1"),
        (SGD, [{}, {"nesterov": True}] + [{}] * 3, ValueError,
         r"config 1 has nesterov=True, momentum=0.0, dampening=0.0; expected momentum > 0"),
        (Adam, [{"lr_typo": 1.0}] + [{}] * 4, ValueError,
         r"config 0 has unknown keys \['lr_typo'\]; accepted keys are \[.*'betas'"),
        (Adam, [{"amsgrad": "yes"}] + [{}] * 4, TypeError, r"config 0 has amsgrad='yes'; expected True or False"),
        (Adam, [{}] * 3, ValueError, r"got 3 configs for N=5 models"),
        (Adam, [{"decoupled_weight_decay": True}] + [{}] * 4, ValueError,
         r"decoupled_weight_decay must be the same for every model"),
        (Adam, [{"differentiable": True}] * 5, ValueError, r"differentiable=True is not supported"),
        (SGD, [{"dampening": math.nan}] + [{}] * 4, ValueError, r"config 0 has dampening=nan"),
        (SGD, [{}] * 4 + [{"dampening": -0.5}], ValueError,
         r"config 4 has dampening=-0.5; expected 0 <= dampening <= 1"),
        (torch.optim.Rprop, [{"etas": (1.2, 0.5)}] + [{}] * 4, ValueError,
         r"config 0 has etas=\(1.2, 0.5\); expected 0 < etaminus < 1 < etaplus"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused_clearly(cls, configs, error, message):
    mb = ModelBatch(make_models(N))
    with pytest.raises(error, match=message):
        OptimizerFactory(cls).create_optimizer(mb, configs)


@pytest.mark.parametrize("name", ["LBFGS", "Adafactor", "Muon", "SparseAdam"])
def test_non_separable_optimizers_are_refused(name):
    if not hasattr(torch.optim, name):
        pytest.skip(f"torch.optim.{name} does not exist in this torch")
    with pytest.raises(
        ValueError, match=rf"^OptimizerFactory: torch.optim.{name} is not supported: "
    ):
        OptimizerFactory(getattr(torch.optim, name))


def test_unknown_optimizer_classes_are_refused():
    class Custom(torch.optim.SGD):
        pass

    with pytest.raises(ValueError, match="cannot tell whether Custom updates each element"):
        OptimizerFactory(Custom)
    with pytest.raises(TypeError, match=r"expected a torch\.optim\.Optimizer class"):
        OptimizerFactory(torch.optim.Adam([torch.zeros(1, requires_grad=True)]))  # type: ignore[arg-type]


def test_set_hparams_is_validated():
    _, opt = _build(Adam, [{}] * N)
    with pytest.raises(
        ValueError, match=r"^BatchAdam.set_hparams: model 2 has lr=-1.0; expected lr >= 0"
    ):
        opt.set_hparams(2, lr=-1.0)
    assert float(opt.hparams["lr"][2]) == 1e-3  # unchanged
    with pytest.raises(ValueError, match="created without the state amsgrad needs"):
        opt.set_hparams(0, amsgrad=True)
    with pytest.raises(ValueError, match=r"unknown hyperparameters \['momentum'\]"):
        opt.set_hparams(0, momentum=0.9)
    with pytest.raises(IndexError, match=r"model indices must be in \[0, 5\)"):
        opt.set_hparams(7, lr=0.1)


def test_skip_of_the_wrong_shape_is_refused():
    mb, opt = _build(SGD, [{"lr": 0.1}] * N)
    x, y = make_batches(N, 1)[0]
    mb.compute_loss(mb(x, per_model=True), y, per_model=True).backward()
    with pytest.raises(ValueError, match=r"BatchSGD.step: skip must be a \[N=5\] bool tensor"):
        opt.step(skip=torch.zeros(3, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hparams_follow_the_model_batch_to_the_gpu():
    configs = [{"lr": 1e-2 * (i + 1), "amsgrad": i % 2 == 0} for i in range(N)]
    batches = make_batches(N, 6)
    mb_cpu, opt_cpu = _build(Adam, configs)
    train_batched(mb_cpu, opt_cpu, batches)
    mb, opt = _build(Adam, configs)
    train_batched(mb, opt, batches[:3])
    mb.to("cuda")
    lr = opt.hparams["lr"]
    train_batched(mb, opt, [(x.cuda(), y.cuda()) for x, y in batches[3:]])
    assert opt.hparams["lr"] is lr and lr.device.type == "cuda"
    for name, p in mb.stacked_params().items():
        torch.testing.assert_close(p.cpu(), mb_cpu.stacked_params()[name], rtol=1e-4, atol=1e-5)


def test_step_hooks_run_once():
    mb, opt = _build(torch.optim.Adadelta, [{}] * N)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    x, y = make_batches(N, 1)[0]
    mb.compute_loss(mb(x, per_model=True), y, per_model=True).backward()
    before = snapshot(mb)
    opt.step()
    assert calls == [1]
    assert not torch.equal(before["p.0.weight"], mb.stacked_params()["0.weight"])


def test_param_groups_share_per_model_hparams_and_scale_by_their_own_factor():
    configs: list[dict[str, Any]] = [
        {"lr": 1e-2 * (i + 1), "betas": (0.9 - 0.1 * i, 0.999)} for i in range(N)
    ]
    models, batches = make_models(N), make_batches(N, 10)
    reference = [copy.deepcopy(m) for m in models]
    ref_opts = [
        Adam(
            [
                {"params": m[0].parameters()},
                {"params": m[2].parameters(), "lr": 0.5 * cfg["lr"]},
            ],
            **cfg,
        )
        for m, cfg in zip(reference, configs)
    ]
    for x, y in batches:
        for i, (m, ref_opt) in enumerate(zip(reference, ref_opts)):
            ref_opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[i]), y[i]).backward()
            ref_opt.step()
    mb = ModelBatch(models)
    params = mb.stacked_params()
    groups = [
        {"params": [params["0.weight"], params["0.bias"]]},
        {"params": [params["2.weight"], params["2.bias"]], "lr": 0.5},
    ]
    opt = BatchAdam(groups, configs, model_batch=mb)
    assert opt.param_groups[1]["hparams"]["lr"] is not opt.hparams["lr"]
    train_batched(mb, opt, batches)
    assert max_rel_diff(mb, reference) <= TOL


def test_tensor_lr_factor_works_like_a_float():
    # A 0-dim tensor factor lets a torch scheduler change the lr of a captured step (fill_).
    configs = [{"lr": 1e-2 * (i + 1)} for i in range(N)]
    batches = make_batches(N, 5)
    runs = []
    for factor in (1.0, torch.tensor(1.0)):
        mb, opt = _build(Adam, configs)
        opt.param_groups[0]["lr"] = factor
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)

        def step_after_first(t: int, o: torch.optim.Optimizer, s: LRScheduler = sched) -> None:
            if t > 0:
                s.step()

        train_batched(mb, opt, batches, step_after_first)
        runs.append(snapshot(mb, opt))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


class _TwoHeads(nn.Module):
    """A shared trunk and two heads; each step trains one head (the other gets no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)])
        self.head = 0

    def forward(self, x):
        return self.heads[self.head](torch.tanh(self.trunk(x)))


@pytest.mark.parametrize(("cls", "configs"), ALL_CASES)
def test_parameters_without_gradient_keep_state_and_step_count_like_torch(cls, configs):
    # torch.optim skips a parameter with no gradient and counts steps per parameter, so
    # bias correction, momentum start and lr decay of each head count only its own steps.
    torch.manual_seed(0)
    models = [_TwoHeads() for _ in range(N)]
    batches = make_batches(N, 12)
    heads = [0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0]
    reference = []
    for i, m in enumerate(models):
        m = copy.deepcopy(m)
        opt = cls(m.parameters(), **configs[i])
        for (x, y), head in zip(batches, heads):
            m.head = head
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x[i]), y[i]).backward()
            opt.step()
        reference.append(m)
    mb = ModelBatch(copy.deepcopy(models))
    opt = OptimizerFactory(cls).create_optimizer(mb, configs)
    skeleton = mb.skeleton
    assert isinstance(skeleton, _TwoHeads)
    for (x, y), head in zip(batches, heads):
        skeleton.head = head
        opt.zero_grad(set_to_none=True)
        mb.compute_loss(mb(x, per_model=True), y, per_model=True).backward()
        opt.step()
    assert max_rel_diff(mb, reference) <= TOL
    rows = opt.param_groups[0]["step"]
    assert rows.shape == (6, N)  # trunk weight/bias, head 0 weight/bias, head 1 weight/bias
    assert rows[:, 0].tolist() == [
        12,
        12,
        heads.count(0),
        heads.count(0),
        heads.count(1),
        heads.count(1),
    ]


def test_optimizer_holds_no_strong_reference_to_the_model_batch():
    import gc
    import weakref

    mb, opt = _build(Adam, [{}] * N)
    ref = weakref.ref(mb)
    del mb
    gc.collect()
    assert ref() is None
    assert opt.num_models == N


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("cls", "configs"), ALL_CASES)
def test_cuda_kernels_match_torch_and_the_torch_path(cls, configs, monkeypatch):
    from modelbatch.optim import _kernels

    models, batches = make_models(N), make_batches(N, 12)
    reference = train_one_by_one(models, cls, configs, batches)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(_kernels, "ENABLED", enabled)
        mb = ModelBatch(copy.deepcopy(models)).cuda()
        opt = OptimizerFactory(cls).create_optimizer(mb, configs)
        held = None
        for t, (x, y) in enumerate(batches):
            opt.zero_grad()
            mb.compute_loss(mb(x.cuda(), per_model=True), y.cuda(), per_model=True).backward()
            if t == 8:
                mb.retire(3)
                held = snapshot(mb, opt)
            if t >= 8:
                for p in mb.parameters():
                    grad(p)[3] = float("nan")
            opt.step()
        after = snapshot(mb, opt)
        assert held is not None
        for key in held:
            assert torch.equal(after[key][3], held[key][3]), key
        assert opt.param_groups[0]["step"][:, 3].tolist() == [8.0] * 4
        runs.append(mb.cpu())
    kernel, torch_path = runs
    # Against torch one by one (model 3 was retired): the GPU's batched matmuls sum in
    # another order than the CPU's, so the GPU tier of the tolerance.
    for i in (0, 1, 2, 4):
        for (k, a), b in zip(
            reference[i].state_dict().items(), kernel.model(i).state_dict().values()
        ):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
    assert max_rel_diff(kernel, [torch_path.model(i) for i in range(N)]) <= 1e-5


def test_fixed_hparams_of_a_group_survive_set_hparams_and_reset():
    # HF Trainer's no-decay group: biases keep weight decay 0 whatever a model's config says.
    mb = ModelBatch(make_models(N))
    weights = [p for n, p in mb.stacked_params().items() if n.endswith("weight")]
    biases = [p for n, p in mb.stacked_params().items() if n.endswith("bias")]
    groups = [{"params": weights}, {"params": biases, "fixed_hparams": {"weight_decay": 0.0}}]
    opt = BatchAdam(groups, [{"weight_decay": 0.1 * (i + 1)} for i in range(N)], model_batch=mb)
    decay, no_decay = (g["hparams"]["weight_decay"] for g in opt.param_groups)
    assert decay.tolist() == pytest.approx([0.1 * (i + 1) for i in range(N)])
    assert no_decay.tolist() == [0.0] * N
    opt.set_hparams([1, 2], weight_decay=0.5)
    opt.reset_models([3], [{"weight_decay": 0.7}])
    assert decay[[1, 2, 3]].tolist() == [0.5, 0.5, 0.7]
    assert no_decay.tolist() == [0.0] * N
    with pytest.raises(ValueError, match=r"fixed_hparams has unknown keys \['momentum'\]"):
        BatchAdam([{"params": biases, "fixed_hparams": {"momentum": 0.9}}], [{}] * N)


def test_kernel_layout_takes_dense_model_major_tensors_and_gives_their_alignment():
    from modelbatch.optim._executor import ParamSlot
    from modelbatch.optim._kernels import kernel_layout

    def slot(p, g=None, state=None, low=None):
        g = torch.zeros_like(p) if g is None else g
        state = {"exp_avg": torch.zeros_like(p)} if state is None else state
        return ParamSlot(0, p, g, state, low)

    p = torch.zeros(4, 6, 8)  # 48 elements per model
    assert kernel_layout(slot(p), 4) == 4
    # A bf16 gradient and copy: 8 elements make 16 bytes.
    assert kernel_layout(slot(p, g=torch.zeros(4, 6, 8, dtype=torch.bfloat16)), 4) == 8
    odd = torch.zeros(4, 5, 4)  # 20 elements per model: a multiple of 4, not of 8
    assert kernel_layout(slot(odd), 4) == 4
    assert kernel_layout(slot(odd, low=torch.zeros(4, 5, 4, dtype=torch.bfloat16)), 4) == 1
    # A gradient one element into its buffer: not 16-byte aligned.
    shifted = torch.zeros(4 * 48 + 1)[1:].view(4, 6, 8)
    assert kernel_layout(slot(p, g=shifted), 4) == 1
    # What the kernel cannot take: float64, state in another dtype, other strides,
    # the model axis not outermost, no elements.
    assert kernel_layout(slot(p.double()), 4) is None
    assert kernel_layout(slot(p, state={"exp_avg": torch.zeros(4, 6, 8).double()}), 4) is None
    strided = torch.zeros(4, 8, 6).transpose(1, 2)
    assert kernel_layout(slot(p, g=strided), 4) is None
    inner = torch.zeros(6, 4, 8).transpose(0, 1)
    assert kernel_layout(slot(inner), 4) is None
    assert kernel_layout(slot(torch.zeros(4, 0)), 4) is None
