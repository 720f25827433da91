"""Markdown tables from `benchmarks/speed.py` results (the tables of docs/benchmarks.md).

python benchmarks/speed_report.py benchmarks/results/speed_*.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any

ARMS = ("loop", "recipe", "recipe_compiled", "quickstart", "compiled", "jax")


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    med = statistics.median(values)
    return f"{med:.3f} ({min(values):.3f}-{max(values):.3f})"


def report(records: list[dict[str, Any]]) -> str:
    times: dict[tuple, list[float]] = defaultdict(list)
    profiles: dict[tuple, dict] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        key = (r["model"], r["precision"], r["n"], r["arm"])
        times[key].append(r["ms"])
        if "profile" in r:
            profiles[key[:3]] = {**r["profile"], "roofline": r.get("optimizer_roofline_ms")}
    lines = [
        "| model | prec | N | loop | recipe | recipe compiled | quick-start loop | compiled step "
        "(median, min-max over processes) | JAX | compiled / JAX | quick-start / recipe |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    configs = sorted({k[:3] for k in times}, key=lambda k: (k[0], k[1], k[2]))
    for model, prec, n in configs:
        row = [times.get((model, prec, n, arm), []) for arm in ARMS]
        med = [statistics.median(v) if v else None for v in row]
        vs_jax = f"{med[4] / med[5]:.2f}" if med[4] and med[5] else "-"
        vs_recipe = f"{med[3] / med[1]:.2f}" if med[3] and med[1] else "-"
        cells = [_cell(v) for v in row]
        lines.append(
            f"| {model} | {prec} | {n} | " + " | ".join(cells) + f" | {vs_jax} | {vs_recipe} |"
        )
    lines += [
        "",
        "| model | prec | N | kernels / step | copy/cast | GEMM | optimizer | other | "
        "update kernel ms | roofline ms | update / roofline |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (model, prec, n), p in sorted(profiles.items()):
        share = p["share"]
        ratio = p["optimizer_update_ms"] / p["roofline"] if p.get("roofline") else float("nan")
        lines.append(
            f"| {model} | {prec} | {n} | {p['kernels_per_step']:.0f} | "
            f"{share.get('copy_cast', 0):.0%} | {share.get('gemm', 0):.0%} | "
            f"{share.get('optimizer', 0):.0%} | {share.get('other', 0):.0%} | "
            f"{p['optimizer_update_ms']:.3f} | {p['roofline'] or 0:.3f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    records: list[dict[str, Any]] = []
    for path in sys.argv[1:]:
        with open(path) as f:
            records += json.load(f)["results"]
    print(report(records))


if __name__ == "__main__":
    main()
