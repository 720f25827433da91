"""A learning-rate x weight-decay sweep of 16 MLPs on digits, trained by HuggingFace's Trainer.

`BatchTrainer` is a `transformers.Trainer` whose model is a `ModelBatch`: the
stock training loop runs all 16 models at once, each with its own AdamW
hyperparameters, per-model gradient clipping and Trainer's linear lr schedule
(a shared factor on every model's own lr). Trainer logs the mean, best, median
and worst model; the full per-model table goes to `<output_dir>/per_model_log.csv`.
With matplotlib installed it saves `hf_sweep.png`: the training loss of each lr
(the band spans its four weight decays) and each model's eval loss against its
lr and weight decay. Finishes in well under a minute on two CPU cores.

    pip install -e ".[hf,examples]"    # from a checkout of this repository
    python examples/hf_trainer.py
"""

# needs: accelerate (Trainer's; tests/test_examples.py skips this example without it)
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from transformers import TrainingArguments

from modelbatch import ModelBatch, format_table
from modelbatch.integrations.huggingface import BatchTrainer, export_model, load_model_state


class MLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


class Digits(torch.utils.data.Dataset):
    """Trainer-style examples: a dict with the model's input and `labels`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "labels": self.y[i]}


def load_data() -> tuple[Digits, Digits]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return Digits(x[:split], y[:split]), Digits(x[split:], y[split:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--plot", default="hf_sweep.png", help="where the PNG goes ('' for none)")
    cli = parser.parse_args()
    output_dir = cli.output_dir or tempfile.mkdtemp(prefix="modelbatch-hf-")

    train_data, eval_data = load_data()
    lrs = [3e-4, 1e-3, 3e-3, 1e-2]
    decays = [0.0, 0.01, 0.1, 1.0]
    configs = [{"lr": lr, "weight_decay": wd} for lr, wd in itertools.product(lrs, decays)]

    torch.manual_seed(0)
    model_batch = ModelBatch([MLP() for _ in configs])
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=cli.steps,
        per_device_train_batch_size=64,
        per_device_eval_batch_size=256,
        lr_scheduler_type="linear",  # a factor 1 -> 0 on every model's own lr
        max_grad_norm=1.0,  # per model: each model is clipped by its own norm
        eval_strategy="steps",
        eval_steps=100,
        logging_steps=50,
        save_strategy="steps",
        save_steps=cli.steps,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    trainer = BatchTrainer(
        model_batch,
        args,
        optimizer_cls=torch.optim.AdamW,
        configs=configs,
        train_dataset=train_data,
        eval_dataset=eval_data,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    metrics = trainer.evaluate()
    best = metrics["eval_best_model"]
    print(f"\n{len(configs)} models, {cli.steps} steps in {seconds:.1f}s")
    print(
        f"eval loss: mean {metrics['eval_loss']:.4f} over the models, best "
        f"{metrics['eval_loss_best']:.4f}, worst {metrics['eval_loss_worst']:.4f}"
    )
    print(
        f"eval accuracy: best {metrics['eval_accuracy_best']:.3f}, median "
        f"{metrics['eval_accuracy_median']:.3f}, worst {metrics['eval_accuracy_worst']:.3f}"
    )
    print(f"lowest eval loss: model {best} with {configs[best]}")

    # Each model's own values from the last evaluation (also in the per-model CSV).
    per_model = trainer.eval_per_model
    rows = [
        {"model": i, **c, "eval_loss": loss, "eval_acc": acc}
        for i, (c, loss, acc) in enumerate(
            zip(configs, per_model["loss"].tolist(), per_model["accuracy"].tolist())
        )
    ]
    print(format_table(rows, sort_by="eval_loss", top=5))
    if cli.plot:
        save_plot(cli.plot, model_batch, configs, per_model["loss"])

    # The best model as an ordinary module, and straight from the Trainer checkpoint.
    plain = export_model(trainer, best)
    state = load_model_state(os.path.join(output_dir, f"checkpoint-{cli.steps}"), best)
    check = MLP()
    check.load_state_dict(state)
    x = eval_data.x[:8]
    assert torch.equal(check(x), plain(x))
    print(f"\nexported model {best}; checkpoint and per-model log in {output_dir}")


def save_plot(path: str, model_batch: ModelBatch, configs: list, eval_loss: torch.Tensor) -> None:
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib not installed: no plot; pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import modelbatch.plot as mbp

    fig = plt.figure(figsize=(12, 3.6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1, 1.4])
    ax = left.subplots()
    groups = [f"lr={c['lr']:g}" for c in configs]  # the band: the four weight decays
    mbp.loss_curves(model_batch.loss_history(), groups=groups, smooth=10, log_y=True, ax=ax)
    mbp.metric_vs_hparams(eval_loss, configs, metric_name="eval loss", axes=right.subplots(1, 2))
    fig.savefig(path, dpi=80)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
