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


def lenet5(channels: int = 3, padding: int = 0) -> nn.Module:
    """LeNet-5: conv 6 and 16 (5x5), fc 120/84/10; 3x32x32 inputs by default.

    1x28x28 inputs with `channels=1, padding=2` (`lenet5_mnist`).
    """
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=padding),
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


# ---------------------------------------------------------------------- conv and recurrent models


def lenet5_mnist() -> nn.Module:
    """LeNet-5 for 1x28x28 inputs: conv 6 (5x5, padding 2) and 16 (5x5), fc 120/84/10."""
    return lenet5(channels=1, padding=2)


class GlobalMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1))


def cnn3() -> nn.Module:
    """3x32x32: 3x3 conv 32/64/128 (padding 1), each + ReLU + 2x2 max-pool; global max; fc 10."""
    layers: list[nn.Module] = []
    for a, b in ((3, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, GlobalMax(), nn.Linear(128, 10))


class GRUClassifier(nn.Module):
    """GRU over a sequence [B, 40, 1] (hidden 64), fc 10 on the last state."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        return self.fc(h[-1])


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut (1x1 conv + BN where the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet_bn() -> nn.Module:
    """3x32x32: stem conv 16 + BN + ReLU, blocks (16, stride 1) and (32, stride 2), avg, fc 10."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        ResBlock(16, 16, 1),
        ResBlock(16, 32, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


# name -> (constructor, input shape per example)
CONV_RNN_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lenet5": (lenet5_mnist, (1, 28, 28)),
    "cnn": (cnn3, (3, 32, 32)),
    "gru": (GRUClassifier, (40, 1)),
    "resnet_bn": (resnet_bn, (3, 32, 32)),
}
