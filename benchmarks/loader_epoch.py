"""Cost of PerModelSampler's per-model orders: the epoch boundary, each step's indices, peak memory.

    python benchmarks/loader_epoch.py --out results/loader [--device cuda] [--quick]

For each sampling, times (median of --repeats, each in a fresh sampler):
- boundary: the work done when an epoch starts (the epoch's per-model keys),
- first: the first step's `[N, B]` indices, boundary included,
- step: the median of the other steps' indices,
- epoch: every step's indices of one epoch,
and the largest tensor ever alive as a fraction of an `[N, L]` int64 order
(CUDA: peak allocated memory). Writes `loader_epoch.json` and `.md` under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from modelbatch.data import PerModelSampler


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(sampling: str, n: int, length: int, batch: int, device: torch.device) -> dict:
    extra = {"num_folds": 5} if sampling == "kfold" else {}
    sampler = PerModelSampler(
        length, num_models=n, batch_size=batch, sampling=sampling, device=device, **extra
    )
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    sampler._plan(1)
    sync(device)
    boundary = time.perf_counter() - t
    steps = []
    batches = sampler.index_batches()
    start = time.perf_counter()
    for _ in range(len(sampler)):
        t = time.perf_counter()
        next(batches)
        sync(device)
        steps.append(time.perf_counter() - t)
    epoch = time.perf_counter() - start
    result = {
        "sampling": sampling,
        "boundary_ms": boundary * 1e3,
        "first_step_ms": steps[0] * 1e3,
        "step_ms": statistics.median(steps[1:] or steps) * 1e3,
        "epoch_s": epoch,
        "steps": len(steps),
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        result["peak_mb"] = peak / 2**20
        result["peak_vs_full_order"] = peak / (n * length * 8)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.models, args.samples, args.repeats = 200, 100, 1
    device = torch.device(args.device)
    rows = []
    for sampling in ("shuffle", "bootstrap", "kfold"):
        runs = [
            measure(sampling, args.models, args.samples, args.batch, device)
            for _ in range(args.repeats)
        ]
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "sampling"}
        rows.append({"sampling": sampling, **row})
    config = {
        "device": str(device),
        "models": args.models,
        "samples": args.samples,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_epoch.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    lines = [
        f"PerModelSampler, N={args.models}, L={args.samples}, B={args.batch}, {device}",
        "",
        "| sampling | epoch boundary ms | first step ms | step ms | epoch s |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['sampling']} | {r['boundary_ms']:.2f} | {r['first_step_ms']:.1f} | "
        f"{r['step_ms']:.1f} | {r['epoch_s']:.2f} |"
        for r in rows
    ]
    (out / "loader_epoch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
