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

On CUDA the per-model step is the generated kernels of `modelbatch.optim`
(compiled before timing); on the CPU it runs with torch ops.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
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


def time_steps(
    opts: dict[str, torch.optim.Optimizer], device: torch.device, repeat: int, warmup: int = 3
) -> dict[str, float]:
    """Fastest seconds of one `step()` per optimizer, the optimizers interleaved.

    Interleaving and taking the minimum keep the comparison fair on a busy machine.
    """
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    _sync(device)
    best = {label: float("inf") for label in opts}
    for _ in range(repeat):
        for label, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            _sync(device)
            best[label] = min(best[label], time.perf_counter() - start)
    return best


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
    header = ["optimizer", "torch foreach", "torch fused", "per-model", "/foreach", "/fused"]
    print(" | ".join(header))
    for key in args.optimizers.split(","):
        cls, config = PER_MODEL[key]
        params = list(mb.parameters())
        shared = config(0, n)
        opts: dict[str, torch.optim.Optimizer] = {}
        for label, kwargs in [("foreach", {"foreach": True}), ("fused", {"fused": True})]:
            with contextlib.suppress(RuntimeError, ValueError, TypeError):
                opts[label] = cls(params, **shared, **kwargs)
        configs = [config(i, n) for i in range(n)]
        opts["ours"] = OptimizerFactory(cls).create_optimizer(mb, configs)
        results = {"fused": float("nan"), **time_steps(opts, device, args.repeat)}
        del opts
        row = [
            cls.__name__,
            f"{results['foreach'] * 1e3:.1f} ms",
            f"{results['fused'] * 1e3:.1f} ms",
        ]
        row += [
            f"{results['ours'] * 1e3:.1f} ms",
            f"{results['ours'] / results['foreach']:.2f}x",
            f"{results['ours'] / results['fused']:.2f}x",
        ]
        print(" | ".join(row))


if __name__ == "__main__":
    main()
