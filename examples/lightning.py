"""A grid of 16 learning rates x weight decays on scikit-learn's digits, trained by Lightning.

One `BatchLightningModule` holds all 16 MLPs; Lightning's `Trainer` runs the
loop. Each model gets its own AdamW hyperparameters and its own cosine
schedule, gradients are clipped per model, and the logger receives the mean
and best validation loss and accuracy plus a per-model table
(`per_model.csv` next to `metrics.csv`).

    python examples/lightning.py              # about 10 s on a laptop CPU
    python examples/lightning.py --epochs 20  # longer
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile

# This script is named lightning.py: take its folder off the import path so
# that `import lightning` finds the framework rather than this file.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from modelbatch import ModelBatch, format_table  # noqa: E402
from modelbatch.integrations.lightning import BatchLightningModule  # noqa: E402
from modelbatch.optim import BatchCosineAnnealingLR  # noqa: E402


def digits_loaders(batch_size: int) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train = TensorDataset(x[:1400], y[:1400])
    val = TensorDataset(x[1400:], y[1400:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(val, batch_size=512),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--clip", type=float, default=1.0, help="per-model max grad norm")
    args = parser.parse_args()
    torch.manual_seed(0)

    lrs = [1e-4, 1e-3, 3e-3, 1e-2]
    wds = [0.0, 1e-3, 1e-2, 1e-1]
    configs = [{"lr": lr, "weight_decay": wd} for lr, wd in itertools.product(lrs, wds)]
    models = [nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)) for _ in configs]
    train, val = digits_loaders(args.batch_size)
    total_steps = args.epochs * len(train)
    module = BatchLightningModule(
        ModelBatch(models),
        configs,
        optimizer_cls=torch.optim.AdamW,
        # Each model anneals to 1% of its own lr: the table's lr column ends at 1.0e-06 ... 1.0e-04.
        scheduler=lambda opt: BatchCosineAnnealingLR(
            opt, T_max=total_steps, eta_min=[c["lr"] / 100 for c in configs]
        ),
        scheduler_interval="step",
    )
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            max_epochs=args.epochs,
            accelerator="auto",
            devices=1,
            gradient_clip_val=args.clip,  # per model: BatchLightningModule routes it
            logger=L.loggers.CSVLogger(logs, name="digits"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=10,
        )
        trainer.fit(module, train, val)
        print(f"per-model table written to {trainer.logger.log_dir}/per_model.csv")

    metrics = trainer.callback_metrics
    print(
        f"val loss: mean {metrics['val/loss']:.4f}, best {metrics['val/loss_best']:.4f}; "
        f"val acc: mean {metrics['val/acc']:.4f}, best {metrics['val/acc_best']:.4f}"
    )
    rows = [{**row, "base_lr": cfg["lr"]} for row, cfg in zip(module.per_model_rows(), configs)]
    print(format_table(rows, sort_by="val_acc", top=8))


if __name__ == "__main__":
    main()
