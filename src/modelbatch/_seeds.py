"""Multi-seed statistics: models grouped by configuration, mean and t interval per group."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._metrics import format_table, to_dataframe
from ._stats import group_indices, summarize

__all__ = ["STATS", "SeedStatistics", "seed_statistics"]

STATS = ("mean", "std", "sem", "ci_low", "ci_high")


def _column(owner: str, name: str, values: Any, n: int | None) -> list[Any]:
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        values = [tuple(v) for v in values.tolist()] if values.dim() == 2 else values.tolist()
    values = list(values)
    if n is not None and len(values) != n:
        raise ValueError(
            f"{owner}: {name!r} has {len(values)} entries, expected one per model (N={n})."
        )
    return values


def _config_columns(by: Any, keys: Sequence[str] | None, n: int) -> dict[str, list[Any]]:
    """The per-model configuration columns that define the groups."""
    owner = "seed_statistics"
    if isinstance(by, torch.optim.Optimizer):
        hparams = getattr(by, "hparams", None)
        if not isinstance(hparams, Mapping):
            raise TypeError(
                f"{owner}: the {type(by).__name__} has no per-model hparams; pass a modelbatch "
                "optimizer (OptimizerFactory, modelbatch.optim.Batch*) or per-model columns."
            )
        by = hparams
    if isinstance(by, Mapping):
        columns = {str(k): _column(owner, str(k), v, n) for k, v in by.items()}
        if keys is None:
            keys = [k for k, col in columns.items() if len(set(col)) > 1]
        missing = [k for k in keys if k not in columns]
        if missing:
            raise ValueError(f"{owner}: no column {missing}; the columns are {list(columns)}.")
        return {k: columns[k] for k in keys}
    if isinstance(by, (str, bytes)) or not isinstance(by, (Sequence, Tensor)):
        raise TypeError(
            f"{owner}: `by` must be a modelbatch optimizer, a mapping of per-model columns or "
            f"N group keys, got {type(by).__name__}."
        )
    column = _column(owner, "by", by, n)
    for i, key in enumerate(column):
        if not isinstance(key, Hashable):
            raise TypeError(f"{owner}: group key {i} ({key!r}) is not hashable.")
    return {"group" if keys is None else keys[0]: column}


@dataclass
class SeedStatistics:
    """Statistics over the seeds of each configuration (from `seed_statistics`).

    Attributes:
        keys: the configuration columns, e.g. `["lr"]`.
        configs: one tuple of key values per group.
        members: the model indices of each group.
        stats: `stats[metric][g]` is group g's `{"mean", "std", "sem",
            "ci_low", "ci_high"}`.
        values: each metric's per-model values `[N]` (numpy, float64).
        confidence: the interval's coverage (0.95).
    """

    keys: list[str]
    configs: list[tuple]
    members: list[list[int]]
    stats: dict[str, list[dict[str, float]]]
    values: dict[str, np.ndarray]
    confidence: float

    def rows(self) -> list[dict[str, Any]]:
        """One row per group: its configuration, `n`, then `<metric>_<stat>` columns."""
        rows = []
        for g, config in enumerate(self.configs):
            row: dict[str, Any] = dict(zip(self.keys, config))
            row["n"] = len(self.members[g])
            for metric, per_group in self.stats.items():
                row.update({f"{metric}_{s}": per_group[g][s] for s in STATS})
            rows.append(row)
        return rows

    def table(self) -> str:
        """`rows()` as aligned text."""
        return format_table(self.rows())

    def to_pandas(self) -> Any:
        """`rows()` as a pandas DataFrame (needs pandas)."""
        return to_dataframe(self.rows())


def seed_statistics(
    metrics: Mapping[str, Tensor | Sequence[float]],
    by: Any,
    *,
    keys: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> SeedStatistics:
    """Group models by configuration and summarize every metric over each group's seeds.

    For each group and metric: the mean, the sample standard deviation
    (ddof=1), the standard error `std / sqrt(n)` and the two-sided Student-t
    interval `mean ± t_{(1 + confidence) / 2, n - 1} * sem`. A group of one
    model has NaN spread; NaN values (a diverged seed) propagate.

    Args:
        metrics: per-model values, `{name: [N]}` (e.g. accuracy, loss).
        by: what defines a configuration: a modelbatch optimizer (its
            per-model `hparams`), a mapping of per-model columns
            (`{"lr": [N], ...}`), or a sequence of N hashable group keys.
        keys: the columns of `by` that define a group; by default the
            hyperparameters that differ between models.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        A `SeedStatistics`: `.table()`, `.rows()`, `.to_pandas()`, and
        `plot_seed_statistics(stats, metric)`.

    Example:
        >>> stats = seed_statistics({"acc": acc}, optimizer)  # 8 lrs x 16 seeds
        >>> len(stats.configs), stats.keys
        (8, ['lr'])
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"seed_statistics: confidence must be in (0, 1), got {confidence}.")
    if not metrics:
        raise ValueError("seed_statistics: no metrics given; pass {name: [N] values}.")
    first = next(iter(metrics))
    n = len(_column("seed_statistics", first, metrics[first], None))
    values = {
        name: np.asarray(_column("seed_statistics", name, v, n), dtype=np.float64)
        for name, v in metrics.items()
    }
    columns = _config_columns(by, keys, n)
    names = list(columns)
    per_model = [tuple(columns[k][i] for k in names) for i in range(n)]
    configs, members = group_indices(per_model)
    stats = {
        name: [summarize(vals[np.asarray(m)], confidence) for m in members]
        for name, vals in values.items()
    }
    return SeedStatistics(names, list(configs), members, stats, values, confidence)  # type: ignore[arg-type]
