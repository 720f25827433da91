"""modelbatch.nn LSTM/GRU/RNN: equal to torch's layers, alone and stacked in a ModelBatch."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
import torch
from _reference import CountOps, grad, rel_err
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._pytree import tree_leaves

import modelbatch.nn as mbnn
from modelbatch import ModelBatch

FORWARD_RTOL = 1e-6
GRAD_RTOL = 1e-5
F_IN, H, T, B = 4, 5, 6, 3

# (torch class, modelbatch class, extra constructor arguments)
KINDS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "LSTM": (nn.LSTM, mbnn.LSTM, {}),
    "LSTM-proj": (nn.LSTM, mbnn.LSTM, {"proj_size": 3}),
    "GRU": (nn.GRU, mbnn.GRU, {}),
    "RNN-tanh": (nn.RNN, mbnn.RNN, {}),
    "RNN-relu": (nn.RNN, mbnn.RNN, {"nonlinearity": "relu"}),
}
CONFIGS = list(itertools.product(KINDS, (1, 2), (False, True), (False, True), (False, True)))
# Inside a ModelBatch, four combinations per kind still take every option both ways.
BATCH_CONFIGS = [
    (k, *c)
    for k in KINDS
    for c in (
        (1, False, False, False),
        (2, True, True, True),
        (1, True, False, True),
        (2, False, True, False),
    )
]


def ids(configs: list) -> list[str]:
    return [
        f"{k}-L{layers}{'-bi' if bi else ''}{'-bf' if bf else ''}{'-hx' if hx else ''}"
        for k, layers, bi, bf, hx in configs
    ]


def initial_state(kind: str, torch_cls: type, layers: int, bi: bool, kwargs: dict, *lead: int):
    d = 2 if bi else 1
    out = kwargs.get("proj_size") or H
    h0 = torch.randn(*lead, layers * d, B, out)
    if torch_cls is nn.LSTM:
        return h0, torch.randn(*lead, layers * d, B, H)
    return h0


@pytest.mark.parametrize(("kind", "layers", "bi", "bf", "hx"), CONFIGS, ids=ids(CONFIGS))
def test_twin_equals_torch_forward_and_gradients(kind, layers, bi, bf, hx) -> None:
    torch_cls, twin_cls, kwargs = KINDS[kind]
    torch.manual_seed(0)
    ref = torch_cls(F_IN, H, num_layers=layers, bidirectional=bi, batch_first=bf, **kwargs)
    twin = twin_cls(F_IN, H, num_layers=layers, bidirectional=bi, batch_first=bf, **kwargs)
    assert list(dict(twin.named_parameters())) == list(dict(ref.named_parameters()))
    twin.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, F_IN) if bf else torch.randn(T, B, F_IN)
    x_ref, x_twin = x.clone().requires_grad_(), x.clone().requires_grad_()
    state = initial_state(kind, torch_cls, layers, bi, kwargs) if hx else None
    s_ref = tree_leaves(state) if hx else []
    s_twin = [s.clone().requires_grad_() for s in s_ref]
    s_ref = [s.clone().requires_grad_() for s in s_ref]
    pack = (lambda s: tuple(s) if torch_cls is nn.LSTM else s[0]) if hx else (lambda s: None)
    out_ref = tree_leaves(ref(x_ref, pack(s_ref)))
    out_twin = tree_leaves(twin(x_twin, pack(s_twin)))
    assert [o.shape for o in out_twin] == [o.shape for o in out_ref]
    weights = [torch.randn(o.shape) for o in out_ref]
    for a, b in zip(out_twin, out_ref):
        assert rel_err(a, b) <= FORWARD_RTOL
    sum((o * w).sum() for o, w in zip(out_ref, weights)).backward()
    sum((o * w).sum() for o, w in zip(out_twin, weights)).backward()
    for (name, p), q in zip(ref.named_parameters(), twin.parameters()):
        assert rel_err(grad(q), grad(p)) <= GRAD_RTOL, name
    assert rel_err(grad(x_twin), grad(x_ref)) <= GRAD_RTOL
    for a, b in zip(s_twin, s_ref):
        assert rel_err(grad(a), grad(b)) <= GRAD_RTOL


class SeqModel(nn.Module):
    """A user model holding a torch recurrent layer; ModelBatch substitutes it."""

    def __init__(self, torch_cls: type, layers: int, bi: bool, bf: bool, kwargs: dict) -> None:
        super().__init__()
        self.rnn = torch_cls(F_IN, H, num_layers=layers, bidirectional=bi, batch_first=bf, **kwargs)
        out = (kwargs.get("proj_size") or H) * (2 if bi else 1)
        self.head = nn.Linear(out, 2)

    def forward(self, x: Tensor, h0: Tensor | None = None, c0: Tensor | None = None):
        self.rnn.flatten_parameters()  # common in user code; a no-op on the twins
        state = h0 if c0 is None else (h0, c0)
        y, h_n = self.rnn(x, state)
        return self.head(y), h_n


@pytest.mark.parametrize(
    ("kind", "layers", "bi", "bf", "hx"), BATCH_CONFIGS, ids=ids(BATCH_CONFIGS)
)
def test_modelbatch_substitutes_and_equals_each_model(kind, layers, bi, bf, hx) -> None:
    torch_cls, _, kwargs = KINDS[kind]
    n = 3
    torch.manual_seed(1)
    models = [SeqModel(torch_cls, layers, bi, bf, kwargs) for _ in range(n)]
    mb = ModelBatch(models)
    assert type(models[0].rnn) is torch_cls, "the user's model is not modified"
    shape = (B, T, F_IN) if bf else (T, B, F_IN)
    if hx:  # every model its own data and its own initial state
        x = torch.randn(n, *shape)
        state = tree_leaves(initial_state(kind, torch_cls, layers, bi, kwargs, n))
        out = mb(x, *state, per_model=True)
        inputs = [(x[i], *(s[i] for s in state)) for i in range(n)]
    else:  # one shared batch
        x = torch.randn(*shape)
        out = mb(x)
        inputs = [(x,)] * n
    leaves = tree_leaves(out)
    weights = [torch.randn(o.shape[1:]) for o in leaves]
    sum((o * w).sum() for o, w in zip(leaves, weights)).backward()
    grads = {name: grad(p) for name, p in mb.stacked_params().items()}
    for i, model in enumerate(models):
        own = tree_leaves(model(*inputs[i]))
        for a, b in zip(leaves, own):
            assert rel_err(a[i], b) <= FORWARD_RTOL
        sum((o * w).sum() for o, w in zip(own, weights)).backward()
        for name, p in model.named_parameters():
            assert rel_err(grads[name][i], grad(p)) <= GRAD_RTOL, f"model {i} {name}"


def test_export_gives_torch_layers_with_each_models_weights() -> None:
    torch.manual_seed(2)
    models = [SeqModel(nn.LSTM, 2, True, True, {}) for _ in range(3)]
    mb = ModelBatch(models)
    with torch.no_grad():
        for p in mb.parameters():
            p.add_(torch.randn_like(p))  # the stacked weights are the truth
    x = torch.randn(B, T, F_IN)
    out = mb(x)[0]
    for i in range(3):
        exported = mb.model(i)
        assert type(exported) is SeqModel and type(exported.rnn) is nn.LSTM
        assert rel_err(exported(x)[0], out[i]) <= FORWARD_RTOL
        state = mb.get_model_states()[i]
        assert set(state) == set(models[i].state_dict())
        fresh = SeqModel(nn.LSTM, 2, True, True, {})
        fresh.load_state_dict(state)
        assert rel_err(fresh(x)[0], out[i]) <= FORWARD_RTOL


def test_substitution_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    models = [SeqModel(nn.GRU, 1, False, False, {}) for _ in range(4)]
    with caplog.at_level(logging.INFO, logger="modelbatch"):
        mb = ModelBatch(models)
        mb(torch.randn(T, B, F_IN))
        mb(torch.randn(T, B, F_IN))
    lines = [r.getMessage() for r in caplog.records if "modelbatch.nn" in r.getMessage()]
    assert len(lines) == 1 and "rnn (GRU)" in lines[0]


def test_dropout_between_layers_differs_per_model_in_training_only() -> None:
    torch.manual_seed(3)
    models = [nn.LSTM(F_IN, H, num_layers=2, dropout=0.5) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    mb = ModelBatch(models)
    x = torch.randn(T, B, F_IN)
    train_out = mb(x)[0]
    assert not torch.equal(train_out[0], train_out[1]), "masks differ per model"
    mb.eval()
    eval_out = mb(x)[0]
    assert torch.equal(eval_out[0], eval_out[1])
    assert rel_err(eval_out[0], models[0].eval()(x)[0]) <= FORWARD_RTOL
    assert not torch.allclose(train_out[0], eval_out[0])


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("batched", [True, False])
def test_cells_equal_torch(kind: str, batched: bool) -> None:
    torch.manual_seed(4)
    ref = getattr(nn, kind)(F_IN, H)
    twin = getattr(mbnn, kind).from_torch(ref)
    x = torch.randn(B, F_IN) if batched else torch.randn(F_IN)
    h = torch.randn(B, H) if batched else torch.randn(H)
    state = (h, torch.randn_like(h)) if kind == "LSTMCell" else h
    for a, b in zip(tree_leaves(twin(x, state)), tree_leaves(ref(x, state))):
        assert rel_err(a, b) <= FORWARD_RTOL
    for a, b in zip(tree_leaves(twin(x)), tree_leaves(ref(x))):
        assert rel_err(a, b) <= FORWARD_RTOL


def test_unbatched_input_equals_torch() -> None:
    torch.manual_seed(5)
    ref = nn.LSTM(F_IN, H, num_layers=2, bidirectional=True)
    twin = mbnn.LSTM.from_torch(ref)
    x = torch.randn(T, F_IN)
    state = (torch.randn(4, H), torch.randn(4, H))
    for a, b in zip(tree_leaves(twin(x, state)), tree_leaves(ref(x, state))):
        assert a.shape == b.shape and rel_err(a, b) <= FORWARD_RTOL


def test_twin_shares_the_torch_parameters() -> None:
    ref = nn.GRU(F_IN, H, num_layers=2)
    twin = mbnn.GRU.from_torch(ref)
    assert all(a is b for a, b in zip(twin.parameters(), ref.parameters()))
    assert repr(twin) == "GRU(4, 5, num_layers=2)"


def test_packed_sequences_are_refused_clearly() -> None:
    lstm = mbnn.LSTM(F_IN, H)
    packed = pack_padded_sequence(torch.randn(T, B, F_IN), torch.tensor([6, 4, 2]))
    with pytest.raises(TypeError, match=r"modelbatch.nn.LSTM: packed sequences are not supported"):
        lstm(packed)


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"modelbatch.nn.LSTM: expected h_0 of shape \(2, 3, 5\)"):
        mbnn.LSTM(F_IN, H, num_layers=2)(torch.randn(T, B, F_IN), (torch.randn(1, B, H),) * 2)
    with pytest.raises(ValueError, match=r"modelbatch\.nn\.GRU: proj_size"):
        mbnn.GRU(F_IN, H, proj_size=2)
    with pytest.raises(ValueError, match=r"modelbatch\.nn\.LSTM: expected input with 4 features"):
        mbnn.LSTM(F_IN, H)(torch.randn(T, B, F_IN + 1))
    with pytest.raises(ValueError, match="nonlinearity"):
        mbnn.RNN(F_IN, H, nonlinearity="gelu")


# ---------------------------------------------------------------------- the scan


GEMMS = (torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-tanh"])
def test_one_gemm_per_step_and_one_weight_gradient_gemm(kind: str) -> None:
    torch_cls, _, kwargs = KINDS[kind]
    torch.manual_seed(0)
    mb = ModelBatch([SeqModel(torch_cls, 1, False, False, kwargs) for _ in range(3)])
    counts = []
    for steps in (T, 2 * T):
        with CountOps(*GEMMS) as forward:
            out, _ = mb(torch.randn(steps, B, F_IN))
        with CountOps(*GEMMS) as backward:
            out.square().sum().backward()
        counts.append((forward.count, backward.count))
    # Each further step costs one GEMM forward (h W_hh^T) and one backward (dgates W_hh):
    # W_hh's gradient is one GEMM over all steps, whatever their number.
    assert counts[1][0] - counts[0][0] == T
    assert counts[1][1] - counts[0][1] == T


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-tanh"])
def test_autocast_casts_once_per_sequence_and_follows_torch(kind: str) -> None:
    # Under autocast the recurrence runs in bf16 as torch's own kernels do: the inputs,
    # the initial state and the weights are cast once, not the state at every step.
    torch_cls, _, kwargs = KINDS[kind]
    torch.manual_seed(0)
    models = [SeqModel(torch_cls, 1, False, False, kwargs) for _ in range(3)]
    mb = ModelBatch(models)
    casts = []
    for steps in (T, 2 * T):
        x = torch.randn(steps, B, F_IN)
        with (
            CountOps(torch.ops.aten._to_copy.default) as count,
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            out, _ = mb(x)
            out.float().square().sum().backward()
        casts.append(count.count)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = torch.stack([m(x)[0] for m in models])
        assert rel_err(out.float(), ref.float()) < 2e-2
    assert casts[1] == casts[0]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-relu"])
def test_initial_state_gradients_per_model_and_last_state_only(kind: str) -> None:
    """Per-model h0 (and c0) with gradients under vmap; a loss on h_n alone (no output grad)."""
    torch_cls, _, kwargs = KINDS[kind]
    n, layers = 3, 2
    torch.manual_seed(2)
    models = [SeqModel(torch_cls, layers, True, False, kwargs) for _ in range(n)]
    mb = ModelBatch(models)
    x = torch.randn(n, T, B, F_IN)
    state = [
        s.requires_grad_()
        for s in tree_leaves(initial_state(kind, torch_cls, layers, True, kwargs, n))
    ]
    _, h_n = mb(x, *state, per_model=True)
    weights = [torch.randn(o.shape[1:]) for o in tree_leaves(h_n)]
    sum((o * w).sum() for o, w in zip(tree_leaves(h_n), weights)).backward()
    # Only the recurrent layers get a gradient: the head is not on the path to h_n.
    grads = {name: p.grad for name, p in mb.stacked_params().items()}
    for i, model in enumerate(models):
        own_state = [s[i].detach().clone().requires_grad_() for s in state]
        _, own = model(x[i], *own_state)
        sum((o * w).sum() for o, w in zip(tree_leaves(own), weights)).backward()
        for a, b in zip(state, own_state):
            assert rel_err(a.grad[i], b.grad) <= GRAD_RTOL
        for name, p in model.rnn.named_parameters():
            batched = grads[f"rnn.{name}"]
            assert batched is not None, f"model {i} {name}: no gradient"
            assert rel_err(batched[i], grad(p)) <= GRAD_RTOL, f"model {i} {name}"


def test_shared_weights_with_batched_inputs_under_vmap() -> None:
    """torch.vmap over data only (weights unbatched) also runs through the scan's rule."""
    torch.manual_seed(0)
    gru = nn.GRU(F_IN, H)
    twin = mbnn.GRU.from_torch(gru)
    x = torch.randn(4, T, B, F_IN)
    out = torch.vmap(lambda xi: twin(xi)[0])(x)
    ref = torch.stack([gru(xi)[0] for xi in x])
    assert rel_err(out, ref) <= FORWARD_RTOL


def test_compiled_cells_equal_plain_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch.compile'd cell functions (CUDA's path), here compiled for the CPU."""
    from modelbatch.nn import _scan

    monkeypatch.setattr(_scan, "_COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(_scan, "_compiled", {})
    torch.manual_seed(0)
    models = [SeqModel(nn.GRU, 1, True, False, {}) for _ in range(3)]
    mb = ModelBatch(models)
    x = torch.randn(T, B, F_IN)
    out, _ = mb(x)
    weight = torch.randn(out.shape[1:])
    (out * weight).sum().backward()
    assert all(c is not None for c in _scan._compiled.values()) and len(_scan._compiled) == 2
    grads = {name: grad(p) for name, p in mb.stacked_params().items()}
    for i, model in enumerate(models):
        own, _ = model(x)
        assert rel_err(out[i], own) <= FORWARD_RTOL
        (own * weight).sum().backward()
        for name, p in model.named_parameters():
            assert rel_err(grads[name][i], grad(p)) <= GRAD_RTOL, f"model {i} {name}"


def test_torch_compile_traces_the_step_loop() -> None:
    torch.manual_seed(0)
    models = [SeqModel(nn.GRU, 1, False, False, {}) for _ in range(3)]
    mb = ModelBatch(models)
    x = torch.randn(3, B, F_IN)
    out, _ = torch.compile(lambda x: mb(x))(x)
    for i, model in enumerate(models):
        assert rel_err(out[i], model(x)[0]) <= FORWARD_RTOL


class LastStep(SeqModel):
    """Logits of the last step only: `[B, 2]`."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0][:, -1]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_training_with_adam_equals_torch_one_by_one(kind: str) -> None:
    """Bidirectional two-layer models, per-model lr, 5 Adam steps against torch's layers."""
    import copy

    import torch.nn.functional as F
    from _reference import max_rel_diff

    from modelbatch.optim import OptimizerFactory

    torch_cls, _, kwargs = KINDS[kind]
    n = 3
    torch.manual_seed(4)
    models = [LastStep(torch_cls, 2, True, True, kwargs) for _ in range(n)]
    ref = [copy.deepcopy(m) for m in models]
    lrs = [1e-3, 3e-3, 1e-2]
    mb = ModelBatch(models)
    opt = OptimizerFactory(torch.optim.Adam).create_optimizer(mb, [{"lr": lr} for lr in lrs])
    ref_opts = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(ref, lrs)]
    for _ in range(5):
        x, y = torch.randn(B, T, F_IN), torch.randint(0, 2, (B,))
        opt.zero_grad()
        mb.compute_loss(mb(x), y).backward()
        opt.step()
        for m, o in zip(ref, ref_opts):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert max_rel_diff(mb, ref) <= GRAD_RTOL


def test_each_dtype_compiles_a_cell_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.compile budgets its variants per code object: a process that trains in
    # float32 and bfloat16 gets one code object, and one budget, per dtype.
    from modelbatch.nn import _scan

    compiled: list = []

    def record(fn: Any, **kwargs: Any) -> Any:
        compiled.append(fn)
        return fn

    monkeypatch.setattr(_scan, "_COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(_scan, "_compiled", {})
    monkeypatch.setattr(torch, "compile", record)
    xg, hg, h = torch.randn(3, 2, 12), torch.randn(3, 2, 12), torch.randn(3, 2, 4)
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        args = [t.to(dtype) for t in (xg, hg, h)]
        out = _scan._fused(_scan._gru_fwd, args[0])(*args)
        for a, b in zip(out, _scan._gru_fwd(*args)):
            assert torch.equal(a, b)
    codes = [fn.__code__ for fn in compiled]
    assert len(codes) == 2 and codes[0] is not codes[1]
    assert all(c is not _scan._gru_fwd.__code__ for c in codes)
