"""Time one optimizer step over N stacked MLPs: per-model hyperparameters vs torch's shared lr.

N copies (default 1,000) of a 784-64-64-10 MLP are stacked by a ModelBatch. We
time `step()` of:

- `torch.optim.<cls>(stacked params, foreach=True)` and `fused=True`, with one
  lr shared by every model (the floor: what one set of hyperparameters costs),
- the `modelbatch.optim` optimizer with a different lr, beta/momentum, eps and
  weight decay for every model.

Usage:
    python benchmarks/optimizer_step.py [--models 1000] [--device cpu|cuda] [--repeat 20]
        [--optimizers adam,adamw,sgd]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from modelbatch import ModelBatch
from modelbatch.optim import OptimizerFactory

PER_MODEL = {
    "adam": (
        torch.optim.Adam,
        lambda i, n: {
            "lr": 1e-4 * (1 + i / n),
            "betas": (0.8 + 0.1 * i / n, 0.99 + 0.009 * i / n),
            "eps": 1e-8 * (1 + i),
            "weight_decay": 1e-4 * (i % 3),
        },
    ),
    "adamw": (
        torch.optim.AdamW,
        lambda i, n: {"lr": 1e-4 * (1 + i / n), "weight_decay": 1e-2 * (1 + i % 5)},
    ),
    "sgd": (
        torch.optim.SGD,
        lambda i, n: {
            "lr": 1e-2 * (1 + i / n),
            "momentum": 0.5 + 0.4 * i / n,
            "weight_decay": 1e-4,
        },
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    opt: torch.optim.Optimizer, device: torch.device, repeat: int, warmup: int = 3
) -> float:
    """Median seconds of one `opt.step()`."""
    for _ in range(warmup):
        opt.step()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--optimizers", default="adam")
    args = parser.parse_args()
    device = torch.device(args.device)
    n = args.models

    torch.manual_seed(0)
    models = [
        nn.Sequential(
            nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        for _ in range(n)
    ]
    mb = ModelBatch(models).to(device)
    del models
    for p in mb.parameters():
        p.grad = torch.randn_like(p)
    numel = sum(p.numel() for p in mb.parameters())
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"N={n} models, {numel / 1e6:.1f}M parameters, device={device} ({name}), "
        f"threads={torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(
        f"{'optimizer':<10} {'torch foreach':>14} {'torch fused':>12} {'per-model':>10} {'ratio':>6}"
    )
    for key in args.optimizers.split(","):
        cls, config = PER_MODEL[key]
        params = list(mb.parameters())
        shared = config(0, n)
        results = {}
        for label, kwargs in [("foreach", {"foreach": True}), ("fused", {"fused": True})]:
            try:
                opt = cls(params, **shared, **kwargs)
            except (RuntimeError, ValueError, TypeError):
                results[label] = float("nan")
                continue
            results[label] = time_step(opt, device, args.repeat)
            del opt
        batched = OptimizerFactory(cls).create_optimizer(mb, [config(i, n) for i in range(n)])
        results["ours"] = time_step(batched, device, args.repeat)
        del batched
        ratio = results["ours"] / results["foreach"]
        print(
            f"{cls.__name__:<10} {results['foreach'] * 1e3:>11.2f} ms {results['fused'] * 1e3:>9.2f} ms "
            f"{results['ours'] * 1e3:>7.2f} ms {ratio:>5.2f}x"
        )


if __name__ == "__main__":
    main()
