"""The benchmark models and their inputs."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn


def mlp(*sizes: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return make


def lenet5() -> nn.Module:
    """LeNet-5 for 3x32x32 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def mlp_bn_dropout() -> nn.Module:
    """784-256-256-10 with BatchNorm and dropout after each hidden layer."""
    return nn.Sequential(
        nn.Linear(784, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(256, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(256, 10),
    )


# name -> (constructor, input shape per example, hidden sizes for the ideal arm or None)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...] | None]] = {
    "mlp_784-64-64-10": (mlp(784, 64, 64, 10), (784,), (784, 64, 64, 10)),
    "mlp_784-512-512-10": (mlp(784, 512, 512, 10), (784,), (784, 512, 512, 10)),
    "lenet5": (lenet5, (3, 32, 32), None),
    "mlp_bn_dropout": (mlp_bn_dropout, (784,), None),
}


def make_batches(
    input_shape: tuple[int, ...], batch: int, count: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` shared batches (x `[B, *input_shape]`, y `[B]` in 0..9), fresh random data."""
    return [
        (
            torch.randn(batch, *input_shape, device=device),
            torch.randint(0, 10, (batch,), device=device),
        )
        for _ in range(count)
    ]
