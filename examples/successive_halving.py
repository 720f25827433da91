"""Successive halving over 256 AdamW configurations on scikit-learn's digits.

128 slots train at once. Every few epochs each group of models that has
survived the same number of rungs is ranked by validation accuracy: the better
half moves up a rung and trains on, the worse half is replaced in place by
fresh models with the next untried configurations (`replace_model`: new
weights, optimizer state, hyperparameters and data seed in that slot, every
other model untouched). Once all 256 configurations have been tried, losers
are retired instead, and the run ends with a handful of survivors.

A `LifecycleLog` records every replacement and retirement; with matplotlib
installed the script saves the search's bracket (`successive_halving_bracket.png`)
and every configuration's last validation accuracy against its lr, weight
decay and beta1 (`successive_halving_hparams.png`).

    python examples/successive_halving.py
"""

from __future__ import annotations

import argparse
import math

import torch
from sklearn.datasets import load_digits
from torch import nn

from modelbatch import ModelBatch, format_table, track
from modelbatch.data import PerModelLoader
from modelbatch.lifecycle import LifecycleLog, NaNGuard, replace_model
from modelbatch.optim import BatchAdamW


class MLP(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sample_configs(count: int, seed: int) -> list[dict]:
    """Random AdamW configurations: log-uniform lr and weight decay, uniform beta1."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(count, 3, generator=g, dtype=torch.float64).tolist()
    return [
        {
            "lr": 10 ** (-3.5 + 3.0 * a),
            "weight_decay": 10 ** (-5 + 4.0 * b),
            "betas": (0.8 + 0.15 * c, 0.999),
        }
        for a, b, c in u
    ]


def load_data(device: torch.device) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return tuple(t.to(device) for t in (x[:split], y[:split], x[split:], y[split:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=256)
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--rung-epochs", type=int, default=2)
    parser.add_argument("--survivors", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--plot-dir", default=".", help="where the PNGs go ('' for none)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x_train, y_train, x_val, y_val = load_data(device)

    configs = sample_configs(args.configs, seed=1)
    n = args.slots
    mb = ModelBatch([MLP() for _ in range(n)]).to(device)
    opt = BatchAdamW(list(mb.parameters()), configs[:n], model_batch=mb)
    loader = PerModelLoader(
        x_train, y_train, num_models=n, batch_size=args.batch_size, seed=list(range(n))
    )
    guard = NaNGuard(mb)  # a diverged model is retired at once and loses its next rung
    slot_config = list(range(n))  # which configuration each slot runs
    level = torch.zeros(n, dtype=torch.long)  # rungs survived; -1: retired for good
    epochs_trained = torch.zeros(n, dtype=torch.long)
    next_config = n
    log = LifecycleLog(n, configs[:n])  # trial t runs configuration t
    last_acc = torch.full((len(configs),), math.nan)  # each configuration's latest val acc
    step = 0
    rung_steps = []

    rung = 0
    while int((level >= 0).sum()) > args.survivors:
        rung += 1
        for _ in range(args.rung_epochs):
            for xb, yb in track(loader, mb, desc=f"rung {rung}", leave=False):
                loss = mb.compute_loss(mb(xb, per_model=True), yb, per_model=True)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
            diverged = guard.step()
            if diverged.any():
                log.retire(diverged, step, "diverged")
            epochs_trained += (level >= 0).long()
        mb.eval()
        with torch.no_grad():
            accuracy = mb.accuracy(mb(x_val), y_val).cpu()
        mb.train()
        for slot, acc in enumerate(accuracy.tolist()):
            if level[slot] >= 0:
                last_acc[log.trial_in(slot)] = acc if mb.active[slot] else math.nan
        accuracy[~mb.active.cpu()] = -1.0  # diverged: ranked last
        rung_steps.append(step)
        replaced = retired = 0
        # ASHA's rule: models compete within their rung. Once every configuration
        # has been tried, the remaining models compete as one group (the finals).
        alive = level >= 0
        if next_config < len(configs):
            groups = [(level == r).nonzero().flatten() for r in level[alive].unique().tolist()]
        else:
            groups = [alive.nonzero().flatten()]
        for group in groups:
            ranked = group[accuracy[group].argsort(descending=True, stable=True)]
            keep = math.ceil(len(ranked) / 2)
            level[ranked[:keep]] += 1
            for slot in ranked[keep:].tolist():
                if next_config < len(configs):
                    cfg = configs[next_config]
                    replace_model(
                        mb,
                        slot,
                        MLP,
                        config=cfg,
                        seed=next_config,
                        optimizer=opt,
                        loader=loader,
                        log=log,
                        step=step,
                    )
                    slot_config[slot], level[slot], epochs_trained[slot] = next_config, 0, 0
                    next_config += 1
                    replaced += 1
                else:
                    mb.retire(slot)
                    log.retire(slot, step)
                    level[slot] = -1
                    retired += 1
        alive = level >= 0
        print(
            f"rung {rung}: best val acc {accuracy[alive].max():.3f}, median "
            f"{accuracy[alive].median():.3f}; replaced {replaced}, retired {retired}, "
            f"{int(alive.sum())} training, {next_config}/{len(configs)} configs tried"
        )

    survivors = (level >= 0).nonzero().flatten().tolist()
    rows = [
        {
            "slot": i,
            "config": slot_config[i],
            "lr": configs[slot_config[i]]["lr"],
            "weight_decay": configs[slot_config[i]]["weight_decay"],
            "beta1": configs[slot_config[i]]["betas"][0],
            "epochs": int(epochs_trained[i]),
            "val_acc": float(accuracy[i]),
        }
        for i in survivors
    ]
    print("\nSurvivors:")
    print(format_table(rows, sort_by="val_acc"))
    if args.plot_dir:
        save_plots(args.plot_dir, log, rung_steps, last_acc, configs[:next_config])


def save_plots(folder: str, log: LifecycleLog, rungs: list, acc: torch.Tensor, tried: list) -> None:
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib not installed: no plots; pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import os

    import modelbatch.plot as mbp

    ax = mbp.bracket(log, rungs=rungs)
    ax.set_title(f"successive halving: {ax.get_title()}")
    path = os.path.join(folder, "successive_halving_bracket.png")
    ax.figure.savefig(path, dpi=80)
    hparams = {
        "lr": [c["lr"] for c in tried],
        "weight_decay": [c["weight_decay"] for c in tried],
        "beta1": [c["betas"][0] for c in tried],
    }
    fig = mbp.metric_vs_hparams(acc[: len(tried)], hparams, metric_name="last val acc", best="max")
    fig.savefig(os.path.join(folder, "successive_halving_hparams.png"), dpi=80)
    print(f"saved {path} and successive_halving_hparams.png")


if __name__ == "__main__":
    main()
