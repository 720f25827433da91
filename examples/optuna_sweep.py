"""An Optuna study on scikit-learn's digits, 16 trials at a time in one ModelBatch.

`optimize_batched` asks the study for 16 trials, trains their 16 MLPs
together (each with its own suggested AdamW lr, weight decay and betas[0]),
reports every model's validation loss to its own trial, prunes per trial, and
refills each freed slot in place with a new trial.

    python examples/optuna_sweep.py                    # TPE, about 15 s on a laptop CPU
    python examples/optuna_sweep.py --sampler cmaes    # CMA-ES (needs `pip install cmaes`)
"""

from __future__ import annotations

import argparse
import collections

import optuna
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelbatch.integrations.optuna import optimize_batched


def digits() -> tuple[DataLoader, tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=128, shuffle=True)
    return train, (x[1400:], y[1400:])


def make_model(trial: optuna.trial.Trial) -> nn.Module:
    torch.manual_seed(trial.number)  # each trial's initialization is reproducible
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def suggest(trial: optuna.trial.Trial) -> dict:
    return {
        "lr": trial.suggest_float("lr", 1e-4, 1.0, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 0.3, log=True),
        "betas": (trial.suggest_float("beta1", 0.5, 0.99), 0.999),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16, help="trials trained at once")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--report-every", type=int, default=20)
    parser.add_argument("--sampler", choices=["tpe", "cmaes"], default="tpe")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if args.sampler == "tpe":
        # constant_liar: trials asked while others are still running get spread out.
        sampler = optuna.samplers.TPESampler(seed=0, constant_liar=True)
    else:
        sampler = optuna.samplers.CmaEsSampler(seed=0)
    study = optuna.create_study(
        direction="minimize",
        sampler=sampler,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=8, n_warmup_steps=args.report_every),
    )
    train, (x_val, y_val) = digits()

    def val_loss(mb):  # [N]: each model's loss on the whole validation set
        return mb.per_model_losses(mb(x_val), y_val)

    trials = optimize_batched(
        study,
        make_model,
        suggest,
        train,
        val_loss,
        n_trials=args.trials,
        batch_size=args.batch,
        steps=args.steps,
        report_every=args.report_every,
    )
    states = collections.Counter(t.state.name for t in trials)
    print(f"{len(trials)} trials: {dict(states)}")
    best = study.best_trial
    params = ", ".join(f"{k}={v:.3g}" for k, v in best.params.items())
    print(f"best trial #{best.number}: val loss {best.value:.4f} with {params}")
    done = sorted(
        (t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value
    )
    for t in done[:5]:
        print(f"  #{t.number:3d}  val loss {t.value:.4f}  lr {t.params['lr']:.2e}")


if __name__ == "__main__":
    main()
