"""Per-model metrics as rows, as a table a person can read, and where users already look.

Rows are dicts `{"model": i, column: value, ...}`, one per model (as
`ModelBatch.summary` returns them). From rows: `format_table` (text),
`to_dataframe` (pandas, optional), `write_csv` (the standard library's csv),
`log_tensorboard` (one scalar series per model through
`torch.utils.tensorboard`, optional).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "aggregate",
    "format_table",
    "log_tensorboard",
    "per_model_rows",
    "to_dataframe",
    "write_csv",
]


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
    names = list(range(n)) if ids is None else [int(i) for i in _column_values("model", ids, n)]
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_column(values: Sequence[Any]) -> list[str]:
    """One column's cells, all floats in one notation so the column reads at a glance.

    Fixed point (4 decimals) while every nonzero float lies in [1e-2, 1e5);
    otherwise scientific with the fewest mantissa digits (1 to 3) that keep
    each value to 4 significant digits: `1.0e-04`, never `0.0000` for a small
    nonzero value. An exact zero prints as `0`.
    """
    floats = [v for v in values if isinstance(v, float) and math.isfinite(v) and v != 0]
    scientific = any(abs(v) < 1e-2 or abs(v) >= 1e5 for v in floats)
    digits = 4
    if scientific:
        digits = next(
            (d for d in (1, 2) if all(float(f"{v:.{d}e}") == float(f"{v:.3e}") for v in floats)),
            3,
        )

    def cell(value: Any) -> str:
        if not isinstance(value, float) or not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        return f"{value:.{digits}e}" if scientific else f"{value:.{digits}f}"

    return [cell(v) for v in values]


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
    columns = [_format_column([row.get(h, "") for row in rows]) for h in headers]
    cells = [list(c) for c in zip(*columns)]
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def to_dataframe(rows: Iterable[Mapping[str, Any]]) -> Any:
    """Per-model rows as a `pandas.DataFrame`, one row per model (pandas is optional).

    Example:
        >>> df = to_dataframe(mb.summary(acc=acc, lr=opt.hparams["lr"]))
        >>> df.sort_values("acc").tail(3)    # the three best models
    """
    try:
        import pandas as pd
    except ImportError as error:
        raise ImportError(
            "to_dataframe: pandas is not installed; install it with "
            "`pip install torch-modelbatch[pandas]`, or use format_table / write_csv."
        ) from error
    return pd.DataFrame.from_records(list(rows))


def write_csv(
    path: str | os.PathLike[str],
    rows: Iterable[Mapping[str, Any]],
    fieldnames: Sequence[str] | None = None,
    **stamp: Any,
) -> None:
    """Append per-model rows to a CSV file, writing the header when the file is new.

    Args:
        path: the file (its folder is created).
        rows: per-model rows.
        fieldnames: the columns, in order; by default the stamp's keys then
            the first row's. Entries a row lacks are left empty; extra ones
            are dropped.
        **stamp: columns with one value for every row (`step=100`, `split="eval"`).
    """
    rows = [{**stamp, **row} for row in rows]
    if not rows:
        return
    names = list(fieldnames) if fieldnames is not None else list(rows[0])
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def log_tensorboard(
    writer: Any,
    rows: Iterable[Mapping[str, Any]],
    step: int,
    prefix: str = "",
    grouped: bool = False,
) -> None:
    """Write every numeric column of per-model rows to TensorBoard, one series per model.

    Args:
        writer: a `torch.utils.tensorboard.SummaryWriter` (Lightning's
            `TensorBoardLogger.experiment` is one).
        rows: per-model rows (each with a `model` entry).
        step: the global step.
        prefix: put before each tag, e.g. `"val/"`.
        grouped: False writes tag `{prefix}{column}/model_{i}` (one chart per
            model and column); True writes `add_scalars("{prefix}{column}",
            {"model_{i}": value})`, all models of a column in one chart.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> log_tensorboard(SummaryWriter("runs/sweep"), mb.summary(acc=acc), step=100)
    """
    rows = list(rows)
    for column in rows[0] if rows else ():
        if column == "model":
            continue
        series = {
            f"model_{row.get('model', i)}": float(row[column])
            for i, row in enumerate(rows)
            if _is_number(row.get(column))
        }
        if not series:
            continue
        tag = f"{prefix}{column}"
        if grouped:
            writer.add_scalars(tag, series, step)
        else:
            for name, value in series.items():
                writer.add_scalar(f"{tag}/{name}", value, step)
