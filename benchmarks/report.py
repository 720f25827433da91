"""Turn a benchmark JSON into the speedup plot and the markdown tables.

    python benchmarks/report.py benchmarks/results/bench_<gpu>_<date>.json [--docs docs/benchmarks.md]

Writes `<json stem>.md` and `<json stem>.png` beside the JSON; with `--docs`,
also the generated section of that page (between the markers).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections import defaultdict
from typing import Any

BEGIN = "<!-- BEGIN GENERATED: benchmarks/report.py -->"
END = "<!-- END GENERATED -->"


def index(results: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, Any]]]:
    table: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in results:
        table[(r["model"], r["n"], r["precision"])][r["arm"]] = r
    return table


def _ms(row: dict[str, dict[str, Any]], arm: str) -> float | None:
    r = row.get(arm)
    return r["ms"] if r and r.get("status") == "ok" else None


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def tables(data: dict[str, Any]) -> str:
    table = index(data["results"])
    models = list(dict.fromkeys(r["model"] for r in data["results"]))
    lines: list[str] = []
    for model in models:
        lines += [
            f"### {model}",
            "",
            "| N | precision | sequential ms | eager ms | fast ms | ideal ms "
            "| fast model-steps/s | fast speedup | eager speedup | fast / ideal "
            "| peak MB fast | peak MB ideal |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        keys = sorted(k for k in table if k[0] == model)
        for _, n, precision in keys:
            row = table[(model, n, precision)]
            seq, eager, fast, ideal = (
                _ms(row, a) for a in ("sequential", "eager", "fast", "ideal")
            )
            seq_s = _fmt(seq, ".4g") + (
                "*" if row.get("sequential", {}).get("sequential_scaled") else ""
            )
            fast_rate = row.get("fast", {}).get("model_steps_per_s")
            mem_fast = row.get("fast", {}).get("peak_mem_mb")
            mem_ideal = row.get("ideal", {}).get("peak_mem_mb")
            cells = [
                str(n),
                precision,
                seq_s,
                _fmt(eager, ".4g")
                if eager is not None
                else row.get("eager", {}).get("status", "-"),
                _fmt(fast, ".4g") if fast is not None else row.get("fast", {}).get("status", "-"),
                _fmt(ideal, ".4g"),
                _fmt(fast_rate, ".3g"),
                _fmt(_ratio(seq, fast), ".1f"),
                _fmt(_ratio(seq, eager), ".1f"),
                _fmt(_ratio(fast, ideal), ".2f"),
                _fmt(mem_fast, ".0f"),
                _fmt(mem_ideal, ".0f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "`*` the sequential loop was timed on "
        f"{data['meta'].get('sequential_timed_models', 32)} models and scaled linearly to N. "
        "Speedup = sequential time / arm time for the same N models (equal work). "
        "fast / ideal = fast-step time / hand-written-ideal time (1.00 = no overhead)."
    )
    return "\n".join(lines)


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue, with its number and whether it is met."""
    table = index(data["results"])
    out: list[dict[str, Any]] = []

    def check(name: str, key: tuple, value: float | None, goal: float, above: bool) -> None:
        met = None if value is None else (value >= goal if above else value <= goal)
        out.append({"target": name, "config": key, "value": value, "goal": goal, "met": met})

    row = table.get(("mlp_784-64-64-10", 4096, "fp32"), {})
    check(
        "MLP 784-64-64-10, N=4096, fp32: fast >= 800x sequential",
        ("mlp_784-64-64-10", 4096, "fp32"),
        _ratio(_ms(row, "sequential"), _ms(row, "fast")),
        800,
        True,
    )
    for model in ("mlp_784-64-64-10", "mlp_784-512-512-10"):
        for (m, n, p), row in sorted(table.items()):
            if m == model and n >= 128 and p in ("fp32", "bf16"):
                check(
                    f"{model}, N={n}, {p}: fast within 1.25x of ideal",
                    (m, n, p),
                    _ratio(_ms(row, "fast"), _ms(row, "ideal")),
                    1.25,
                    False,
                )
    for (m, n, p), row in sorted(table.items()):
        if n == 1 and p == "fp32":
            check(
                f"{m}, N=1, fp32: fast >= 5x sequential",
                (m, n, p),
                _ratio(_ms(row, "sequential"), _ms(row, "fast")),
                5,
                True,
            )
    row = table.get(("lenet5", 512, "bf16"), {})
    check(
        "LeNet-5, N=512, bf16: fast >= 40x sequential",
        ("lenet5", 512, "bf16"),
        _ratio(_ms(row, "sequential"), _ms(row, "fast")),
        40,
        True,
    )
    for (m, n, p), row in sorted(table.items()):
        if n == 1024 and "ideal" in row and p == "fp32":
            mem = row.get("fast", {}).get("peak_mem_mb")
            check(
                f"{m}, N=1024, {p}: peak memory within 1.2x of ideal",
                (m, n, p),
                _ratio(mem, row["ideal"].get("peak_mem_mb")),
                1.2,
                False,
            )
    return out


def targets_md(data: dict[str, Any]) -> str:
    lines = ["| target | measured | met |", "| --- | ---: | --- |"]
    for t in targets(data):
        met = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'], '.3g')} | {met} |")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = index(data["results"])
    models = list(dict.fromkeys(r["model"] for r in data["results"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for precision, color in (("fp32", "C0"), ("tf32", "C1"), ("bf16", "C2")):
            keys = sorted(k for k in table if k[0] == model and k[2] == precision)
            for arm, style in (("fast", "-o"), ("eager", ":x"), ("ideal", "--")):
                pts = [
                    (n, _ratio(_ms(table[k], "sequential"), _ms(table[k], arm)))
                    for k in keys
                    for n in [k[1]]
                ]
                pts = [(n, s) for n, s in pts if s is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{arm} {precision}", ms=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (models)")
        ax.set_title(model, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("speedup over the sequential loop")
    axes[0][-1].legend(fontsize=7)
    meta = data["meta"]
    fig.suptitle(f"{meta['gpu']}, torch {meta['torch']}, batch {meta['batch_per_model']}/model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table from several runs: a later run's (model, N, precision, arm) rows win."""
    rows: dict[tuple, dict[str, Any]] = {}
    for i, run in enumerate(runs):
        for r in run["results"]:
            rows[(r["model"], r["n"], r["precision"], r["arm"])] = {**r, "run": i}
    meta = dict(runs[-1]["meta"])
    meta["runs"] = [run["meta"] for run in runs]
    return {"meta": meta, "results": list(rows.values())}


def render(data: dict[str, Any], png_name: str) -> str:
    meta = data["meta"]
    runs = meta.get("runs", [meta])
    sources = []
    for i, run in enumerate(runs):
        models = sorted({r["model"] for r in data["results"] if r.get("run", 0) == i})
        if models:
            sources.append(f"- run {run['date']}: {', '.join(models)} (`{run['command']}`)")
    return "\n".join(
        [
            f"Machine: **{meta['gpu']}**, torch {meta['torch']} (CUDA {meta['cuda']}); "
            f"batch {meta['batch_per_model']} per model, median of {meta['repeats']} timed "
            "repeats. Rows come from:",
            "",
            *sources,
            "",
            "#### Targets",
            "",
            targets_md(data),
            "",
            f"![speedup against N]({png_name})",
            "",
            tables(data),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="runs; a later run's rows replace an earlier's")
    parser.add_argument("--docs", default=None, help="markdown page to update between markers")
    parser.add_argument("--png-link", default=None, help="image path as the docs page sees it")
    args = parser.parse_args(argv)
    path = pathlib.Path(args.json[-1])
    data = merge([json.loads(pathlib.Path(p).read_text()) for p in args.json])
    png = path.with_suffix(".png")
    plot(data, png)
    path.with_suffix(".md").write_text(render(data, png.name) + "\n")
    if args.docs:
        docs = pathlib.Path(args.docs)
        text = docs.read_text()
        head, rest = text.split(BEGIN)
        _, tail = rest.split(END)
        body = render(data, args.png_link or png.name)
        docs.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")
    print(targets_md(data))


if __name__ == "__main__":
    main()
