"""What ModelBatch takes in: per-model and shared inputs, randomness, buffers the forward
writes, retired models' buffers, and the errors that say what to fix."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from _reference import CountOps, grad, rel_err
from torch import Tensor, nn

from modelbatch import ModelBatch
from modelbatch.optim import BatchOptimizer

N, B = 4, 6
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class MLP(nn.Module):
    def __init__(self, d_in: int = 5, d_out: int = 3, p: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, d_out)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).mean(dim=(-2, -1)))


class BiLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(5, 7, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


M = TypeVar("M", bound=nn.Module)


def models_of(factory: Callable[[], M], n: int = N, seed: int = 0) -> list[M]:
    torch.manual_seed(seed)
    return [factory() for _ in range(n)]


# ---------------------------------------------------------------- [N, B, ...] without per_model


@pytest.mark.parametrize(
    ("factory", "shape"),
    [(MLP, (N, B, 5)), (CNN, (N, B, 3, 8, 8))],
    ids=["mlp", "cnn"],
)
def test_per_model_input_given_as_shared_raises_naming_per_model(factory, shape) -> None:
    models = models_of(factory)
    mb = ModelBatch(models)
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match=r"input args\[0\] of shape .* per_model=True"):
        mb(x)
    out = mb(x, per_model=True)
    for i, m in enumerate(models):
        assert rel_err(out[i], m(x[i])) <= 1e-6


def test_explicit_per_model_false_is_always_honoured() -> None:
    models = models_of(MLP)
    mb = ModelBatch(models)
    x = torch.randn(N, B, 5)
    out = mb(x, per_model=False)  # the user says: every model sees all of x
    assert out.shape == (N, N, B, 3)
    for i, m in enumerate(models):
        assert rel_err(out[i], m(x)) <= 1e-6


@pytest.mark.parametrize(
    ("factory", "shape"),
    [(MLP, (N, 5)), (CNN, (N, 3, 8, 8)), (BiLSTM, (N, 9, 5)), (lambda: nn.Linear(5, 5), (N, 5))],
    ids=["mlp", "cnn", "lstm", "square-linear"],
)
def test_a_shared_batch_of_n_examples_runs_without_per_model(factory, shape) -> None:
    models = models_of(factory)
    mb = ModelBatch(models)
    x = torch.randn(*shape)
    out = mb(x)
    for i, m in enumerate(models):
        assert rel_err(out[i], m(x)) <= 1e-6


def test_an_earlier_call_settles_the_models_input_rank() -> None:
    models = models_of(lambda: nn.Linear(5, 5))
    mb = ModelBatch(models)
    mb(torch.randn(B, 9, 5))  # shared [B, T, F]: the model takes rank-3 inputs
    x = torch.randn(N, 9, 5)  # a shared batch of N sequences, shaped like the per-model mistake
    out = mb(x)
    assert out.shape == (N, N, 9, 5)
    with pytest.raises(ValueError, match="per_model=True"):
        mb(torch.randn(N, B, 9, 5))


def test_ambiguous_sequence_batch_asks_and_per_model_false_settles_it() -> None:
    mb = ModelBatch(models_of(lambda: nn.Linear(5, 5)))
    x = torch.randn(N, 9, 5)
    with pytest.raises(ValueError, match="per_model=False if it is one shared batch of 4"):
        mb(x)
    assert mb(x, per_model=False).shape == (N, N, 9, 5)
    assert mb(x).shape == (N, N, 9, 5)  # the rank is known now


# ---------------------------------------------------------------- mixed inputs


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, x: Tensor, z: Tensor, *, bias: Tensor | None = None, pair=None) -> Tensor:
        out = self.a(x) + self.b(z)
        if bias is not None:
            out = out + bias
        if pair is not None:
            out = out * pair["scale"] + pair["shift"]
        return out


def test_mixed_positional_inputs_with_a_tuple() -> None:
    models = models_of(Mixed)
    mb = ModelBatch(models)
    x, z = torch.randn(B, 5), torch.randn(N, B, 2)
    out = mb(x, z, per_model=(False, True))
    for i, m in enumerate(models):
        assert rel_err(out[i], m(x, z[i])) <= 1e-6


def test_mixed_inputs_with_a_dict_of_positions_and_keywords_and_nested_entries() -> None:
    models = models_of(Mixed)
    mb = ModelBatch(models)
    x, z = torch.randn(N, B, 5), torch.randn(B, 2)
    bias = torch.randn(N, 1, 3)
    pair = {"scale": torch.randn(N, B, 3), "shift": torch.randn(3)}
    out = mb(
        x,
        z,
        bias=bias,
        pair=pair,
        per_model={0: True, "bias": True, "pair": {"scale": True, "shift": False}},
    )
    for i, m in enumerate(models):
        own = m(x[i], z, bias=bias[i], pair={"scale": pair["scale"][i], "shift": pair["shift"]})
        assert rel_err(out[i], own) <= 1e-6


def test_mixed_input_specs_are_checked() -> None:
    mb = ModelBatch(models_of(Mixed))
    x, z = torch.randn(B, 5), torch.randn(N, B, 2)
    with pytest.raises(ValueError, match="per_model has 1 entries, the call 2 positional"):
        mb(x, z, per_model=(True,))
    with pytest.raises(ValueError, match="per_model names keyword 'bias'"):
        mb(x, z, per_model={"bias": True})
    with pytest.raises(ValueError, match="per_model names position 2"):
        mb(x, z, per_model={2: True})
    with pytest.raises(TypeError, match=r"per_model entry for args\[1\] must be True, False"):
        mb(x, z, per_model=(False, 1))
    with pytest.raises(ValueError, match=r"per_model marks args\[0\] as per model: expected \[N=4"):
        mb(x, z, per_model=(True, True))
    with pytest.raises(TypeError, match=r"marks input kwargs\['pair'\]\['scale'\] \(float\)"):
        mb(x, z, per_model={1: True, "pair": True}, pair={"scale": 2.0, "shift": 1.0})
    with pytest.raises(TypeError, match="per_model must be None, a bool"):
        mb(x, z, per_model="yes")


# ---------------------------------------------------------------- randomness


def _clones(n: int, p: float = 0.5) -> list[nn.Module]:
    torch.manual_seed(0)
    base = MLP(p=p)
    return [copy.deepcopy(base) for _ in range(n)]


@pytest.mark.parametrize("per_model_dropout", [False, True])
def test_randomness_same_gives_every_model_the_same_masks_each_step_new(
    per_model_dropout: bool,
) -> None:
    mb = ModelBatch(_clones(N), randomness="same", per_model_dropout=per_model_dropout)
    x = torch.randn(32, 5)
    first, second = mb(x), mb(x)
    for i in range(1, N):
        assert torch.equal(first[i], first[0])  # identical weights and masks
    assert not torch.equal(first, second)  # masks change from step to step
    mb.randomness = "different"
    third = mb(x)
    assert not torch.equal(third[0], third[1])


def test_randomness_same_covers_the_layers_modelbatch_substitutes() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 16), nn.RReLU(), nn.Dropout1d(0.5))
    mb = ModelBatch([copy.deepcopy(base) for _ in range(N)], randomness="same")
    x = torch.randn(B, 16, 5)
    out = mb(x)
    for i in range(1, N):
        assert torch.equal(out[i], out[0])
    assert not torch.equal(out, mb(x))


def test_randomness_different_is_the_default_and_values_are_checked() -> None:
    mb = ModelBatch(_clones(N))
    assert mb.randomness == "different"
    out = mb(torch.randn(32, 5))
    assert not torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match="randomness must be 'different' or 'same', got 'error'"):
        ModelBatch(_clones(2), randomness="error")
    with pytest.raises(ValueError, match="randomness must be"):
        mb.randomness = "Same"


# ---------------------------------------------------------------- constructor and target errors


def test_one_module_instead_of_a_list_is_refused() -> None:
    for single in (MLP(), nn.Sequential(nn.Linear(2, 2), nn.ReLU())):
        with pytest.raises(TypeError, match=r"got a single (MLP|Sequential); pass \[model\]"):
            ModelBatch(single)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a list of N models, got int"):
        ModelBatch(3)  # type: ignore[arg-type]


def test_a_generator_of_models_is_taken_once() -> None:
    torch.manual_seed(0)
    # A one-shot iterable, though the annotation says Sequence: the runtime accepts it.
    mb = ModelBatch(MLP() for _ in range(3))  # type: ignore[arg-type]
    assert mb.num_models == 3


def test_lr_list_is_checked() -> None:
    models = models_of(MLP, 3)
    with pytest.raises(
        TypeError, match=r"lr_list must be a list of N=3 .* got float 0.001; .*\[0.001\] \* 3"
    ):
        ModelBatch(models, lr_list=0.001, optimizer_cls=torch.optim.SGD)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"lr_list\[1\] must be a number, got str '0.1'"):
        ModelBatch(models, lr_list=[0.1, "0.1", 0.2], optimizer_cls=torch.optim.SGD)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"lr_list\[0\] must be a number, got bool"):
        ModelBatch(models, lr_list=[True, 0.1, 0.2], optimizer_cls=torch.optim.SGD)
    with pytest.raises(ValueError, match="lr_list was given without optimizer_cls; no optimizer"):
        ModelBatch(models, lr_list=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="optimizer_kwargs was given without optimizer_cls"):
        ModelBatch(models, optimizer_kwargs={"momentum": 0.9})
    mb = ModelBatch(
        models,
        lr_list=torch.tensor([0.1, 0.2, 0.3]),  # type: ignore[arg-type]  # a tensor is accepted too
        optimizer_cls=torch.optim.SGD,
    )
    assert isinstance(mb.optimizer, BatchOptimizer)
    assert mb.optimizer.hparams["lr"].tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_targets_are_checked_against_n_and_the_losss_dtype() -> None:
    mb = ModelBatch(models_of(MLP, 3))
    out = mb(torch.randn(B, 5))
    with pytest.raises(
        ValueError, match=r"targets of shape \(4, 6\) look per model .* hold 4 models, expected N=3"
    ):
        mb.compute_loss(out, torch.randint(0, 3, (4, B)))
    with pytest.raises(
        ValueError, match=r"targets of shape \(7,\) fit neither shared targets \[B=6"
    ):
        mb.compute_loss(out, torch.randint(0, 3, (7,)))
    with pytest.raises(
        TypeError,
        match=r"targets \(6,\) torch.float64 .* class-index targets must be integers: pass targets.long\(\)",
    ):
        mb.compute_loss(out, torch.randint(0, 3, (B,)).double())
    with pytest.raises(
        TypeError,
        match=r"targets are float64, outputs torch.float32; pass targets.to\(torch.float32\)",
    ):
        mb.compute_loss(out, torch.rand(B, 3, dtype=torch.float64), loss_fn=F.huber_loss)
    with pytest.raises(TypeError, match=r"targets \(6,\) torch.float32 \(gather.*targets.long\(\)"):
        mb.compute_loss(out, torch.randint(0, 3, (B,)).float())  # torch's error, explained
    # Integer class indices and float probabilities of the outputs' dtype are fine.
    mb.compute_loss(out, torch.randint(0, 3, (B,)))
    mb.compute_loss(out, torch.softmax(torch.randn(B, 3), -1))


class Doubler(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2


def test_a_model_without_parameters_runs_and_refuses_an_optimizer() -> None:
    mb = ModelBatch([Doubler() for _ in range(3)])
    x = torch.randn(B, 5)
    out = mb(x)
    assert out.shape == (3, B, 5) and torch.equal(out[2], x * 2)
    xs = torch.randn(3, B, 5)
    assert torch.equal(mb(xs, per_model=True), xs * 2)
    assert mb.model(1)(x).shape == (B, 5)
    with pytest.raises(
        ValueError,
        match=r"optimizer_cls=SGD was given, but the models \(Doubler\) have no parameters",
    ):
        ModelBatch([Doubler() for _ in range(3)], optimizer_cls=torch.optim.SGD)


def test_one_module_object_for_several_models_is_refused() -> None:
    m = MLP()
    with pytest.raises(
        ValueError, match=r"models 0 and 2 are the same module object \(MLP\).*copy.deepcopy"
    ):
        ModelBatch([m, MLP(), m])
    shared = nn.Linear(5, 5)
    with pytest.raises(ValueError, match=r"models 0 and 1 share one parameter tensor, '0.weight'"):
        ModelBatch([nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared, nn.ReLU())])


# ---------------------------------------------------------------- device and dtype of inputs


def test_input_on_the_wrong_device_is_refused_up_front() -> None:
    mb = ModelBatch(models_of(MLP))
    with pytest.raises(
        ValueError, match=r"input args\[0\] is on meta, the models are on cpu; move it"
    ):
        mb(torch.randn(B, 5, device="meta"))
    mixed = ModelBatch(models_of(Mixed))
    with pytest.raises(ValueError, match=r"input kwargs\['bias'\] is on meta"):
        mixed(torch.randn(B, 5), torch.randn(B, 2), bias=torch.randn(3, device="meta"))


@pytest.mark.gpu
@cuda
def test_cpu_input_into_a_cuda_batch_is_refused() -> None:
    mb = ModelBatch(models_of(MLP)).cuda()
    with pytest.raises(ValueError, match=r"input args\[0\] is on cpu, the models are on cuda:0"):
        mb(torch.randn(B, 5))
    # A 0-dim CPU tensor is a scalar torch itself accepts next to CUDA tensors.
    mixed = ModelBatch(models_of(Mixed)).cuda()
    out = mixed(
        torch.randn(B, 5, device="cuda"), torch.randn(B, 2, device="cuda"), bias=torch.tensor(1.0)
    )
    assert out.device.type == "cuda"


def test_wrong_input_dtype_names_the_input_and_the_fix() -> None:
    mb = ModelBatch(models_of(Mixed))
    with pytest.raises(
        TypeError,
        match=r"input args\[1\] has dtype torch.float64, the models' parameters are torch.float32 .*\.to\(torch.float32\)",
    ):
        mb(torch.randn(B, 5), torch.randn(B, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"input args\[0\] has dtype torch.int64"):
        ModelBatch(models_of(MLP))(torch.randint(0, 3, (B, 5)))


class TokensAndWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 2)

    def forward(self, tokens: Tensor, weights: Tensor) -> Tensor:
        return self.lin(self.emb(tokens) * weights)


def test_a_dtype_error_blames_the_float_input_not_the_token_ids() -> None:
    mb = ModelBatch(models_of(TokensAndWeights))
    tokens = torch.randint(0, 10, (B, 7))
    with pytest.raises(TypeError, match=r"input args\[1\] has dtype torch.float64"):
        mb(tokens, torch.rand(B, 7, 1, dtype=torch.float64))
    assert mb(tokens, torch.rand(B, 7, 1)).shape == (N, B, 7, 2)


class CastsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.float()) * x.sum(-1, keepdim=True)  # float64 again, by promotion


def test_legitimate_dtype_promotion_is_not_pre_empted() -> None:
    models = models_of(CastsItsInput)
    mb = ModelBatch(models)
    x = torch.randn(B, 5, dtype=torch.float64)
    out = mb(x)
    assert out.dtype == torch.float64
    for i, m in enumerate(models):
        assert rel_err(out[i], m(x)) <= 1e-6


# ---------------------------------------------------------------- buffers the forward writes


class Counter(nn.Module):
    count: Tensor
    scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(x) * self.scale  # autograd saves the old scale
        self.count = self.count + 1
        self.scale = self.scale * 0.5 + x.mean()
        return out


def test_a_re_assigned_buffer_is_written_back_like_torch_per_model() -> None:
    models = models_of(Counter)
    refs = copy.deepcopy(models)
    mb = ModelBatch(models)
    for _ in range(3):
        xs = torch.randn(N, B, 5)
        out = mb(xs, per_model=True)
        out.sum().backward()
        for i, r in enumerate(refs):
            own = r(xs[i])
            own.sum().backward()
            assert rel_err(out[i], own) <= 1e-6
    for i, r in enumerate(refs):
        assert mb.stacked_buffers()["count"][i].item() == r.count.item() == 3
        assert rel_err(mb.stacked_buffers()["scale"][i], r.scale) <= 1e-6
        assert rel_err(grad(mb.stacked_params()["lin.weight"])[i], grad(r.lin.weight)) <= 1e-5
    one = mb.model(1)
    assert isinstance(one, Counter)
    assert one.count.item() == 3


class Reshaper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x: Tensor) -> Tensor:
        self.seen = torch.zeros(4)
        return self.lin(x)


class ReplacesWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(x)
        self.lin.weight = nn.Parameter(self.lin.weight.detach() * 2)
        return out


def test_a_re_assignment_stacking_cannot_keep_is_refused_by_name() -> None:
    with pytest.raises(
        ValueError, match=r"re-assigns buffer 'seen' with \(4,\) per model \(was \(3,\)\)"
    ):
        ModelBatch(models_of(Reshaper))(torch.randn(B, 5))
    with pytest.raises(ValueError, match=r"re-assigns parameter 'lin\.weight'"):
        ModelBatch(models_of(ReplacesWeight))(torch.randn(B, 5))


# ---------------------------------------------------------------- retired models stand still


class BNNet(nn.Module):
    steps: Tensor

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8, momentum=momentum)
        self.head = nn.Linear(8, 3)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.steps.add_(1)
        return self.head(F.relu(self.bn(self.lin(x))))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("retire_by", ["retire", "mask"])
def test_retired_models_buffers_stand_still_while_others_train(momentum, retire_by) -> None:
    models = models_of(lambda: BNNet(momentum))
    refs = copy.deepcopy(models)
    mb = ModelBatch(models)
    xs = [torch.randn(N, B, 5) for _ in range(4)]
    mb(xs[0], per_model=True).sum().backward()  # everyone trains once
    for i, r in enumerate(refs):
        r(xs[0][i])
    if retire_by == "retire":
        mb.retire([1, 3])
    else:
        mb.active[1] = False  # written directly: seen through the mask's version
        mb.active[3] = False
    frozen = {k: v.clone() for k, v in mb.stacked_buffers().items()}
    x_eval = torch.randn(B, 5)
    mb.eval()
    eval_before = mb(x_eval)
    mb.train()
    for x in xs[1:]:
        mb(x, per_model=True).sum().backward()
        for i in (0, 2):
            refs[i](x[i])
    for name, buf in mb.stacked_buffers().items():
        for i in (1, 3):
            assert torch.equal(buf[i], frozen[name][i]), (name, i)
        for i in (0, 2):
            ref = refs[i].get_buffer(name)
            assert torch.equal(buf[i], ref) or rel_err(buf[i], ref) <= 1e-6, (name, i)
    mb.eval()
    eval_after = mb(x_eval)
    assert torch.equal(eval_after[1], eval_before[1]) and torch.equal(eval_after[3], eval_before[3])
    mb.train()
    mb.activate([1, 3])
    mb(xs[1], per_model=True)
    assert not torch.equal(mb.stacked_buffers()["bn.running_mean"][1], frozen["bn.running_mean"][1])


def test_holding_retired_buffers_reads_the_mask_once_per_change_not_per_forward() -> None:
    mb = ModelBatch(models_of(BNNet))
    x = torch.randn(B, 5)
    with CountOps(torch.ops.aten._local_scalar_dense.default) as syncs:
        for _ in range(5):
            mb(x)
    assert syncs.count == 1
    mb.retire(2)
    with CountOps(torch.ops.aten._local_scalar_dense.default) as syncs:
        for _ in range(5):
            mb(x)
    assert syncs.count == 1


def test_retired_buffers_stand_still_under_torch_compile() -> None:
    models = models_of(BNNet)
    mb = ModelBatch(models)
    mb.retire(0)
    frozen = {k: v.clone() for k, v in mb.stacked_buffers().items()}
    # aot_eager traces the forward as a graph (no branch on the mask) without a C++ compiler.
    forward = torch.compile(lambda x: mb(x, per_model=False), backend="aot_eager", fullgraph=False)
    for _ in range(2):
        forward(torch.randn(B, 5)).sum().backward()
    for name, buf in mb.stacked_buffers().items():
        assert torch.equal(buf[0], frozen[name][0]), name
        assert not torch.equal(buf[1], frozen[name][1]), name


@pytest.mark.gpu
@cuda
def test_retired_buffers_stand_still_in_a_captured_step() -> None:
    from modelbatch import compile_step

    torch.manual_seed(0)
    mb = ModelBatch([BNNet() for _ in range(N)]).cuda()
    opt = torch.optim.SGD(mb.parameters(), lr=0.1)
    step = compile_step(mb, opt, mode="graph")
    x = torch.randn(B, 5, device="cuda")
    y = torch.randint(0, 3, (B,), device="cuda")
    for _ in range(4):  # two eager warm-up steps, then the capture, then a replay
        step(x, y)
    assert step.mode == "graph" and step.num_graphs == 1
    mb.retire(1)  # a tensor write: the captured graph is replayed, not re-captured
    frozen = {k: v.clone() for k, v in mb.stacked_buffers().items()}
    for _ in range(3):
        step(torch.randn(B, 5, device="cuda"), y)
    torch.cuda.synchronize()
    assert step.num_graphs == 1
    for name, buf in mb.stacked_buffers().items():
        assert torch.equal(buf[1], frozen[name][1]), name
        assert not torch.equal(buf[0], frozen[name][0]), name
