"""Ensembles: predictions against the exported members run one by one, metrics against
numpy and torchmetrics, greedy selection and seed statistics against plain numpy/scipy,
and the exported module against itself through torch.save, state dicts and torch.export."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import TypedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _reference import CLASSES, IN, make_models
from torch import nn

from modelbatch import ModelBatch
from modelbatch.ensemble import (
    StackedEnsemble,
    classification_metrics,
    ensemble_classify,
    ensemble_evaluate,
    ensemble_log_probs,
    ensemble_predict,
    ensemble_regress,
    export_ensemble,
    greedy_selection,
    member_outputs,
    plot_reliability,
    plot_seed_statistics,
    seed_statistics,
    t_quantile,
)
from modelbatch.optim import OptimizerFactory


class Tolerance(TypedDict):
    """`rtol`/`atol` keywords of `torch.testing.assert_close`."""

    rtol: float
    atol: float


FP32: Tolerance = {"rtol": 1e-6, "atol": 1e-7}  # fp32 forward on CPU, probabilities in [0, 1]


class BNNet(nn.Module):
    """Linear-BatchNorm-Dropout-Linear: eval mode must use running stats and no dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


def bn_batch(n: int = 5) -> ModelBatch:
    """A batch of BatchNorm models with running stats of their own (a few train-mode forwards)."""
    torch.manual_seed(3)
    mb = ModelBatch([BNNet() for _ in range(n)])
    with torch.no_grad():
        for _ in range(3):
            mb(torch.randn(32, IN) * 2 + 1)
    return mb


def mlp_batch(n: int = 6) -> ModelBatch:
    return ModelBatch(make_models(n, seed=11))


def reference_outputs(mb: ModelBatch, x: torch.Tensor, members: list[int]) -> torch.Tensor:
    """Each member exported as an ordinary module and run alone, in eval mode: `[K, B, C]`."""
    with torch.no_grad():
        return torch.stack([mb.model(i).eval()(x) for i in members])


# ---------------------------------------------------------------------- prediction


@pytest.mark.parametrize("make", [mlp_batch, bn_batch], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize(
    "members, weights",
    [(None, None), ([4, 1, 2], None), ([4, 1, 2], [0.5, 0.2, 0.3]), ([1, 1, 3], [1.0, 1.0, 2.0])],
)
def test_prediction_equals_the_average_of_exported_members(make, members, weights) -> None:
    mb = make()
    mb.train()
    x = torch.randn(20, IN)
    idx = list(range(mb.num_models)) if members is None else members
    w = torch.full((len(idx),), 1 / len(idx)) if weights is None else torch.tensor(weights)
    w = (w / w.sum()).view(-1, 1, 1)
    ref = reference_outputs(mb, x, idx)
    expected = {
        "probs": (w * ref.softmax(-1)).sum(0),
        "logits": (w * ref).sum(0),
        "vote": (w * F.one_hot(ref.argmax(-1), CLASSES).float()).sum(0),
    }
    for combine, want in expected.items():
        got = ensemble_predict(mb, x, members=members, weights=weights, combine=combine)
        torch.testing.assert_close(got, want, **FP32)
        exported = export_ensemble(mb, members, weights, combine=combine)
        torch.testing.assert_close(exported(x), want, **FP32)
    assert mb.training  # the batch's mode is restored
    log_p = ensemble_log_probs(member_outputs(mb, x, members=members), w.view(-1))
    torch.testing.assert_close(log_p.exp(), expected["probs"], **FP32)


def test_active_members_and_masks() -> None:
    mb = mlp_batch()
    mb.retire([0, 3])
    x = torch.randn(16, IN)
    want = reference_outputs(mb, x, [1, 2, 4, 5]).softmax(-1).mean(0)
    torch.testing.assert_close(ensemble_predict(mb, x, members="active"), want, **FP32)
    torch.testing.assert_close(ensemble_predict(mb, x, members=mb.active), want, **FP32)
    outs = member_outputs(mb, x, members=torch.tensor([5, 2]))
    torch.testing.assert_close(outs, reference_outputs(mb, x, [5, 2]), **FP32)


def test_regression_mean_and_variance() -> None:
    mb = mlp_batch()
    x = torch.randn(16, IN)
    ref = reference_outputs(mb, x, [0, 2, 5]).double().numpy()
    w = np.array([0.2, 0.3, 0.5])
    mean = np.einsum("k,kbc->bc", w, ref)
    var = np.einsum("k,kbc->bc", w, (ref - mean) ** 2)
    got_mean, got_var = ensemble_predict(mb, x, members=[0, 2, 5], weights=w, task="regression")
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var.numpy(), var, rtol=1e-5, atol=1e-6)
    # Uniform weights: numpy's population variance.
    m, v = ensemble_regress(torch.tensor(ref))
    np.testing.assert_allclose(v.numpy(), ref.var(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.numpy(), ref.mean(axis=0), rtol=1e-12)
    exported = export_ensemble(mb, [0, 2, 5], w, task="regression")
    e_mean, e_var = exported(x)
    torch.testing.assert_close(e_mean, got_mean, **FP32)
    torch.testing.assert_close(e_var, got_var, **FP32)


def test_vote_is_the_majority_with_ties_to_the_lower_class() -> None:
    logits = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])
    assert ensemble_classify(logits, combine="vote").argmax(-1).item() == 1
    tie = logits[1:]
    assert ensemble_classify(tie, combine="vote").argmax(-1).item() == 1


def test_combiners_compile_without_graph_breaks() -> None:
    outputs = torch.randn(7, 12, 5)
    w = torch.rand(7)
    w = w / w.sum()
    for fn in (ensemble_classify, ensemble_log_probs, ensemble_regress):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(outputs, w), fn(outputs, w))


def test_per_model_dropout_members_predict_in_eval_mode() -> None:
    torch.manual_seed(9)
    models = [
        nn.Sequential(nn.Linear(IN, 8), nn.Dropout(0.1 * (i + 1)), nn.Tanh(), nn.Linear(8, 3))
        for i in range(4)
    ]
    mb = ModelBatch(models, per_model_dropout=True)
    x = torch.randn(9, IN)
    want = reference_outputs(mb, x, [2, 0]).softmax(-1).mean(0)
    first = ensemble_predict(mb, x, members=[2, 0])
    torch.testing.assert_close(first, want, **FP32)
    torch.testing.assert_close(ensemble_predict(mb, x, members=[2, 0]), first, rtol=0, atol=0)
    torch.testing.assert_close(export_ensemble(mb, [2, 0])(x), want, **FP32)


def test_member_metrics_fill_the_summary_table() -> None:
    mb = mlp_batch()
    x, y = torch.randn(32, IN), torch.randint(0, CLASSES, (32,))
    report = ensemble_evaluate(mb, [(x, y)])
    rows = mb.summary(**report.members)
    assert [r["model"] for r in rows] == list(range(6))
    assert rows[3]["nll"] == report.members["nll"][3].item()


# ---------------------------------------------------------------------- export


def test_exported_ensemble_reloads_from_a_state_dict_and_a_pickle(tmp_path: Path) -> None:
    mb = bn_batch()
    x = torch.randn(10, IN)
    ens = export_ensemble(mb, members=[4, 0, 2], weights=[2.0, 1.0, 1.0])
    want = ens(x)
    assert ens.members.get_parameter("fc.weight").shape == (3, 8, IN)
    torch.save(ens.state_dict(), tmp_path / "ens.pt")
    fresh = StackedEnsemble(BNNet(), 3)
    fresh.load_state_dict(torch.load(tmp_path / "ens.pt"))  # weights_only: plain tensors
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    torch.testing.assert_close(fresh.member_weights, torch.tensor([0.5, 0.25, 0.25]))
    torch.save(ens, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.testing.assert_close(whole(x), want, rtol=0, atol=0)
    copied = copy.deepcopy(ens)
    torch.testing.assert_close(copied(x), want, rtol=0, atol=0)


def test_exported_ensemble_holds_copies_not_views() -> None:
    mb = mlp_batch()
    x = torch.randn(8, IN)
    ens = export_ensemble(mb, [1, 2])
    before = ens(x)
    with torch.no_grad():
        for p in mb.parameters():
            p.add_(1.0)
    torch.testing.assert_close(ens(x), before, rtol=0, atol=0)


def test_exported_ensemble_compiles_without_graph_breaks() -> None:
    mb = bn_batch()
    x = torch.randn(12, IN)
    ens = export_ensemble(mb, members=[0, 2, 4])
    compiled = torch.compile(ens, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ens(x), **FP32)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_torch_export_gives_the_same_outputs(task: str, tmp_path: Path) -> None:
    mb = bn_batch()
    x = torch.randn(12, IN)
    ens = export_ensemble(mb, members=[3, 1], weights=[0.25, 0.75], task=task)
    program = torch.export.export(ens, (x,))
    x2 = torch.randn(12, IN)
    torch.testing.assert_close(program.module()(x2), ens(x2), **FP32)
    if task == "regression":
        return
    # The saved program runs with torch alone: modelbatch cannot even be imported.
    torch.export.save(program, tmp_path / "ens.pt2")
    torch.save(x2, tmp_path / "x.pt")
    torch.save(ens(x2), tmp_path / "want.pt")
    script = (
        "import sys; sys.modules['modelbatch'] = None\n"
        "import torch\n"
        f"p = torch.export.load({str(tmp_path / 'ens.pt2')!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"want = torch.load({str(tmp_path / 'want.pt')!r})\n"
        "torch.testing.assert_close(p.module()(x), want, rtol=1e-6, atol=1e-7)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------------- metrics


def numpy_metrics(log_probs: torch.Tensor, targets: torch.Tensor, n_bins: int, norm: str) -> dict:
    """One set of logits `[B, C]`: the textbook formulas, sample by sample and bin by bin."""
    lp = log_probs.double().numpy()
    p = log_probs.exp().numpy()  # the same fp32 probabilities the library bins
    y = targets.numpy()
    b = len(y)
    conf, pred = p.max(-1), p.argmax(-1)
    hit = (pred == y).astype(np.float64)
    onehot = np.eye(p.shape[-1])[y]
    pd = p.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = np.where(pd > 0, -pd * np.log(pd), 0.0).sum(-1)
    edges = np.linspace(0, 1, n_bins + 1).astype(np.float32)
    gaps, props = [], []
    for j in range(n_bins + 1):  # the last bin holds confidences of exactly 1, as torchmetrics
        upper = edges[j + 1] if j < n_bins else np.inf
        mask = (conf >= edges[j]) & (conf < upper)
        if mask.any():
            gaps.append(abs(hit[mask].mean() - conf[mask].astype(np.float64).mean()))
            props.append(mask.sum() / b)
    gap, prop = np.array(gaps), np.array(props)
    ece = {
        "l1": (gap * prop).sum(),
        "l2": math.sqrt((gap**2 * prop).sum()),
        "max": gap.max(),
    }[norm]
    return {
        "accuracy": hit.mean(),
        "nll": -lp[np.arange(b), y].mean(),
        "brier": ((pd - onehot) ** 2).sum(-1).mean(),
        "ece": ece,
        "entropy": ent.mean(),
    }


def spread_logits(k: int, b: int, c: int, seed: int = 0) -> torch.Tensor:
    """Logits whose confidences cover every bin, a few of them exactly 1 in fp32."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(k, b, 1, generator=g) * 8
    logits = torch.randn(k, b, c, generator=g) * scale
    logits[:, :3, 0] = 200.0
    return logits


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_metrics_equal_numpy(norm: str) -> None:
    logits = spread_logits(4, 300, 7)
    y = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(1))
    lp = logits.log_softmax(-1)
    got = classification_metrics(lp, y, n_bins=15, norm=norm)
    assert float(lp[0, 0].exp().max()) == 1.0  # the extra bin is exercised
    for k in range(4):
        want = numpy_metrics(lp[k], y, 15, norm)
        for name, value in want.items():
            np.testing.assert_allclose(got[name][k].item(), value, rtol=1e-9, err_msg=name)
    nll = F.nll_loss(lp.reshape(-1, 7), y.repeat(4), reduction="none").view(4, -1).mean(1)
    torch.testing.assert_close(got["nll"].float(), nll, **FP32)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [5, 15])
def test_metrics_equal_torchmetrics(norm: str, n_bins: int) -> None:
    tm = pytest.importorskip("torchmetrics")
    logits = spread_logits(3, 400, 5, seed=2)
    y = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(3))
    lp = logits.log_softmax(-1)
    got = classification_metrics(lp, y, n_bins=n_bins, norm=norm)
    for k in range(3):
        ce = tm.classification.MulticlassCalibrationError(num_classes=5, n_bins=n_bins, norm=norm)
        acc = tm.classification.MulticlassAccuracy(num_classes=5, average="micro")
        # torchmetrics sums its bins in float32: agreement to float32 rounding, not 1e-9.
        torch.testing.assert_close(got["ece"][k].float(), ce(lp[k].exp(), y), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["accuracy"][k].float(), acc(lp[k].exp(), y))


def test_evaluate_over_batches_equals_one_pass_and_numpy() -> None:
    mb = bn_batch(6)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, IN, generator=g) * 3
    y = torch.randint(0, CLASSES, (100,), generator=g)
    loader = [(x[:50], y[:50]), (x[50:87], y[50:87]), (x[87:], y[87:])]
    members, weights = [5, 0, 2, 3], np.array([0.1, 0.4, 0.2, 0.3])
    report = ensemble_evaluate(mb, loader, members, weights)
    ref = reference_outputs(mb, x, members)
    member_lp = ref.log_softmax(-1)
    ens_p = np.einsum("k,kbc->bc", weights, ref.double().softmax(-1).numpy())
    want = numpy_metrics(torch.tensor(np.log(ens_p)).float(), y, 15, "l1")
    for name, value in want.items():
        np.testing.assert_allclose(report.ensemble[name].item(), value, rtol=1e-5, err_msg=name)
    for j in range(4):
        want_j = numpy_metrics(member_lp[j], y, 15, "l1")
        for name, value in want_j.items():
            np.testing.assert_allclose(report.members[name][j].item(), value, rtol=1e-5)
    ens_pred = ens_p.argmax(-1)
    disagree = (member_lp.argmax(-1).numpy() != ens_pred).mean(1)
    np.testing.assert_allclose(report.members["disagreement"].numpy(), disagree, rtol=1e-12)
    np.testing.assert_allclose(report.ensemble["disagreement"].item(), weights @ disagree)
    member_ent = report.members["entropy"].numpy()
    mi = report.ensemble["entropy"].item() - weights @ member_ent
    np.testing.assert_allclose(report.ensemble["mutual_information"].item(), mi, rtol=1e-12)
    assert report.ensemble["mutual_information"].item() > 0  # members disagree: MI > 0
    assert report.indices.tolist() == members
    rows = report.rows()
    assert [r["model"] for r in rows] == ["ensemble", "mean member", *members]
    assert "mutual_information" in report.table()


def test_evaluate_regression_matches_numpy() -> None:
    mb = mlp_batch()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, IN, generator=g), torch.randn(40, CLASSES, generator=g)
    report = ensemble_evaluate(mb, [(x[:25], y[:25]), (x[25:], y[25:])], task="regression")
    ref = reference_outputs(mb, x, list(range(6))).double().numpy()
    yn = y.double().numpy()
    np.testing.assert_allclose(
        report.ensemble["mse"].item(), ((ref.mean(0) - yn) ** 2).mean(), rtol=1e-5
    )
    np.testing.assert_allclose(report.ensemble["variance"].item(), ref.var(0).mean(), rtol=1e-5)
    np.testing.assert_allclose(
        report.members["mse"].numpy(), ((ref - yn) ** 2).mean((1, 2)), rtol=1e-5
    )


# ---------------------------------------------------------------------- greedy selection


def numpy_greedy(probs: np.ndarray, y: np.ndarray, steps: int, metric: str, init: int, pool):
    """Caruana et al. (2004), with replacement, written out: loops, strict improvement."""
    higher = metric == "accuracy"

    def score(p: np.ndarray) -> float:
        if metric == "nll":
            return -np.log(p[np.arange(len(y)), y]).mean()
        if metric == "brier":
            return ((p - np.eye(p.shape[-1])[y]) ** 2).sum(-1).mean()
        if metric == "accuracy":
            return (p.argmax(-1) == y).mean()
        return ((p - y) ** 2).mean()  # mse

    def better(a: float, b: float) -> bool:
        return a > b if higher else a < b

    total, picks, curve = np.zeros_like(probs[0]), [], []
    singles = [score(probs[j]) for j in pool]
    for j in sorted(range(len(pool)), key=lambda j: (-singles[j] if higher else singles[j], j))[
        :init
    ]:
        total = total + probs[pool[j]]
        picks.append(pool[j])
        curve.append(score(total / len(picks)))
    for _ in range(steps):
        best_j, best_s = None, None
        for j in pool:
            s = score((total + probs[j]) / (len(picks) + 1))
            if best_s is None or better(s, best_s):
                best_j, best_s = j, s
        assert best_j is not None and best_s is not None
        total = total + probs[best_j]
        picks.append(best_j)
        curve.append(best_s)
    size = 1 + min(range(len(curve)), key=lambda t: (-curve[t] if higher else curve[t], t))
    chosen, counts = np.unique(picks[:size], return_counts=True)
    return picks, curve, size, chosen, counts


@pytest.mark.parametrize(
    "metric, init, candidates",
    [("nll", 0, None), ("brier", 2, None), ("accuracy", 0, None), ("nll", 3, [7, 1, 4, 9, 2])],
)
def test_greedy_selection_equals_numpy(metric: str, init: int, candidates) -> None:
    g = torch.Generator().manual_seed(6)
    outputs = torch.randn(10, 80, 4, generator=g) * 2
    y = torch.randint(0, 4, (80,), generator=g)
    sel = greedy_selection(outputs, y, steps=12, metric=metric, init=init, candidates=candidates)
    pool = list(range(10)) if candidates is None else candidates
    probs = outputs.double().softmax(-1).numpy()
    picks, curve, size, chosen, counts = numpy_greedy(probs, y.numpy(), 12, metric, init, pool)
    assert sel.order.tolist() == picks
    np.testing.assert_allclose(sel.curve.numpy(), curve, rtol=1e-12)
    assert sel.size == size
    assert sel.indices.tolist() == chosen.tolist()
    assert sel.counts.tolist() == counts.tolist()
    np.testing.assert_allclose(sel.weights.numpy(), counts / size, rtol=1e-15)
    assert len(set(picks)) < len(picks) or metric == "accuracy"  # picks repeat: with replacement


def test_greedy_selection_regression_and_mask() -> None:
    g = torch.Generator().manual_seed(7)
    outputs = torch.randn(8, 30, 2, generator=g)
    y = torch.randn(30, 2, generator=g)
    mask = torch.tensor([True, False, True, True, False, True, True, True])
    sel = greedy_selection(outputs, y, steps=9, task="regression", metric="mse", candidates=mask)
    pool = mask.nonzero().view(-1).tolist()
    picks, curve, size, chosen, _ = numpy_greedy(
        outputs.double().numpy(), y.double().numpy(), 9, "mse", 0, pool
    )
    assert sel.order.tolist() == picks and sel.size == size
    assert sel.indices.tolist() == chosen.tolist()
    np.testing.assert_allclose(sel.curve.numpy(), curve, rtol=1e-12)


def test_selection_feeds_prediction_and_export() -> None:
    mb = mlp_batch()
    x, y = torch.randn(64, IN), torch.randint(0, CLASSES, (64,))
    sel = greedy_selection(member_outputs(mb, x), y, steps=8)
    w = sel.weights.float().view(-1, 1, 1)
    want = (w * reference_outputs(mb, x, sel.indices.tolist()).softmax(-1)).sum(0)
    got = ensemble_predict(mb, x, members=sel.indices, weights=sel.weights)
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(export_ensemble(mb, sel.indices, sel.weights)(x), want, **FP32)
    # The selection's validation NLL is the NLL of the ensemble it returns.
    nll = -ensemble_log_probs(member_outputs(mb, x, members=sel.indices).double(), sel.weights)
    assert math.isclose(
        nll[torch.arange(64), y].mean().item(), sel.curve[sel.size - 1].item(), rel_tol=1e-9
    )


# ---------------------------------------------------------------------- seed statistics


T_TABLE = [  # (p, df, t): Student-t quantiles, as printed in statistics tables
    (0.975, 1, 12.706204736174694),
    (0.975, 5, 2.5705818356363146),
    (0.975, 15, 2.131449545559776),
    (0.995, 10, 3.16927267261695),
    (0.95, 30, 1.697260886593957),
    (0.9, 2.5, 1.7302509288071766),
]


@pytest.mark.parametrize("p, df, t", T_TABLE)
def test_t_quantile_table(p: float, df: float, t: float) -> None:
    assert math.isclose(t_quantile(p, df), t, rel_tol=1e-8)
    assert math.isclose(t_quantile(1 - p, df), -t, rel_tol=1e-8)


def test_t_quantile_equals_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in [0.5, 1, 2, 3, 4.5, 7, 15, 31, 100, 1000, 1e5]:
        for p in [0.501, 0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.05, 0.025]:
            assert math.isclose(t_quantile(p, df), stats.t.ppf(p, df), rel_tol=1e-8), (p, df)
    assert math.isclose(t_quantile(0.975, math.inf), stats.norm.ppf(0.975), rel_tol=1e-12)


def sweep_batch(lrs: list[float], seeds: int) -> ModelBatch:
    mb = ModelBatch(make_models(len(lrs) * seeds))
    configs = [{"lr": lr, "momentum": 0.9} for lr in lrs for _ in range(seeds)]
    mb.optimizer = OptimizerFactory(torch.optim.SGD).create_optimizer(mb, configs)
    return mb


def test_seed_statistics_by_optimizer_equal_numpy_and_scipy() -> None:
    lrs, seeds = [0.3, 0.01, 0.1], 6
    mb = sweep_batch(lrs, seeds)
    g = torch.Generator().manual_seed(8)
    acc, loss = torch.rand(18, generator=g), torch.randn(18, generator=g)
    stats = seed_statistics({"acc": acc, "loss": loss}, mb.optimizer)
    assert stats.keys == ["lr"]  # momentum is the same for all: not a grouping key
    assert [c[0] for c in stats.configs] == sorted(lrs)
    t5 = 2.5705818356363146  # t_{0.975, 5}
    for g_i, (lr,) in enumerate(stats.configs):
        block = lrs.index(lr)
        for name, values in (("acc", acc), ("loss", loss)):
            v = values[block * seeds : (block + 1) * seeds].double().numpy()
            s = stats.stats[name][g_i]
            sem = v.std(ddof=1) / math.sqrt(seeds)
            np.testing.assert_allclose(
                [s["mean"], s["std"], s["sem"], s["ci_low"], s["ci_high"]],
                [v.mean(), v.std(ddof=1), sem, v.mean() - t5 * sem, v.mean() + t5 * sem],
                rtol=1e-9,
            )
    scipy_stats = pytest.importorskip("scipy.stats")
    for g_i, members in enumerate(stats.members):
        v = acc[members].double().numpy()
        lo, hi = scipy_stats.t.interval(0.9, len(v) - 1, loc=v.mean(), scale=scipy_stats.sem(v))
        s90 = seed_statistics({"acc": acc}, mb.optimizer, confidence=0.9).stats["acc"][g_i]
        np.testing.assert_allclose([s90["ci_low"], s90["ci_high"]], [lo, hi], rtol=1e-9)


def test_seed_statistics_by_keys_and_columns() -> None:
    values = [1.0, 2.0, 4.0, 10.0, 20.0, 7.0]
    stats = seed_statistics({"m": values}, ["b", "a", "b", "a", "a", "c"])
    assert stats.keys == ["group"] and stats.configs == [("a",), ("b",), ("c",)]
    assert stats.members == [[1, 3, 4], [0, 2], [5]]
    assert stats.stats["m"][0]["mean"] == pytest.approx(32 / 3)
    assert math.isnan(stats.stats["m"][2]["std"]) and stats.stats["m"][2]["mean"] == 7.0
    cols = {"lr": [0.1, 0.1, 0.2, 0.2, 0.1, 0.2], "wd": [0, 1, 0, 1, 0, 1]}
    both = seed_statistics({"m": values}, cols)
    assert both.keys == ["lr", "wd"] and both.members == [[0, 4], [1], [2], [3, 5]]
    only_lr = seed_statistics({"m": values}, cols, keys=["lr"])
    assert only_lr.members == [[0, 1, 4], [2, 3, 5]]
    rows = only_lr.rows()
    assert rows[0]["lr"] == 0.1 and rows[0]["n"] == 3 and "m_ci_high" in rows[0]
    assert "m_mean" in only_lr.table()


def test_seed_statistics_dataframe() -> None:
    pd = pytest.importorskip("pandas")
    stats = seed_statistics({"m": [1.0, 2.0, 3.0, 5.0]}, [0, 0, 1, 1])
    frame = stats.to_pandas()
    assert isinstance(frame, pd.DataFrame)
    assert frame["m_mean"].tolist() == [1.5, 4.0]


def test_plots_write_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    mb = mlp_batch()
    x, y = torch.randn(64, IN), torch.randint(0, CLASSES, (64,))
    report = ensemble_evaluate(mb, [(x, y)])
    plot_reliability(report, members=[0, 1], path=tmp_path / "rel.png")
    stats = seed_statistics({"acc": report.members["accuracy"]}, [0.1, 0.1, 0.1, 1.0, 1.0, 1.0])
    plot_seed_statistics(stats, "acc", path=tmp_path / "seeds.png")
    for name in ("rel.png", "seeds.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------- errors


def test_errors_name_the_function_and_the_fix() -> None:
    mb = mlp_batch()
    x = torch.randn(4, IN)
    with pytest.raises(ValueError, match=r"^ensemble_predict: members must be"):
        ensemble_predict(mb, x, members="all")
    with pytest.raises(ValueError, match=r"^ensemble_predict: weights must have one entry"):
        ensemble_predict(mb, x, members=[0, 1], weights=[1.0])
    with pytest.raises(ValueError, match=r"^export_ensemble: weights must be finite, >= 0"):
        export_ensemble(mb, [0, 1], [1.0, -1.0])
    with pytest.raises(ValueError, match=r"^ensemble_predict: combine must be one of"):
        ensemble_predict(mb, x, combine="mean")
    with pytest.raises(TypeError, match=r"^member_outputs: expected a ModelBatch"):
        member_outputs(nn.Linear(2, 2), x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^greedy_selection: metric must be one of"):
        greedy_selection(torch.randn(3, 4, 2), torch.zeros(4, dtype=torch.long), metric="f1")
    with pytest.raises(ValueError, match=r"^seed_statistics: 'by' has 2 entries"):
        seed_statistics({"m": [1.0, 2.0, 3.0]}, [0, 1])
    with pytest.raises(ValueError, match=r"^ensemble_classify: weights must be \[K=3\]"):
        ensemble_classify(torch.randn(3, 4, 2), torch.ones(2))


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prediction_and_metrics_equal_cpu() -> None:
    mb = bn_batch(6)
    x, y = torch.randn(64, IN), torch.randint(0, CLASSES, (64,))
    want = ensemble_predict(mb, x, members=[5, 1, 2], weights=[1, 2, 3])
    report = ensemble_evaluate(mb, [(x, y)], members=[5, 1, 2], weights=[1, 2, 3])
    mb.cuda()
    got = ensemble_predict(mb, x.cuda(), members=[5, 1, 2], weights=[1, 2, 3])
    assert isinstance(got, torch.Tensor)  # classification: one tensor, not (mean, variance)
    # CUDA matmuls sum in another order than CPU ones: fp32 agreement to ~1e-5.
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    gpu_report = ensemble_evaluate(mb, [(x, y)], members=[5, 1, 2], weights=[1, 2, 3])
    for name in ("accuracy", "nll", "brier"):
        torch.testing.assert_close(
            gpu_report.ensemble[name].cpu(), report.ensemble[name], rtol=1e-5, atol=1e-6
        )
    ens = export_ensemble(mb, [5, 1, 2], [1, 2, 3])
    torch.testing.assert_close(ens(x.cuda()).cpu(), want, rtol=1e-5, atol=1e-6)
