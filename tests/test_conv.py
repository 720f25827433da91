"""Convolutions over the model axis: every lowering against the models run one by one."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _reference import grad, max_rel_diff, rel_err
from torch import nn

from modelbatch import ModelBatch
from modelbatch.nn import Conv1d, Conv2d, Conv3d, _conv, conv_lowering
from modelbatch.optim import OptimizerFactory

N = 3
FORWARD_RTOL = 1e-6
GRAD_RTOL = 1e-5
LOWERINGS = ["auto", "dense", "dense_cl", "grouped", "grouped_cl", "bmm", "bmm_cl"]


def net(nd: int) -> nn.Module:
    """Two convolutions of `nd` dims: stride, dilation, 'same' (asymmetric), no bias."""
    conv: Callable[..., nn.Module] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
    k = (3, 2, 3)[:nd]
    return nn.Sequential(
        conv(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        conv(4, 3, k, padding="same", dilation=2, bias=False),
        nn.ReLU(),
        conv(3, 5, 1, padding="valid"),
    )


SPATIAL = {1: (13,), 2: (9, 11), 3: (5, 6, 7)}


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("per_model", [False, True], ids=["shared", "per_model"])
def test_every_lowering_equals_models_one_by_one(lowering: str, nd: int, per_model: bool) -> None:
    torch.manual_seed(nd)
    models = [net(nd) for _ in range(N)]
    mb = ModelBatch(models)
    assert isinstance(mb.skeleton, nn.Sequential)
    assert type(mb.skeleton[0]) is (Conv1d, Conv2d, Conv3d)[nd - 1]
    x = torch.randn(N, 4, 2, *SPATIAL[nd]) if per_model else torch.randn(4, 2, *SPATIAL[nd])
    with conv_lowering(lowering):
        out = mb(x, per_model=per_model)
    weight = torch.randn_like(out)  # a different gradient for every output element
    (out * weight).sum().backward()
    grads = {name: grad(p) for name, p in mb.stacked_params().items()}
    for i, model in enumerate(models):
        own = model(x[i] if per_model else x)
        assert rel_err(out[i], own) <= FORWARD_RTOL, f"model {i} forward"
        (own * weight[i]).sum().backward()
        for name, p in model.named_parameters():
            assert rel_err(grads[name][i], grad(p)) <= GRAD_RTOL, f"model {i} grad {name}"


@pytest.mark.parametrize("lowering", ["dense", "grouped", "bmm"])
def test_input_gradient_and_unbatched_input(lowering: str) -> None:
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=(2, 1), stride=(1, 2))) for _ in range(N)]
    mb = ModelBatch(models)
    x = torch.randn(3, 8, 7, requires_grad=True)  # one example without a batch axis
    with conv_lowering(lowering):
        out = mb(x)
    weight = torch.randn_like(out)
    (gx,) = torch.autograd.grad((out * weight).sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref = sum((m(x_ref) * weight[i]).sum() for i, m in enumerate(models))
    (gx_ref,) = torch.autograd.grad(ref, x_ref)
    assert out.shape == (N, 4, 10, 4)
    assert rel_err(gx, gx_ref) <= GRAD_RTOL


def test_training_with_adam_equals_one_by_one() -> None:
    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 2 * 2, 3),
        )

    models = [make() for _ in range(N)]
    ref = [copy.deepcopy(m) for m in models]
    lrs = [1e-3, 3e-3, 1e-2]
    mb = ModelBatch(models)
    opt = OptimizerFactory(torch.optim.Adam).create_optimizer(mb, [{"lr": lr} for lr in lrs])
    ref_opts = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(ref, lrs)]
    for _ in range(5):
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
        opt.zero_grad()
        mb.compute_loss(mb(x), y).backward()
        opt.step()
        for m, o in zip(ref, ref_opts):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert max_rel_diff(mb, ref) <= GRAD_RTOL


def test_export_gives_torch_classes_and_fallbacks_are_not_substituted() -> None:
    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1, groups=2),
            nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"),
        )

    models = [make() for _ in range(N)]
    mb = ModelBatch(models)
    assert isinstance(mb.skeleton, nn.Sequential)
    kinds = [type(m) for m in mb.skeleton]
    assert kinds == [Conv2d, nn.Conv2d, nn.Conv2d]
    exported = mb.model(1)
    assert isinstance(exported, nn.Sequential)
    assert [type(m) for m in exported] == [nn.Conv2d] * 3
    x = torch.randn(2, 2, 6, 6)
    assert rel_err(mb(x)[1], models[1](x)) <= FORWARD_RTOL
    assert rel_err(exported(x), models[1](x)) <= FORWARD_RTOL


def test_twin_outside_vmap_is_torch() -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(2, 3, 3, stride=2, padding=1)
    twin = Conv3d.from_torch(conv)
    assert twin.weight is conv.weight
    x = torch.randn(2, 2, 5, 5, 5)
    assert torch.equal(twin(x), conv(x))


def test_function_backward_outside_vmap_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    spec = ((2, 1), ((1, 2), (0, 1)), (1, 2))
    assert torch.autograd.gradcheck(
        lambda x, w, b: _conv._BatchedConv.apply(x, w, b, spec), (x, w, b)
    )


def test_conv_lowering_rejects_unknown_names() -> None:
    with (
        pytest.raises(ValueError, match=r"^modelbatch.nn.conv_lowering: expected one of"),
        conv_lowering("winograd"),
    ):
        pass


def test_measured_choice_is_the_fastest_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timing path (CUDA only) with fake timings: fastest wins beyond the margin, then cached."""
    times = {"dense": 3.0, "dense_cl": 2.0, "grouped": 10.0, "grouped_cl": 9.8, "bmm": 4.0}
    times["bmm_cl"] = 5.0
    calls: list[str] = []

    def fake_time(name: str, *args: object) -> float:
        calls.append(name)
        return times[name]

    monkeypatch.setattr(_conv, "_MEASURED_DEVICES", ("cpu",))
    monkeypatch.setattr(_conv, "_time_candidate", fake_time)
    monkeypatch.setattr(_conv, "_cache", {})
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3)) for _ in range(N)]
    mb = ModelBatch(models)
    x = torch.randn(2, 2, 7, 7)
    out = mb(x)
    assert sorted(calls) == sorted(times)  # dense forms for the shared input, the rest after
    assert sorted(_conv.chosen_lowerings().values()) == ["bmm", "dense_cl"]
    assert rel_err(out[2], models[2](x)) <= FORWARD_RTOL
    mb(x)
    assert len(calls) == len(times)  # the second call reads the cache
    # Within the margin the earlier candidate stays: grouped_cl (9.8) does not beat grouped.
    times["bmm"] = times["bmm_cl"] = 20.0
    monkeypatch.setattr(_conv, "_cache", {})
    mb(x)
    assert "grouped" in _conv.chosen_lowerings().values()


# ---------------------------------------------------------------------- pooling


POOLS = [
    (nn.MaxPool1d(3, stride=2, padding=1, dilation=2), 1),
    (nn.MaxPool2d(2), 2),
    (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), 2),
    (nn.MaxPool3d(2), 3),
    (nn.AvgPool1d(2), 1),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), 2),
    (nn.AvgPool3d(2, ceil_mode=True), 3),
    (nn.AdaptiveAvgPool1d(3), 1),
    (nn.AdaptiveAvgPool2d(1), 2),
    (nn.AdaptiveAvgPool3d((2, 1, 2)), 3),
]


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten operators dispatched inside the block (and convolution_backward's args)."""

    def __init__(self) -> None:
        super().__init__()
        self.funcs: list = []
        self.args: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        if func is torch.ops.aten.convolution_backward.default:
            self.args.append(args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("pool", "nd"), POOLS, ids=[repr(p) for p, _ in POOLS])
@pytest.mark.parametrize("per_model", [False, True], ids=["shared", "per_model"])
def test_pooling_after_conv_equals_one_by_one_without_copies(
    pool: nn.Module, nd: int, per_model: bool
) -> None:
    torch.manual_seed(nd)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
    models = [nn.Sequential(conv(2, 3, 1), nn.ReLU(), copy.deepcopy(pool)) for _ in range(N)]
    mb = ModelBatch(models)
    x = torch.randn(N, 4, 2, *SPATIAL[nd]) if per_model else torch.randn(4, 2, *SPATIAL[nd])
    with _Ops() as ops, conv_lowering("dense" if not per_model else "grouped"):
        out = mb(x, per_model=per_model)
    copies = (torch.ops.aten.clone.default, torch.ops.aten.copy_.default)
    # [B, N, C, ...] all the way: only the grouped conv reorders a per-model input [N, B, ...].
    assert len([f for f in ops.funcs if f in copies]) == int(per_model)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    grads = {name: grad(p) for name, p in mb.stacked_params().items()}
    for i, model in enumerate(models):
        own = model(x[i] if per_model else x)
        assert rel_err(out[i], own) <= FORWARD_RTOL, f"model {i} forward"
        (own * weight[i]).sum().backward()
        for name, p in model.named_parameters():
            assert rel_err(grads[name][i], grad(p)) <= GRAD_RTOL, f"model {i} grad {name}"


def test_pooling_unbatched_input_and_indices() -> None:
    torch.manual_seed(0)
    models = [
        nn.Sequential(nn.Conv2d(2, 3, 1), nn.MaxPool2d(2, return_indices=True)) for _ in range(N)
    ]
    mb = ModelBatch(models)
    assert isinstance(mb.skeleton, nn.Sequential)
    assert type(mb.skeleton[1]).__module__ == "modelbatch.nn._pool"
    exported = mb.model(0)
    assert isinstance(exported, nn.Sequential)
    assert type(exported[1]) is nn.MaxPool2d
    # [C, H, W] and [B, C, H, W] (B != N: a shared batch of exactly N examples would need
    # per_model=False after an unbatched call, see tests/test_inputs.py)
    for x in (torch.randn(2, 6, 6), torch.randn(4, 2, 6, 6)):
        out, idx = mb(x)
        for i, model in enumerate(models):
            own, own_idx = model(x)
            assert rel_err(out[i], own) <= FORWARD_RTOL
            assert torch.equal(idx[i], own_idx)


def test_timing_inside_the_vmap_rule_picks_a_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real timing (CUDA's path) run on the CPU: forward and backward of every candidate."""
    monkeypatch.setattr(_conv, "_MEASURED_DEVICES", ("cpu",))
    monkeypatch.setattr(_conv, "_cache", {})
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 4, 3)) for _ in range(N)]
    mb = ModelBatch(models)
    x = torch.randn(2, 2, 7, 7)
    out = mb(x)
    out.sum().backward()
    choices = _conv.chosen_lowerings()
    assert len(choices) == 2 and set(choices.values()) <= set(_conv.LOWERINGS)
    for i, model in enumerate(models):
        assert rel_err(out[i], model(x)) <= FORWARD_RTOL


def test_torch_compile_traces_torchs_own_forms() -> None:
    """Under torch.compile the twins step aside (inductor fuses torch's forms itself)."""
    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        )

    models = [make() for _ in range(N)]
    mb = ModelBatch(models)
    x = torch.randn(5, 1, 10, 10)
    compiled = torch.compile(lambda x: mb(x))(x)
    # Against each model's own forward (not the batch's eager path, which shares the code).
    for i, model in enumerate(models):
        assert rel_err(compiled[i], model(x)) <= FORWARD_RTOL, f"model {i}"


def test_shared_input_weight_gradient_is_one_dense_convolution() -> None:
    torch.manual_seed(0)
    mb = ModelBatch([nn.Sequential(nn.Conv2d(3, 4, 3)) for _ in range(N)])
    out = mb(torch.randn(2, 3, 6, 6))
    with _Ops() as ops:
        out.square().sum().backward()
    calls = [f for f in ops.funcs if f is torch.ops.aten.convolution_backward.default]
    assert len(calls) == 1
    assert len(ops.args[0]) and ops.args[0][9] == 1  # groups=1: one dense weight-gradient
    assert ops.args[0][2].shape[0] == N * 4  # N x C_out output channels
