"""Plots of ensemble results: reliability diagrams and seed statistics (matplotlib, lazily)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._seeds import SeedStatistics

__all__ = ["plot_reliability", "plot_seed_statistics"]


def _axes(owner: str, ax: Any) -> Any:
    if ax is not None:
        return ax
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"{owner}: needs matplotlib; `pip install matplotlib`.") from err
    # A bare Figure: no pyplot state, no GUI backend.
    return Figure(figsize=(5.0, 4.0), layout="constrained").add_subplot()


def _finish(ax: Any, path: Any) -> Any:
    fig = ax.figure
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_reliability(
    report: Any, *, members: Sequence[int] = (), path: Any = None, ax: Any = None
) -> Any:
    """Reliability diagram: accuracy against confidence per bin, for the ensemble and members.

    Each bin is drawn at its mean confidence, its marker sized by its share of samples.

    Args:
        report: an `EnsembleReport` (classification).
        members: positions in `report.indices` of members to draw as well.
        path: save the figure there (PNG, SVG, ... by the suffix).
        ax: draw into these matplotlib axes instead of a new figure.

    Returns:
        The matplotlib `Figure`.
    """
    if report.bins is None or report.member_bins is None:
        raise ValueError("plot_reliability: the report has no calibration bins (a regression?).")
    ax = _axes("plot_reliability", ax)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    curves = [("ensemble", report.bins, float(report.ensemble["ece"]))]
    for j in members:
        bins = {k: v[j] for k, v in report.member_bins.items()}
        name = f"model {int(report.indices[j])}"
        curves.append((name, bins, float(report.members["ece"][j])))
    for name, bins, ece in curves:
        keep = bins["count"] > 0
        x = bins["confidence"][keep].tolist()
        y = bins["accuracy"][keep].tolist()
        share = (bins["count"][keep] / bins["count"].sum()).tolist()
        (line,) = ax.plot(x, y, linewidth=1, label=f"{name} (ECE {ece:.3f})")
        # Marker area shows how many samples a bin holds: most sit in the top bins.
        ax.scatter(x, y, s=[4 + 200 * v for v in share], color=line.get_color(), alpha=0.7)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize="small")
    return _finish(ax, path)


def plot_seed_statistics(
    stats: SeedStatistics,
    metric: str,
    *,
    x: str | None = None,
    path: Any = None,
    ax: Any = None,
    logx: bool | None = None,
) -> Any:
    """Mean and interval of one metric per configuration, with every seed as a dot.

    Args:
        stats: from `seed_statistics`.
        metric: one of its metrics.
        x: the configuration column on the x axis (default: the first);
            the other columns, if any, give one line each.
        path: save the figure there.
        ax: draw into these matplotlib axes instead of a new figure.
        logx: log-scaled x axis; by default when x is positive and spans
            more than a factor of 100.

    Returns:
        The matplotlib `Figure`.
    """
    if metric not in stats.stats:
        raise ValueError(
            f"plot_seed_statistics: no metric {metric!r}; the metrics are {list(stats.stats)}."
        )
    keys = stats.keys or ["group"]
    configs = stats.configs if stats.keys else [("all",) for _ in stats.configs]
    x = keys[0] if x is None else x
    if x not in keys:
        raise ValueError(f"plot_seed_statistics: no column {x!r}; the columns are {keys}.")
    pos = keys.index(x)
    xs = [c[pos] for c in configs]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    coords = [float(v) for v in xs] if numeric else list(range(len(xs)))
    ax = _axes("plot_seed_statistics", ax)
    series: dict[tuple, list[int]] = {}
    for g, c in enumerate(configs):
        series.setdefault(tuple(v for i, v in enumerate(c) if i != pos), []).append(g)
    level = round(100 * stats.confidence)
    for rest, groups in series.items():
        groups = sorted(groups, key=lambda g: coords[g])
        s = [stats.stats[metric][g] for g in groups]
        gx = [coords[g] for g in groups]
        mean = [v["mean"] for v in s]
        lo = [v["mean"] - v["ci_low"] if not math.isnan(v["ci_low"]) else 0.0 for v in s]
        hi = [v["ci_high"] - v["mean"] if not math.isnan(v["ci_high"]) else 0.0 for v in s]
        others = [k for i, k in enumerate(keys) if i != pos]
        label = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in zip(others, rest)
        )
        line = ax.errorbar(
            gx,
            mean,
            yerr=[lo, hi],
            marker="o",
            capsize=3,
            label=label or f"mean, {level}% interval",
        )
        for g in groups:
            seeds = stats.values[metric][stats.members[g]]
            ax.scatter([coords[g]] * len(seeds), seeds, s=6, alpha=0.3, color=line[0].get_color())
    if (
        logx
        if logx is not None
        else (numeric and min(coords) > 0 and max(coords) > 100 * min(coords))
    ):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(coords, [str(v) for v in xs])
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.legend(fontsize="small")
    return _finish(ax, path)
