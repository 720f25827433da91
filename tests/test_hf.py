"""BatchTrainer (HuggingFace Trainer) against N models trained one by one in plain PyTorch.

Every test compares weights, never only "it ran": the Trainer's run must equal
a per-model torch.optim run on the very batches the Trainer drew.
"""

from __future__ import annotations

import copy
import csv
import math
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments

from modelbatch import ModelBatch
from modelbatch.integrations.huggingface import (
    BatchTrainer,
    export_model,
    load_model_state,
)

N = 4
STEPS = 20
CONFIGS = [
    {"lr": 1e-2, "weight_decay": 0.0},
    {"lr": 3e-3, "weight_decay": 0.1},
    {"lr": 3e-2, "weight_decay": 0.01},
    {"lr": 5e-3, "weight_decay": 0.5},
]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Blobs(torch.utils.data.Dataset):
    """Random inputs with labels a model can partly learn."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0.5).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class RecordingTrainer(BatchTrainer):
    """Keeps a copy of every training micro-batch, to replay it in the reference."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: list[dict[str, torch.Tensor]] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.model_batch.training:
            self.recorded.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


def make_models(seed: int = 0, n: int = N) -> list[MLP]:
    torch.manual_seed(seed)
    return [MLP() for _ in range(n)]


def make_args(out, **overrides) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=4,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_grad_norm=0.0,
        lr_scheduler_type="linear",
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def linear_factor(total: int):
    # The factor HF's "linear" schedule (no warmup) gives; torch scales each model's own lr by it.
    return lambda step: max(0.0, (total - step) / total)


def hf_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The stock Trainer's two groups: no weight decay for biases and LayerNorm weights."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(cast(Trainer, None), model))  # self is unused
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def torch_reference(
    models,
    micro_batches,
    configs,
    *,
    accumulation=1,
    total=STEPS,
    clip=None,
    global_clip=False,
    optimizer="adamw",
    loss_of=None,
):
    """N models trained one by one with torch.optim on the recorded batches."""
    models = [copy.deepcopy(m) for m in models]
    opts: list[torch.optim.Optimizer] = []
    for m, c in zip(models, configs):
        groups = hf_param_groups(m, c["weight_decay"])
        if optimizer == "adamw":
            opts.append(torch.optim.AdamW(groups, lr=c["lr"]))
        else:
            opts.append(torch.optim.SGD(groups, lr=c["lr"], momentum=c["momentum"]))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, linear_factor(total)) for o in opts]
    loss_of = loss_of or (lambda m, b: F.cross_entropy(m(b["x"]), b["labels"]))
    steps = [
        micro_batches[i : i + accumulation] for i in range(0, len(micro_batches), accumulation)
    ]
    for group in steps:
        for m in models:
            m.zero_grad(set_to_none=True)
        for batch in group:
            for m in models:
                (loss_of(m, batch) / len(group)).backward()
        if clip is not None:
            if global_clip:
                torch.nn.utils.clip_grad_norm_([p for m in models for p in m.parameters()], clip)
            else:
                for m in models:
                    torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
    return models


def max_rel_diff(mb: ModelBatch, models, noise_only: tuple[str, ...] = ()) -> float:
    """Max over models and tensors of max|got - ref| / max|ref|.

    Tensors named in `noise_only` have an exactly zero true gradient, so their
    values are rounding noise (Adam amplifies it); they are checked in absolute terms.
    """
    worst = 0.0
    for i, m in enumerate(models):
        ref = m.state_dict()
        got = mb.get_model_states()[i]
        for k, v in ref.items():
            if k.endswith(noise_only) and noise_only:
                assert float((got[k] - v).abs().max()) <= 1e-6, k
                continue
            worst = max(worst, float((got[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)))
    return worst


def train(out, models, configs=CONFIGS, trainer_cls=RecordingTrainer, **arg_overrides):
    mb = ModelBatch([copy.deepcopy(m) for m in models])
    trainer = trainer_cls(
        mb, make_args(out, **arg_overrides), configs=configs, train_dataset=Blobs()
    )
    trainer.train()
    return trainer


# ---------------------------------------------------------------------- equivalence


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """One 20-step AdamW run through Trainer, read by several tests (Trainer runs are slow)."""
    models = make_models()
    out = tmp_path_factory.mktemp("adamw")
    return models, train(out, models), out


def test_trainer_equals_per_model_torch_adamw(adamw_run):
    models, trainer, _ = adamw_run
    assert len(trainer.recorded) == STEPS
    ref = torch_reference(models, trainer.recorded, CONFIGS)
    assert max_rel_diff(trainer.model_batch, ref) <= 1e-5
    # It trained: every model moved away from its initial weights.
    start = ModelBatch([copy.deepcopy(m) for m in models])
    for name, p in trainer.model_batch.stacked_params().items():
        moved = (p.detach() - start.stacked_params()[name]).flatten(1).abs().amax(dim=1)
        assert bool((moved > 1e-4).all()), name


def test_trainer_equals_library_loop(adamw_run):
    from modelbatch.optim import VECTORIZED

    models, trainer, _ = adamw_run
    mb = ModelBatch([copy.deepcopy(m) for m in models])
    params = mb.stacked_params()
    groups = [
        {"params": [p for n, p in params.items() if not n.endswith("bias")]},
        {"params": [p for n, p in params.items() if n.endswith("bias")]},
    ]
    opt = VECTORIZED[torch.optim.AdamW](groups, CONFIGS)
    opt.param_groups[1]["hparams"]["weight_decay"].zero_()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_factor(STEPS))
    for batch in trainer.recorded:
        opt.zero_grad()
        mb.compute_loss(mb(x=batch["x"]), batch["labels"]).backward()
        opt.step()
        sched.step()
    for name, p in mb.stacked_params().items():
        got = trainer.model_batch.stacked_params()[name].detach()
        assert float((got - p.detach()).abs().max() / p.detach().abs().max()) <= 1e-5, name


def test_max_grad_norm_clips_each_model_by_its_own_norm(tmp_path):
    models = make_models(seed=2)
    clip = 0.3
    trainer = train(tmp_path, models, max_grad_norm=clip)
    per_model = torch_reference(models, trainer.recorded, CONFIGS, clip=clip)
    global_ = torch_reference(models, trainer.recorded, CONFIGS, clip=clip, global_clip=True)
    assert max_rel_diff(trainer.model_batch, per_model) <= 1e-5
    # The test can fail: one global norm would have given clearly different weights.
    assert max_rel_diff(trainer.model_batch, global_) > 1e-3
    # Clipping was active, and the logged norms are per model.
    assert trainer.last_grad_norms.shape == (N,)


def test_gradient_accumulation_divides_by_the_steps(tmp_path):
    # SGD, not Adam: Adam is nearly blind to a wrong gradient scale.
    configs = [
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
        {"lr": 0.2, "momentum": 0.0, "weight_decay": 0.01},
        {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1},
        {"lr": 0.02, "momentum": 0.8, "weight_decay": 0.0},
    ]
    models = make_models(seed=3)
    mb = ModelBatch([copy.deepcopy(m) for m in models])
    args = make_args(
        tmp_path, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=3
    )
    trainer = RecordingTrainer(
        mb, args, optimizer_cls=torch.optim.SGD, configs=configs, train_dataset=Blobs()
    )
    trainer.train()
    # 16 batches per epoch: five steps of 3 micro-batches, then one of 1 at the epoch's end,
    # which Trainer divides by 1, not 3.
    assert len(trainer.recorded) == 16
    ref = torch_reference(
        models, trainer.recorded, configs, accumulation=3, total=6, optimizer="sgd"
    )
    assert max_rel_diff(trainer.model_batch, ref) <= 1e-5
    undivided = torch_reference(
        models, trainer.recorded, configs, accumulation=1, total=18, optimizer="sgd"
    )
    assert max_rel_diff(trainer.model_batch, undivided) > 1e-3


# ---------------------------------------------------------------------- checkpoints


def test_resume_from_checkpoint_continues_identically(tmp_path):
    models = make_models(seed=4)
    full = train(tmp_path / "full", models, save_strategy="steps", save_steps=10)
    checkpoint = tmp_path / "full" / "checkpoint-10"
    assert (checkpoint / "model.safetensors").is_file()

    # Resume into a batch with other initial weights: everything must come from the checkpoint.
    mb = ModelBatch(make_models(seed=99))
    resumed = BatchTrainer(
        mb,
        make_args(tmp_path / "resumed", save_strategy="steps", save_steps=10),
        configs=CONFIGS,
        train_dataset=Blobs(),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, p in full.model_batch.stacked_params().items():
        assert torch.equal(p, mb.stacked_params()[name]), name

    # The checkpoint holds the stacked weights; model i comes out as a plain state dict.
    final = tmp_path / "full" / "checkpoint-20"
    for i in (0, N - 1):
        state = load_model_state(final, i)
        plain = MLP()
        plain.load_state_dict(state)  # strict: exactly the user's keys
        for k, v in full.model_batch.get_model_states()[i].items():
            assert torch.equal(state[k], v), k
        x = torch.randn(5, 8)
        assert torch.equal(plain(x), export_model(full, i)(x))
    with pytest.raises(IndexError, match="load_model_state"):
        load_model_state(final, N)


def test_resume_rejects_a_mismatched_checkpoint(tmp_path):
    full = train(
        tmp_path / "full", make_models(seed=5), max_steps=2, save_strategy="steps", save_steps=2
    )
    assert full.state.global_step == 2
    mb = ModelBatch(make_models(seed=5, n=N + 1))
    other = BatchTrainer(
        mb, make_args(tmp_path / "other"), configs=CONFIGS + CONFIGS[:1], train_dataset=Blobs()
    )
    with pytest.raises(ValueError, match="BatchTrainer: the checkpoint"):
        other.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))


# ---------------------------------------------------------------------- logging and eval


def test_logs_aggregates_and_writes_the_per_model_table(adamw_run):
    _, trainer, out = adamw_run
    history = trainer.model_batch.loss_history()  # [STEPS, N], one row per micro-batch
    train_logs = [h for h in trainer.state.log_history if "loss_best" in h]
    assert [h["step"] for h in train_logs] == [5, 10, 15, 20]
    for h in trainer.state.log_history:
        assert len(h) < 20  # aggregates only, never one key per model
    with open(out / "per_model_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * N
    for log in train_logs:
        step = log["step"]
        window = history[step - 5 : step].double().mean(dim=0)
        logged = torch.tensor(
            [float(r["loss"]) for r in rows if int(r["step"]) == step], dtype=torch.float64
        )
        assert torch.allclose(logged, window, rtol=1e-6, atol=0)
        assert log["best_model"] == int(window.argmin())
        assert math.isclose(log["loss_best"], float(window.min()), rel_tol=1e-6)
        assert math.isclose(log["loss_worst"], float(window.max()), rel_tol=1e-6)
        assert math.isclose(log["loss_median"], float(window.median()), rel_tol=1e-6)
        # "loss" is the mean over the models (Trainer's own would be their sum).
        assert math.isclose(log["loss"], float(window.mean()), rel_tol=1e-6)


def test_eval_predictions_are_batch_first_and_per_model(tmp_path):
    trainer = train(tmp_path, make_models(seed=7), max_steps=3)
    data = Blobs(n=10, seed=1)  # 10 samples in eval batches of 4: an uneven last batch
    out = trainer.predict(data)
    predictions = out.predictions
    assert isinstance(predictions, np.ndarray) and predictions.shape == (10, N, 3)
    mb = trainer.model_batch
    losses = []
    for i in range(N):
        logits = export_model(trainer, i)(data.x)
        assert torch.allclose(torch.as_tensor(predictions[:, i]), logits, rtol=1e-6, atol=1e-7)
        losses.append(float(F.cross_entropy(logits, data.y).detach()))
    best = min(range(N), key=lambda i: losses[i])
    assert out.metrics["test_best_model"] == best
    assert math.isclose(out.metrics["test_loss_best"], losses[best], rel_tol=1e-6)
    # The mean over models, comparable with one model's loss; and each model's own.
    assert math.isclose(out.metrics["test_loss"], sum(losses) / N, rel_tol=1e-6)
    assert torch.allclose(
        trainer.eval_per_model["loss"], torch.tensor(losses, dtype=torch.float64), rtol=1e-6
    )
    # Evaluation does not enter the training loss history.
    assert mb.loss_history().shape == (3, N)


# ---------------------------------------------------------------------- per-model grad scaler


def test_overflow_in_one_model_skips_only_that_model(tmp_path):
    amp = pytest.importorskip("modelbatch.amp")
    k = 2

    def run(out, blow_up: bool):
        models = make_models(seed=8)
        if blow_up:
            with torch.no_grad():
                models[k].get_parameter("net.2.weight").mul_(
                    1e36
                )  # its scaled gradients overflow to inf
        mb = ModelBatch(models)
        start = mb.get_model_states()[k]
        scaler = amp.BatchGradScaler(mb, init_scale=2.0**16)
        trainer = RecordingTrainer(
            mb,
            make_args(out, max_steps=5),
            configs=CONFIGS,
            # Passed, or picked up from the batch it is attached to: both paths.
            grad_scaler=scaler if blow_up else None,
            train_dataset=Blobs(),
        )
        assert trainer.grad_scaler is scaler
        trainer.train()
        return trainer, start, scaler

    clean, _, _ = run(tmp_path / "clean", blow_up=False)
    broken, start_k, scaler = run(tmp_path / "broken", blow_up=True)
    for name, p in broken.model_batch.stacked_params().items():
        others = [i for i in range(N) if i != k]
        assert torch.equal(p[others], clean.model_batch.stacked_params()[name][others]), name
        assert torch.equal(p[k], start_k[name]), name  # model k never stepped
    scale = scaler.get_scale()
    assert float(scale[k]) < 2.0**16
    assert all(float(scale[i]) == 2.0**16 for i in range(N) if i != k)
    # The others trained as plain torch would have.
    ref = torch_reference(make_models(seed=8), clean.recorded, CONFIGS, total=5)
    assert max_rel_diff(clean.model_batch, ref) <= 1e-5


def test_fp16_global_scaler_is_replaced_by_the_per_model_one(tmp_path, monkeypatch):
    amp = pytest.importorskip("modelbatch.amp")
    from transformers import Trainer

    # accelerate makes a torch GradScaler for fp16 on GPUs only; give the CPU run one,
    # configured as args.fp16 would, and check BatchTrainer swaps it for the per-model one.
    original = Trainer.create_accelerator_and_postprocess

    def with_torch_scaler(self):
        original(self)
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=7)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", with_torch_scaler)
    k = 3
    models = make_models(seed=10)
    with torch.no_grad():
        models[k].get_parameter("net.2.weight").fill_(float("inf"))
    mb = ModelBatch(models)
    start = mb.get_model_states()
    trainer = BatchTrainer(
        mb, make_args(tmp_path, max_steps=3), configs=CONFIGS, train_dataset=Blobs()
    )
    assert isinstance(trainer.grad_scaler, amp.BatchGradScaler)
    assert mb.grad_scaler is trainer.grad_scaler
    assert trainer.grad_scaler.get_scale().tolist() == [2.0**12] * N
    trainer.train()
    scale = trainer.grad_scaler.get_scale()
    assert float(scale[k]) == 2.0**9  # backed off at each of the 3 steps
    assert all(float(scale[i]) == 2.0**12 for i in range(N) if i != k)
    after = mb.get_model_states()
    for i in range(N):
        same = all(torch.equal(after[i][n], start[i][n]) for n in start[i])
        assert same == (i == k), i


def test_resume_restores_the_per_model_scaler(tmp_path):
    amp = pytest.importorskip("modelbatch.amp")
    k = 1

    def trainer_for(out, seed):
        models = make_models(seed=seed)
        with torch.no_grad():
            # Non-finite at every scale: model k skips every step, in both runs alike.
            models[k].get_parameter("net.2.weight").fill_(float("inf"))
        mb = ModelBatch(models)
        # growth_interval=2: the others' scales grow while model k's backs off, so the
        # scaler state differs per model by the checkpoint.
        scaler = amp.BatchGradScaler(mb, init_scale=2.0**10, growth_interval=2)
        args = make_args(out, max_steps=6, save_strategy="steps", save_steps=3)
        return BatchTrainer(mb, args, configs=CONFIGS, grad_scaler=scaler, train_dataset=Blobs())

    full = trainer_for(tmp_path / "full", seed=9)
    full.train()
    resumed = trainer_for(tmp_path / "resumed", seed=9)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert torch.equal(full.grad_scaler.get_scale(), resumed.grad_scaler.get_scale())
    assert float(full.grad_scaler.get_scale()[k]) < 2.0**10 < float(full.grad_scaler.get_scale()[0])
    for name, p in full.model_batch.stacked_params().items():
        assert torch.equal(p, resumed.model_batch.stacked_params()[name]), name


# ---------------------------------------------------------------------- PreTrainedModel


def test_tiny_bert_sequence_classification(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )  # type: ignore[call-arg]  # taken by PretrainedConfig, absent from BertConfig's signature
    n, steps = 3, 4
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(BertForSequenceClassification(config))

    class Sentences(torch.utils.data.Dataset):
        def __init__(self, size: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(1, 40, (size, 12), generator=g)
            lengths = torch.randint(4, 13, (size,), generator=g)
            self.mask = (torch.arange(12) < lengths[:, None]).long()
            self.labels = torch.randint(0, 3, (size,), generator=g)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i):
            return {
                "input_ids": self.ids[i],
                "attention_mask": self.mask[i],
                "labels": self.labels[i],
            }

    configs = [
        {"lr": lr, "weight_decay": wd} for lr, wd in [(1e-3, 0.0), (3e-3, 0.1), (5e-4, 0.01)]
    ]
    mb = ModelBatch([copy.deepcopy(m) for m in models])
    trainer = RecordingTrainer(
        mb,
        make_args(tmp_path, max_steps=steps, per_device_train_batch_size=4),
        configs=configs,
        train_dataset=Sentences(16, 0),
    )
    trainer.train()

    def hf_loss(m, batch):  # each model's own HF loss, labels passed to the model
        return m(**batch).loss

    ref = torch_reference(models, trainer.recorded, configs, total=steps, loss_of=hf_loss)
    # Softmax ignores the attention key bias: its gradient is zero up to rounding.
    assert max_rel_diff(mb, ref, noise_only=("attention.self.key.bias",)) <= 1e-5

    data = Sentences(6, 1)
    out = trainer.predict(data)
    predictions = out.predictions
    assert isinstance(predictions, np.ndarray) and predictions.shape == (6, n, 3)
    for i in range(n):
        exported = export_model(trainer, i)
        assert isinstance(exported, BertForSequenceClassification)
        logits = exported(input_ids=data.ids, attention_mask=data.mask).logits
        expected = ref[i](input_ids=data.ids, attention_mask=data.mask).logits
        assert torch.allclose(logits, expected, rtol=1e-6, atol=1e-7)
        assert torch.allclose(torch.as_tensor(predictions[:, i]), logits, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- errors


def test_clear_errors(tmp_path):
    with pytest.raises(
        TypeError, match=r"BatchTrainer: expected model to be a modelbatch\.ModelBatch"
    ):
        BatchTrainer(MLP(), make_args(tmp_path))  # type: ignore[arg-type]  # the wrong type is the point
    mb = ModelBatch(make_models())
    with pytest.raises(ValueError, match="BatchTrainer: configs has 2 entries"):
        BatchTrainer(mb, make_args(tmp_path), configs=CONFIGS[:2])
    with pytest.raises(ValueError, match=r"BatchTrainer: args\.optim='sgd' is not used"):
        BatchTrainer(mb, make_args(tmp_path, optim="sgd"), configs=CONFIGS)
    with pytest.raises(ValueError, match=r"BatchTrainer: label_smoothing_factor=0\.1"):
        BatchTrainer(mb, make_args(tmp_path, label_smoothing_factor=0.1), configs=CONFIGS)
    with pytest.raises(ValueError, match="BatchTrainer: compute_loss_func is not used"):
        BatchTrainer(mb, make_args(tmp_path), configs=CONFIGS, compute_loss_func=F.cross_entropy)
    trainer = BatchTrainer(mb, make_args(tmp_path), configs=CONFIGS, label_key="target")
    with pytest.raises(ValueError, match="BatchTrainer: the batch has no 'target' entry"):
        trainer.compute_loss(mb, {"x": torch.randn(2, 8), "labels": torch.zeros(2).long()})


def test_dataset_columns_follow_the_users_forward(tmp_path):
    # Trainer prunes `datasets` columns by the model's forward signature; it must be
    # MLP.forward(x), not ModelBatch.forward(*args, **kwargs).
    trainer = BatchTrainer(ModelBatch(make_models()), make_args(tmp_path), configs=CONFIGS)
    trainer._set_signature_columns_if_needed()
    columns = trainer._signature_columns
    assert columns is not None
    assert "x" in columns and "labels" in columns and "kwargs" not in columns


# ---------------------------------------------------------------------- the stock Trainer


class NormMLP(nn.Module):
    """A model with biases and a LayerNorm; returns HF-style outputs (with loss given labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_each_model_equals_the_stock_trainer_on_that_model(tmp_path):
    from transformers import Trainer

    configs = [{"lr": 1e-2, "weight_decay": 0.5}, {"lr": 3e-2, "weight_decay": 0.2}]
    torch.manual_seed(11)
    models = [NormMLP() for _ in configs]
    with torch.no_grad():  # LayerNorm starts at (1, 0): move it, so decaying it would show
        for m in models:
            norm = m.net[1]
            assert isinstance(norm, nn.LayerNorm)
            norm.weight.add_(torch.randn(16) * 0.3)
            norm.bias.add_(torch.randn(16) * 0.3)
    args = dict(max_steps=STEPS, eval_strategy="no")
    batch = BatchTrainer(
        ModelBatch([copy.deepcopy(m) for m in models]),
        make_args(tmp_path / "batch", **args),
        configs=configs,
        train_dataset=Blobs(),
    )
    batch.train()
    # Two groups, as the stock Trainer builds them; the second never decays.
    opt = batch.optimizer
    assert opt is not None
    assert len(opt.param_groups) == 2
    assert float(opt.param_groups[1]["hparams"]["weight_decay"].abs().max()) == 0.0
    for i, (m, c) in enumerate(zip(models, configs)):
        single = copy.deepcopy(m)
        stock = Trainer(
            single,
            make_args(
                tmp_path / f"stock{i}",
                learning_rate=c["lr"],
                weight_decay=c["weight_decay"],
                **args,
            ),
            train_dataset=Blobs(),
        )
        stock.train()
        got = batch.model_batch.get_model_states()[i]
        for k, v in single.state_dict().items():
            rel = float((got[k] - v).abs().max() / v.abs().max())
            assert rel <= 1e-5, (i, k, rel)


def test_per_model_table_goes_to_tensorboard_with_report_to(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mb = ModelBatch(make_models(seed=8))
    args = make_args(
        tmp_path,
        max_steps=10,
        report_to=["tensorboard"],
        eval_strategy="steps",
        eval_steps=10,
    )
    trainer = BatchTrainer(
        mb, args, configs=CONFIGS, train_dataset=Blobs(), eval_dataset=Blobs(12, seed=3)
    )
    trainer.train()
    for cb in trainer.callback_handler.callbacks:
        if getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.flush()
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for i in range(N):
        train = acc.Scalars(f"per_model/train/loss/model_{i}")
        assert [e.step for e in train] == [5, 10]
        (ev,) = acc.Scalars(f"per_model/eval/loss/model_{i}")
        assert ev.value == pytest.approx(float(trainer.eval_per_model["loss"][i]), rel=1e-6)
    assert "per_model/eval/accuracy/model_0" in tags
