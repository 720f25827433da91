"""Lifecycle: early stopping, NaN guard, replace_model, progress bar."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from modelbatch import ModelBatch
from modelbatch import _progress as progress
from modelbatch import optim as mb_optim
from modelbatch.amp import BatchGradScaler
from modelbatch.data import PerModelLoader
from modelbatch.lifecycle import EarlyStopping, NaNGuard, replace_model

# Tiny tensors: intra-op threads only add contention on a shared machine.
torch.set_num_threads(1)

N, D, C = 4, 5, 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 7)
        self.fc2 = nn.Linear(7, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def make_batch(seed: int = 0) -> ModelBatch:
    torch.manual_seed(seed)
    return ModelBatch([Net() for _ in range(N)])


CONFIGS = [{"lr": 0.01 * (i + 1), "betas": (0.9, 0.95 + 0.01 * i)} for i in range(N)]


def make_run(seed: int = 0):
    mb = make_batch(seed)
    opt = mb_optim.BatchAdam(list(mb.parameters()), CONFIGS, model_batch=mb)
    sched = mb_optim.BatchStepLR(opt, step_size=[2, 3, 2, 3], gamma=[0.5, 0.7, 0.9, 0.6])
    return mb, opt, sched


def batches(steps: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(N, 8, D, generator=g), torch.randint(0, C, (N, 8), generator=g))
        for _ in range(steps)
    ]


def train(mb, opt, sched, data) -> None:
    for xb, yb in data:
        loss = mb.compute_loss(mb(xb, per_model=True), yb, per_model=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def snapshot(mb) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mb.state_dict().items()}


# ---------------------------------------------------------------------- early stopping


def reference_stop_steps(metrics: torch.Tensor, patience: int, min_delta: float) -> list:
    """Plain Python, one model at a time: the call at which each model is retired."""
    stops = []
    for i in range(metrics.shape[1]):
        best, wait, stop = math.inf, 0, None
        for t, v in enumerate(metrics[:, i].tolist()):
            if v < best - min_delta:
                best, wait = v, 0
            else:
                wait += 1
            if wait >= patience:
                stop = t
                break
        stops.append(stop)
    return stops


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_early_stopping_retires_exactly_the_stalled_models(seed):
    g = torch.Generator().manual_seed(seed)
    n, steps = 16, 30
    # Noisy curves that flatten at model-specific times, some with NaN.
    t = torch.arange(steps, dtype=torch.float64).unsqueeze(1)
    plateau = torch.randint(3, steps + 10, (n,), generator=g).to(torch.float64)
    noise = 0.005 * torch.rand(steps, n, generator=g, dtype=torch.float64)
    metrics = 1.0 - 0.05 * torch.minimum(t, plateau) + noise
    metrics[10:, 3] = float("nan")
    torch.manual_seed(0)
    mb = ModelBatch([nn.Linear(2, 2) for _ in range(n)])
    stopper = EarlyStopping(mb, patience=3, min_delta=0.01)
    expected = reference_stop_steps(metrics, 3, 0.01)
    got: list = [None] * n
    for step in range(steps):
        for i in stopper.step(metrics[step]).nonzero().flatten().tolist():
            assert got[i] is None
            got[i] = step
    assert got == expected
    assert any(s is None for s in expected) and any(s is not None for s in expected)
    assert mb.active.tolist() == [s is None for s in expected]
    assert stopper.stopped.tolist() == [s is not None for s in expected]


def test_early_stopping_max_mode_and_retired_models_are_frozen():
    mb = ModelBatch([nn.Linear(2, 2) for _ in range(3)])
    stopper = EarlyStopping(mb, patience=2, mode="max")
    mb.retire(2)
    for acc in ([0.5, 0.5, 0.1], [0.6, 0.5, 0.1], [0.7, 0.5, 0.1]):
        retired = stopper.step(torch.tensor(acc, dtype=torch.float64))
    assert retired.tolist() == [False, True, False]
    assert mb.active.tolist() == [True, False, False]
    assert stopper.wait.tolist() == [0, 2, 0]
    assert stopper.best.tolist() == [0.7, 0.5, -math.inf]
    stopper.reset([1])
    assert stopper.wait.tolist() == [0, 0, 0] and not stopper.stopped[1]
    with pytest.raises(
        ValueError, match=r"EarlyStopping.step: expected one value per model, shape \[N=3\]"
    ):
        stopper.step(torch.zeros(2))


# ---------------------------------------------------------------------- NaN guard


def test_nan_guard_retires_diverged_models_and_others_train_on_bitwise_unchanged():
    data = batches(4)
    clean, opt_c, sched_c = make_run()
    poisoned, opt_p, sched_p = make_run()
    with torch.no_grad():
        poisoned.stacked.fc2.weight[2, 0, 0] = float("nan")
    guard = NaNGuard(poisoned)
    train(poisoned, opt_p, sched_p, data[:1])
    assert guard.step().tolist() == [False, False, True, False]
    assert guard.events == [(1, [2])] and poisoned.active.tolist() == [True, True, False, True]
    train(poisoned, opt_p, sched_p, data[1:])
    assert not guard.step().any()
    train(clean, opt_c, sched_c, data)
    for k, v in snapshot(clean).items():
        if k != "active":
            assert torch.equal(v[[0, 1, 3]], snapshot(poisoned)[k][[0, 1, 3]]), k


def test_nan_guard_checks_losses_and_can_reset():
    mb, opt, sched = make_run()
    train(mb, opt, sched, batches(2))
    guard = NaNGuard(mb, "reset", init_fn=Net, optimizer=opt, scheduler=sched, check_weights=False)
    before = snapshot(mb)
    bad = guard.step(torch.tensor([0.1, float("inf"), 0.3, float("nan")]))
    assert bad.tolist() == [False, True, False, True]
    assert mb.active.all() and guard.diverged.tolist() == [0, 1, 0, 1]
    after = snapshot(mb)
    assert torch.equal(after["stacked.fc1.weight"][[0, 2]], before["stacked.fc1.weight"][[0, 2]])
    assert not torch.equal(after["stacked.fc1.weight"][1], before["stacked.fc1.weight"][1])
    steps = opt.param_groups[0]["step"]  # [parameters, models]
    assert steps[:, 1].eq(0).all() and steps[:, 0].eq(2).all()
    with pytest.raises(ValueError, match="NaNGuard: action='reset' needs init_fn"):
        NaNGuard(mb, "reset")


# ---------------------------------------------------------------------- replace_model


def test_replace_model_trains_like_a_fresh_model_and_leaves_the_others_bitwise_unchanged():
    data = batches(7)
    kept, opt_k, sched_k = make_run()
    train(kept, opt_k, sched_k, data)

    mb, opt, sched = make_run()
    train(mb, opt, sched, data[:3])
    ptrs = [p.data_ptr() for p in mb.parameters()]
    torch.manual_seed(42)
    fresh = Net()
    new_state = {k: v.clone() for k, v in fresh.state_dict().items()}
    rng = torch.get_rng_state()
    config = {"lr": 0.02, "betas": (0.8, 0.9)}
    replace_model(
        mb,
        1,
        fresh,
        config=config,
        schedule={"step_size": 1, "gamma": 0.5},
        optimizer=opt,
        scheduler=sched,
    )
    assert torch.equal(rng, torch.get_rng_state())
    assert ptrs == [p.data_ptr() for p in mb.parameters()]
    assert mb.model(1).state_dict().keys() == new_state.keys()
    train(mb, opt, sched, data[3:])

    # The other models: bitwise as if nothing happened.
    for k, v in snapshot(kept).items():
        if k != "active":
            assert torch.equal(v[[0, 2, 3]], snapshot(mb)[k][[0, 2, 3]]), k
    # Model 1: the fresh model trained alone with plain torch from the replacement on.
    ref = Net()
    ref.load_state_dict(new_state)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.02, betas=(0.8, 0.9))
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    for xb, yb in data[3:]:
        loss = nn.functional.cross_entropy(ref(xb[1]), yb[1])
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        ref_sched.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(mb.model(1).state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_replace_model_with_a_seeded_init_fn_resets_scaler_loader_and_callbacks():
    mb, opt, sched = make_run()
    scaler = BatchGradScaler(mb, init_scale=1024.0)
    scaler._scale.copy_(torch.tensor([8.0, 16.0, 32.0, 64.0]))
    scaler._growth_tracker.fill_(3)
    loader = PerModelLoader(
        torch.randn(30, D), torch.randint(0, C, (30,)), num_models=N, batch_size=8
    )
    order = loader.order(0).clone()
    stopper = EarlyStopping(mb, patience=1)
    stopper.step(torch.ones(N))
    stopper.step(torch.ones(N))
    assert not mb.active.any()
    replace_model(
        mb, 2, Net, seed=7, optimizer=opt, scheduler=sched, loader=loader, callbacks=[stopper]
    )
    first = mb.model(2).state_dict()
    replace_model(mb, 3, Net, seed=7, optimizer=opt, scheduler=sched)
    assert all(torch.equal(first[k], mb.model(3).state_dict()[k]) for k in first)
    assert mb.active.tolist() == [False, False, True, True]
    assert scaler.get_scale().tolist()[:2] == [8.0, 16.0] and scaler._growth_tracker[2] == 0
    assert torch.equal(order[[0, 1, 3]], loader.order(0)[[0, 1, 3]])
    assert not torch.equal(order[2], loader.order(0)[2])
    assert stopper.best[2] == math.inf and stopper.best[0] == 1.0


def test_replace_model_refuses_what_does_not_fit():
    mb, opt, _ = make_run()
    with pytest.raises(ValueError, match="replace_model: the new model does not fit this batch"):
        replace_model(mb, 0, nn.Linear(D, C), optimizer=opt)
    with pytest.raises(
        TypeError, match=r"replace_model: the optimizer \(SGD\) cannot reset one model"
    ):
        replace_model(mb, 0, Net(), optimizer=torch.optim.SGD(mb.parameters(), lr=0.1))
    with pytest.raises(IndexError, match=r"replace_model: index must be an int in \[0, 4\)"):
        replace_model(mb, 4, Net(), optimizer=opt)
    with pytest.raises(ValueError, match=r"BatchAdam\.reset_models: .*unknown keys"):
        replace_model(mb, 0, Net(), config={"momentum": 0.9}, optimizer=opt)


# ---------------------------------------------------------------------- progress bar


def test_progress_bar_shows_aggregates_not_one_line_per_model():
    pytest.importorskip("tqdm")
    mb = make_batch()
    mb.latest_losses = torch.tensor([0.5, 0.25, float("nan"), 2.0])
    mb.retire(3)
    out = io.StringIO()
    items = list(progress.track(range(5), mb, file=out, mininterval=0.0, ascii=True))
    assert items == list(range(5))
    text = out.getvalue()
    assert "active=3/4" in text and "best=0.25" in text and "median=0.25" in text
    # The retired model (2.0) and the NaN are left out of best and median.
    assert "\n" not in text.strip()  # one bar line, redrawn in place


def test_progress_bar_without_tqdm_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_tqdm", lambda: None)
    mb = make_batch()
    assert list(progress.track(range(3), mb)) == [0, 1, 2]
    bar = progress.ProgressBar(3, model_batch=mb)
    bar.update()
    bar.close()
    assert not bar.enabled and capsys.readouterr().err == ""


def test_replace_model_restarts_a_per_model_torch_scheduler():
    mb = make_batch()
    opt = mb_optim.BatchSGD(
        list(mb.parameters()), [{"lr": 0.1 * (i + 1)} for i in range(N)], model_batch=mb
    )
    sched = mb_optim.BatchLRScheduler(
        opt, torch.optim.lr_scheduler.StepLR, [{"step_size": 1, "gamma": 0.5}] * N
    )
    for _ in range(3):
        sched.step()
    before = opt.hparams["lr"].clone()
    replace_model(
        mb,
        2,
        Net(),
        config={"lr": 0.7},
        schedule={"step_size": 1, "gamma": 0.9},
        optimizer=opt,
        scheduler=sched,
    )
    assert torch.equal(opt.hparams["lr"][[0, 1, 3]], before[[0, 1, 3]])
    assert opt.hparams["lr"][2].item() == pytest.approx(0.7)
    sched.step()
    assert opt.hparams["lr"][2].item() == pytest.approx(0.63)
    assert opt.hparams["lr"][0].item() == pytest.approx(0.1 * 0.5**4)


def test_callback_state_round_trips_through_a_checkpoint(tmp_path):
    from modelbatch.checkpoint import load, save

    mb = make_batch()
    stopper, guard = EarlyStopping(mb, patience=2), NaNGuard(mb)
    stopper.step(torch.tensor([0.5, 0.4, 0.3, 0.2]))
    stopper.step(torch.tensor([0.6, 0.3, 0.3, 0.1]))
    guard.step(torch.tensor([0.1, float("nan"), 0.1, 0.1]))
    save(tmp_path / "c.safetensors", mb, states={"stopper": stopper, "guard": guard})
    mb2 = make_batch(1)
    stopper2, guard2 = EarlyStopping(mb2, patience=2), NaNGuard(mb2)
    load(tmp_path / "c.safetensors", mb2, states={"stopper": stopper2, "guard": guard2})
    for a, b in zip(stopper.state_dict().values(), stopper2.state_dict().values()):
        assert torch.equal(a, b)
    assert guard2.events == [(1, [1])] and guard2.diverged.tolist() == [0, 1, 0, 0]
    assert mb2.active.tolist() == [True, False, True, True]
    with pytest.raises(
        ValueError,
        match=r"holds states\['guard'\] state \(NaNGuard\) but no states\['guard'\] was given",
    ):
        load(tmp_path / "c.safetensors", mb2, states={"stopper": stopper2})


def test_replace_model_sets_the_new_models_own_dropout_rate():
    class Drop(nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.fc = nn.Linear(D, C)
            self.drop = nn.Dropout(p)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.fc(x))

    mb = ModelBatch([Drop(0.1 * i) for i in range(N)], per_model_dropout=True)
    replace_model(mb, 2, Drop(0.55))
    assert torch.allclose(mb.stacked_buffers()["drop.p"], torch.tensor([0.0, 0.1, 0.55, 0.3]))
    same_p = ModelBatch([Drop(0.1) for _ in range(N)])
    with pytest.raises(ValueError, match=r"replace_model: .* differs from model 0 in 'drop'"):
        replace_model(same_p, 1, Drop(0.3))


def test_replace_model_keeps_the_schedule_arguments_it_does_not_change() -> None:
    """BatchLRScheduler: schedule={"gamma": ...} changes gamma and keeps step_size."""
    from modelbatch.optim import BatchLRScheduler, OptimizerFactory

    torch.manual_seed(0)
    mb = ModelBatch([nn.Linear(3, 2) for _ in range(3)])
    opt = OptimizerFactory(torch.optim.SGD).create_optimizer(mb, [{"lr": 0.1}] * 3)
    assert isinstance(opt, mb_optim.BatchOptimizer)
    sched = BatchLRScheduler(
        opt, torch.optim.lr_scheduler.StepLR, [{"step_size": 2, "gamma": 0.5}] * 3
    )
    replace_model(
        mb,
        1,
        nn.Linear(3, 2),
        config={"lr": 0.2},
        schedule={"gamma": 0.1},
        optimizer=opt,
        scheduler=sched,
    )
    assert sched.per_model_kwargs[1] == {"step_size": 2, "gamma": 0.1}
    assert sched.per_model_kwargs[0] == {"step_size": 2, "gamma": 0.5}
    lrs = []
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.hparams["lr"].tolist())
    # model 1: 0.2 for two steps, then 0.02; model 0: 0.1, then 0.05
    assert lrs[1] == pytest.approx([0.05, 0.02, 0.05], rel=1e-12)
    assert lrs[3] == pytest.approx([0.025, 0.002, 0.025], rel=1e-12)
