"""A learning-rate x weight-decay sweep on scikit-learn's digits, sharded over processes.

Each process (rank) trains its own contiguous block of the models as one
ModelBatch; nothing is communicated during training. Every model's init,
dropout masks, data order and hyperparameters depend only on its global id
and the seed, so the results are the same with 1, 2 or 8 processes. Every
few epochs the ranks gather the validation accuracies and retire the worse
half together (successive halving); at the end rank 0 prints the best models
by global id, and all ranks write one sharded checkpoint.

    torchrun --standalone --nproc-per-node 2 examples/distributed_sweep.py
    python examples/distributed_sweep.py              # the same sweep in one process

On several nodes, run on each node (same MASTER address, NODE_RANK 0..K-1):

    torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint $MASTER:29500 examples/distributed_sweep.py
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import modelbatch
from modelbatch import ModelBatch, format_table
from modelbatch import distributed as dist
from modelbatch.data import PerModelLoader


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))


def config(model_id: int, n: int) -> dict[str, float]:
    """Model `model_id`'s hyperparameters: a grid over lr x weight decay, by global id."""
    side = max(1, math.isqrt(n))
    i, j = divmod(model_id, side)
    return {
        "lr": 10 ** (-3.5 + 2.5 * (j % side) / max(1, side - 1)),
        "weight_decay": 10 ** (-4 + i % 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--halve-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=Path("distributed_sweep_checkpoint"))
    args = parser.parse_args()

    with dist.init() as ctx:
        ids = ctx.shard(range(args.models))
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target)
        x_train, y_train = x[:1400].to(ctx.device), y[:1400].to(ctx.device)
        x_val, y_val = x[1400:].to(ctx.device), y[1400:].to(ctx.device)

        mb = ModelBatch.from_factory(
            make_model,
            ids,
            seed=args.seed,
            device=ctx.device,
            optimizer_cls=torch.optim.AdamW,
            configs=[config(int(i), args.models) for i in ids],
        )
        loader = PerModelLoader(
            x_train,
            y_train,
            num_models=len(ids),
            batch_size=64,
            seed=ctx.data_seeds(args.seed),
            drop_last=True,
        )
        mode = "auto" if ctx.device.type == "cuda" else "eager"
        step = modelbatch.compile_step(mb, mb.optimizer, per_model=True, mode=mode)
        for epoch in range(args.epochs):
            mb.train()
            for xb, yb in loader:
                step(xb, yb)
            if (epoch + 1) % args.halve_every == 0 and epoch + 1 < args.epochs:
                mb.eval()
                with torch.no_grad():
                    acc = mb.accuracy(mb(x_val), y_val)
                dist.successive_halving(ctx, mb, acc, keep=0.5, mode="max")
                active = ctx.gather(mb.active)  # a collective: every rank calls it
                if ctx.is_main:
                    print(f"epoch {epoch + 1}: {int(active.sum())} models train on")
        mb.eval()
        with torch.no_grad():
            acc = mb.accuracy(mb(x_val), y_val)
        lrs = mb.optimizer.hparams["lr"].float()
        rows = ctx.summary(mb, val_acc=acc, lr=lrs)
        if ctx.is_main:
            print(f"{ctx.world_size} process(es), {args.models} models")
            print(format_table(rows, sort_by="val_acc", top=5))
        # One directory on a file system every rank sees; each rank writes its shard.
        dist.save(args.checkpoint, ctx, mb, optimizer=mb.optimizer, step=args.epochs)
        if ctx.is_main:
            print(f"checkpoint: {args.checkpoint} ({len(list(args.checkpoint.iterdir()))} files)")


if __name__ == "__main__":
    main()
