"""Ensembles and multi-seed studies from the models of a ModelBatch.

- Prediction in one vectorized forward, over all models, the active ones or
  a subset, without unstacking: `member_outputs`, `ensemble_predict`, and the
  pure combiners `ensemble_classify`, `ensemble_log_probs`, `ensemble_regress`.
- Metrics for the ensemble and each member (accuracy, NLL, Brier, calibration
  error, entropy, disagreement): `ensemble_evaluate`, `classification_metrics`.
- Greedy ensemble selection with replacement: `greedy_selection`.
- Seed statistics per configuration (mean, std, standard error, t interval):
  `seed_statistics`, `t_quantile`.
- An inference module holding the chosen members: `export_ensemble`,
  `StackedEnsemble`.
- Plots (matplotlib, imported when called): `plot_reliability`,
  `plot_seed_statistics`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._batch import ModelBatch
from ._calibration import NORMS, ClassificationSums
from ._combine import ensemble_classify, ensemble_log_probs, ensemble_regress, mix_log_probs
from ._ensemble_plot import plot_reliability, plot_seed_statistics
from ._indices import model_indices
from ._metrics import format_table
from ._seeds import SeedStatistics, seed_statistics
from ._selection import Selection, greedy_selection
from ._stacked_ensemble import StackedEnsemble, check_task, members_forward
from ._stats import t_quantile
from .fast import _as_args, eval_autocast, eval_batches

__all__ = [
    "EnsembleReport",
    "SeedStatistics",
    "Selection",
    "StackedEnsemble",
    "classification_metrics",
    "ensemble_classify",
    "ensemble_evaluate",
    "ensemble_log_probs",
    "ensemble_predict",
    "ensemble_regress",
    "export_ensemble",
    "greedy_selection",
    "member_outputs",
    "plot_reliability",
    "plot_seed_statistics",
    "seed_statistics",
    "t_quantile",
]


# ---------------------------------------------------------------------- members and weights


def _members(owner: str, model_batch: ModelBatch, members: Any) -> Tensor | None:
    """Member indices `[K]`, or None for all N models in order."""
    if not isinstance(model_batch, ModelBatch):
        raise TypeError(
            f"{owner}: expected a ModelBatch, got {type(model_batch).__name__}; wrap the "
            "models with modelbatch.ModelBatch(models) first."
        )
    if members is None:
        return None
    if isinstance(members, str):
        if members != "active":
            raise ValueError(
                f"{owner}: members must be None (all), 'active', indices or an [N] bool mask, "
                f"got {members!r}."
            )
        members = model_batch.active
    idx = model_indices(owner, members, model_batch.num_models, model_batch.active.device)
    if idx.numel() == 0:
        raise ValueError(f"{owner}: no members selected; pass at least one model.")
    return idx


def _weights(owner: str, weights: Any, k: int, device: torch.device) -> Tensor | None:
    """Member weights `[K]` normalized to sum 1 (float64), or None for uniform."""
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float64).to(device).reshape(-1)
    if w.numel() != k:
        raise ValueError(
            f"{owner}: weights must have one entry per member (K={k}), got {w.numel()}; pass "
            "weights in the order of members."
        )
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        raise ValueError(f"{owner}: weights must be finite, >= 0 and not all 0, got {w.tolist()}.")
    return w / w.sum()


def _member_state(model_batch: ModelBatch, idx: Tensor | None) -> dict[str, Tensor] | None:
    """The members' stacked parameters and buffers `[K, ...]`, gathered once; None for all."""
    if idx is None:
        return None
    own = {**model_batch.stacked_params(), **model_batch.stacked_buffers()}
    return {name: t.index_select(0, idx) for name, t in own.items()}


def _forward(
    model_batch: ModelBatch, state: dict[str, Tensor] | None, args: tuple, kwargs: dict
) -> Any:
    """The members' outputs `[K, B, ...]` on shared inputs, in the batch's current mode."""
    if state is None:
        return model_batch(*args, **kwargs)
    device = model_batch.active.device
    return members_forward(model_batch.skeleton, state, args, kwargs, device, "different")


@contextlib.contextmanager
def _eval_mode(model_batch: ModelBatch) -> Any:
    was_training = model_batch.training
    model_batch.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model_batch.train(was_training)


# ---------------------------------------------------------------------- prediction


def member_outputs(model_batch: ModelBatch, *args: Any, members: Any = None, **kwargs: Any) -> Any:
    """The members' outputs on shared inputs, in eval mode and without grad: `[K, B, ...]`.

    Args:
        model_batch: the trained models.
        *args: the model's inputs, shared by all members (`[B, ...]`).
        members: None (all N models), `"active"`, indices `[K]` or an `[N]`
            bool mask. A subset runs only its own members: their weights are
            gathered, nothing is unstacked.
        **kwargs: the model's keyword inputs.

    Example:
        >>> member_outputs(mb, torch.randn(16, 4), members=[0, 3]).shape
        torch.Size([2, 16, 3])
    """
    idx = _members("member_outputs", model_batch, members)
    with _eval_mode(model_batch):
        return _forward(model_batch, _member_state(model_batch, idx), args, kwargs)


def ensemble_predict(
    model_batch: ModelBatch,
    *args: Any,
    members: Any = None,
    weights: Any = None,
    task: str = "classification",
    combine: str = "probs",
    **kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """The ensemble's prediction in one forward of its members (eval mode, no grad).

    Args:
        model_batch: the trained models.
        *args: inputs shared by all members (`[B, ...]`).
        members: None (all), `"active"`, indices or an `[N]` bool mask.
        weights: `[K]` member weights (normalized here), e.g. a `Selection`'s.
        task: `"classification"` returns `[B, ..., C]` as `combine` says;
            `"regression"` returns `(mean, variance)` across members, each `[B, ...]`.
        combine: `"probs"`, the mean of the members' probabilities; `"logits"`,
            the mean logits; `"vote"`, the fraction of members voting for each
            class (see `ensemble_classify`).
        **kwargs: the model's keyword inputs.

    Returns:
        The ensemble's prediction; the batch is put back in its mode.

    Example:
        >>> ensemble_predict(mb, torch.randn(16, 4)).shape
        torch.Size([16, 3])
    """
    check_task("ensemble_predict", task, combine)
    idx = _members("ensemble_predict", model_batch, members)
    k = model_batch.num_models if idx is None else idx.numel()
    w = _weights("ensemble_predict", weights, k, model_batch.active.device)
    with _eval_mode(model_batch):
        outputs = _forward(model_batch, _member_state(model_batch, idx), args, kwargs)
    if task == "regression":
        return ensemble_regress(outputs, w)
    return ensemble_classify(outputs, w, combine=combine)


def export_ensemble(
    model_batch: ModelBatch,
    members: Any = None,
    weights: Any = None,
    *,
    task: str = "classification",
    combine: str = "probs",
) -> StackedEnsemble:
    """A `StackedEnsemble` holding copies of the chosen members' weights and buffers.

    Args:
        model_batch: the trained models.
        members: None (all), `"active"`, indices or an `[N]` bool mask.
        weights: `[K]` member weights (normalized here); uniform by default.
        task: `"classification"` or `"regression"` (see `StackedEnsemble`).
        combine: for classification, `"probs"`, `"logits"` or `"vote"`.

    Example:
        >>> ens = export_ensemble(mb, members=[0, 3, 5])
        >>> torch.save(ens.state_dict(), "ensemble.pt")
        >>> ens(torch.randn(16, 4)).shape
        torch.Size([16, 3])
    """
    check_task("export_ensemble", task, combine)
    idx = _members("export_ensemble", model_batch, members)
    device = model_batch.active.device
    if idx is None:
        idx = torch.arange(model_batch.num_models, device=device)
    w = _weights("export_ensemble", weights, idx.numel(), device)
    template = model_batch.model(int(idx[0]))
    ens = StackedEnsemble(template, idx.numel(), task=task, combine=combine)
    state = _member_state(model_batch, idx)
    assert state is not None
    with torch.no_grad():
        for name, t in ens.member_state().items():
            t.copy_(state[name])
        if w is not None:
            ens.member_weights.copy_(w)
    return ens


# ---------------------------------------------------------------------- metrics


def classification_metrics(
    log_probs: Tensor, targets: Tensor, *, n_bins: int = 15, norm: str = "l1"
) -> dict[str, Tensor]:
    """Accuracy, NLL, Brier score, calibration error and predictive entropy.

    Args:
        log_probs: log-probabilities `[*L, B, C]` (`logits.log_softmax(-1)`,
            or `ensemble_log_probs(outputs)` for an ensemble); leading dims
            `L` (e.g. K members) are kept.
        targets: class indices `[B]`.
        n_bins: equal-width confidence bins, as torchmetrics' `CalibrationError`.
        norm: `"l1"` (expected calibration error), `"l2"` or `"max"`.

    Returns:
        `accuracy`, `nll`, `brier` (sum over classes of the squared error,
        mean over samples), `ece`, `entropy`: each `[*L]` (float64).

    Example:
        >>> classification_metrics(torch.randn(8, 32, 10).log_softmax(-1),
        ...                        torch.randint(0, 10, (32,)))["ece"].shape
        torch.Size([8])
    """
    if norm not in NORMS:
        raise ValueError(f"classification_metrics: norm must be one of {NORMS}, got {norm!r}.")
    sums = ClassificationSums(n_bins)
    sums.update(log_probs, targets)
    return sums.compute(norm)


@dataclass
class EnsembleReport:
    """What `ensemble_evaluate` measured.

    Attributes:
        indices: `[K]` the members' model indices.
        weights: `[K]` their weights (sum 1).
        ensemble: the ensemble's metrics, each a 0-dim tensor. Classification:
            `accuracy`, `nll`, `brier`, `ece`, `entropy` (predictive entropy),
            `disagreement` (weighted mean of the members'), `mutual_information`
            (predictive entropy minus the members' weighted mean entropy).
            Regression: `mse` of the mean, `variance` (mean spread across members).
        members: each member's metrics, `[K]` each: classification as above
            with `disagreement` the fraction of samples where the member's top
            class differs from the ensemble's; regression `mse`.
        bins: the ensemble's calibration bins (`count`, `confidence`,
            `accuracy`, `[n_bins + 1]`); None for regression.
        member_bins: the members' bins, `[K, n_bins + 1]` each; None for regression.
    """

    indices: Tensor
    weights: Tensor
    ensemble: dict[str, Tensor]
    members: dict[str, Tensor]
    bins: dict[str, Tensor] | None = None
    member_bins: dict[str, Tensor] | None = None

    def rows(self) -> list[dict[str, Any]]:
        """The ensemble, the members' mean and each member, one row each."""
        names = list(self.members)
        ens: dict[str, Any] = {"model": "ensemble", "weight": 1.0}
        ens.update({m: float(v) for m, v in self.ensemble.items()})
        mean: dict[str, Any] = {"model": "mean member", "weight": ""}
        mean.update({m: float(self.members[m].mean()) for m in names})
        per = {m: self.members[m].tolist() for m in names}
        weights = self.weights.tolist()
        rows = [ens, mean]
        for j, i in enumerate(self.indices.tolist()):
            rows.append({"model": i, "weight": weights[j], **{m: per[m][j] for m in names}})
        return rows

    def table(self, top: int | None = None) -> str:
        """`rows()` as aligned text; `top` keeps the first members."""
        rows = self.rows()
        return format_table(rows if top is None else rows[: 2 + top])


@torch.no_grad()
def ensemble_evaluate(
    model_batch: ModelBatch,
    loader: Iterable[Any],
    members: Any = None,
    weights: Any = None,
    *,
    task: str = "classification",
    n_bins: int = 15,
    norm: str = "l1",
    autocast_dtype: torch.dtype | None = None,
) -> EnsembleReport:
    """The ensemble's and every member's metrics over a loader, in eval mode.

    Runs the members' forward once per batch (as `modelbatch.evaluate` does)
    and keeps running sums on the device; nothing is read back before the end.

    Args:
        model_batch: the trained models; put back in their mode afterwards.
        loader: yields `(inputs, targets)` shared by all members; targets
            are class indices `[B]` (classification) or `[B, ...]` (regression).
        members: None (all), `"active"`, indices or an `[N]` bool mask.
        weights: `[K]` member weights (normalized here), e.g. a `Selection`'s.
        task: `"classification"` (members' logits `[K, B, C]`) or `"regression"`.
        n_bins: the calibration error's equal-width bins.
        norm: the calibration error's norm, `"l1"`, `"l2"` or `"max"`.
        autocast_dtype: run the forward under `torch.autocast`; metrics in fp32/fp64.

    Returns:
        An `EnsembleReport`; `report.table()` prints it.
    """
    check_task("ensemble_evaluate", task, "probs")
    if norm not in NORMS:
        raise ValueError(f"ensemble_evaluate: norm must be one of {NORMS}, got {norm!r}.")
    mb = model_batch
    idx = _members("ensemble_evaluate", mb, members)
    device = mb.active.device
    indices = torch.arange(mb.num_models, device=device) if idx is None else idx
    k = indices.numel()
    w = _weights("ensemble_evaluate", weights, k, device)
    w_full = torch.full((k,), 1.0 / k, dtype=torch.float64, device=device) if w is None else w
    ens_sums, member_sums = ClassificationSums(n_bins), ClassificationSums(n_bins)
    sums: dict[str, Tensor] = {}
    count = 0

    def add(key: str, value: Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    with _eval_mode(mb):
        state = _member_state(mb, idx)
        for inputs, targets in eval_batches("ensemble_evaluate", loader, device):
            with eval_autocast(device, autocast_dtype):
                outputs = _forward(mb, state, _as_args(inputs), {})
            outputs = outputs.float()
            if task == "regression":
                mean, var = ensemble_regress(outputs, w)
                target = targets.to(outputs)
                add("ens_mse", (mean - target).double().square().sum())
                add("variance", var.double().sum())
                add("mse", (outputs - target).double().square().flatten(1).sum(1))
                count += target.numel()
                continue
            # Every position of [K, B, ..., C] is one sample of C classes.
            outputs = outputs.reshape(k, -1, outputs.shape[-1])
            targets = targets.reshape(-1)
            member_lp = outputs.log_softmax(dim=-1)
            ens_lp = mix_log_probs(member_lp, w)
            member_sums.update(member_lp, targets)
            ens_sums.update(ens_lp, targets)
            differs = member_lp.argmax(dim=-1) != ens_lp.argmax(dim=-1)
            add("disagreement", differs.double().sum(1))
            count += targets.numel()
    if count == 0:
        raise ValueError(
            "ensemble_evaluate: the loader yielded no batches; pass a non-empty loader."
        )
    if task == "regression":
        return EnsembleReport(
            indices,
            w_full,
            {"mse": sums["ens_mse"] / count, "variance": sums["variance"] / count},
            {"mse": sums["mse"] / count},
        )
    per_member = member_sums.compute(norm)
    per_member["disagreement"] = sums["disagreement"] / count
    ens = ens_sums.compute(norm)
    ens["disagreement"] = (w_full * per_member["disagreement"]).sum()
    ens["mutual_information"] = ens["entropy"] - (w_full * per_member["entropy"]).sum()
    return EnsembleReport(indices, w_full, ens, per_member, ens_sums.bins(), member_sums.bins())
