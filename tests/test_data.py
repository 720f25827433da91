"""Per-model data: reproducible per-model orders, bootstrap bags, K folds, shared batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from modelbatch.data import (
    PerModelLoader,
    PerModelSampler,
    SharedLoader,
    kfold_assignment,
    model_seeds,
)

# Tiny tensors: intra-op threads only add contention on a shared machine.
torch.set_num_threads(1)

L = 97


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(L, 5, generator=g), torch.randint(0, 4, (L,), generator=g)


def test_shuffle_rows_are_permutations_that_differ_across_models_and_epochs(data):
    loader = PerModelLoader(*data, num_models=8, batch_size=10, sampling="shuffle", seed=3)
    o0, o1 = loader.order(0), loader.order(1)
    assert o0.shape == (8, L)
    expected = torch.arange(L).expand(8, L)
    assert torch.equal(o0.sort(dim=1).values, expected)
    assert torch.equal(o1.sort(dim=1).values, expected)
    assert len({tuple(r) for r in o0.tolist()}) == 8
    assert not any(torch.equal(a, b) for a, b in zip(o0, o1))


def test_orders_are_reproducible_and_depend_only_on_the_models_own_seed(data):
    a = PerModelLoader(*data, num_models=3, batch_size=10, seed=[11, 22, 33])
    b = PerModelLoader(*data, num_models=3, batch_size=10, seed=[11, 22, 33])
    c = PerModelLoader(*data, num_models=2, batch_size=10, seed=[99, 22])
    assert torch.equal(a.order(4), b.order(4))
    assert torch.equal(a.order(4)[1], c.order(4)[1])
    assert not torch.equal(a.order(4)[0], c.order(4)[0])
    # A base seed gives distinct per-model seeds, the same every time.
    assert torch.equal(model_seeds(5, 6), model_seeds(5, 6))
    assert model_seeds(5, 6).unique().numel() == 6


def test_batches_gather_each_models_own_samples(data):
    x, y = data
    loader = PerModelLoader(x, y, num_models=4, batch_size=16, seed=1)
    order = loader.order(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    xb, yb = batches[2]
    assert xb.shape == (4, 16, 5) and yb.shape == (4, 16)
    idx = order[:, 32:48]
    for i in range(4):
        assert torch.equal(xb[i], x[idx[i]]) and torch.equal(yb[i], y[idx[i]])
    assert batches[-1][0].shape == (4, L - 6 * 16, 5)
    assert loader.epoch == 1
    dropped = PerModelLoader(x, y, num_models=4, batch_size=16, drop_last=True)
    assert len(list(dropped)) == 6


def test_resume_mid_epoch_gives_the_same_remaining_batches(data):
    a = PerModelLoader(*data, num_models=3, batch_size=8, seed=7)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = a.state_dict()
    rest_a = list(it)
    b = PerModelLoader(*data, num_models=3, batch_size=8, seed=0)
    b.load_state_dict(state)
    rest_b = list(b)
    assert len(rest_a) == len(rest_b) == len(a) - 5
    assert all(torch.equal(p[0], q[0]) for p, q in zip(rest_a, rest_b))


def test_bootstrap_bags_are_reproducible_differ_and_are_used_whole_each_epoch(data):
    loader = PerModelLoader(*data, num_models=6, batch_size=10, sampling="bootstrap", seed=2)
    again = PerModelLoader(*data, num_models=6, batch_size=10, sampling="bootstrap", seed=2)
    bags = loader.bags()
    assert bags.shape == (6, L) and int(bags.min()) >= 0 and int(bags.max()) < L
    assert torch.equal(bags, again.bags())
    assert len({tuple(r) for r in bags.sort(dim=1).values.tolist()}) == 6
    # With replacement: about 1 - 1/e of the samples are in a bag, never all of them.
    distinct = torch.tensor([r.unique().numel() for r in bags])
    assert bool((distinct < L).all()) and bool((distinct > L // 2).all())
    for epoch in (0, 1):
        assert torch.equal(loader.order(epoch).sort(dim=1).values, bags.sort(dim=1).values)
    assert not torch.equal(loader.order(0), loader.order(1))
    idx, mask = loader.held_out()
    for i in range(6):
        oob = set(idx[i][mask[i]].tolist())
        assert oob == set(range(L)) - set(bags[i].tolist())


def test_kfold_every_sample_is_held_out_exactly_once(data):
    k = 5
    loader = PerModelLoader(*data, num_models=k, batch_size=10, sampling="kfold", num_folds=k)
    idx, mask = loader.held_out()
    held = torch.cat([idx[i][mask[i]] for i in range(k)])
    assert torch.equal(held.sort().values, torch.arange(L))
    order = loader.order(0)
    assert order.shape == (k, L - (L + k - 1) // k)
    for i in range(k):
        train = set(order[i].tolist())
        assert len(train) == order.shape[1]
        assert not train & set(idx[i][mask[i]].tolist())
    sizes = kfold_assignment(L, k).bincount()
    assert int(sizes.max() - sizes.min()) <= 1


def test_kfold_with_several_configs_per_fold(data):
    loader = PerModelLoader(
        *data, num_models=6, batch_size=10, sampling="kfold", num_folds=3, seed=[1, 2, 3, 4, 5, 6]
    )
    assert loader.model_folds is not None
    assert loader.model_folds.tolist() == [0, 1, 2, 0, 1, 2]
    idx, mask = loader.held_out()
    assert torch.equal(idx[0][mask[0]], idx[3][mask[3]])
    assert not torch.equal(loader.order(0)[0], loader.order(0)[3])
    (xv, _yv), m = loader.held_out_data()
    assert xv.shape == (6, idx.shape[1], 5) and torch.equal(xv[2][m[2]], data[0][idx[2][mask[2]]])


def test_shared_loader_covers_each_sample_once_per_epoch(data):
    x, y = data
    loader = SharedLoader(TensorDataset(x, y), batch_size=10, seed=4)
    xs = torch.cat([b[0] for b in loader])
    assert xs.shape == x.shape
    assert torch.equal(xs, x[loader.order(0)])
    assert sorted(loader.order(0).tolist()) == list(range(L))
    assert not torch.equal(loader.order(0), loader.order(1))
    plain = SharedLoader(x, y, batch_size=10, shuffle=False, drop_last=True)
    batches = list(plain)
    assert len(batches) == 9 and torch.equal(batches[0][0], x[:10])


def test_map_style_dataset_is_collated_once(data):
    x, y = data

    class Pairs(Dataset):
        def __len__(self) -> int:
            return L

        def __getitem__(self, i: int):
            return x[i], y[i]

    loader = PerModelLoader(Pairs(), num_models=2, batch_size=8)
    assert torch.equal(loader.tensors[0], x) and torch.equal(loader.tensors[1], y)


def test_sampler_drives_torch_dataloader_with_the_same_batches(data):
    x, y = data
    kwargs: dict[str, Any] = {
        "num_models": 3,
        "batch_size": 8,
        "sampling": "kfold",
        "num_folds": 3,
        "seed": 4,
    }
    sampler = PerModelSampler(L, **kwargs)
    loader = PerModelLoader(x, y, **kwargs)
    batches = list(DataLoader(TensorDataset(x, y), batch_sampler=sampler))
    expected = list(loader)
    assert len(batches) == len(expected) == len(sampler)
    for (xb, yb), (xe, ye) in zip(batches, expected):
        assert torch.equal(xb.unflatten(0, (3, -1)), xe) and torch.equal(
            yb.unflatten(0, (3, -1)), ye
        )
    assert sampler.epoch == loader.epoch == 1


def test_set_seed_changes_only_that_models_samples(data):
    loader = PerModelLoader(*data, num_models=4, batch_size=8, sampling="bootstrap")
    before = loader.order(0).clone()
    loader.set_seed(2, 12345)
    after = loader.order(0)
    assert torch.equal(before[[0, 1, 3]], after[[0, 1, 3]])
    assert not torch.equal(before[2], after[2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampling": "jackknife"}, "PerModelLoader: sampling must be one of"),
        ({"sampling": "kfold"}, "needs num_folds"),
        ({"num_folds": 3}, "apply to sampling='kfold'"),
        ({"seed": [1, 2]}, "seeds must have one entry per model (N=4), got 2"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
    ],
)
def test_bad_arguments_are_named(data, kwargs, message):
    kwargs = {"num_models": 4, "batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PerModelLoader(*data, **kwargs)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="same first dimension"):
        PerModelLoader(torch.randn(10, 2), torch.randn(9), num_models=2, batch_size=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_orders_on_gpu_match_cpu(data):
    cpu = PerModelLoader(*data, num_models=5, batch_size=8, sampling="bootstrap")
    gpu = PerModelLoader(*data, num_models=5, batch_size=8, sampling="bootstrap", device="cuda")
    assert torch.equal(cpu.order(3), gpu.order(3).cpu())
    assert next(iter(gpu))[0].device.type == "cuda"


@pytest.mark.parametrize("sampling", ["shuffle", "bootstrap", "kfold"])
def test_training_on_per_model_batches_matches_each_model_trained_alone(data, sampling):
    from torch import nn

    from modelbatch import ModelBatch
    from modelbatch.optim import BatchSGD

    x, y = data
    n, lrs = 3, [0.05, 0.1, 0.2]
    torch.manual_seed(0)
    models = [nn.Linear(5, 4) for _ in range(n)]
    refs = [nn.Linear(5, 4) for _ in range(n)]
    for ref, m in zip(refs, models):
        ref.load_state_dict(m.state_dict())
    mb = ModelBatch(models)
    opt = BatchSGD(list(mb.parameters()), [{"lr": lr} for lr in lrs], model_batch=mb)
    extra: dict[str, Any] = {"num_folds": 3} if sampling == "kfold" else {}
    loader = PerModelLoader(x, y, num_models=n, batch_size=16, sampling=sampling, seed=9, **extra)
    orders = [loader.order(e) for e in range(2)]
    for _ in range(2):
        for xb, yb in loader:
            loss = mb.compute_loss(mb(xb, per_model=True), yb, per_model=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for i, (ref, lr) in enumerate(zip(refs, lrs)):
        ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
        for order in orders:
            for idx in order[i].split(16):
                loss = nn.functional.cross_entropy(ref(x[idx]), y[idx])
                ref_opt.zero_grad()
                loss.backward()
                ref_opt.step()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(mb.get_model_states()[i][k], v, rtol=1e-5, atol=1e-6)
