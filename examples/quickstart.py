"""Train 64 small MLPs at once on scikit-learn's digits, one learning rate each.

A log-spaced learning-rate sweep from 1e-4 to 1: every model is an ordinary
`nn.Module`; modelbatch stacks them and trains all 64 in one vectorized step.
Runs on the GPU when there is one, and in well under a minute on two CPU cores.
Shows progress as it goes (a tqdm bar when tqdm is installed, and one line per
epoch with the spread of the 64 models' training losses) and ends with the time
it took.

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from modelbatch import ModelBatch, ProgressBar, format_table

try:  # optional: without tqdm the per-epoch lines are the progress
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None


class MLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_data(device: torch.device) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return tuple(t.to(device) for t in (x[:split], y[:split], x[split:], y[split:]))


def log(line: str) -> None:
    """Print a line without breaking a tqdm bar when there is one."""
    if tqdm is not None:
        tqdm.write(line)
    else:
        print(line, flush=True)


def spread(losses: torch.Tensor) -> str:
    """min / median / max over the models of `[N]` losses (diverged models counted apart)."""
    finite = losses[losses.isfinite()]
    text = "loss diverged in every model"
    if finite.numel():
        text = (
            f"loss min {finite.min().item():.4f} median {finite.median().item():.4f} "
            f"max {finite.max().item():.4f}"
        )
    if finite.numel() < losses.numel():
        text += f" ({losses.numel() - finite.numel()} diverged)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    begin = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_data(device)
    lrs = torch.logspace(-4, 0, args.models).tolist()
    models = [MLP() for _ in range(args.models)]
    mb = ModelBatch(models, lr_list=lrs, optimizer_cls=torch.optim.Adam).to(device)

    steps_per_epoch = -(-len(x_train) // args.batch_size)
    log(
        f"Training {args.models} MLPs for {args.epochs} epochs on {device} (batch {args.batch_size})"
    )
    start = time.perf_counter()
    # The bar (tqdm only) shows the best and median of the models' latest losses.
    with ProgressBar(args.epochs * steps_per_epoch, model_batch=mb, desc="train") as bar:
        for epoch in range(args.epochs):
            order = torch.randperm(len(x_train), device=device)
            epoch_loss = torch.zeros(args.models, device=device)  # [N], stays on the device
            for first in range(0, len(x_train), args.batch_size):
                idx = order[first : first + args.batch_size]
                mb.zero_grad()
                losses = mb.compute_loss(mb(x_train[idx]), y_train[idx], reduction="none")
                losses.sum().backward()  # [N] -> each model gets its own loss's gradient
                mb.step()
                epoch_loss += losses.detach() * len(idx)
                bar.update()
            # One read from the device per epoch: each model's mean training loss.
            seconds = time.perf_counter() - start
            mean = (epoch_loss / len(x_train)).cpu()
            log(f"epoch {epoch + 1}/{args.epochs}  {seconds:6.1f} s  {spread(mean)}")
    elapsed = time.perf_counter() - start

    mb.eval()
    with torch.no_grad():
        train_loss = mb.compute_loss(mb(x_train), y_train, reduction="none")
        test_acc = mb.accuracy(mb(x_test), y_test)
    rows = mb.summary(lr=lrs, train_loss=train_loss, test_acc=test_acc)
    for row in rows:
        del row["loss"]
    print(f"Trained {args.models} MLPs for {args.epochs} epochs on {device} in {elapsed:.1f} s\n")
    print(format_table(rows, sort_by="test_acc", top=10))
    best = int(test_acc.argmax())
    print(
        f"\nBest model: #{best}, lr={lrs[best]:.2e}, "
        f"test accuracy {test_acc[best].item():.3f}, train loss {train_loss[best].item():.4f}"
    )
    print(f"Done in {time.perf_counter() - begin:.1f} s (data, setup, training, evaluation)")


if __name__ == "__main__":
    main()
