"""Per-model orders computed on the fly: valid permutations, uniform, independent, cheap."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from modelbatch.data import PerModelLoader, PerModelSampler

torch.set_num_threads(1)


def chi_square(counts: torch.Tensor) -> float:
    """Pearson's statistic of counts against equal expected counts."""
    counts = counts.double().reshape(-1)
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def joint_counts(a: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(a * size + b, minlength=size * size).reshape(size, size)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 64, 65, 97, 1000])
def test_every_models_order_is_a_permutation(length):
    sampler = PerModelSampler(length, num_models=50, batch_size=4, seed=length)
    for epoch in (0, 3):
        order = sampler.order(epoch)
        assert order.dtype == torch.int64 and order.shape == (50, length)
        assert torch.equal(order.sort(dim=1).values, torch.arange(length).expand(50, -1))
    batches = torch.cat(list(sampler.index_batches()), dim=1)
    assert torch.equal(batches, sampler.order(0))


@pytest.mark.parametrize("sampling", ["shuffle", "bootstrap", "kfold"])
def test_steps_computed_several_at_once_equal_the_epochs_order(sampling, monkeypatch):
    # Chunks of 3 steps (12 indices per model) over an epoch of 10 steps, the last
    # one short; and a position loaded between steps is honoured within the epoch.
    from modelbatch import data

    monkeypatch.setattr(data, "_CHUNK_ELEMENTS", 5 * 4 * 3)
    extra: dict[str, Any] = {"num_folds": 3} if sampling == "kfold" else {}
    sampler = PerModelSampler(39, num_models=5, batch_size=4, seed=7, sampling=sampling, **extra)
    order = sampler.order(0)
    steps = list(sampler.index_batches())
    assert [tuple(s.shape) for s in steps] == [(5, 4)] * (order.shape[1] // 4) + (
        [(5, order.shape[1] % 4)] if order.shape[1] % 4 else []
    )
    assert torch.equal(torch.cat(steps, dim=1), order)
    assert sampler.epoch == 1 and sampler.batch == 0

    sampler = PerModelSampler(39, num_models=5, batch_size=4, seed=7, sampling=sampling, **extra)
    it = sampler.index_batches()
    assert torch.equal(next(it), order[:, 0:4])
    state = sampler.state_dict()
    state["batch"] = 5
    sampler.load_state_dict(state)
    assert torch.equal(next(it), order[:, 20:24])
    assert torch.equal(next(it), order[:, 24:28])


N_STAT, L_STAT = 4000, 8
# A chi-square bound about 6 standard deviations above the mean of its degrees of
# freedom: a uniform sampler passes with a fixed seed, a biased one fails by far.


def bound(dof: int) -> float:
    return dof + 6 * (2 * dof) ** 0.5


@pytest.mark.parametrize("seed", [0, list(range(N_STAT))])
def test_each_position_is_uniform_over_the_samples(seed):
    order = PerModelSampler(L_STAT, num_models=N_STAT, batch_size=4, seed=seed).order(0)
    # counts[p, v]: how many models put sample v at position p.
    counts = torch.stack([torch.bincount(order[:, p], minlength=L_STAT) for p in range(L_STAT)])
    assert chi_square(counts) < bound((L_STAT - 1) ** 2)


@pytest.mark.parametrize("seed", [0, list(range(N_STAT))])
def test_neighbouring_positions_and_models_and_epochs_are_independent(seed):
    sampler = PerModelSampler(L_STAT, num_models=N_STAT, batch_size=4, seed=seed)
    o0, o1 = sampler.order(0), sampler.order(1)
    # Within a model: the pair at positions (p, p+1) is uniform over distinct pairs.
    pairs = joint_counts(o0[:, 2], o0[:, 3], L_STAT)
    assert int(pairs.diagonal().sum()) == 0
    off = pairs[~torch.eye(L_STAT, dtype=torch.bool)]
    assert chi_square(off) < bound(off.numel() - 1)
    # Across models (consecutive seeds, the hardest case for a weak hash) and epochs.
    for a, b in ((o0[:-1:2, 0], o0[1::2, 0]), (o0[:, 0], o1[:, 0]), (o0[:, 5], o1[:, 5])):
        table = joint_counts(a, b, L_STAT)
        assert chi_square(table) < bound(table.numel() - 1)


def test_triples_of_positions_are_uniform_on_a_small_data_set():
    # Few samples are where a keyed permutation with too few rounds shows: at 6
    # Feistel rounds this statistic is ~25 standard deviations off.
    length, n = 16, 100_000
    order = PerModelSampler(length, num_models=n, batch_size=2, seed=5).order(0)
    codes = (order[:, 3] * length + order[:, 9]) * length + order[:, 15]
    counts = torch.bincount(codes, minlength=length**3).reshape(length, length, length)
    i = torch.arange(length)
    distinct = (i[:, None, None] != i[None, :, None]) & (i[None, :, None] != i[None, None, :])
    distinct &= i[:, None, None] != i[None, None, :]
    assert int(counts[~distinct].sum()) == 0
    assert chi_square(counts[distinct]) < bound(int(distinct.sum()) - 1)


def test_odd_and_even_permutations_are_equally_likely():
    import itertools

    n = 20_000
    order = PerModelSampler(6, num_models=n, batch_size=2, seed=5).order(0)
    # The parity of a permutation of 6: count the inversions.
    inversions = sum(
        ((order[:, i] > order[:, j]).long() for i in range(6) for j in range(i + 1, 6)),
        torch.zeros(n, dtype=torch.long),
    )
    odd = int((inversions % 2).sum())
    assert abs(odd - n / 2) < 6 * (n / 4) ** 0.5
    # Each of the 720 permutations of 6 appears about equally often.
    codes = sum(order[:, i] * 6**i for i in range(6))
    counts = torch.bincount(codes, minlength=6**6)
    valid = [sum(v * 6**i for i, v in enumerate(p)) for p in itertools.permutations(range(6))]
    assert int(counts[valid].sum()) == n
    assert chi_square(counts[valid]) < bound(719)


def test_bootstrap_draws_are_uniform_and_independent():
    loader = PerModelSampler(L_STAT, num_models=N_STAT, batch_size=4, sampling="bootstrap")
    bags = loader.bags()
    assert chi_square(torch.bincount(bags.reshape(-1), minlength=L_STAT)) < bound(L_STAT - 1)
    table = joint_counts(bags[:, 0], bags[:, 1], L_STAT)
    assert chi_square(table) < bound(table.numel() - 1)
    table = joint_counts(bags[:-1:2, 0], bags[1::2, 0], L_STAT)
    assert chi_square(table) < bound(table.numel() - 1)


def test_kfold_epochs_take_a_uniform_subset_of_the_training_samples():
    n, length, k = 3000, 11, 3
    sampler = PerModelSampler(length, num_models=n, batch_size=2, sampling="kfold", num_folds=k)
    order = sampler.order(0)
    assert order.shape == (n, sampler.samples_per_epoch)
    train = sampler._train_mask()
    for i in range(0, n, 97):
        row = order[i].tolist()
        assert len(set(row)) == len(row) and all(train[i, v] for v in row)
    # Model i (fold i % 3) sees each of its training samples equally often at position 0.
    first = order[0::k, 0]
    counts = torch.bincount(first, minlength=length)[train[0]]
    assert chi_square(counts) < bound(counts.numel() - 1)


def test_an_epoch_never_builds_every_models_whole_order():
    # 40,000 models over 2,000,000 samples: a whole [N, L] order would be 640 GB.
    for sampling in ("shuffle", "bootstrap"):
        sampler = PerModelSampler(
            2_000_000, num_models=40_000, batch_size=4, sampling=sampling, seed=1
        )
        first = next(sampler.index_batches())
        assert first.shape == (40_000, 4)
        assert int(first.min()) >= 0 and int(first.max()) < 2_000_000
        assert first[:, 0].unique().numel() > 39_000  # the models start in different places


def test_resuming_mid_epoch_continues_the_same_orders():
    x = torch.randn(53, 3)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("shuffle", {}),
        ("bootstrap", {}),
        ("kfold", {"num_folds": 4}),
    ]
    for sampling, extra in cases:
        a = PerModelLoader(x, num_models=5, batch_size=6, sampling=sampling, seed=3, **extra)
        list(a)  # the first epoch
        it = iter(a)
        next(it), next(it)
        state = a.state_dict()
        rest = [batch[0] for batch in it]
        b = PerModelLoader(x, num_models=5, batch_size=6, sampling=sampling, seed=99, **extra)
        b.load_state_dict(state)
        again = [batch[0] for batch in b]
        assert len(rest) == len(again) == len(a) - 2
        assert all(torch.equal(p, q) for p, q in zip(rest, again))
        assert torch.equal(torch.cat(rest, 1), x[a.order(1)[:, 12:]])
