"""Lightning integration: training through the Trainer equals training by hand, per model."""

from __future__ import annotations

import copy
import csv
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if TYPE_CHECKING:
    import lightning.pytorch as L
else:
    L = pytest.importorskip("lightning.pytorch")

from modelbatch import ModelBatch
from modelbatch import optim as mb_optim
from modelbatch.integrations.lightning import (
    BatchLightningModule,
    batch_precision_plugin,
)
from modelbatch.optim import OptimizerFactory, clip_grad_norm_

N = 4
STEPS = 20
CONFIGS: list[dict[str, Any]] = [
    {"lr": 10 ** (-3 + 0.5 * i), "weight_decay": 0.03 * (i + 1)} for i in range(N)
]


def make_models(seed: int = 0) -> list[nn.Sequential]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)) for _ in range(N)]


def scaler_of(tr: L.Trainer) -> Any:
    """The grad scaler of the Trainer's precision plugin (a MixedPrecision one)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = tr.precision_plugin
    assert isinstance(plugin, MixedPrecision), type(plugin)
    return plugin.scaler


def make_loader(seed: int = 1, n: int = 100, batch: int = 20) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def batches(loader: DataLoader, steps: int) -> list[Any]:
    out: list[Any] = []
    while len(out) < steps:
        out.extend(loader)
    return out[:steps]


def trainer(tmp_path=None, **kwargs) -> L.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_steps=STEPS,
        default_root_dir=tmp_path,
    )
    base.update(kwargs)
    return L.Trainer(**base)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().clamp(min=1e-12)
    diff = (actual - expected).abs().max() / scale
    assert diff <= rel, f"max relative difference {diff.item():.3e} > {rel:g}"


STEP_SIZES = [2, 3, 4, 5]
GAMMAS = [0.5, 0.7, 0.9, 0.3]


def plain_torch_reference(
    init: Sequence[nn.Module], loader, steps, max_norm=None, schedule=False, clip_value=None
):
    """Each model alone, with torch.optim.AdamW, StepLR, clip_grad_norm_ / clip_grad_value_.

    `max_norm` is one float for all models or a list, one per model.
    """
    out = []
    for i, (model, cfg) in enumerate(zip(init, CONFIGS)):
        model = copy.deepcopy(model)
        opt = torch.optim.AdamW(model.parameters(), **cfg)
        sched = torch.optim.lr_scheduler.StepLR(opt, STEP_SIZES[i], GAMMAS[i])
        for x, y in batches(loader, steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if max_norm is not None:
                norm_i = max_norm[i] if isinstance(max_norm, list) else max_norm
                torch.nn.utils.clip_grad_norm_(model.parameters(), norm_i)
            if clip_value is not None:
                torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
            opt.step()
            if schedule:
                sched.step()
        out.append(model)
    return out


def assert_batch_equals(mb: ModelBatch, refs: list[nn.Module], rel: float) -> None:
    for i, ref in enumerate(refs):
        for name, value in ref.state_dict().items():
            assert_close_rel(mb.stacked_params()[name][i].detach(), value, rel)


def test_fit_matches_plain_torch_and_own_loop():
    init = make_models()
    loader = make_loader()
    module = BatchLightningModule(ModelBatch(copy.deepcopy(init)), CONFIGS)
    trainer().fit(module, loader)
    mb = module.model_batch

    # Not "it ran": every model moved, and each moved as its own torch.optim run.
    for i in range(N):
        moved = mb.stacked_params()["0.weight"][i] - init[i].state_dict()["0.weight"]
        assert moved.abs().max() > 1e-3
    assert_batch_equals(mb, plain_torch_reference(init, loader, STEPS), 1e-5)

    # And as the library's own loop on the same batches.
    own = ModelBatch(copy.deepcopy(init))
    opt = OptimizerFactory(torch.optim.AdamW).create_optimizer(own, CONFIGS)
    for x, y in batches(loader, STEPS):
        opt.zero_grad()
        own.compute_loss(own(x), y).backward()
        opt.step()
    for name, value in own.stacked_params().items():
        assert_close_rel(mb.stacked_params()[name].detach(), value.detach(), 1e-5)

    # The optimizer Lightning stepped carries each model's own hyperparameters.
    stepped = module.trainer.optimizers[0]
    assert isinstance(stepped, mb_optim.BatchOptimizer)
    hp = stepped.hparams
    for key in ("lr", "weight_decay"):
        expected = torch.tensor([c[key] for c in CONFIGS], dtype=hp[key].dtype)
        assert torch.equal(hp[key], expected), key


def test_gradient_clipping_is_per_model_not_global():
    init = make_models()
    loader = make_loader()
    max_norm = 0.3
    module = BatchLightningModule(ModelBatch(copy.deepcopy(init)), CONFIGS)
    trainer(gradient_clip_val=max_norm).fit(module, loader)
    mb = module.model_batch
    assert_batch_equals(mb, plain_torch_reference(init, loader, STEPS, max_norm=max_norm), 1e-5)
    assert module.grad_norms is not None and module.grad_norms.shape == (N,)

    # The same run with one global norm over all models gives other weights,
    # so the comparison above can fail.
    glob = ModelBatch(copy.deepcopy(init))
    opt = OptimizerFactory(torch.optim.AdamW).create_optimizer(glob, CONFIGS)
    for x, y in batches(loader, STEPS):
        opt.zero_grad()
        glob.compute_loss(glob(x), y).backward()
        torch.nn.utils.clip_grad_norm_(glob.parameters(), max_norm)
        opt.step()
    diff = (glob.stacked_params()["0.weight"] - mb.stacked_params()["0.weight"]).abs().max()
    assert diff > 1e-4


def test_per_model_max_grad_norm_argument():
    init = make_models()
    loader = make_loader()
    norms = [0.05, 0.3, 1.0, 5.0]
    module = BatchLightningModule(
        ModelBatch(copy.deepcopy(init)), CONFIGS, max_grad_norm=torch.tensor(norms)
    )
    trainer().fit(module, loader)
    refs = plain_torch_reference(init, loader, STEPS, max_norm=norms)
    assert_batch_equals(module.model_batch, refs, 1e-5)


def test_value_clipping_matches_torch_per_model():
    init = make_models()
    loader = make_loader()
    module = BatchLightningModule(ModelBatch(copy.deepcopy(init)), CONFIGS)
    trainer(gradient_clip_val=0.02, gradient_clip_algorithm="value").fit(module, loader)
    refs = plain_torch_reference(init, loader, STEPS, clip_value=0.02)
    assert_batch_equals(module.model_batch, refs, 1e-5)


def _scheduled_module(init):
    """Per-model StepLR: model i decays by GAMMAS[i] every STEP_SIZES[i] steps."""
    return BatchLightningModule(
        ModelBatch(copy.deepcopy(init)),
        CONFIGS,
        scheduler=lambda opt: mb_optim.BatchStepLR(opt, step_size=STEP_SIZES, gamma=GAMMAS),
    )


def test_per_model_schedule_matches_torch_schedulers():
    init = make_models()
    loader = make_loader()
    module = _scheduled_module(init)
    trainer(gradient_clip_val=0.5).fit(module, loader)
    refs = plain_torch_reference(init, loader, STEPS, max_norm=0.5, schedule=True)
    assert_batch_equals(module.model_batch, refs, 1e-5)
    lrs = module.trainer.optimizers[0].hparams["lr"]
    expected = [c["lr"] * g ** (STEPS // s) for c, s, g in zip(CONFIGS, STEP_SIZES, GAMMAS)]
    assert torch.allclose(lrs, torch.tensor(expected, dtype=lrs.dtype), rtol=1e-12)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-scaler"])
def test_resume_from_checkpoint_continues_identically(tmp_path, fp16):
    from lightning.pytorch.plugins.precision import MixedPrecision

    init = make_models()
    if fp16:  # model 2 overflows: the scales differ per model and must resume so
        with torch.no_grad():
            init[2].get_parameter("2.weight").mul_(1e4)
    loader = make_loader()  # 5 batches an epoch: 4 epochs are STEPS steps
    epochs = STEPS // len(loader)

    def run(module, max_epochs, ckpt_path=None):
        # torch's scaler in the plugin: the module swaps in the per-model one.
        plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if fp16 else []
        tr = trainer(gradient_clip_val=0.5, max_steps=-1, max_epochs=max_epochs, plugins=plugins)
        tr.fit(module, loader, ckpt_path=ckpt_path)
        return tr

    straight = _scheduled_module(init)
    t0 = run(straight, epochs)

    # Stop at an epoch boundary: Lightning restarts a plain DataLoader's epoch on resume.
    ckpt = tmp_path / "half.ckpt"
    run(_scheduled_module(init), epochs // 2).save_checkpoint(ckpt)

    # A fresh module from other weights: everything must come from the checkpoint.
    resumed = _scheduled_module(make_models(seed=123))
    t2 = run(resumed, epochs, ckpt_path=ckpt)
    assert t2.global_step == STEPS
    for name, value in straight.model_batch.stacked_params().items():
        assert torch.equal(resumed.model_batch.stacked_params()[name], value), name
    s_opt, r_opt = t0.optimizers[0], t2.optimizers[0]
    assert r_opt.param_groups[0]["lr"] == s_opt.param_groups[0]["lr"]
    assert torch.equal(resumed.lr_schedulers().steps, straight.lr_schedulers().steps)
    for key, value in s_opt.hparams.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(r_opt.hparams[key], value), key
    if fp16:
        scales = t0.precision_plugin.scaler.get_scale()
        assert scales[2] < scales[0]
        assert torch.equal(t2.precision_plugin.scaler.get_scale(), scales)


def test_bf16_mixed_matches_own_autocast_loop():
    init = make_models()
    loader = make_loader()
    module = BatchLightningModule(ModelBatch(copy.deepcopy(init)), CONFIGS)
    trainer(precision="bf16-mixed", max_steps=8).fit(module, loader)
    own = ModelBatch(copy.deepcopy(init))
    opt = OptimizerFactory(torch.optim.AdamW).create_optimizer(own, CONFIGS)
    for x, y in batches(loader, 8):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = own.compute_loss(own(x), y)
        loss.backward()
        opt.step()
    for name, value in own.stacked_params().items():
        got = module.model_batch.stacked_params()[name].detach()
        assert got.dtype == torch.float32
        assert_close_rel(got, value.detach(), 1e-5)
    moved = module.model_batch.stacked_params()["2.weight"] - torch.stack(
        [m.state_dict()["2.weight"] for m in init]
    )
    assert moved.abs().max() > 1e-3


def test_logs_aggregates_and_per_model_table(tmp_path):
    init = make_models()
    loader = make_loader()
    val = make_loader(seed=7, n=40)
    logger = L.loggers.CSVLogger(tmp_path, name="run")
    module = BatchLightningModule(ModelBatch(copy.deepcopy(init)), CONFIGS)
    trainer(logger=logger, max_steps=10, log_every_n_steps=1).fit(module, loader, val)

    # Validation metrics are each model's own loss on the whole validation set.
    x_val = torch.cat([x for x, _ in val])
    y_val = torch.cat([y for _, y in val])
    mb = module.model_batch
    with torch.no_grad():
        expected = mb.per_model_losses(mb(x_val), y_val)
        expected_acc = mb.accuracy(mb(x_val), y_val)
    assert_close_rel(module.val_metrics["loss"], expected, 1e-6)
    assert_close_rel(module.val_metrics["acc"], expected_acc, 1e-6)
    logged = module.trainer.callback_metrics
    assert torch.isclose(logged["val/loss"], expected.mean(), rtol=1e-6)
    assert torch.isclose(logged["val/loss_best"], expected.min(), rtol=1e-6)
    assert torch.isclose(logged["val/acc_best"], expected_acc.max(), rtol=1e-6)

    with open(logger.log_dir + "/metrics.csv") as f:
        header = next(csv.reader(f))
    assert "train/loss" in header and "val/loss" in header

    with open(logger.log_dir + "/per_model.csv") as f:
        rows = list(csv.DictReader(f))
    last_epoch = max(int(r["epoch"]) for r in rows)
    last = [r for r in rows if int(r["epoch"]) == last_epoch]
    assert [int(r["model"]) for r in last] == list(range(N))
    for row, cfg in zip(last, CONFIGS):
        assert float(row["lr"]) == pytest.approx(cfg["lr"], rel=1e-6)
        assert float(row["weight_decay"]) == pytest.approx(cfg["weight_decay"], rel=1e-6)
        assert "val_loss" in row


def test_retired_model_is_left_unchanged_by_the_trainer():
    init = make_models()
    mb = ModelBatch(copy.deepcopy(init))
    mb.retire(2)
    module = BatchLightningModule(mb, CONFIGS)
    trainer(max_steps=5, gradient_clip_val=0.3).fit(module, make_loader())
    for name, value in init[2].state_dict().items():
        assert torch.equal(mb.stacked_params()[name][2], value)
    assert not torch.equal(mb.stacked_params()["0.weight"][1], init[1].state_dict()["0.weight"])


def test_bad_configs_give_clear_errors():
    mb = ModelBatch(make_models())
    with pytest.raises(ValueError, match=r"^BatchLightningModule: expected one optimizer config"):
        BatchLightningModule(mb, CONFIGS[:2])
    with pytest.raises(TypeError, match=r"^BatchLightningModule: expected a modelbatch.ModelBatch"):
        BatchLightningModule(nn.Linear(2, 2), CONFIGS)  # type: ignore[arg-type]  # the point
    with pytest.raises(ValueError, match=r"^batch_precision_plugin: precision must be"):
        batch_precision_plugin(mb, "32-true")


def _fp16_reference(init, loader, steps, max_norm):
    from modelbatch.amp import BatchGradScaler

    own = ModelBatch(copy.deepcopy(init))
    opt = OptimizerFactory(torch.optim.AdamW).create_optimizer(own, CONFIGS)
    scaler = BatchGradScaler(own)
    for x, y in batches(loader, steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            loss = own.compute_loss(own(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        clip_grad_norm_(own, max_norm)
        scaler.step(opt)
        scaler.update()
    return own, scaler


@pytest.mark.parametrize("how", ["batch_plugin", "torch_scaler_swapped"])
def test_16_mixed_uses_the_per_model_scaler_and_isolates_overflow(how):
    from lightning.pytorch.plugins.precision import MixedPrecision

    from modelbatch.amp import BatchGradScaler

    init = make_models()
    # Model 2's output overflows fp16: its steps are skipped, the others' are not.
    with torch.no_grad():
        init[2].get_parameter("2.weight").mul_(1e4)
    loader = make_loader()
    mb = ModelBatch(copy.deepcopy(init))
    module = BatchLightningModule(mb, CONFIGS)
    # Lightning turns precision="16-mixed" into bf16 on CPU; a plugin keeps fp16.
    if how == "batch_plugin":
        plugin = batch_precision_plugin(mb, "16-mixed", device="cpu")
    else:  # torch's global scaler, which the module must replace by the per-model one
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    tr = trainer(plugins=[plugin], max_steps=6, gradient_clip_val=0.3)
    tr.fit(module, loader)
    scaler = scaler_of(tr)
    assert isinstance(scaler, BatchGradScaler)
    assert scaler.get_scale().shape == (N,)

    own, own_scaler = _fp16_reference(init, loader, 6, 0.3)
    assert torch.equal(scaler.get_scale(), own_scaler.get_scale())
    assert scaler.get_scale()[2] < scaler.get_scale()[0]  # only model 2 backed off
    for name, value in own.stacked_params().items():
        assert_close_rel(mb.stacked_params()[name].detach(), value.detach(), 1e-5)
    for name, value in init[2].state_dict().items():
        assert torch.equal(mb.stacked_params()[name][2], value), name  # skipped every step
    for i in (0, 1, 3):
        assert not torch.equal(mb.stacked_params()["0.weight"][i], init[i].state_dict()["0.weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_16_mixed_flag_on_cuda_gets_the_per_model_scaler():
    from modelbatch.amp import BatchGradScaler

    mb = ModelBatch(make_models())
    module = BatchLightningModule(mb, CONFIGS)
    tr = trainer(accelerator="cuda", precision="16-mixed", max_steps=3, gradient_clip_val=0.3)
    tr.fit(module, make_loader())
    assert isinstance(scaler_of(tr), BatchGradScaler)
    assert torch.isfinite(mb.stacked_params()["0.weight"]).all()


def test_per_model_batches_from_a_per_model_loader():
    from modelbatch.data import PerModelLoader

    init = make_models()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(60, 6, generator=g), torch.randint(0, 3, (60,), generator=g)

    def loader():  # each model its own bootstrap bag: batches [N, B, ...]
        return PerModelLoader(x, y, num_models=N, batch_size=12, sampling="bootstrap", seed=5)

    module = BatchLightningModule(ModelBatch(copy.deepcopy(init)), CONFIGS, per_model_inputs=True)
    trainer(max_steps=10).fit(module, loader())
    again = loader()  # the same batches: 2 epochs of 5, a new order each epoch
    per_model = [batch for _ in range(2) for batch in again]
    assert len(per_model) == 10 and per_model[0][0].shape == (N, 12, 6)
    for i, (model, cfg) in enumerate(zip(copy.deepcopy(init), CONFIGS)):
        opt = torch.optim.AdamW(model.parameters(), **cfg)
        for xb, yb in per_model:
            opt.zero_grad()
            F.cross_entropy(model(xb[i]), yb[i]).backward()
            opt.step()
        for name, value in model.state_dict().items():
            assert_close_rel(module.model_batch.stacked_params()[name][i].detach(), value, 1e-5)


def test_attached_scaler_is_adopted_under_16_mixed_and_refused_otherwise():
    from lightning.pytorch.plugins.precision import MixedPrecision

    from modelbatch.amp import BatchGradScaler

    mb = ModelBatch(make_models())
    mine = BatchGradScaler(mb, init_scale=2.0**10)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    tr = trainer(plugins=[plugin], max_steps=2)
    tr.fit(BatchLightningModule(mb, CONFIGS), make_loader())
    assert scaler_of(tr) is mine and mb.grad_scaler is mine

    # fp32 would backpropagate scaled losses that nothing unscales.
    with pytest.raises(
        ValueError, match=r"^BatchLightningModule: the ModelBatch has a grad scaler"
    ):
        trainer(max_steps=2).fit(BatchLightningModule(mb, CONFIGS), make_loader())


def test_tensorboard_logger_gets_one_series_per_model_and_the_table_reads(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modelbatch import format_table

    configs = [{"lr": lr, "weight_decay": 0.0} for lr in (1e-4, 3e-5, 1e-3, 2e-4)]
    logger = L.loggers.TensorBoardLogger(tmp_path, name="run")
    module = BatchLightningModule(ModelBatch(make_models()), configs)
    trainer(logger=logger, max_steps=10).fit(module, make_loader(), make_loader(seed=7, n=40))
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for i, cfg in enumerate(configs):
        events = acc.Scalars(f"per_model/lr/model_{i}")
        assert [e.step for e in events] == [5, 10]  # one point per epoch end
        assert events[-1].value == pytest.approx(cfg["lr"], rel=1e-6)
        assert f"per_model/val_loss/model_{i}" in tags
    # Also the CSV next to the events, and a table where 1e-4 reads as 1.0e-04, not 0.0000.
    with open(logger.log_dir + "/per_model.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * N
    table = format_table(module.per_model_rows())
    assert "1.0e-04" in table and "3.0e-05" in table and "0.0000" not in table
