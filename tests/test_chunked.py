"""ChunkedTrainer: training the model axis chunk by chunk equals training it whole, bitwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelbatch import ChunkedTrainer, ModelBatch, OptimizerFactory

N, SEED = 7, 4


def make() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 3))


def configs() -> list[dict[str, float]]:
    return [{"lr": 1e-3 * (i + 1), "weight_decay": 0.01 * i} for i in range(N)]


def batches(per_model: bool, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    lead = (N,) if per_model else ()
    return [
        (torch.randn(*lead, 10, 6, generator=g), torch.randint(0, 3, (*lead, 10), generator=g))
        for _ in range(count)
    ]


def reference(per_model: bool, data: list) -> tuple[ModelBatch, torch.optim.Optimizer, list]:
    mb = ModelBatch.from_factory(make, N, seed=SEED)
    opt = OptimizerFactory(torch.optim.AdamW).create_optimizer(mb, configs())
    losses = []
    for x, y in data:
        opt.zero_grad()
        mb.compute_loss(mb(x, per_model=per_model), y).backward()
        opt.step()
        assert mb.latest_losses is not None
        losses.append(mb.latest_losses)
    return mb, opt, losses


@pytest.mark.parametrize("per_model", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunked_equals_unchunked(per_model: bool, chunk_size: int) -> None:
    data = batches(per_model, 4)
    ref, ref_opt, ref_losses = reference(per_model, data)
    mb = ModelBatch.from_factory(make, N, seed=SEED)
    trainer = ChunkedTrainer(
        mb,
        OptimizerFactory(torch.optim.AdamW),
        configs(),
        chunk_size=chunk_size,
        per_model=per_model,
    )
    # Two rounds of two batches: every chunk runs both batches of a round.
    first = trainer.train(data[:2])
    second = trainer.train(data[2:])
    losses = torch.cat([first, second])
    assert torch.equal(losses, torch.stack(ref_losses))
    for name, t in ref.stacked_params().items():
        assert torch.equal(mb.stacked_params()[name], t), name
    for name, t in ref.stacked_buffers().items():
        assert torch.equal(mb.stacked_buffers()[name], t), name
    for p, q in zip(ref.parameters(), mb.parameters()):
        for key, value in ref_opt.state[p].items():
            assert torch.equal(trainer.optimizer.state[q][key], value), key
    assert torch.equal(trainer.optimizer.param_groups[0]["step"], ref_opt.param_groups[0]["step"])
    assert torch.equal(mb.loss_history(), torch.stack(ref_losses))


def test_fresh_state_follows_each_models_hyperparameters() -> None:
    # Adagrad's accumulator starts at each model's own initial_accumulator_value.
    data = batches(False, 3)
    cfgs = [{"lr": 0.01 * (i + 1), "initial_accumulator_value": 0.1 * i} for i in range(N)]
    ref = ModelBatch.from_factory(make, N, seed=SEED)
    ref_opt = OptimizerFactory(torch.optim.Adagrad).create_optimizer(ref, cfgs)
    for x, y in data:
        ref_opt.zero_grad()
        ref.compute_loss(ref(x), y).backward()
        ref_opt.step()
    mb = ModelBatch.from_factory(make, N, seed=SEED)
    trainer = ChunkedTrainer(mb, OptimizerFactory(torch.optim.Adagrad), cfgs, chunk_size=3)
    trainer.train(data)
    for name, t in ref.stacked_params().items():
        assert torch.equal(mb.stacked_params()[name], t), name


def test_retired_models_and_hparams_live_in_the_store() -> None:
    data = batches(False, 2)
    mb = ModelBatch.from_factory(make, N, seed=SEED)
    trainer = ChunkedTrainer(mb, OptimizerFactory(torch.optim.AdamW), configs(), chunk_size=2)
    trainer.train(data[:1])
    before = {k: t.detach().clone() for k, t in mb.stacked_params().items()}
    mb.retire([2, 6])
    trainer.optimizer.hparams["lr"][0] = 0.0
    trainer.optimizer.hparams["weight_decay"][0] = 0.0
    trainer.train(data[1:])
    for name, t in mb.stacked_params().items():
        for i in (0, 2, 6):
            assert torch.equal(t[i], before[name][i]), (name, i)
        assert not torch.equal(t[1], before[name][1]), name


def test_chunked_trainer_errors() -> None:
    mb = ModelBatch.from_factory(make, N)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        ChunkedTrainer(mb, OptimizerFactory(torch.optim.SGD), chunk_size=0)
    with pytest.raises(TypeError, match="expected a ModelBatch"):
        ChunkedTrainer(nn.Linear(2, 2), OptimizerFactory(torch.optim.SGD))  # type: ignore[arg-type]
    trainer = ChunkedTrainer(mb, OptimizerFactory(torch.optim.SGD, {"lr": 0.1}), chunk_size=3)
    with pytest.raises(ValueError, match="at least one"):
        trainer.train([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offload", [False, True])
def test_chunked_on_gpu_matches_in_memory(offload: bool) -> None:
    data = [(x.cuda(), y.cuda()) for x, y in batches(False, 4)]
    ref = ModelBatch.from_factory(make, N, seed=SEED, device="cuda")
    ref_opt = OptimizerFactory(torch.optim.AdamW).create_optimizer(ref, configs())
    for x, y in data:
        ref_opt.zero_grad()
        ref.compute_loss(ref(x), y).backward()
        ref_opt.step()
    store = ModelBatch.from_factory(
        make, N, seed=SEED, device="cpu" if offload else "cuda", build_device="cuda"
    )
    trainer = ChunkedTrainer(
        store,
        OptimizerFactory(torch.optim.AdamW),
        configs(),
        device="cuda",
        offload=offload,
        chunk_size=None if offload else 3,
    )
    trainer.train(data[:2])
    trainer.train(data[2:])
    if offload:
        assert all(p.is_pinned() for p in store.parameters())
    # GPU tier: the captured step's fused Adam and kernels chosen per chunk shape
    # round differently from the eager reference in the last bits.
    for name, t in ref.stacked_params().items():
        torch.testing.assert_close(
            store.stacked_params()[name].cuda(), t.detach(), rtol=1e-4, atol=1e-5
        )


class _FakeStream:
    """Stands in for a CUDA stream or event on the CPU: every copy is already done."""

    def __init__(self, *args: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def wait_stream(self, stream: object) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record(self, stream: object = None) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        pass


def test_staged_copies_move_each_chunk_to_its_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # The host-to-GPU path's bookkeeping (staging in, staging out, padded last
    # chunk), run on the CPU with streams and events that do nothing.
    from modelbatch._chunked import _Mover

    for name in ("Stream", "Event", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, _FakeStream)
    store = torch.arange(7 * 2, dtype=torch.float32).reshape(7, 2)
    worker = torch.zeros(3, 2)
    # A table with the models on its second axis, like the optimizer's step counts [K, N].
    table, table_worker = torch.arange(2 * 7.0).reshape(2, 7), torch.zeros(2, 3)
    mover = _Mover(lambda: [(worker, store, 0), (table_worker, table, 1)], torch.device("cuda"))
    assert mover.async_
    expected, expected_table = store.clone(), table.clone()
    chunks = [(0, 3), (3, 6), (6, 7)]
    mover.prefetch(*chunks[0])
    for c, (start, stop) in enumerate(chunks):
        mover.load(start, stop)
        assert torch.equal(worker[: stop - start], expected[start:stop])
        assert torch.equal(table_worker[:, : stop - start], expected_table[:, start:stop])
        if c + 1 < len(chunks):
            mover.prefetch(*chunks[c + 1])
        worker.mul_(-1)
        table_worker.add_(100)
        expected[start:stop] *= -1
        expected_table[:, start:stop] += 100
        mover.save(start, stop)
    mover.finish()
    assert torch.equal(store, expected)
    assert torch.equal(table, expected_table)
