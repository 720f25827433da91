"""Per-model metrics as rows and as a table a person can read."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["aggregate", "format_table", "per_model_rows"]


def _column_values(name: str, values: Tensor | Sequence[Any], n: int) -> list[Any]:
    if isinstance(values, Tensor):
        if values.shape[:1] != (n,):
            raise ValueError(
                f"summary: column {name!r} must have one entry per model (N={n}), "
                f"got shape {tuple(values.shape)}."
            )
        values = values.detach().cpu().tolist()
    values = list(values)
    if len(values) != n:
        raise ValueError(
            f"summary: column {name!r} must have one entry per model (N={n}), got {len(values)}."
        )
    return values


def per_model_rows(
    columns: Mapping[str, Tensor | Sequence[Any]], n: int, ids: Sequence[int] | Tensor | None = None
) -> list[dict[str, Any]]:
    """Turn `[N]` columns into N dicts `{"model": i, column: value, ...}`.

    `ids` names the models (their global ids); by default model i is `i`.

    Example:
        >>> per_model_rows({"loss": torch.tensor([0.5, 0.25])}, 2)
        [{'model': 0, 'loss': 0.5}, {'model': 1, 'loss': 0.25}]
    """
    values = {name: _column_values(name, col, n) for name, col in columns.items()}
    names = list(range(n)) if ids is None else [int(i) for i in ids]
    return [
        {"model": names[i], **{name: vals[i] for name, vals in values.items()}} for i in range(n)
    ]


def aggregate(values: Tensor, active: Tensor, higher_is_better: bool = False) -> dict[str, Any]:
    """Best, median and worst of `values` `[N]` over the active models with finite values.

    Returns:
        `best`, `median`, `worst` (NaN when no model qualifies), `best_model`
        (its index, -1 when none) and `active` (how many models are active).
        One copy to the host; meant for logging, not for every step.
    """
    vals = values.detach().double().cpu().reshape(-1)
    on = active.detach().cpu().reshape(-1)
    mask = on & torch.isfinite(vals)
    stats: dict[str, Any] = {"active": int(on.sum())}
    if not bool(mask.any()):
        return {**stats, "best": math.nan, "median": math.nan, "worst": math.nan, "best_model": -1}
    idx = mask.nonzero().reshape(-1)
    kept = vals[idx]
    best_pos = int(kept.argmax() if higher_is_better else kept.argmin())
    worst = kept.min() if higher_is_better else kept.max()
    return {
        **stats,
        "best": float(kept[best_pos]),
        "median": float(kept.median()),
        "worst": float(worst),
        "best_model": int(idx[best_pos]),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    sort_by: str | None = None,
    top: int | None = None,
    descending: bool | None = None,
) -> str:
    """Rows of per-model metrics as aligned text.

    Args:
        rows: as returned by `ModelBatch.summary`.
        sort_by: a column to sort on (ascending for names containing "loss",
            descending otherwise, unless `descending` is given).
        top: keep only the first `top` rows after sorting.
    """
    rows = list(rows)
    if not rows:
        return "(no models)"
    if sort_by is not None:
        if sort_by not in rows[0]:
            raise ValueError(f"format_table: no column {sort_by!r}; columns are {list(rows[0])}.")
        desc = ("loss" not in sort_by) if descending is None else descending

        def key(row: Mapping[str, Any]) -> float:
            v = float(row[sort_by])
            return -math.inf if math.isnan(v) else (v if desc else -v)

        rows = sorted(rows, key=key, reverse=True)
    if top is not None:
        rows = rows[:top]
    headers = list(rows[0].keys())
    cells = [[_cell(row.get(h, "")) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
