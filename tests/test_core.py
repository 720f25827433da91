"""ModelBatch core: stacking, forward, losses, gradients, validation, export."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from _reference import grad, latest_losses, rel_err
from torch import nn

from modelbatch import ModelBatch

M = TypeVar("M", bound=nn.Module)


class MLP(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 16, d_out: int = 5, p: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0) -> dict:
        return {"sum": self.a(x) + self.b(y) * scale, "x": self.a(x)}


ARCHS = {
    "mlp": (lambda: MLP(), lambda *lead: torch.randn(*lead, 12)),
    "cnn": (SmallCNN, lambda *lead: torch.randn(*lead, 3, 16, 16)),
}


def make_models(factory: Callable[[], M], n: int, seed: int = 0) -> list[M]:
    torch.manual_seed(seed)
    return [factory() for _ in range(n)]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("per_model", [False, True])
def test_forward_equals_each_models_own(arch: str, per_model: bool) -> None:
    factory, data = ARCHS[arch]
    models = make_models(factory, 6)
    mb = ModelBatch(models)
    x = data(6, 10) if per_model else data(10)
    out = mb(x, per_model=per_model)
    assert out.shape[:2] == (6, 10)
    for i, m in enumerate(models):
        expected = m(x[i] if per_model else x)
        assert rel_err(out[i], expected) <= 1e-6


def test_pytree_inputs_kwargs_and_outputs() -> None:
    models = make_models(TwoInputs, 4)
    mb = ModelBatch(models)
    x, y = torch.randn(4, 7, 6), torch.randn(4, 7, 3)
    out = mb(x, y=y, scale=0.5, per_model=True)
    assert set(out) == {"sum", "x"} and out["sum"].shape == (4, 7, 4)
    for i, m in enumerate(models):
        ref = m(x[i], y[i], scale=0.5)
        assert rel_err(out["sum"][i], ref["sum"]) <= 1e-6
        assert rel_err(out["x"][i], ref["x"]) <= 1e-6


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("per_model", [False, True])
def test_gradients_equal_each_models_own(arch: str, per_model: bool) -> None:
    factory, data = ARCHS[arch]
    models = make_models(factory, 5, seed=1)
    mb = ModelBatch(models)
    n, b = 5, 9
    x = data(n, b) if per_model else data(b)
    y = torch.randint(0, 4, (n, b) if per_model else (b,))
    loss = mb.compute_loss(mb(x, per_model=per_model), y)
    loss.backward()
    for i, m in enumerate(models):
        own = F.cross_entropy(m(x[i] if per_model else x), y[i] if per_model else y)
        grads = torch.autograd.grad(own, list(m.parameters()))
        for (name, stacked), g in zip(mb.stacked_params().items(), grads):
            assert rel_err(grad(stacked)[i], g) <= 1e-5, name
        assert abs(latest_losses(mb)[i].item() - own.item()) <= 1e-6 * max(1.0, own.item())


def test_reductions_and_retired_models_contribute_nothing() -> None:
    models = make_models(MLP, 4)
    mb = ModelBatch(models)
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    out = mb(x)
    none = mb.compute_loss(out, y, reduction="none")
    assert none.shape == (4,)
    assert torch.allclose(mb.compute_loss(out, y, reduction="sum"), none.sum())
    assert torch.allclose(mb.compute_loss(out, y, reduction="mean"), none.sum() / 4)
    mb.retire([1, 3])
    assert mb.active.tolist() == [True, False, True, False]
    masked = mb.compute_loss(mb(x), y)
    masked.backward()
    assert latest_losses(mb)[1] == 0 and latest_losses(mb)[3] == 0
    for p in mb.parameters():
        assert torch.count_nonzero(grad(p)[1]) == 0 and torch.count_nonzero(grad(p)[3]) == 0
        assert torch.count_nonzero(grad(p)[0]) > 0
    mb.activate(1)
    assert mb.active.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="reduction must be"):
        mb.compute_loss(out, y, reduction="avg")


def test_custom_loss_and_per_model_targets() -> None:
    models = make_models(lambda: nn.Linear(3, 1), 3)
    mb = ModelBatch(models, loss_fn=F.mse_loss)
    x, y = torch.randn(3, 6, 3), torch.randn(3, 6, 1)
    losses = mb.compute_loss(mb(x, per_model=True), y, reduction="none")
    for i, m in enumerate(models):
        assert rel_err(losses[i], F.mse_loss(m(x[i]), y[i])) <= 1e-6
    with pytest.raises(ValueError, match="one scalar per model"):
        mb.compute_loss(mb(x, per_model=True), y, loss_fn=lambda o, t: (o - t) ** 2)


@pytest.mark.parametrize(
    "loss_fn",
    [F.cross_entropy, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(ignore_index=3)],
    ids=["F.cross_entropy", "CrossEntropyLoss", "CrossEntropyLoss-ignore3"],
)
@pytest.mark.parametrize("split", [False, True], ids=["shared", "per_model"])
def test_cross_entropy_in_one_call_equals_vmapped_loss(
    loss_fn: Callable[..., torch.Tensor], split: bool
) -> None:
    # The plain cross-entropy runs as one call over [N * B, C]; it must give the
    # vmapped loss's values and gradients bitwise, ignored targets included.
    torch.manual_seed(0)
    models = make_models(MLP, 4)
    fast = ModelBatch(models, loss_fn=loss_fn)
    slow = ModelBatch(models, loss_fn=lambda o, t: loss_fn(o, t))
    x = torch.randn(4, 9, 12) if split else torch.randn(9, 12)
    y = torch.randint(0, 5, (4, 9) if split else (9,))
    ignore = -100 if not isinstance(loss_fn, nn.CrossEntropyLoss) else loss_fn.ignore_index
    y[..., 2] = ignore
    if ignore != -100:
        y[..., 5] = ignore
    out_fast, out_slow = fast(x, per_model=split), slow(x, per_model=split)
    a = fast.compute_loss(out_fast, y, reduction="none")
    b = slow.compute_loss(out_slow, y, reduction="none")
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        assert torch.equal(grad(p), grad(q)), name
    # Not plain: label smoothing goes through vmap (and still gives torch's value).
    smooth = nn.CrossEntropyLoss(label_smoothing=0.1)
    losses = ModelBatch(models, loss_fn=smooth).per_model_losses(fast(x, per_model=split), y)
    xs = x if split else x.expand(4, *x.shape)
    ys = y if split else y.expand(4, *y.shape)
    for i, m in enumerate(models):
        assert rel_err(losses[i], smooth(m(xs[i]), ys[i])) <= 1e-6


def test_dropout_masks_differ_across_models_and_steps() -> None:
    torch.manual_seed(0)
    base = MLP(p=0.5)
    clones = [MLP(p=0.5) for _ in range(4)]
    for c in clones:
        c.load_state_dict(base.state_dict())
    mb = ModelBatch(clones)
    x = torch.randn(32, 12)
    first = mb(x)
    second = mb(x)
    # Identical weights: any difference comes from the dropout masks.
    for i in range(1, 4):
        assert not torch.equal(first[0], first[i])
    assert not torch.equal(first, second)
    mb.eval()
    assert torch.equal(mb(x), mb(x))


def test_accuracy_history_and_table() -> None:
    models = make_models(MLP, 3)
    mb = ModelBatch(models)
    x, y = torch.randn(20, 12), torch.randint(0, 5, (20,))
    out = mb(x)
    acc = mb.accuracy(out, y)
    for i, m in enumerate(models):
        assert acc[i].item() == pytest.approx((m(x).argmax(-1) == y).float().mean().item())
    mb.compute_loss(out, y)
    mb.compute_loss(out, y)
    assert mb.loss_history().shape == (2, 3)
    rows = mb.summary(acc=acc, lr=[0.1, 0.2, 0.3])
    assert rows[2]["lr"] == 0.3 and rows[1]["model"] == 1 and "loss" in rows[0]
    table = mb.format_summary(sort_by="acc", acc=acc)
    assert table.splitlines()[0].split() == ["model", "active", "loss", "acc"]
    assert len(table.splitlines()) == 5


# ---------------------------------------------------------------- validation


def test_rejects_empty_list() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        ModelBatch([])


def test_rejects_different_shapes() -> None:
    with pytest.raises(
        ValueError, match=r"model 1 differs from model 0 in 'net.0'.*in_features=12"
    ):
        ModelBatch([MLP(hidden=16), MLP(hidden=8)])


def test_rejects_different_dropout_p() -> None:
    with pytest.raises(
        ValueError,
        match=r"model 2 differs from model 0 in 'net.2' \(Dropout\(p=0.1.*per_model_dropout",
    ):
        ModelBatch([MLP(p=0.5), MLP(p=0.5), MLP(p=0.1)])


def test_rejects_different_class() -> None:
    class Other(MLP):
        pass

    with pytest.raises(ValueError, match="model 1 is a Other, model 0 a MLP"):
        ModelBatch([MLP(), Other()])


def test_rejects_different_training_mode() -> None:
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 .*training mode"):
        ModelBatch([MLP(), MLP().eval()])


def test_rejects_different_plain_configuration() -> None:
    class Act(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return torch.tanh(self.lin(x)) if self.kind == "tanh" else self.lin(x).relu()

    with pytest.raises(ValueError, match="model 1 differs from model 0 in the top-level module"):
        ModelBatch([Act("tanh"), Act("relu")])


def test_rejects_different_dtype_and_a_single_module() -> None:
    with pytest.raises(ValueError, match=r"parameter 'net.0.weight' \(dtype torch.float64"):
        ModelBatch([MLP(), MLP().double()])
    with pytest.raises(TypeError, match="got a single MLP"):
        ModelBatch(MLP())  # type: ignore[arg-type]


def test_rejects_wrong_input_leading_dimension() -> None:
    mb = ModelBatch(make_models(MLP, 3))
    with pytest.raises(ValueError, match=r"per_model=True expects every input tensor to be \[N=3"):
        mb(torch.randn(4, 10, 12), per_model=True)
    with pytest.raises(ValueError, match=r"expects targets \[N=3"):
        mb.compute_loss(mb(torch.randn(10, 12)), torch.randint(0, 5, (10,)), per_model=True)


# ---------------------------------------------------------------- export


def test_export_round_trip() -> None:
    models = make_models(SmallCNN, 4)
    mb = ModelBatch(models)
    with torch.no_grad():
        for p in mb.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    x = torch.randn(5, 3, 16, 16)
    out = mb(x)
    states = mb.get_model_states()
    assert len(states) == 4 and set(states[0]) == set(SmallCNN().state_dict())
    for i in range(4):
        plain = SmallCNN()
        plain.load_state_dict(states[i])
        assert torch.equal(plain(x), out[i]) or rel_err(plain(x), out[i]) <= 1e-6
        exported = mb.model(i)
        assert type(exported) is SmallCNN
        assert rel_err(exported(x), out[i]) <= 1e-6
    # Loading the states in reverse order reverses the models.
    mb.load_model_states(states[::-1])
    assert rel_err(mb(x)[0], out[3]) <= 1e-6
    with pytest.raises(ValueError, match="expected 4 state dicts, got 3"):
        mb.load_model_states(states[:3])


def test_state_dict_and_device_moves() -> None:
    mb = ModelBatch(make_models(MLP, 2))
    keys = set(mb.state_dict())
    assert keys == {
        "active",
        "stacked.net.0.weight",
        "stacked.net.0.bias",
        "stacked.net.3.weight",
        "stacked.net.3.bias",
    }
    mb.double()
    assert mb.stacked_params()["net.0.weight"].dtype == torch.float64
    assert mb(torch.randn(3, 12, dtype=torch.float64)).dtype == torch.float64


def test_equal_learning_rates_train_like_plain_torch() -> None:
    models = make_models(MLP, 3, seed=3)
    refs = make_models(MLP, 3, seed=3)
    mb = ModelBatch(models, lr_list=[0.05] * 3, optimizer_cls=torch.optim.SGD)
    opts = [torch.optim.SGD(r.parameters(), lr=0.05) for r in refs]
    for _ in range(5):
        x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
        mb.zero_grad()
        mb.compute_loss(mb(x), y).backward()
        mb.step()
        for r, o in zip(refs, opts):
            o.zero_grad()
            F.cross_entropy(r(x), y).backward()
            o.step()
    for i, r in enumerate(refs):
        for (name, stacked), p in zip(mb.stacked_params().items(), r.parameters()):
            assert rel_err(stacked[i], p) <= 1e-5, name


def test_lr_list_length_is_checked() -> None:
    with pytest.raises(ValueError, match="lr_list has 2 entries, expected one per model"):
        ModelBatch(make_models(MLP, 3), lr_list=[0.1, 0.2], optimizer_cls=torch.optim.SGD)


class WithNonPersistentBuffer(nn.Module):
    offset: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("offset", torch.randn(4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.offset


def test_export_fills_non_persistent_buffers() -> None:
    models = make_models(WithNonPersistentBuffer, 3)
    mb = ModelBatch(models)
    x = torch.randn(5, 4)
    assert "offset" not in mb.get_model_states()[0]
    for i, m in enumerate(models):
        exported = mb.model(i)
        assert isinstance(exported, WithNonPersistentBuffer)
        assert torch.equal(exported.offset, m.offset)
        assert rel_err(exported(x), m(x)) <= 1e-6


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens)))


def test_tied_weights_are_stacked_once_and_exported_under_every_key() -> None:
    models = make_models(TiedLM, 3)
    mb = ModelBatch(models)
    assert list(mb.stacked_params()) == ["emb.weight"]
    tokens = torch.randint(0, 11, (4, 7))
    out = mb(tokens)
    for i, m in enumerate(models):
        assert rel_err(out[i], m(tokens)) <= 1e-6
    states = mb.get_model_states()
    assert set(states[0]) == {"emb.weight", "head.weight"}
    exported = mb.model(1)
    assert isinstance(exported, TiedLM)
    assert exported.head.weight is exported.emb.weight
    assert rel_err(exported(tokens), models[1](tokens)) <= 1e-6
    mb.load_model_states(states[::-1])
    assert rel_err(mb(tokens)[0], out[2]) <= 1e-6
