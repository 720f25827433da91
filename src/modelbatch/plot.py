"""Pictures of a sweep: loss curves, final metric against each hyperparameter, a search's bracket.

matplotlib is optional (`pip install torch-modelbatch[plot]`) and imported only
when a function here is called. Each function draws into the axes it is
given (or a new figure) and returns them, so a picture can be adjusted and
saved as usual (`fig.savefig("sweep.png")`).

Example:
    >>> import modelbatch.plot as mbp
    >>> ax = mbp.loss_curves(mb.loss_history(), groups=[c["lr"] for c in configs])
    >>> ax.figure.savefig("loss.png")
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["bracket", "loss_curves", "metric_vs_hparams"]

# Names whose values are read on a log scale (learning rates, decay, epsilon).
_LOG_NAMES = ("lr", "learning_rate", "weight_decay", "eps")


def _pyplot(owner: str) -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            f"{owner}: matplotlib is not installed; install it with `pip install "
            "torch-modelbatch[plot]` (or `pip install matplotlib`)."
        ) from error
    return plt


def _array(owner: str, name: str, values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{owner}: {name} must be numbers (a tensor, array or list), got "
            f"{type(values).__name__}."
        ) from error


def _axes(owner: str, ax: Any) -> Any:
    if ax is not None:
        return ax
    _, ax = _pyplot(owner).subplots(figsize=(6.4, 4.2), layout="constrained")
    return ax


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over the first axis, ignoring NaN (the first steps average fewer)."""
    if window <= 1:
        return y
    ok = np.isfinite(y)
    cum = np.cumsum(np.where(ok, y, 0.0), axis=0)
    cnt = np.cumsum(ok, axis=0)
    cum[window:] = cum[window:] - cum[:-window]
    cnt[window:] = cnt[window:] - cnt[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, cum / np.maximum(cnt, 1), np.nan)


def loss_curves(
    history: Any,
    groups: Sequence[Any] | None = None,
    *,
    steps: Any = None,
    smooth: int = 1,
    spread: str = "minmax",
    log_y: bool = False,
    ax: Any = None,
) -> Any:
    """Per-model loss curves; with `groups`, one line per group and the spread of its members.

    Models with the same key in `groups` (e.g. the same configuration trained
    with different seeds) are drawn as their mean, with a band from their
    lowest to their highest value (`spread="minmax"`) or one standard
    deviation either side (`"std"`).

    Args:
        history: `[T, N]` losses (`ModelBatch.loss_history()`), or a ModelBatch.
        groups: N keys, one per model (a config id, an lr, a name); None draws
            one line per model.
        steps: `[T]` x values (default 0..T-1).
        smooth: a trailing moving average over this many steps (1: none).
        spread: `"minmax"` or `"std"`.
        log_y: a log-scale y axis.
        ax: matplotlib axes to draw into (default: a new figure).

    Returns:
        The axes: one line per group (or model), labelled, and one band per
        group of two or more models.

    Warning:
        A retired model's loss is recorded as 0 from its retirement on; drop
        its column (`history[:, keep]`) before plotting.
    """
    owner = "plot.loss_curves"
    if spread not in ("minmax", "std"):
        raise ValueError(f"{owner}: spread must be 'minmax' or 'std', got {spread!r}.")
    if hasattr(history, "loss_history"):
        history = history.loss_history()
    y = _array(owner, "history", history)
    if y.ndim != 2:
        raise ValueError(
            f"{owner}: history must be [T, N] (steps x models), got shape {y.shape}; pass "
            "ModelBatch.loss_history() or stack the per-step [N] losses."
        )
    t, n = y.shape
    x = np.arange(t) if steps is None else _array(owner, "steps", steps)
    if x.shape != (t,):
        raise ValueError(f"{owner}: steps must have T={t} entries, got shape {x.shape}.")
    keys = list(range(n)) if groups is None else list(groups)
    if len(keys) != n:
        raise ValueError(f"{owner}: groups must have one key per model (N={n}), got {len(keys)}.")
    y = _smooth(y, int(smooth))
    ax = _axes(owner, ax)
    order = list(dict.fromkeys(keys))  # keys in order of first appearance
    for j, key in enumerate(order):
        cols = [i for i, k in enumerate(keys) if k == key]
        member = y[:, cols]
        color = f"C{j % 10}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps where every member is NaN
            mean = np.nanmean(member, axis=1)
            if spread == "minmax":
                low, high = np.nanmin(member, axis=1), np.nanmax(member, axis=1)
            else:
                sd = np.nanstd(member, axis=1)
                low, high = mean - sd, mean + sd
        if groups is None:
            label = f"model {key}"
        else:
            label = f"{key}" if len(cols) == 1 else f"{key} ({len(cols)} models)"
        ax.plot(x, mean, color=color, label=label, linewidth=1.5)
        if len(cols) > 1:
            ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if smooth <= 1 else f"loss (mean of {int(smooth)} steps)")
    if len(order) <= 12:
        ax.legend(fontsize="small")
    return ax


def _columns(owner: str, hparams: Any, n: int) -> dict[str, np.ndarray]:
    """`{name: [N]}` from a mapping of `[N]` values, N config dicts, or an optimizer."""
    if hasattr(hparams, "hparams") and isinstance(hparams.hparams, Mapping):
        hparams = hparams.hparams
    if isinstance(hparams, Mapping):
        raw = dict(hparams)
    elif isinstance(hparams, Sequence) and all(isinstance(c, Mapping) for c in hparams):
        if len(hparams) != n:
            raise ValueError(f"{owner}: got {len(hparams)} configs for N={n} metric values.")
        names = [k for k in hparams[0] if all(k in c for c in hparams)]
        raw = {k: [c[k] for c in hparams] for k in names}
    else:
        raise TypeError(
            f"{owner}: hparams must be a mapping name -> [N] values, N config dicts or a "
            f"modelbatch optimizer, got {type(hparams).__name__}."
        )
    cols: dict[str, np.ndarray] = {}
    for name, values in raw.items():
        try:
            arr = _array(owner, name, values)
        except TypeError:
            continue  # non-numeric (a name, a flag string): nothing to plot against
        if arr.shape == (n,) and np.unique(arr[np.isfinite(arr)]).size > 1:
            cols[name] = arr  # constant or [N, 2] (betas) columns are left out
    if not cols:
        raise ValueError(
            f"{owner}: no hyperparameter varies across the N={n} models; pass the swept "
            "values, e.g. {'lr': lrs}."
        )
    return cols


def _scale(name: str, x: np.ndarray, log_x: Any) -> str:
    if isinstance(log_x, bool):
        wanted = log_x
    elif isinstance(log_x, Sequence):
        wanted = name in log_x
    else:
        positive = x[np.isfinite(x) & (x > 0)]
        wide = positive.size > 1 and positive.max() / positive.min() >= 20
        wanted = name in _LOG_NAMES or name.endswith("lr") or wide
    if not wanted:
        return "linear"
    finite = x[np.isfinite(x)]
    if finite.size and finite.min() > 0:
        return "log"
    return "symlog"  # zeros (no weight decay) stay on the axis


def metric_vs_hparams(
    metric: Any,
    hparams: Any,
    *,
    metric_name: str = "metric",
    log_x: bool | Sequence[str] | None = None,
    best: str | None = "min",
    axes: Any = None,
) -> Any:
    """The final metric of each model against each swept hyperparameter, one panel each.

    Args:
        metric: `[N]`, one value per model (a validation loss or accuracy).
        hparams: `{name: [N]}`, N config dicts (`[{"lr": ..., "weight_decay": ...}]`),
            or a modelbatch optimizer (its `hparams`). Only numeric `[N]`
            entries that vary get a panel.
        metric_name: the y-axis label.
        log_x: None chooses: a log axis for learning rates, weight decay, eps
            and any positive values spanning more than a factor 20 (symlog
            where a value is 0); True / False for all panels; or the names
            to put on a log axis.
        best: mark the best model with a star: `"min"`, `"max"` or None.
        axes: a sequence of matplotlib axes, one per panel (default: a new figure).

    Returns:
        The figure; panel k is a scatter of the N models (`metric` against
        hyperparameter k), sharing the y axis.
    """
    owner = "plot.metric_vs_hparams"
    if best not in ("min", "max", None):
        raise ValueError(f"{owner}: best must be 'min', 'max' or None, got {best!r}.")
    y = _array(owner, "metric", metric)
    if y.ndim != 1:
        raise ValueError(f"{owner}: metric must be [N], one value per model, got {y.shape}.")
    cols = _columns(owner, hparams, y.shape[0])
    if axes is None:
        plt = _pyplot(owner)
        fig, grid = plt.subplots(
            1,
            len(cols),
            figsize=(3.4 * len(cols) + 0.6, 3.4),
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
        axes = list(grid[0])
    else:
        axes = list(axes)
        if len(axes) != len(cols):
            raise ValueError(
                f"{owner}: got {len(axes)} axes for {len(cols)} hyperparameters {list(cols)}."
            )
        fig = axes[0].figure
    finite = np.isfinite(y)
    star = None
    if best is not None and finite.any():
        star = int(np.nanargmin(y) if best == "min" else np.nanargmax(y))
    for ax, (name, x) in zip(axes, cols.items()):
        ax.scatter(x, y, s=22, alpha=0.8, color="C0", label="model")
        if star is not None:
            ax.scatter([x[star]], [y[star]], marker="*", s=180, color="C3", label="best")
        scale = _scale(name, x, log_x)
        if scale == "symlog":
            positive = x[np.isfinite(x) & (x > 0)]
            ax.set_xscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)
        else:
            ax.set_xscale(scale)
        ax.set_xlabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(metric_name)
    if star is not None:
        axes[0].legend(fontsize="small")
    return fig


_OUTCOME_COLORS = {"running": "C2", "replaced": "C1", "retired": "C7"}


def bracket(
    log: Any,
    *,
    end: int | None = None,
    rungs: Sequence[float] | None = None,
    ax: Any = None,
) -> Any:
    """A successive-halving / ASHA chart: each trial as a bar from its start to its stop.

    Rows are trials in order of start. Bars are coloured by outcome (still
    running at the end, replaced, retired), and a cross marks where a trial
    was stopped.

    Args:
        log: a `modelbatch.lifecycle.LifecycleLog` (or its `trials` list).
        end: the last step, where running trials' bars end (default: the
            latest step recorded).
        rungs: steps at which the search made decisions, drawn as vertical lines.
        ax: matplotlib axes to draw into (default: a new figure).

    Returns:
        The axes: one horizontal segment per trial (one `LineCollection`
        per outcome), labelled by outcome.
    """
    owner = "plot.bracket"
    trials = list(getattr(log, "trials", log))
    if not trials or not all(isinstance(t, Mapping) and "start" in t for t in trials):
        raise TypeError(
            f"{owner}: expected a modelbatch.lifecycle.LifecycleLog with trials recorded, "
            f"got {type(log).__name__}."
        )
    last = max(max(t["start"], t["end"] if t["end"] is not None else t["start"]) for t in trials)
    end = last if end is None else int(end)
    ax = _axes(owner, ax)
    rows = sorted(trials, key=lambda t: (t["start"], t["trial"]))
    by_outcome: dict[str, list[int]] = {}
    for row, t in enumerate(rows):
        by_outcome.setdefault(str(t["outcome"]), []).append(row)
    extra = iter(f"C{k}" for k in (0, 3, 4, 5, 6, 8, 9))
    width = min(2.5, max(0.6, 150 / len(rows)))  # hundreds of trials: thin bars that don't merge
    for outcome, members in by_outcome.items():
        color = _OUTCOME_COLORS.get(outcome) or next(extra, "C0")
        starts = [rows[r]["start"] for r in members]
        stops = [end if rows[r]["end"] is None else rows[r]["end"] for r in members]
        label = {"running": "trained to the end"}.get(outcome, outcome)
        ax.hlines(
            members, starts, stops, colors=color, linewidth=width, label=f"{label} ({len(members)})"
        )
        if outcome != "running":
            ax.plot(stops, members, "|", color=color, markersize=2 * width + 1)
    for r in rungs or ():
        ax.axvline(r, color="0.6", linewidth=0.8, linestyle="--")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("trial (in order of start)")
    ax.set_ylim(len(rows), -1)  # first trial on top
    ax.margins(x=0.02)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{len(rows)} trials, {sum(t['end'] is None for t in rows)} trained to the end")
    return ax
