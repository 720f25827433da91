"""Architecture search on scikit-learn's digits: 64 MLP shapes x 16 seeds in one run.

Widths 16-256 (step 16) x depths 1-4 (hidden layers) = 64 architectures,
16 seeds each: 1,024 models trained with Adam by one `MixedBatch` (models
of one family padded into a few stacked groups, one step for all of them).
Prints the plan, a table of test accuracy per architecture (mean and spread
over the seeds), and the wall time against the same sweep run as 64
separate `ModelBatch`es (one `compile_step` each, one after another) and
against the ordinary loop (a few models timed, scaled to all of them).
Wall time includes building the models and moving the data to the device.

    python examples/arch_search.py            # the full sweep (a GPU is the point)
    python examples/arch_search.py --quick    # a small sweep that runs on a CPU in seconds
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from modelbatch import (
    MixedBatch,
    MixedOptimizer,
    ModelBatch,
    compile_mixed_step,
    compile_step,
    format_table,
)
from modelbatch.optim import OptimizerFactory

LR = 1e-3


def mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def data(device: torch.device) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=0)
    return tuple(torch.tensor(a, device=device) for a in (x_tr, y_tr, x_te, y_te))


def build(archs: list[tuple[int, int]], seeds: int, device: torch.device) -> list[nn.Module]:
    """Model (arch k, seed s) at index k * seeds + s, each from its own seed."""
    models = []
    for k, (w, d) in enumerate(archs):
        for s in range(seeds):
            torch.manual_seed(10_000 * k + s)
            models.append(mlp(w, d).to(device))
    return models


def epoch_batches(n: int, batch: int, epoch: int, device: torch.device) -> list[torch.Tensor]:
    """One shared shuffle per epoch, full batches only (one captured graph)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(device)
    return list(perm[: n - n % batch].split(batch))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_mixed(archs, seeds, epochs, batch, max_waste, device) -> dict:
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = data(device)
    mb = MixedBatch(build(archs, seeds, device), max_waste=max_waste)
    opt = MixedOptimizer(mb, torch.optim.Adam, [{"lr": LR}] * mb.num_models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager step on a CPU says so once
        step = compile_mixed_step(mb, opt)
    for epoch in range(epochs):
        for idx in epoch_batches(len(x_tr), batch, epoch, device):
            step(x_tr[idx], y_tr[idx])  # losses [N] stay on the device
    mb.eval()
    with torch.no_grad():
        accuracy = mb.accuracy(mb(x_te), y_te)  # [N], the user's model order
    accuracy = accuracy.cpu()
    sync(device)
    return {
        "seconds": time.perf_counter() - start,
        "accuracy": accuracy,
        "plan": mb.plan,
        "mode": step.mode,
    }


def run_separate(archs, seeds, epochs, batch, device) -> dict:
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = data(device)
    models = build(archs, seeds, device)
    batches, steps = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(len(archs)):
            mb = ModelBatch(models[k * seeds : (k + 1) * seeds])
            opt = OptimizerFactory(torch.optim.Adam, {"lr": LR}).create_optimizer(mb)
            batches.append(mb)
            steps.append(compile_step(mb, opt))
    for epoch in range(epochs):
        for idx in epoch_batches(len(x_tr), batch, epoch, device):
            for step in steps:
                step(x_tr[idx], y_tr[idx])
    accs = []
    with torch.no_grad():
        for mb in batches:
            mb.eval()
            accs.append(mb.accuracy(mb(x_te), y_te))
    accuracy = torch.cat(accs).cpu()
    sync(device)
    return {"seconds": time.perf_counter() - start, "accuracy": accuracy}


def run_loop(archs, seeds, epochs, batch, count, device) -> dict:
    """`count` models (one seed of evenly spread architectures) trained one by one."""
    start = time.perf_counter()
    x_tr, y_tr, _, _ = data(device)
    picks = np.linspace(0, len(archs) - 1, count).round().astype(int)
    for k in picks:
        torch.manual_seed(10_000 * int(k))
        model = mlp(*archs[k]).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        for epoch in range(epochs):
            for idx in epoch_batches(len(x_tr), batch, epoch, device):
                opt.zero_grad()
                F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
                opt.step()
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "scaled": seconds * len(archs) * seeds / count, "count": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 architectures x 2 seeds, 1 epoch")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-waste", type=float, default=None, help="default: by device")
    parser.add_argument("--loop-models", type=int, default=None, help="models timed in the loop")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        widths, depths = [16, 64], [1, 2]
    else:
        widths, depths = list(range(16, 257, 16)), [1, 2, 3, 4]
    archs = [(w, d) for w in widths for d in depths]
    seeds = args.seeds or (2 if args.quick else 16)
    epochs = args.epochs or (1 if args.quick else 20)
    loop_models = args.loop_models or (2 if args.quick else 8)

    mixed = run_mixed(archs, seeds, epochs, args.batch, args.max_waste, device)
    separate = run_separate(archs, seeds, epochs, args.batch, device)
    loop = run_loop(archs, seeds, epochs, args.batch, loop_models, device)

    acc = mixed["accuracy"].reshape(len(archs), seeds)
    rows = [
        {
            "width": w,
            "depth": d,
            "mean acc": float(acc[k].mean()),
            "std": float(acc[k].std()) if seeds > 1 else 0.0,
            "min": float(acc[k].min()),
            "max": float(acc[k].max()),
        }
        for k, (w, d) in enumerate(archs)
    ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; {len(archs)} architectures x {seeds} seeds = {len(archs) * seeds} MLPs, "
        f"{epochs} epochs on digits ({mixed['mode']} step)"
    )
    print(mixed["plan"])
    print()
    print(format_table(rows, sort_by="mean acc", top=None))
    print()
    best = max(rows, key=lambda r: r["mean acc"])
    print(
        f"best architecture: width {best['width']}, depth {best['depth']}: "
        f"{best['mean acc']:.3f} +- {best['std']:.3f} over {seeds} seeds"
    )
    diff = float((mixed["accuracy"] - separate["accuracy"]).abs().max())
    print(
        f"largest accuracy difference, mixed vs separate batches: {diff:.4f} (same models, same data)"
    )
    print("wall time (models built, data moved, trained, evaluated):")
    print(f"  one MixedBatch:          {mixed['seconds']:8.2f} s")
    print(f"  {len(archs)} separate batches:    {separate['seconds']:8.2f} s")
    print(
        f"  sequential loop:         {loop['scaled']:8.2f} s  (timed {loop['count']} models: "
        f"{loop['seconds']:.2f} s, scaled x{len(archs) * seeds / loop['count']:.0f})"
    )
    print(f"  speedup vs separate:     {separate['seconds'] / mixed['seconds']:8.1f} x")
    print(f"  speedup vs loop:         {loop['scaled'] / mixed['seconds']:8.1f} x")


if __name__ == "__main__":
    main()
