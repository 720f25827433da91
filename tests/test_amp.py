"""The per-model gradient scaler against torch's GradScaler run on each model alone."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _reference import CountOps, grad, make_sgd, max_rel_diff
from torch import nn

from modelbatch import ModelBatch
from modelbatch.amp import BatchGradScaler
from modelbatch.optim import clip_grad_norm_

N = 4
LRS = [0.05, 0.1, 0.2, 0.03]
INIT_SCALES = [2.0**10, 2.0**16, 2.0**8, 2.0**12]


def _models(n: int = N, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)) for _ in range(n)]


# ---------------------------------------------------------------- reference trajectory

# step -> (model, value injected into that model's first gradient entry)
INJECT = {
    2: [(1, float("inf"))],
    3: [(1, float("nan")), (3, float("inf"))],
    9: [(0, float("-inf"))],
}
for _s in (14, 15, 16, 17, 18, 19, 20, 21):  # model 2 overflows on and on: its scale keeps halving
    INJECT.setdefault(_s, []).append((2, float("inf")))


@pytest.mark.parametrize(("growth", "backoff"), [(2.0, 0.5), (1.5, 0.3)])
def test_each_model_follows_torch_gradscaler_on_that_model_alone(growth, backoff) -> None:
    steps, interval = 30, 3
    max_norms = [0.5, 1.0, 0.2, 2.0]
    models = _models()
    separate = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    opt = make_sgd(mb, LRS)
    scaler = BatchGradScaler(
        mb,
        torch.tensor(INIT_SCALES),
        growth_factor=growth,
        backoff_factor=backoff,
        growth_interval=interval,
    )
    torch_opts = [torch.optim.SGD(m.parameters(), lr=LRS[i]) for i, m in enumerate(separate)]
    torch_scalers = [
        torch.amp.GradScaler(
            "cpu",
            init_scale=INIT_SCALES[i],
            growth_factor=growth,
            backoff_factor=backoff,
            growth_interval=interval,
        )
        for i in range(N)
    ]
    first = next(iter(mb.parameters()))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        scaler.scale(mb.compute_loss(mb(x), y)).backward()
        for k, value in INJECT.get(step, []):
            grad(first)[k, 0, 0] = value
        scaler.unscale_(opt)
        clip_grad_norm_(mb, torch.tensor(max_norms))
        scaler.step(opt)
        scaler.update()
        for i, (m, o, s) in enumerate(zip(separate, torch_opts, torch_scalers)):
            o.zero_grad()
            s.scale(F.cross_entropy(m(x), y)).backward()
            for k, value in INJECT.get(step, []):
                if k == i:
                    grad(next(m.parameters()))[0, 0] = value
            s.unscale_(o)
            nn.utils.clip_grad_norm_(m.parameters(), max_norms[i])
            s.step(o)
            s.update()
        expected_scale = torch.tensor([s.get_scale() for s in torch_scalers])
        expected_tracker = torch.tensor([s._get_growth_tracker() for s in torch_scalers])
        assert torch.equal(scaler.get_scale(), expected_scale), step
        assert torch.equal(scaler.get_growth_tracker(), expected_tracker.int()), step
    assert max_rel_diff(mb, separate) <= 1e-5


# ---------------------------------------------------------------- isolation


def _run(poison: Any, steps: int = 8, device: str = "cpu", dtype: torch.dtype | None = None):
    """Train N models on per-model data; `poison(step, xs, grads)` may corrupt model k.

    Returns the weights after every step and the final scales.
    """
    mb = ModelBatch(_models()).to(device)
    opt = make_sgd(mb, LRS)
    scaler = BatchGradScaler(mb, init_scale=2.0**12, growth_interval=2)
    gen = torch.Generator().manual_seed(3)
    history = []
    for step in range(steps):
        xs = torch.randn(N, 16, 6, generator=gen).to(device)
        y = torch.randint(0, 3, (N, 16), generator=gen).to(device)
        poison(step, xs, None)
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype or torch.float16, enabled=dtype is not None):
            loss = mb.compute_loss(mb(xs, per_model=True), y, per_model=True)
        scaler.scale(loss).backward()
        poison(step, None, [p.grad for p in mb.parameters()])
        scaler.step(opt)
        scaler.update()
        history.append([p.detach().clone() for p in mb.parameters()])
    return history, scaler.get_scale()


def _assert_isolated(clean, dirty, k: int, bad_step: int) -> None:
    (hist_a, scale_a), (hist_b, scale_b) = clean, dirty
    others = [i for i in range(N) if i != k]
    for step, (params_a, params_b) in enumerate(zip(hist_a, hist_b)):
        for a, b in zip(params_a, params_b):
            assert torch.equal(a[others], b[others]), step  # bitwise
    # Model k did not move on the bad step, and did move on the others.
    for before, after in zip(hist_b[bad_step - 1], hist_b[bad_step]):
        assert torch.equal(before[k], after[k])
    assert not torch.equal(hist_b[bad_step + 1][0][k], hist_b[bad_step][0][k])
    assert torch.equal(scale_a[others], scale_b[others])
    assert scale_b[k] < scale_a[k]


@pytest.mark.parametrize("k", [0, 2])
def test_inf_in_model_k_gradient_skips_only_model_k(k: int) -> None:
    bad_step = 3

    def inject(step: int, xs: Any, grads: Any) -> None:
        if grads is not None and step == bad_step:
            grads[-1][k, 1] = float("inf")

    _assert_isolated(_run(lambda *a: None), _run(inject), k, bad_step)


def _overflow_model(k: int, bad_step: int, dtype: torch.dtype):
    def poison(step: int, xs: Any, grads: Any) -> None:
        if xs is not None and step == bad_step:
            if dtype == torch.float16:
                xs[k] *= 1e5  # beyond fp16's range: the autocast matmul overflows
            else:
                xs[k, 0, 0] = float("inf")  # bf16 has fp32's range: overflow by hand

    return poison


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_overflow_under_cpu_autocast_skips_only_that_model(dtype: torch.dtype) -> None:
    k, bad_step = 1, 2
    clean = _run(lambda *a: None, dtype=dtype)
    dirty = _run(_overflow_model(k, bad_step, dtype), dtype=dtype)
    _assert_isolated(clean, dirty, k, bad_step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overflow_under_cuda_fp16_autocast_skips_only_that_model() -> None:
    k, bad_step = 2, 3
    clean = _run(lambda *a: None, device="cuda", dtype=torch.float16)
    dirty = _run(_overflow_model(k, bad_step, torch.float16), device="cuda", dtype=torch.float16)
    _assert_isolated(clean, dirty, k, bad_step)


# ---------------------------------------------------------------- scaling semantics


def _found_inf(scaler: BatchGradScaler, opt: torch.optim.Optimizer) -> torch.Tensor:
    flags = scaler.found_inf(opt)
    assert flags is not None, "expected found_inf flags: unscale_ has not run for opt"
    return flags


def _grads(mb: ModelBatch) -> list[torch.Tensor]:
    return [grad(p).clone() for p in mb.parameters()]


@pytest.mark.parametrize("reduction", ["sum", "mean", "accumulate"])
def test_compute_loss_gradients_are_scaled_per_model(reduction: str) -> None:
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def backward(mb: ModelBatch, scaler: BatchGradScaler | None) -> None:
        if reduction == "accumulate":
            for half in (slice(0, 8), slice(8, 16)):
                loss = mb.compute_loss(mb(x[half]), y[half]) / 2
                (scaler.scale(loss) if scaler else loss).backward()
        else:
            loss = mb.compute_loss(mb(x), y, reduction=reduction)
            (scaler.scale(loss) if scaler else loss).backward()

    plain = ModelBatch(_models())
    backward(plain, None)
    scaled = ModelBatch(_models())
    scaler = BatchGradScaler(scaled, init_scale=torch.tensor(INIT_SCALES))
    backward(scaled, scaler)
    scales = torch.tensor(INIT_SCALES)
    for g_plain, g_scaled in zip(_grads(plain), _grads(scaled)):
        # Powers of two: scaling commutes exactly with every float operation.
        assert torch.equal(g_scaled, g_plain * scales.view(-1, *([1] * (g_plain.dim() - 1))))
    opt = make_sgd(scaled, LRS)
    scaler.unscale_(opt)
    for g_plain, g_scaled in zip(_grads(plain), _grads(scaled)):
        assert torch.equal(g_scaled, g_plain)
    assert torch.equal(_found_inf(scaler, opt), torch.zeros(N))


def test_scale_of_per_model_losses_and_of_foreign_scalars() -> None:
    mb = ModelBatch(_models())
    scaler = BatchGradScaler(mb, init_scale=torch.tensor(INIT_SCALES))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    out = mb(x)
    losses = mb.compute_loss(out, y, reduction="none")
    assert scaler.scale(losses) is losses
    total = mb.compute_loss(out, y)
    assert scaler.scale(total) is total
    own = mb.per_model_losses(out, y)  # [N], not through compute_loss
    assert torch.equal(scaler.scale(own), own * torch.tensor(INIT_SCALES))
    foreign = out.square().mean()
    with pytest.raises(ValueError, match=r"BatchGradScaler.scale: got a loss of shape \(\)"):
        scaler.scale(foreign)


def test_disabled_scaler_is_a_pass_through() -> None:
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    plain = ModelBatch(_models())
    plain.compute_loss(plain(x), y).backward()
    mb = ModelBatch(_models())
    scaler = BatchGradScaler(mb, enabled=False)
    opt = make_sgd(mb, LRS)
    loss = mb.compute_loss(mb(x), y)
    assert scaler.scale(loss) is loss
    loss.backward()
    scaler.unscale_(opt)
    for a, b in zip(_grads(plain), _grads(mb)):
        assert torch.equal(a, b)
    scaler.step(opt)
    scaler.update()
    assert not scaler.is_enabled()
    assert scaler.state_dict() == {}
    assert torch.equal(scaler.get_scale(), torch.ones(N))


def test_user_skip_is_combined_with_found_inf() -> None:
    mb = ModelBatch(_models())
    opt = make_sgd(mb, LRS)
    scaler = BatchGradScaler(mb)
    before = [p.detach().clone() for p in mb.parameters()]
    scaler.scale(mb.compute_loss(mb(torch.randn(8, 6)), torch.randint(0, 3, (8,)))).backward()
    grad(next(iter(mb.parameters())))[1, 0, 0] = float("nan")
    scaler.step(opt, skip=torch.tensor([False, False, False, True]))
    after = list(mb.parameters())
    for b, a in zip(before, after):
        assert torch.equal(b[[1, 3]], a[[1, 3]].detach())
        assert not torch.equal(b[[0, 2]], a[[0, 2]].detach())


def test_stage_errors_and_bad_inputs() -> None:
    mb = ModelBatch(_models())
    opt = make_sgd(mb, LRS)
    scaler = BatchGradScaler(mb)
    with pytest.raises(RuntimeError, match=r"BatchGradScaler\.update: no inf checks"):
        scaler.update()
    scaler.scale(mb.compute_loss(mb(torch.randn(8, 6)), torch.randint(0, 3, (8,)))).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"BatchGradScaler\.unscale_: already called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"BatchGradScaler\.step: already called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"BatchGradScaler\.unscale_: called after step"):
        scaler.unscale_(opt)
    scaler.update()
    plain = torch.optim.SGD(mb.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"BatchGradScaler\.step: SGD\.step\(\) takes no skip"):
        scaler.step(plain)
    with pytest.raises(ValueError, match=r"BatchGradScaler: init_scale must be a float or have"):
        BatchGradScaler(mb, init_scale=torch.ones(3))
    with pytest.raises(ValueError, match="BatchGradScaler: growth_factor must be > 1"):
        BatchGradScaler(mb, growth_factor=1.0)
    assert mb.grad_scaler is scaler


def test_state_dict_round_trip_in_place() -> None:
    mb = ModelBatch(_models())
    opt = make_sgd(mb, LRS)
    scaler = BatchGradScaler(mb, init_scale=torch.tensor(INIT_SCALES), growth_interval=2)
    for step in range(5):
        opt.zero_grad()
        scaler.scale(mb.compute_loss(mb(torch.randn(8, 6)), torch.randint(0, 3, (8,)))).backward()
        if step == 1:
            grad(next(iter(mb.parameters())))[2, 0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    state = scaler.state_dict()
    other = BatchGradScaler(ModelBatch(_models()), growth_factor=3.0)
    scale_storage = other._scale.data_ptr()
    other.load_state_dict(state)
    assert other._scale.data_ptr() == scale_storage
    assert torch.equal(other.get_scale(), scaler.get_scale())
    assert torch.equal(other.get_growth_tracker(), scaler.get_growth_tracker())
    assert other.state_dict()["growth_factor"] == 2.0
    # A torch GradScaler state (floats) broadcasts to every model.
    ref = torch.amp.GradScaler("cpu", init_scale=128.0, growth_interval=7)
    other.load_state_dict(ref.state_dict())
    assert torch.equal(other.get_scale(), torch.full((N,), 128.0))
    with pytest.raises(
        ValueError,
        match=r"BatchGradScaler.load_state_dict: scale must be a float or have shape \[N=4\], "
        r"got shape \(7,\)",
    ):
        other.load_state_dict({**state, "scale": torch.ones(7)})


def test_bad_scaler_state_is_refused_and_changes_nothing() -> None:
    mb = ModelBatch(_models())
    scaler = BatchGradScaler(mb, init_scale=torch.tensor(INIT_SCALES), growth_interval=2)
    good = scaler.state_dict()
    nan_scale = good["scale"].clone()
    nan_scale[2] = float("nan")
    bad_states = {
        r"scale must be finite and > 0.*\(model 2\)": {**good, "scale": nan_scale},
        "scale must be finite and > 0": {**good, "scale": 0.0},
        "growth_factor must be > 1": {**good, "growth_factor": 0.5},
        r"backoff_factor must be in \(0, 1\)": {**good, "backoff_factor": float("nan")},
        "growth_interval must be an integer >= 1": {**good, "growth_interval": 0},
        "'_growth_tracker' must hold counts >= 0": {
            **good,
            "_growth_tracker": torch.tensor([0, -1, 0, 0], dtype=torch.int32),
        },
    }
    other = BatchGradScaler(ModelBatch(_models()), init_scale=64.0, growth_factor=3.0)
    before = other.state_dict()
    for pattern, state in bad_states.items():
        with pytest.raises(ValueError, match=f"BatchGradScaler.load_state_dict: {pattern}"):
            other.load_state_dict(state)
        after = other.state_dict()
        assert torch.equal(after["scale"], before["scale"]), pattern
        assert torch.equal(after["_growth_tracker"], before["_growth_tracker"]), pattern
        assert after["growth_factor"] == 3.0, pattern
    with pytest.raises(ValueError, match="BatchGradScaler: init_scale must be finite and > 0"):
        BatchGradScaler(ModelBatch(_models()), init_scale=0.0)


def test_launch_count_of_unscale_step_update_does_not_grow_with_n() -> None:
    counts = []
    for n in (2, 50):
        mb = ModelBatch(_models(n))
        opt = make_sgd(mb, [0.1] * n)
        scaler = BatchGradScaler(mb)
        scaler.scale(mb.compute_loss(mb(torch.randn(8, 6)), torch.randint(0, 3, (8,)))).backward()
        with CountOps() as ops:
            scaler.unscale_(opt)
        with CountOps() as ops_update:
            scaler.step(opt)
            scaler.update()
        counts.append((ops.count, ops_update.count))
    assert counts[0] == counts[1]


def test_reset_models_restores_only_their_scale() -> None:
    mb = ModelBatch(_models())
    opt = make_sgd(mb, LRS)
    scaler = BatchGradScaler(mb, init_scale=torch.tensor(INIT_SCALES), growth_interval=1)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(mb.compute_loss(mb(torch.randn(8, 6)), torch.randint(0, 3, (8,)))).backward()
        if step == 2:
            grad(next(iter(mb.parameters())))[3, 0, 0] = float("nan")
        scaler.step(opt)
        scaler.update()
    before = scaler.get_scale()
    assert not torch.equal(before, torch.tensor(INIT_SCALES))
    scaler.reset_models([1, 3])
    after = scaler.get_scale()
    assert after[[1, 3]].tolist() == [INIT_SCALES[1], INIT_SCALES[3]]
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    assert scaler.get_growth_tracker()[[1, 3]].tolist() == [0, 0]
    scaler.reset_models(torch.tensor([False, False, True, False]), init_scale=8.0)
    assert scaler.get_scale()[2].item() == 8.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_found_inf_flags_exactly_the_models_with_a_non_finite_gradient(dtype) -> None:
    n = 64
    mb = ModelBatch(_models(n)).to(dtype)
    opt = make_sgd(mb, [0.1] * n)
    scaler = BatchGradScaler(mb)
    scaler.scale(
        mb.compute_loss(mb(torch.randn(8, 6, dtype=dtype)), torch.randint(0, 3, (8,)))
    ).backward()
    gen = torch.Generator().manual_seed(5)
    bad = torch.rand(n, generator=gen) < 0.5
    values = [float("nan"), float("inf"), float("-inf")]
    for i in bad.nonzero().reshape(-1).tolist():
        grads = [grad(p) for p in mb.parameters()]
        g = grads[int(torch.randint(0, len(grads), (), generator=gen))][i].reshape(-1)
        g[int(torch.randint(0, g.numel(), (), generator=gen))] = values[i % 3]
    scaler.unscale_(opt)
    assert torch.equal(_found_inf(scaler, opt) > 0, bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unscale_clip_update_do_not_synchronize_with_the_host() -> None:
    mb = ModelBatch(_models()).to("cuda")
    opt = make_sgd(mb, LRS)
    scaler = BatchGradScaler(mb)
    max_norm = torch.rand(N, device="cuda") + 0.1
    with torch.autocast("cuda", dtype=torch.float16):
        loss = mb.compute_loss(
            mb(torch.randn(8, 6, device="cuda")), torch.randint(0, 3, (8,)).cuda()
        )
    scaler.scale(loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scaler.unscale_(opt)
        norms = clip_grad_norm_(mb, max_norm)
        scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert norms.shape == (N,)


def test_model_batch_step_runs_the_scaler_recipe() -> None:
    """mb.step() with a scaler attached equals scaler.step(opt) + scaler.update()."""
    from modelbatch import ModelBatch
    from modelbatch.amp import BatchGradScaler

    def run(use_mb_step: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        models = [torch.nn.Linear(6, 3) for _ in range(4)]
        mb = ModelBatch(models, lr_list=[0.1, 0.05, 0.02, 0.01], optimizer_cls=torch.optim.SGD)
        scaler = BatchGradScaler(mb, init_scale=2.0**8, growth_interval=2)
        for step in range(5):
            x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
            mb.zero_grad()
            mb.compute_loss(mb(x), y).backward()
            if step == 2:
                grad(mb.stacked_params()["weight"])[1, 0, 0] = float("inf")
            if use_mb_step:
                mb.step()
            else:
                scaler.step(mb.optimizer)
                scaler.update()
        return [p.detach().clone() for p in mb.parameters()], scaler.get_scale()

    params_a, scale_a = run(True)
    params_b, scale_b = run(False)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert torch.equal(scale_a, scale_b)
    assert scale_a[1] < scale_a[0]  # model 1 overflowed once and backed off
