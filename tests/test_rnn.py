"""modelbatch.nn LSTM/GRU/RNN: equal to torch's layers, alone and stacked in a ModelBatch."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
import torch
from _reference import grad
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


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


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
