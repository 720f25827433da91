"""A learning-rate x weight-decay sweep of 1,024 small MLPs on scikit-learn's digits.

Trains every (lr, weight_decay) pair on a 32 x 32 grid for a fixed number of
epochs with `modelbatch` (one fast step for all models), reports each model's
final train loss and test accuracy, and times the same sweep run the ordinary
way, one model after another (a subset of the models, scaled to all of them).

The two timings compare like with like. One-time costs of the process (imports,
torch._dynamo's included; the CUDA context; the data onto the device) are paid
before either clock starts; each arm runs once, small, as a warm-up; on a GPU
the device is synchronized before a clock starts and before it stops. Each
timed arm then covers all of its own work: building the models and optimizers
(for modelbatch also stacking them and capturing the step), training and the
final evaluation.

    python examples/sweep_digits.py            # full sweep (a GPU is the point)
    python examples/sweep_digits.py --quick    # a small sweep that runs on a CPU in seconds
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from modelbatch import ModelBatch
from modelbatch.fast import compile_step, evaluate
from modelbatch.optim import OptimizerFactory


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def data(device: torch.device) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=0)
    return (
        torch.tensor(x_tr, device=device),
        torch.tensor(y_tr, device=device),
        torch.tensor(x_te, device=device),
        torch.tensor(y_te, device=device),
    )


def grid(side: int) -> list[dict[str, float]]:
    lrs = np.logspace(-4, -1, side)
    wds = np.concatenate([[0.0], np.logspace(-5, -1, side - 1)])
    return [{"lr": float(lr), "weight_decay": float(wd)} for lr in lrs for wd in wds]


def batches(n: int, batch: int, epoch: int, device: torch.device) -> list[torch.Tensor]:
    """One shared shuffle per epoch; the last, smaller batch is kept (the step re-captures)."""
    gen = torch.Generator().manual_seed(epoch)
    return list(torch.randperm(n, generator=gen).to(device).split(batch))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_batched(
    configs: list[dict], epochs: int, batch: int, tensors: tuple[torch.Tensor, ...]
) -> dict:
    x_tr, y_tr, x_te, y_te = tensors
    device = x_tr.device
    sync(device)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        models = [mlp() for _ in configs]
    mb = ModelBatch(models)
    opt = OptimizerFactory(torch.optim.AdamW).create_optimizer(mb, configs)
    step = compile_step(mb, opt)
    for epoch in range(epochs):
        for idx in batches(len(x_tr), batch, epoch, device):
            losses = step(x_tr[idx], y_tr[idx])  # [N], stays on the device
    result = evaluate(mb, [(x_te, y_te)])
    train = evaluate(mb, [(x_tr, y_tr)])
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "step_mode": step.mode,
        "last_batch_losses": losses.cpu().tolist(),
        "train_loss": train.loss.cpu().tolist(),
        "test_accuracy": result.accuracy.cpu().tolist(),
    }


def run_sequential(
    configs: list[dict], epochs: int, batch: int, tensors: tuple[torch.Tensor, ...]
) -> dict:
    x_tr, y_tr, x_te, y_te = tensors
    device = x_tr.device
    sync(device)
    start = time.perf_counter()
    accs = []
    for i, cfg in enumerate(configs):
        torch.manual_seed(i)
        model = mlp().to(device)
        opt = torch.optim.AdamW(model.parameters(), **cfg)
        for epoch in range(epochs):
            for idx in batches(len(x_tr), batch, epoch, device):
                opt.zero_grad()
                F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
                opt.step()
        with torch.no_grad():
            accs.append((model(x_te).argmax(-1) == y_te).float().mean())
    accs_list = torch.stack(accs).cpu().tolist()
    sync(device)
    return {"seconds": time.perf_counter() - start, "test_accuracy": accs_list}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 models, 2 epochs (CPU-sized)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sequential-subset", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the timings and results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    side = 4 if args.quick else 32
    epochs = args.epochs or (2 if args.quick else 20)
    configs = grid(side)
    subset = args.sequential_subset or (2 if args.quick else 16)

    # One-time costs, outside both clocks: torch._dynamo's import (the captured step
    # uses it), the CUDA context and the data on the device; then a small warm-up
    # run of each arm (kernels, allocator, library handles).
    importlib.import_module("torch._dynamo")

    tensors = data(device)
    run_batched(configs[:2], 1, args.batch, tensors)
    run_sequential(configs[:1], 1, args.batch, tensors)

    batched = run_batched(configs, epochs, args.batch, tensors)
    seq = run_sequential(configs[:subset], epochs, args.batch, tensors)
    seq_all = seq["seconds"] * len(configs) / subset
    acc = np.array(batched["test_accuracy"]).reshape(side, side)
    best = int(np.argmax(acc))
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(f"{len(configs)} MLPs x {epochs} epochs on digits ({batched['step_mode']} step)")
    print(f"  modelbatch:  {batched['seconds']:8.2f} s")
    print(
        f"  sequential:  {seq_all:8.2f} s  (timed {subset} models: {seq['seconds']:.2f} s, "
        f"scaled x{len(configs) / subset:.0f})"
    )
    print(f"  speedup:     {seq_all / batched['seconds']:8.1f} x")
    cuda = device.type == "cuda"
    print(
        "  timing: one-time costs (imports, torch._dynamo, "
        + ("the CUDA context, " if cuda else "")
        + "data on the device) excluded from both arms;\n"
        + "          each arm timed after a warm-up run"
        + (", CUDA synchronized at start and stop" if cuda else "")
    )
    print(
        f"  best model: lr={configs[best]['lr']:.2e} weight_decay="
        f"{configs[best]['weight_decay']:.1e}  test accuracy {acc.flat[best]:.3f}"
    )
    # The same models trained one by one reach the same accuracy (same seeds aside).
    print(f"  first {subset} sequential accuracies: {np.round(seq['test_accuracy'], 3).tolist()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": str(device),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "torch": torch.__version__,
                    "models": len(configs),
                    "epochs": epochs,
                    "batched_s": batched["seconds"],
                    "sequential_s_scaled": seq_all,
                    "sequential_subset": subset,
                    "sequential_subset_s": seq["seconds"],
                    "speedup": seq_all / batched["seconds"],
                    "best": {**configs[best], "test_accuracy": float(acc.flat[best])},
                    "test_accuracy": batched["test_accuracy"],
                    "train_loss": batched["train_loss"],
                },
                f,
            )


if __name__ == "__main__":
    main()
