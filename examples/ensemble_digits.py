"""A deep ensemble and a multi-seed study on scikit-learn's digits, each trained in one run.

1. A 32-member deep ensemble (same MLP, 32 random inits) against its average
   member: accuracy, NLL, Brier and expected calibration error on a held-out
   test set, and a reliability diagram (`reliability.png`).
2. A sub-ensemble chosen from the 32 by greedy selection with replacement
   (Caruana et al., 2004) on a validation split, scored on the test set.
3. A multi-seed study: 8 learning rates x 16 seeds (128 models in one
   ModelBatch), mean and 95% t interval of the test accuracy and NLL per lr,
   as a table and a plot (`seeds.png`).

Runs in well under a minute on two CPU cores.

    python examples/ensemble_digits.py
    python examples/ensemble_digits.py --quick    # a few seconds, for the tests
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from modelbatch import ModelBatch, format_table
from modelbatch.ensemble import (
    classification_metrics,
    ensemble_evaluate,
    greedy_selection,
    member_outputs,
    plot_reliability,
    plot_seed_statistics,
    seed_statistics,
)
from modelbatch.optim import OptimizerFactory


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def splits(device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train 60%, validation 20%, test 20%, stratified, fixed."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    x_va, x_te, y_va, y_te = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=0, stratify=y_rest
    )
    pairs = {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": (x_te, y_te)}
    return {
        k: (torch.tensor(a, device=device), torch.tensor(b, device=device))
        for k, (a, b) in pairs.items()
    }


def train(mb: ModelBatch, opt: torch.optim.Optimizer, data: tuple, epochs: int, batch: int) -> None:
    x, y = data
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).to(x.device).split(batch):
            opt.zero_grad()
            mb.compute_loss(mb(x[idx]), y[idx]).backward()
            opt.step()


def deep_ensemble(args: argparse.Namespace, data: dict, device: torch.device, out: Path) -> None:
    torch.manual_seed(0)
    mb = ModelBatch([mlp() for _ in range(args.members)]).to(device)
    opt = OptimizerFactory(torch.optim.Adam, {"lr": args.lr}).create_optimizer(mb)
    start = time.perf_counter()
    train(mb, opt, data["train"], args.epochs, args.batch_size)
    seconds = time.perf_counter() - start
    print(f"Trained a {args.members}-member deep ensemble in {seconds:.1f} s on {device}\n")

    test = [data["test"]]
    report = ensemble_evaluate(mb, test)
    # Greedy selection on the validation split; the test set only scores the result.
    x_va, y_va = data["val"]
    selection = greedy_selection(member_outputs(mb, x_va), y_va, steps=args.members, metric="nll")
    chosen = ensemble_evaluate(mb, test, members=selection.indices, weights=selection.weights)

    metrics = ["accuracy", "nll", "brier", "ece"]
    best = int(report.members["nll"].argmin())
    rows = [
        {
            "predictor": f"ensemble of {args.members}",
            **{m: float(report.ensemble[m]) for m in metrics},
        },
        {"predictor": "mean member", **{m: float(report.members[m].mean()) for m in metrics}},
        {
            "predictor": f"best member (#{best})",
            **{m: float(report.members[m][best]) for m in metrics},
        },
        {
            "predictor": f"greedy: {len(selection.indices)} models, {selection.size} picks",
            **{m: float(chosen.ensemble[m]) for m in metrics},
        },
    ]
    print(format_table(rows))
    print(
        f"\nEnsemble disagreement {float(report.ensemble['disagreement']):.3f}, "
        f"mutual information {float(report.ensemble['mutual_information']):.4f} nats"
    )
    print(
        f"Greedy selection: models {selection.indices.tolist()}, weights "
        f"{[round(w, 3) for w in selection.weights.tolist()]}"
    )
    try:
        median = int(report.members["nll"].argsort()[args.members // 2])
        plot_reliability(report, members=[median], path=out / "reliability.png")
        print(f"Reliability diagram: {out / 'reliability.png'}")
    except ImportError:
        print("(matplotlib is not installed: no reliability diagram)")


def seed_study(args: argparse.Namespace, data: dict, device: torch.device, out: Path) -> None:
    lrs = np.logspace(-4, -1, args.lrs).tolist()
    configs = [{"lr": lr} for lr in lrs for _ in range(args.seeds)]
    torch.manual_seed(1)
    mb = ModelBatch([mlp() for _ in configs]).to(device)
    opt = OptimizerFactory(torch.optim.Adam).create_optimizer(mb, configs)
    start = time.perf_counter()
    train(mb, opt, data["train"], args.epochs, args.batch_size)
    seconds = time.perf_counter() - start
    print(
        f"\nMulti-seed study: {args.lrs} learning rates x {args.seeds} seeds = {len(configs)} "
        f"models, trained in {seconds:.1f} s"
    )
    x_te, y_te = data["test"]
    per_model = classification_metrics(member_outputs(mb, x_te).log_softmax(-1), y_te)
    stats = seed_statistics({"accuracy": per_model["accuracy"], "nll": per_model["nll"]}, opt)
    rows = [
        {
            "lr": row["lr"],
            "seeds": row["n"],
            "accuracy": row["accuracy_mean"],
            "acc 95% interval": f"[{row['accuracy_ci_low']:.4f}, {row['accuracy_ci_high']:.4f}]",
            "nll": row["nll_mean"],
            "nll 95% interval": f"[{row['nll_ci_low']:.4f}, {row['nll_ci_high']:.4f}]",
        }
        for row in stats.rows()
    ]
    print(format_table(rows))
    try:
        plot_seed_statistics(stats, "accuracy", path=out / "seeds.png")
        print(f"Seed statistics plot: {out / 'seeds.png'}")
    except ImportError:
        print("(matplotlib is not installed: no plot)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lrs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true", help="tiny settings, for the tests")
    args = parser.parse_args()
    if args.quick:
        args.members, args.lrs, args.seeds, args.epochs = 6, 3, 3, 3
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = splits(device)
    deep_ensemble(args, data, device, args.out)
    seed_study(args, data, device, args.out)


if __name__ == "__main__":
    main()
