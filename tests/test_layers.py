"""Layer coverage: N batched models against the same N models run one by one in plain PyTorch.

The table `CASES` is the source of the coverage page (docs/coverage.md): every
layer listed there is checked here for the batched forward and the gradients
of a summed loss.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _reference import grad, rel_err
from torch import Tensor, nn

from modelbatch import ModelBatch
from modelbatch.nn import UnbatchableLayerError

N = 3
FORWARD_RTOL = 1e-6
GRAD_RTOL = 1e-5


# ---------------------------------------------------------------------- models of the table


class Seq(nn.Module):
    """A sequence model: layers applied in order, tuple outputs reduced to their first element."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
            if isinstance(x, tuple):
                x = x[0]
        return x


class SelfAttention(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        out, weights = self.attn(x, x, x, need_weights=True)
        return out + weights.sum(-1, keepdim=True)


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Linear(8, 6, bias=False)  # a key bias has no gradient
        self.v = nn.Linear(8, 5)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        mask[:, -1] = True  # the last key is padding
        return self.attn(x, self.k(x), self.v(x), key_padding_mask=mask)[0]


class GPTBlock(nn.Module):
    """Pre-norm causal self-attention and MLP, as in GPT-2."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, dropout=0.0)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 16, context: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[GPTBlock(d) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


class RecurrentClassifier(nn.Module):
    def __init__(self, kind: type[nn.Module], **kwargs) -> None:
        super().__init__()
        self.rnn = kind(6, 5, batch_first=True, **kwargs)
        directions = 2 if kwargs.get("bidirectional") else 1
        self.head = nn.Linear(5 * directions, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class CellLoop(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.cell = kind(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        state = None
        outs = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            h = state[0] if isinstance(state, tuple) else state
            outs.append(h)
        return torch.stack(outs, 1)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(x, x.flip(1), tgt_is_causal=False)


class Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(8, 8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bil(x, x.flip(1))


def conv(*layers: nn.Module, channels: int = 4) -> nn.Module:
    # A normalization right after a conv makes the conv's bias gradient exactly 0 in theory
    # (rounding noise in practice); the norm cases put a Tanh in between.
    return Seq(nn.Conv2d(3, channels, 3, padding=1), *layers)


# ---------------------------------------------------------------------- the table


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    input: Callable[[], Tensor]
    train: bool = True
    # torch.vmap runs some ops model by model (its "fallback"); correct, but slower.
    fallback: bool = False


def image(c: int = 3, s: int = 8) -> Callable[[], Tensor]:
    return lambda: torch.randn(4, c, s, s)


def signal() -> Tensor:
    return torch.randn(4, 4, 12)


def tokens(vocab: int = 11, t: int = 6) -> Callable[[], Tensor]:
    return lambda: torch.randint(0, vocab, (4, t))


def seq(features: int = 8, t: int = 5) -> Callable[[], Tensor]:
    return lambda: torch.randn(4, t, features)


CASES = [
    Case("Linear+ReLU", lambda: Seq(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), seq()),
    Case(
        "Conv1d (stride, padding, dilation, groups)",
        lambda: Seq(nn.Conv1d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2), nn.Tanh()),
        signal,
    ),
    Case(
        "Conv2d (stride, padding, dilation, groups)",
        lambda: Seq(nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=2, groups=3), nn.SiLU()),
        image(),
    ),
    Case(
        "Conv2d padding='same', reflect",
        lambda: Seq(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")),
        image(),
    ),
    Case("Conv3d", lambda: Seq(nn.Conv3d(3, 4, 3, padding=1)), lambda: torch.randn(2, 3, 4, 5, 5)),
    Case(
        "ConvTranspose1d",
        lambda: Seq(nn.ConvTranspose1d(4, 3, 3, stride=2, output_padding=1)),
        signal,
    ),
    Case(
        "ConvTranspose2d (groups)",
        lambda: Seq(nn.ConvTranspose2d(3, 6, 3, stride=2, groups=3)),
        image(),
    ),
    Case(
        "MaxPool1d (dilation)",
        lambda: Seq(nn.Conv1d(4, 4, 1), nn.MaxPool1d(3, stride=2, padding=1, dilation=2)),
        signal,
    ),
    Case("MaxPool2d", lambda: conv(nn.MaxPool2d(2)), image()),
    Case("AvgPool2d (padding)", lambda: conv(nn.AvgPool2d(3, stride=2, padding=1)), image()),
    Case("AdaptiveAvgPool2d", lambda: conv(nn.AdaptiveAvgPool2d(3)), image()),
    Case("AdaptiveMaxPool2d", lambda: conv(nn.AdaptiveMaxPool2d((2, 3))), image()),
    Case("LPPool2d", lambda: conv(nn.LPPool2d(2, 2)), image()),
    Case(
        "Upsample (bilinear)", lambda: conv(nn.Upsample(scale_factor=2, mode="bilinear")), image()
    ),
    Case("PixelShuffle", lambda: conv(nn.PixelShuffle(2), channels=8), image()),
    Case("Flatten, Unflatten", lambda: conv(nn.Flatten(), nn.Unflatten(1, (4, 64))), image()),
    Case("BatchNorm1d (train)", lambda: Seq(nn.Linear(8, 6), nn.BatchNorm1d(5)), seq()),
    Case("BatchNorm1d (eval)", lambda: Seq(nn.Linear(8, 6), nn.BatchNorm1d(5)), seq(), train=False),
    Case("BatchNorm2d (train)", lambda: conv(nn.Tanh(), nn.BatchNorm2d(4)), image()),
    Case("BatchNorm2d (eval)", lambda: conv(nn.Tanh(), nn.BatchNorm2d(4)), image(), train=False),
    Case(
        "BatchNorm2d momentum=None (train)",
        lambda: conv(nn.Tanh(), nn.BatchNorm2d(4, momentum=None)),
        image(),
    ),
    Case(
        "BatchNorm2d track_running_stats=False",
        lambda: conv(nn.Tanh(), nn.BatchNorm2d(4, track_running_stats=False)),
        image(),
        train=False,
    ),
    Case(
        "BatchNorm3d (train)",
        lambda: Seq(nn.Conv3d(3, 4, 1), nn.Tanh(), nn.BatchNorm3d(4)),
        lambda: torch.randn(2, 3, 3, 4, 4),
    ),
    Case("GroupNorm", lambda: conv(nn.GroupNorm(2, 4)), image()),
    Case("LayerNorm", lambda: conv(nn.LayerNorm([4, 8, 8])), image()),
    Case(
        "InstanceNorm2d (affine, running stats)",
        lambda: conv(nn.Tanh(), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
        image(),
    ),
    Case("LocalResponseNorm", lambda: conv(nn.LocalResponseNorm(2)), image()),
    Case("Embedding", lambda: Seq(nn.Embedding(11, 8), nn.Linear(8, 3)), tokens()),
    Case(
        "Embedding (max_norm)",
        lambda: Seq(nn.Embedding(11, 8, max_norm=1.0)),
        tokens(),
        fallback=True,
    ),
    Case("Embedding (padding_idx)", lambda: Seq(nn.Embedding(11, 8, padding_idx=0)), tokens()),
    Case("EmbeddingBag (mean)", lambda: Seq(nn.EmbeddingBag(11, 8)), tokens(), fallback=True),
    Case("MultiheadAttention (self, weights)", SelfAttention, seq()),
    Case("MultiheadAttention (self, eval)", SelfAttention, seq(), train=False),
    Case("MultiheadAttention (kdim/vdim, key_padding_mask)", CrossAttention, seq()),
    Case(
        "TransformerEncoderLayer (post-norm)",
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        seq(),
    ),
    Case(
        "TransformerEncoderLayer (pre-norm, gelu)",
        lambda: nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        ),
        seq(),
    ),
    Case(
        "TransformerEncoderLayer (eval)",
        lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
        seq(),
        train=False,
    ),
    Case("TransformerDecoderLayer (memory = input)", Decoder, seq()),
    Case("GPT block (causal MHA, LayerNorm, GELU MLP, embeddings)", TinyGPT, tokens(t=8)),
    Case("LSTM (substituted)", lambda: RecurrentClassifier(nn.LSTM, num_layers=2), seq(6)),
    Case(
        "GRU (substituted, bidirectional)",
        lambda: RecurrentClassifier(nn.GRU, bidirectional=True),
        seq(6),
    ),
    Case(
        "RNN (substituted, relu)", lambda: RecurrentClassifier(nn.RNN, nonlinearity="relu"), seq(6)
    ),
    Case("LSTMCell (substituted)", lambda: CellLoop(nn.LSTMCell), seq(6)),
    Case("GRUCell (substituted)", lambda: CellLoop(nn.GRUCell), seq(6)),
    Case("RNNCell (substituted)", lambda: CellLoop(nn.RNNCell), seq(6)),
    Case("RReLU (eval, substituted)", lambda: conv(nn.RReLU()), image(), train=False),
    Case("PReLU", lambda: conv(nn.PReLU(4)), image()),
    Case("Bilinear (substituted)", Bilinear, seq()),
    Case("Dropout (eval)", lambda: conv(nn.Dropout(0.5)), image(), train=False),
]


def build(case: Case, seed: int) -> tuple[list[nn.Module], Tensor]:
    models = []
    for i in range(N):
        torch.manual_seed(seed + i)
        models.append(case.make().train(case.train))
    return models, case.input()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_and_gradients_match_each_model(case: Case) -> None:
    models, x = build(case, seed=100)
    reference = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    mb = ModelBatch(models)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mb(x)
        weight = torch.randn(out.shape[1:])
        (out * weight).sum().backward()
    # The launch count must not grow with N: no op may fall back to a loop over models.
    fallbacks = [str(w.message) for w in caught if "performance drop" in str(w.message)]
    assert bool(fallbacks) == case.fallback, fallbacks

    grads = {name: p.grad for name, p in mb.stacked_params().items()}
    buffers = mb.stacked_buffers()
    for i, model in enumerate(models):
        # The user's models are untouched by stacking and the batched forward.
        for k, v in model.state_dict().items():
            assert torch.equal(v, reference[i][k]), f"model {i} {k} was modified"
        own = model(x)
        assert rel_err(out[i], own) <= FORWARD_RTOL, f"model {i} forward"
        for name, p in model.named_parameters():  # in-place changes (Embedding max_norm)
            assert rel_err(mb.stacked_params()[name][i], p) <= FORWARD_RTOL, name
        (own * weight).sum().backward()
        for name, p in model.named_parameters():
            g = grads[name]
            assert g is not None, name
            assert rel_err(g[i], grad(p)) <= GRAD_RTOL, f"model {i} grad {name}"
        for name, b in model.named_buffers():
            if b.is_floating_point():
                assert rel_err(buffers[name][i], b) <= FORWARD_RTOL, f"model {i} buffer {name}"
            else:
                assert torch.equal(buffers[name][i], b), f"model {i} buffer {name}"


# ---------------------------------------------------------------------- BatchNorm over training


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4, momentum=0.2)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.bn1 = nn.BatchNorm1d(8, momentum=None)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn2(self.conv(x))), 2)
        return self.out(F.relu(self.bn1(self.fc(x.flatten(1)))))


def test_batchnorm_running_stats_after_training_equal_one_by_one() -> None:
    torch.manual_seed(0)
    models = [ConvBN() for _ in range(N)]
    eager = [ConvBN() for _ in range(N)]
    for e, m in zip(eager, models):
        e.load_state_dict(m.state_dict())
    lrs = torch.tensor([0.05, 0.1, 0.2])  # a different learning rate for each model
    mb = ModelBatch(models)
    steps = 10
    xs = torch.randn(steps, N, 16, 3, 8, 8)  # each model its own data
    ys = torch.randint(0, 3, (steps, N, 16))
    for t in range(steps):
        loss = mb.compute_loss(mb(xs[t], per_model=True), ys[t], per_model=True)
        mb.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in mb.parameters():
                p.sub_(lrs.view(-1, *[1] * (p.dim() - 1)) * grad(p))
        for i, e in enumerate(eager):
            e.zero_grad()
            F.cross_entropy(e(xs[t, i]), ys[t, i]).backward()
            with torch.no_grad():
                for p in e.parameters():
                    p.sub_(lrs[i] * grad(p))

    buffers, params = mb.stacked_buffers(), mb.stacked_params()
    for i, e in enumerate(eager):
        for name, b in e.named_buffers():
            if name.endswith("num_batches_tracked"):
                assert int(buffers[name][i]) == int(b) == steps
            else:
                assert rel_err(buffers[name][i], b) <= 1e-5, f"model {i} {name}"
        for name, p in e.named_parameters():
            assert rel_err(params[name][i], p) <= 1e-5, f"model {i} {name}"

    mb.eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        out = mb(x)
        for i, e in enumerate(eager):
            assert rel_err(out[i], e.eval()(x)) <= 1e-5, f"model {i} eval output"
    # Eval mode leaves the running statistics alone.
    assert all(torch.equal(b, mb.stacked_buffers()[k]) for k, b in buffers.items())
    bn1, eager_bn1 = mb.model(1).bn1, eager[1].bn1
    assert type(bn1) is nn.BatchNorm1d and bn1.momentum is None
    assert bn1.running_var is not None and eager_bn1.running_var is not None
    assert rel_err(bn1.running_var, eager_bn1.running_var) <= 1e-5


# ---------------------------------------------------------------------- per-model dropout


RATES = [0.0, 0.2, 0.5, 0.9]


class DropNet(nn.Module):
    def __init__(self, p: float, kind: type[nn.Module] = nn.Dropout) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = kind(p)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.lin(x))


def _same_weights(models: Sequence[nn.Module]) -> None:
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())


def test_dropout_rates_differ_without_opt_in_is_an_error() -> None:
    with pytest.raises(ValueError, match="per_model_dropout=True"):
        ModelBatch([DropNet(p) for p in RATES])


@pytest.mark.parametrize("kind", [nn.Dropout, nn.Dropout1d, nn.Dropout2d])
def test_dropout_rate_sweep_drop_fraction_matches_each_p(kind: type[nn.Module]) -> None:
    torch.manual_seed(1)
    models = [DropNet(p, kind) for p in RATES]
    _same_weights(models)
    mb = ModelBatch(models, per_model_dropout=True)
    # Inputs [B, C, L] so that channel-wise dropout has many channels to count.
    x = torch.randn(64, 32, 8)
    out = mb(x)
    clean = models[0].lin(x).detach()
    for i, p in enumerate(RATES):
        dropped = out[i] == 0
        if kind is nn.Dropout:
            units = dropped.numel()
            frac = dropped.float().mean().item()
        else:  # whole channels are dropped together
            assert torch.equal(dropped.all(-1), dropped.any(-1))
            units = dropped.shape[0] * dropped.shape[1]
            frac = dropped.all(-1).float().mean().item()
        assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / units) + 1e-9, (i, p, frac)
        kept = ~dropped
        if p < 1:
            torch.testing.assert_close(out[i][kept], clean[kept] / (1 - p), rtol=1e-6, atol=1e-6)


def test_dropout_masks_differ_per_model_and_per_step() -> None:
    torch.manual_seed(2)
    models = [DropNet(0.5) for _ in range(3)] + [DropNet(0.3)]
    _same_weights(models)
    mb = ModelBatch(models, per_model_dropout=True)
    x = torch.randn(64, 8)
    first, second = mb(x) == 0, mb(x) == 0
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert not torch.equal(first[0], second[0])
    mb.eval()
    out = mb(x)
    assert torch.equal(out[0], out[1]), "eval mode is the identity for every model"
    torch.testing.assert_close(out[0], models[0].lin(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", [nn.AlphaDropout, nn.FeatureAlphaDropout])
def test_alpha_dropout_per_model_rate(kind: type[nn.Module]) -> None:
    torch.manual_seed(3)
    rates = [0.1, 0.5]
    models = [nn.Sequential(nn.Identity(), kind(p)) for p in rates]
    mb = ModelBatch([nn.Sequential(nn.Linear(1, 1), m) for m in models], per_model_dropout=True)
    alpha = 1.7580993408473766
    x = torch.randn(256, 16, 32)
    out = mb(x.unsqueeze(-1)).squeeze(-1)
    for i, p in enumerate(rates):
        exported = mb.model(i)
        assert isinstance(exported, nn.Sequential)
        clean = exported[0](x.unsqueeze(-1)).squeeze(-1).detach()
        a = 1 / math.sqrt((alpha**2 * p + 1) * (1 - p))
        low = a * alpha * (p - 1)
        dropped = (out[i] - low).abs() < 1e-6
        frac = dropped.float().mean().item()
        units = dropped.numel() if kind is nn.AlphaDropout else 256 * 16
        assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / units), (p, frac)
        kept = ~dropped
        torch.testing.assert_close(
            out[i][kept], a * clean[kept] + a * alpha * p, rtol=1e-6, atol=1e-7
        )


def test_dropout_subclass_without_twin_refuses_differing_rates() -> None:
    class MyDropout(nn.Dropout):
        pass

    with pytest.raises(ValueError, match=r"no per-model version of MyDropout \('drop'\)"):
        ModelBatch([DropNet(p, MyDropout) for p in (0.1, 0.2)], per_model_dropout=True)
    mb = ModelBatch([DropNet(0.3, MyDropout) for _ in range(2)], per_model_dropout=True)
    assert "drop.p" not in mb.stacked_buffers()  # equal rates: torch's own layer runs


def test_per_model_dropout_export_keeps_each_p_out_of_the_state_dict() -> None:
    models = [DropNet(p) for p in RATES]
    mb = ModelBatch(models, per_model_dropout=True)
    assert torch.equal(mb.stacked_buffers()["drop.p"], torch.tensor(RATES))
    assert "stacked.drop.p" not in mb.state_dict()
    for i, p in enumerate(RATES):
        exported = mb.model(i)
        assert type(exported.drop) is nn.Dropout and exported.drop.p == pytest.approx(p)
        assert set(mb.get_model_states()[i]) == set(models[i].state_dict())
    # The rate is data: changing it in place takes effect on the next forward.
    mb.stacked_buffers()["drop.p"][0] = 1.0
    assert bool((mb(torch.randn(4, 8))[0] == 0).all())
    drop = mb.model(0).drop
    assert isinstance(drop, nn.Dropout) and drop.p == 1.0
    assert models[0].drop.p == 0.0, "the user's model keeps its own p"


# ---------------------------------------------------------------------- clear errors


class DataDependent(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x if x.sum() > 0 else -x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gate = DataDependent()

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.lin(x))


def test_unbatchable_layer_error_names_the_layer() -> None:
    mb = ModelBatch([Outer() for _ in range(2)])
    with pytest.raises(UnbatchableLayerError, match=r"layer 'gate' \(DataDependent\)") as info:
        mb(torch.randn(3, 4))
    assert "torch.where" in str(info.value)
    assert isinstance(info.value, RuntimeError)


class FunctionalRReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.rrelu(x, training=True)  # aten::rrelu has no vmap rule


def test_missing_batching_rule_names_the_layer() -> None:
    mb = ModelBatch([nn.Sequential(nn.Linear(4, 4), FunctionalRReLU()) for _ in range(2)])
    with pytest.raises(UnbatchableLayerError, match=r"layer '1' \(FunctionalRReLU\).*rrelu"):
        mb(torch.randn(3, 4))


def test_attention_fast_path_setting_is_restored() -> None:
    mb = ModelBatch([Outer() for _ in range(2)])
    assert torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(UnbatchableLayerError):
        mb(torch.randn(3, 4))
    assert torch.backends.mha.get_fastpath_enabled()


def test_ordinary_errors_pass_through_unchanged() -> None:
    mb = ModelBatch([nn.Linear(4, 4) for _ in range(2)])
    with pytest.raises(RuntimeError) as info:
        mb(torch.randn(3, 5))
    assert not isinstance(info.value, UnbatchableLayerError)


def test_unsupported_cumulative_batchnorm_subclass_is_refused_at_construction() -> None:
    class MyBN(nn.BatchNorm1d):
        pass

    with pytest.raises(ValueError, match=r"MyBN\(momentum=None\).*momentum=0.1"):
        ModelBatch([nn.Sequential(nn.Linear(4, 4), MyBN(4, momentum=None)) for _ in range(2)])


def test_sparse_embedding_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"Embedding\(sparse=True\).*sparse=False"):
        ModelBatch([nn.Embedding(5, 3, sparse=True) for _ in range(2)])


def test_rrelu_train_mode_slopes_in_bounds_and_differ_per_model() -> None:
    models = [nn.Sequential(nn.Linear(4, 64), nn.RReLU(0.1, 0.3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    mb = ModelBatch(models)
    x = torch.randn(32, 4)
    out = mb(x)
    pre = F.linear(x, mb.stacked_params()["0.weight"][0], mb.stacked_params()["0.bias"][0])
    neg = pre < 0
    slopes = out[:, neg] / pre[neg]
    assert bool((slopes >= 0.1 - 1e-6).all() & (slopes <= 0.3 + 1e-6).all())
    assert not torch.equal(slopes[0], slopes[1])
    assert torch.equal(out[:, ~neg], pre[~neg].expand(2, -1))


def test_coverage_page_lists_every_case() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "coverage.md").read_text()
    rows = {line.split("|")[1].strip() for line in page.splitlines() if line.startswith("| ")}
    missing = [c.name for c in CASES if c.name not in rows]
    assert not missing, f"docs/coverage.md lacks rows for {missing}"


def test_models_built_from_the_cumulative_batchnorm_twin_stack() -> None:
    """modelbatch.nn.BatchNorm1d(momentum=None) in a user's model is accepted as is."""
    from modelbatch.nn import BatchNorm1d as TwinBN

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 6), TwinBN(6, momentum=None)) for _ in range(3)]
    mb = ModelBatch(models)
    x = torch.randn(3, 7, 5)
    out = mb(x, per_model=True)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x[i]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            mb.stacked_buffers()["1.running_mean"][i], m[1].running_mean, rtol=1e-6, atol=1e-7
        )


# ---------------------------------------------------------------------- BatchNorm's batched kernel


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten operators dispatched inside the block, with their arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


BN_CONFIGS = [
    # (dims, train, affine, track, momentum, per_model)
    (1, True, True, True, 0.1, False),
    (1, False, True, True, 0.1, True),
    (1, True, False, True, 0.3, True),
    (2, True, True, False, 0.1, False),
    (2, False, True, True, 0.2, False),
    (2, True, True, True, 0.2, True),
    (3, True, True, True, 0.1, False),
]


@pytest.mark.parametrize(("dims", "train", "affine", "track", "momentum", "per_model"), BN_CONFIGS)
def test_batchnorm_kernel_over_models_equals_one_by_one(
    dims: int, train: bool, affine: bool, track: bool, momentum: float, per_model: bool
) -> None:
    torch.manual_seed(dims)
    bn_cls = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    # No bias before the norm: in training its exact gradient is 0, rounding noise in both runs.
    first = (
        nn.Linear(5, 4, bias=False)
        if dims == 1
        else (nn.Conv2d, nn.Conv3d)[dims - 2](3, 4, 3, padding=1, bias=False)
    )

    def make() -> nn.Module:
        bn = bn_cls(4, affine=affine, track_running_stats=track, momentum=momentum)
        model = nn.Sequential(copy.deepcopy(first), bn, nn.Tanh())
        for p in model.parameters():  # weight and bias away from 1 and 0, per model
            nn.init.normal_(p)
        if track:
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        return model.train(train)

    models = [make() for _ in range(N)]
    reference = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    shape = (6, 5) if dims == 1 else (6, 3, *(5,) * dims)
    x = torch.randn(N, *shape) if per_model else torch.randn(*shape)
    with _Ops() as ops:
        out = mb(x, per_model=per_model)
    norms = [args for func, args in ops.calls if func is torch.ops.aten.native_batch_norm.default]
    # One kernel for the N models, their affine inside it (torch's rule passes ones and zeros).
    assert len(norms) == 1
    if affine:  # the stacked weight itself, not a tensor of ones
        assert norms[0][1].data_ptr() == mb.stacked_params()["1.weight"].data_ptr()
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    grads = {name: grad(p) for name, p in mb.stacked_params().items()}
    buffers = mb.stacked_buffers()
    for i, model in enumerate(reference):
        own = model(x[i] if per_model else x)
        assert rel_err(out[i], own) <= FORWARD_RTOL, f"model {i} forward"
        (own * weight[i]).sum().backward()
        for name, p in model.named_parameters():
            assert rel_err(grads[name][i], grad(p)) <= GRAD_RTOL, f"model {i} grad {name}"
        for name, b in model.named_buffers():
            if b.is_floating_point():
                assert rel_err(buffers[name][i], b) <= FORWARD_RTOL, f"model {i} {name}"
            else:
                assert torch.equal(buffers[name][i], b), f"model {i} {name}"


def test_conv_then_batchnorm_copies_nothing() -> None:
    """The dense convolution's output [B, N, C, H, W] is the layout BatchNorm's kernel reads."""
    torch.manual_seed(0)
    mb = ModelBatch([nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)) for _ in range(N)])
    copies = (torch.ops.aten.clone.default, torch.ops.aten.copy_.default)
    with _Ops() as ops:
        mb(torch.randn(2, 3, 6, 6))
    assert not [func for func, _ in ops.calls if func in copies]
