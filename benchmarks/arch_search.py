"""Architecture sweep: one MixedBatch step against 64 separate batches and the plain loop.

The sweep of issue 18: MLPs on digits-shaped data (64 features, 10 classes),
widths 16-256 (step 16) x depths 1-4 = 64 architectures, 16 seeds each
(1,024 models), Adam, batch 128. Arms, all in this one process:

- `mixed[max_waste=w]`: one `MixedBatch` over all 1,024 models and one
  `compile_mixed_step` (one CUDA graph for the whole step), for each w in
  `--max-waste` (0 = one group per architecture; 1 = everything padded into
  one group): which padding threshold is fastest is measured here.
- `separate`: 64 `ModelBatch`es (one per architecture), each with its own
  `compile_step`, stepped one after another: today's best.
- `loop`: each architecture's model trained alone with `torch.optim.Adam`
  (one seed of every architecture timed, scaled by the number of seeds).

Each arm reports milliseconds per step of the whole sweep (every model takes
one step). Results as JSON and markdown under `--out`.

    python benchmarks/arch_search.py --out benchmarks/results/arch_search   # GPU, ~2 min
    python benchmarks/arch_search.py --quick --device cpu --out /tmp/arch   # CPU check
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import profile_kernels
from torch import nn

from modelbatch import MixedBatch, MixedOptimizer, ModelBatch, compile_mixed_step, compile_step
from modelbatch.optim import OptimizerFactory


def mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def sweep(widths: list[int], depths: list[int], seeds: int) -> list[tuple[int, int, int]]:
    return [(w, d, s) for w in widths for d in depths for s in range(seeds)]


def build(spec: list[tuple[int, int, int]], device: torch.device) -> list[nn.Module]:
    models = []
    for w, d, s in spec:
        torch.manual_seed(1000 * w + 10 * d + s)
        models.append(mlp(w, d).to(device))
    return models


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, steps: int, device: torch.device) -> float:
    """Milliseconds per call of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / steps


def batches(device: torch.device, batch: int, count: int = 8):
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(count)
    ]
    return [(x.to(device), y.to(device)) for x, y in data]


def arm_mixed(spec, data, max_waste, args, device) -> dict:
    start = time.perf_counter()
    models = build(spec, device)
    mixed = MixedBatch(models, max_waste=max_waste)
    del models
    opt = MixedOptimizer(mixed, torch.optim.Adam, [{"lr": 1e-3}] * len(spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = compile_mixed_step(mixed, opt)
    it = iter(range(10**9))

    def one() -> None:
        x, y = data[next(it) % len(data)]
        step(x, y)

    ms = timed(one, args.warmup, args.steps, device)
    profile = profile_kernels(one) if args.profile and device.type == "cuda" else None
    groups = [
        {"models": len(g.members), "archs": len(g.archs), "kind": g.kind, "waste": g.waste}
        for g in mixed._plan
    ]
    stacked = sum(p.numel() for p in mixed.parameters())
    result = {
        "ms_per_step": ms,
        "mode": step.mode,
        "groups": len(groups),
        "plan": groups,
        "stacked_params": stacked,
        "setup_s": time.perf_counter() - start,
        "final_loss_mean": float(mixed.latest_losses.mean()),
        "profile": profile,
    }
    return result


def arm_separate(spec, data, args, device) -> dict:
    start = time.perf_counter()
    by_arch: dict[tuple[int, int], list[nn.Module]] = {}
    for (w, d, _), m in zip(spec, build(spec, device)):
        by_arch.setdefault((w, d), []).append(m)
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for models in by_arch.values():
            mb = ModelBatch(models)
            opt = OptimizerFactory(torch.optim.Adam, {"lr": 1e-3}).create_optimizer(mb)
            steps.append(compile_step(mb, opt))
    it = iter(range(10**9))

    def one() -> None:
        x, y = data[next(it) % len(data)]
        for step in steps:
            step(x, y)

    ms = timed(one, args.warmup, args.steps, device)
    return {
        "ms_per_step": ms,
        "profile": profile_kernels(one) if args.profile and device.type == "cuda" else None,
        "batches": len(steps),
        "mode": steps[0].mode,
        "setup_s": time.perf_counter() - start,
    }


def arm_loop(spec, data, args, device, seeds: int) -> dict:
    """One seed of every architecture, each alone with torch.optim.Adam; scaled by `seeds`."""
    one_seed = [s for s in spec if s[2] == 0]
    models = build(one_seed, device)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    it = iter(range(10**9))

    def one() -> None:
        x, y = data[next(it) % len(data)]
        for m, o in zip(models, opts):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()

    steps = max(2, args.steps // 10)
    ms = timed(one, 2, steps, device)
    return {"ms_per_step": ms * seeds, "timed_models": len(models), "scale": seeds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small sweep (CPU check)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-waste", default="0,0.5,0.75,1", help="comma-separated")
    parser.add_argument("--out", default="benchmarks/results/arch_search")
    parser.add_argument(
        "--profile", action="store_true", help="CUDA: kernels per step and GPU time by family"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        widths, depths, seeds = [16, 32, 48], [1, 2], 2
        args.steps = args.steps or 3
        args.warmup = min(args.warmup, 3)
    else:
        widths, depths, seeds = list(range(16, 257, 16)), [1, 2, 3, 4], 16
        args.steps = args.steps or 100
    spec = sweep(widths, depths, seeds)
    data = batches(device, args.batch)
    results: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "models": len(spec),
        "architectures": len(widths) * len(depths),
        "seeds": seeds,
        "batch": args.batch,
        "steps": args.steps,
        "arms": {},
    }
    for w in [float(v) for v in args.max_waste.split(",")]:
        results["arms"][f"mixed[max_waste={w:g}]"] = arm_mixed(spec, data, w, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(
            f"mixed max_waste={w:g}: {results['arms'][f'mixed[max_waste={w:g}]']['ms_per_step']:.2f} ms",
            flush=True,
        )
    results["arms"]["separate"] = arm_separate(spec, data, args, device)
    print(f"separate: {results['arms']['separate']['ms_per_step']:.2f} ms", flush=True)
    results["arms"]["loop"] = arm_loop(spec, data, args, device, seeds)
    print(f"loop: {results['arms']['loop']['ms_per_step']:.2f} ms", flush=True)

    arms = results["arms"]
    separate, loop = arms["separate"]["ms_per_step"], arms["loop"]["ms_per_step"]
    lines = [
        f"# Architecture sweep on {results['device']}",
        "",
        f"{len(spec)} MLPs ({results['architectures']} architectures x {seeds} seeds), "
        f"Adam, batch {args.batch}, {args.steps} timed steps; ms per step of the whole sweep.",
        "",
        "| arm | ms / step | vs separate | vs loop | groups | stacked params |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in arms.items():
        lines.append(
            f"| {name} | {r['ms_per_step']:.2f} | {separate / r['ms_per_step']:.1f}x | "
            f"{loop / r['ms_per_step']:.1f}x | {r.get('groups', r.get('batches', ''))} | "
            f"{r.get('stacked_params', '')} |"
        )
    profiled = [(k, r["profile"]) for k, r in arms.items() if r.get("profile")]
    if profiled:
        lines += [
            "",
            "| arm | kernels / step | GPU ms / step | gemm | optimizer | copy/cast | other |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, prof in profiled:
            share = prof["share"]
            lines.append(
                f"| {name} | {prof['kernels_per_step']:.0f} | {prof['gpu_ms_per_step']:.2f} | "
                + " | ".join(
                    f"{100 * share.get(f, 0):.0f}%"
                    for f in ("gemm", "optimizer", "copy_cast", "other")
                )
                + " |"
            )
    best = min((k for k in arms if k.startswith("mixed")), key=lambda k: arms[k]["ms_per_step"])
    results["best_mixed"] = best
    lines += ["", f"fastest mixed arm: {best}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = results["device"].replace(" ", "-")
    (out / f"arch_search_{tag}.json").write_text(json.dumps(results, indent=1))
    (out / f"arch_search_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
