"""ModelBatch.from_factory: models keyed by (seed, global id), without N module instances."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from modelbatch import ModelBatch
from modelbatch._build import model_seeds
from modelbatch.nn import SeededDropout
from modelbatch.optim import BatchOptimizer


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )


def dropout_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 5))


def test_a_model_depends_only_on_seed_and_id() -> None:
    whole = ModelBatch.from_factory(mlp, 12, seed=5)
    part = ModelBatch.from_factory(mlp, [7, 3, 11], seed=5, chunk_elements=100)
    for k, i in enumerate([7, 3, 11]):
        for name, t in part.stacked_params().items():
            assert torch.equal(t[k], whole.stacked_params()[name][i]), (name, i)
    other = ModelBatch.from_factory(mlp, 12, seed=6)
    assert not torch.equal(other.stacked_params()["0.weight"], whole.stacked_params()["0.weight"])
    assert isinstance(part.model_ids, torch.Tensor)
    assert part.model_ids.tolist() == [7, 3, 11]


@pytest.mark.parametrize("make", [mlp, cnn])
def test_fast_init_has_torchs_default_distribution(make) -> None:
    mb = ModelBatch.from_factory(make, 64, seed=0, init="fast")
    template = make()
    for name, t in mb.stacked_params().items():
        prefix, _, leaf = name.rpartition(".")
        module = template.get_submodule(prefix)
        if isinstance(module, nn.BatchNorm2d):
            # Deterministic in make(): copied, identical for every model.
            assert torch.equal(t, getattr(module, leaf).expand_as(t)), name
            continue
        t = t.detach()
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
        bound = 1 / math.sqrt(fan_in)
        std = bound / math.sqrt(3)
        # Five standard errors of the sample std and mean of a uniform distribution.
        assert float(t.abs().max()) <= bound, name
        assert abs(float(t.std()) / std - 1) < 5 * 0.45 / math.sqrt(t.numel()), name
        assert abs(float(t.mean())) < 5 * std / math.sqrt(t.numel()), name
        # Models differ from each other.
        assert not torch.equal(t[0], t[1]), name
    for name, b in mb.stacked_buffers().items():
        assert torch.equal(b, template.get_buffer(name).expand_as(b)), name


def test_exact_init_is_make_under_the_models_seed() -> None:
    mb = ModelBatch.from_factory(cnn, [4, 9], seed=2, init="exact")
    for k, i in enumerate([4, 9]):
        torch.manual_seed(int(model_seeds(2, [i])[0]))
        ref = cnn()
        for key, value in ref.state_dict().items():
            assert torch.equal(mb.model(k).state_dict()[key], value), key


def custom_init() -> nn.Sequential:
    model = mlp()
    first = model[0]
    assert isinstance(first, nn.Linear)
    nn.init.normal_(first.weight, std=0.5)
    return model


def test_custom_init_falls_back_to_exact_or_is_refused() -> None:
    with pytest.warns(UserWarning, match="custom init"):
        auto = ModelBatch.from_factory(custom_init, 3, seed=1)
    exact = ModelBatch.from_factory(custom_init, 3, seed=1, init="exact")
    for name, t in auto.stacked_params().items():
        assert torch.equal(t, exact.stacked_params()[name]), name
    with pytest.raises(ValueError, match="init='fast' cannot reproduce"):
        ModelBatch.from_factory(custom_init, 3, init="fast")
    with pytest.raises(ValueError, match="init must be one of"):
        ModelBatch.from_factory(mlp, 3, init="slow")
    with pytest.raises(ValueError, match="distinct"):
        ModelBatch.from_factory(mlp, [1, 1])


def test_seeded_dropout_masks_depend_only_on_seed_id_and_step() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 20)
    whole = ModelBatch.from_factory(dropout_mlp, 8, seed=3)
    part = ModelBatch.from_factory(dropout_mlp, [5, 2], seed=3)
    assert isinstance(whole.skeleton, nn.Sequential)
    assert isinstance(whole.skeleton[1], SeededDropout)
    for _ in range(3):
        torch.rand(7)  # the global generator does not matter
        out_whole, out_part = whole(x), part(x)
        assert torch.equal(out_part[0], out_whole[5])
        assert torch.equal(out_part[1], out_whole[2])
    # Masks differ per model and per step, and keep about half of the units.
    hidden = ModelBatch.from_factory(
        lambda: nn.Sequential(nn.Dropout(0.5)), 4, seed=0, loss_fn=None
    )
    ones = torch.ones(64, 32)
    first, second = hidden(ones), hidden(ones)
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], second[0])
    kept = (first != 0).float().mean()
    assert 0.45 < float(kept) < 0.55
    assert set(first.unique().tolist()) == {0.0, 2.0}
    # Eval mode is the identity and does not advance the stream.
    whole.eval()
    assert torch.equal(whole(x)[0], whole(x)[0])
    exported = whole.model(3)
    assert isinstance(exported, nn.Sequential)
    assert type(exported[1]) is nn.Dropout and exported[1].p == 0.5


def test_summary_names_global_ids_and_optimizer_configs() -> None:
    ids = [10, 20, 30]
    mb = ModelBatch.from_factory(
        mlp,
        ids,
        optimizer_cls=torch.optim.SGD,
        configs=[{"lr": 0.1 * (i // 10)} for i in ids],
    )
    assert [row["model"] for row in mb.summary()] == ids
    assert isinstance(mb.optimizer, BatchOptimizer)
    assert mb.optimizer.hparams["lr"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="need optimizer_cls"):
        ModelBatch.from_factory(mlp, 2, configs=[{}, {}])


def test_from_factory_models_train_like_plain_torch() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    lrs = [0.05, 0.1, 0.2]
    mb = ModelBatch.from_factory(
        mlp, [0, 1, 2], seed=9, optimizer_cls=torch.optim.SGD, configs=[{"lr": lr} for lr in lrs]
    )
    plain = [mb.model(i) for i in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m, lr in zip(plain, lrs)]
    for _ in range(4):
        mb.zero_grad()
        mb.compute_loss(mb(x), y).backward()
        mb.step()
        for m, opt in zip(plain, opts):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for i, m in enumerate(plain):
        for key, value in m.state_dict().items():
            torch.testing.assert_close(mb.model(i).state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_no_warning_for_default_inits() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelBatch.from_factory(
            lambda: nn.Sequential(nn.Embedding(10, 8, padding_idx=0), nn.LSTM(8, 8)), 3
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", [mlp, cnn, dropout_mlp])
def test_built_on_the_gpu_as_on_the_cpu(make) -> None:
    # Integer hashing and single fp32 operations: the same values on either device.
    cpu = ModelBatch.from_factory(make, [2, 40, 7], seed=3)
    gpu = ModelBatch.from_factory(make, [2, 40, 7], seed=3, device="cuda")
    pinned = ModelBatch.from_factory(make, [2, 40, 7], seed=3, device="cpu", build_device="cuda")
    for name, t in cpu.stacked_params().items():
        assert torch.equal(gpu.stacked_params()[name].cpu(), t), name
        assert torch.equal(pinned.stacked_params()[name], t), name
        assert pinned.stacked_params()[name].is_pinned()
