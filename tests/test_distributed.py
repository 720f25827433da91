"""modelbatch.distributed: a sweep sharded over torchrun ranks equals the one-process sweep.

The multi-process runs launch this file as a torchrun script (gloo, CPU); the
one-process runs call the same worker in the test process (world size 1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modelbatch import ModelBatch, distributed
from modelbatch.data import PerModelLoader

N, SEED, STEPS_BEFORE, STEPS_AFTER = 7, 11, 4, 3


def make() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 10, generator=g), torch.randint(0, 3, (40,), generator=g)


def build(ctx: distributed.Context) -> tuple[ModelBatch, PerModelLoader]:
    ids = ctx.shard(range(N))
    mb = ModelBatch.from_factory(
        make,
        ids,
        seed=SEED,
        optimizer_cls=torch.optim.Adam,
        configs=[{"lr": 1e-3 * (1 + int(i))} for i in ids],
    )
    x, y = data()
    loader = PerModelLoader(x, y, num_models=len(ids), batch_size=8, seed=ctx.data_seeds(SEED))
    return mb, loader


def train(mb: ModelBatch, loader: PerModelLoader, steps: int) -> None:
    done = 0
    while done < steps:
        for xb, yb in loader:
            mb.zero_grad()
            mb.compute_loss(mb(xb, per_model=True), yb).backward()
            mb.step()
            done += 1
            if done == steps:
                return


def run(mode: str, folder: Path) -> dict[str, torch.Tensor] | None:
    """One rank's part of a scenario; rank 0 returns the gathered final state."""
    ctx = distributed.init(backend="gloo")
    try:
        mb, loader = build(ctx)
        if mode in ("full", "save"):
            train(mb, loader, 2)
            x, y = data()
            with torch.no_grad():
                mb.eval()
                val = mb.per_model_losses(mb(x), y)
                mb.train()
            retired = distributed.successive_halving(ctx, mb, val, keep=0.5)
            assert int(retired.sum()) == int((~mb.active).sum())
            everyone = ctx.gather(retired)  # the decision spans ranks: 4 of 7 retire
            assert everyone is not None and int(everyone.sum()) == 4
            train(mb, loader, STEPS_BEFORE - 2)
            if mode == "save":
                distributed.save(folder / "ckpt", ctx, mb, loader=loader, step=STEPS_BEFORE)
                shared_optuna_study(ctx, folder)
        else:
            ckpt = distributed.load(folder / "ckpt", ctx, mb, loader=loader)
            assert ckpt.step == STEPS_BEFORE
        train(mb, loader, STEPS_AFTER)
        state = {name: ctx.gather(t.detach()) for name, t in mb.stacked_params().items()}
        state["active"] = ctx.gather(mb.active)
        assert mb.latest_losses is not None
        state["losses"] = ctx.gather(mb.latest_losses, dst=0)
        rows = ctx.summary(mb)
        assert [r["model"] for r in rows] == list(range(N))
        if ctx.is_main:  # every gather above reached rank 0
            full: dict[str, torch.Tensor] = {}
            for name, t in state.items():
                assert t is not None, name
                full[name] = t
            torch.save(full, folder / f"{mode}_{ctx.world_size}.pt")
            return full
        return None
    finally:
        ctx.close()


def shared_optuna_study(ctx: distributed.Context, folder: Path) -> None:
    """Each rank asks and tells its own batch of trials of one study in a journal file."""
    try:
        import optuna

        from modelbatch.integrations.optuna import optimize_batched, shared_study
    except ImportError:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = shared_study(
        folder / "study.journal",
        ctx,
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=ctx.rank),
    )
    x, y = data()
    mine = len(ctx.block(range(6)))
    trials = optimize_batched(
        study,
        lambda t: make(),
        lambda t: {"lr": t.suggest_float("lr", 1e-3, 1e-1, log=True)},
        [(x, y)],
        lambda mb: mb.per_model_losses(mb(x), y),
        n_trials=mine,
        batch_size=2,
        steps=2,
        report_every=1,
    )
    assert len(trials) == mine
    ctx.barrier()
    everyone = study.get_trials(deepcopy=False)
    assert len(everyone) == 6
    assert len({t.number for t in everyone}) == 6
    assert all(t.state.is_finished() for t in everyone)


def torchrun(nproc: int, mode: str, folder: Path) -> dict[str, torch.Tensor]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        __file__,
        mode,
        str(folder),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(folder / f"{mode}_{nproc}.pt")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("one")
    state = run("full", folder)
    assert state is not None
    return state


def test_sharded_sweep_equals_one_process_and_checkpoints_reshard(
    tmp_path: Path, one_process: dict[str, torch.Tensor]
) -> None:
    # 7 models over 2 ranks (4 + 3), a successive-halving round across ranks,
    # a checkpoint with 2 ranks, then resumed with 3 ranks and with 1.
    two = torchrun(2, "save", tmp_path)
    assert_same(two, one_process)
    three = torchrun(3, "load", tmp_path)
    assert_same(three, one_process)
    one = run("load", tmp_path)
    assert one is not None
    assert_same(one, one_process)
    # The halving round kept 3 of the 7 models (retired 4), the same ones everywhere.
    assert int(one_process["active"].sum()) == 3


def test_checkpoint_detects_corruption_and_mismatch(tmp_path: Path) -> None:
    ctx = distributed.init(backend="gloo")
    try:
        mb, loader = build(ctx)
        train(mb, loader, 1)
        distributed.save(tmp_path / "c", ctx, mb, step=3, extra={"note": "x"})
        assert not any(p.name.startswith(".c.") for p in tmp_path.iterdir())
        # Saving again replaces the checkpoint whole.
        distributed.save(tmp_path / "c", ctx, mb, step=4)
        fresh, _ = build(ctx)
        ckpt = distributed.load(tmp_path / "c", ctx, fresh)
        assert ckpt.step == 4
        for name, t in mb.stacked_params().items():
            assert torch.equal(fresh.stacked_params()[name], t)
        with pytest.raises(ValueError, match="holds state for"):
            distributed.load(tmp_path / "c", ctx, fresh, loader=loader)
        ctx.shard(range(N + 1))
        with pytest.raises(ValueError, match=r"ctx\.shard|from_factory"):
            distributed.load(tmp_path / "c", ctx, fresh)
        ctx.shard(range(N))
        # Flip bytes inside one model's weights in the data files.
        before = {k: t.clone() for k, t in fresh.stacked_params().items()}
        victim = next((tmp_path / "c").glob("*.distcp"))
        good = victim.read_bytes()
        # The first layer's weights (model 0 first) as they lie in the file.
        needle = mb.stacked_params()["0.weight"][0, 0].detach().numpy().tobytes()
        at = good.find(needle)
        assert at > 0
        raw = bytearray(good)
        raw[at + 2] ^= 0x10
        victim.write_bytes(bytes(raw))
        with pytest.raises(ValueError, match=r"model 0's .* fails its checksum"):
            distributed.load(tmp_path / "c", ctx, fresh)
        victim.write_bytes(good[: len(good) // 2])
        with pytest.raises(ValueError, match="unreadable"):
            distributed.load(tmp_path / "c", ctx, fresh)
        for name, t in fresh.stacked_params().items():
            assert torch.equal(before[name], t)
    finally:
        ctx.close()
        shutil.rmtree(tmp_path / "c", ignore_errors=True)


def test_gather_decide_and_errors() -> None:
    ctx = distributed.init(backend="gloo")
    try:
        assert (ctx.rank, ctx.world_size) == (0, 1)
        with pytest.raises(RuntimeError, match=r"ctx\.shard"):
            ctx.gather(torch.zeros(3))
        ids = ctx.shard([5, 2, 9])
        assert ids.tolist() == [5, 2, 9]
        values = torch.tensor([0.3, float("nan"), 0.1])
        gathered = ctx.gather(values)
        assert gathered is not None
        assert torch.equal(gathered.isnan(), values.isnan())
        flags = ctx.gather(torch.tensor([True, False, True]))
        assert flags is not None and flags.tolist() == [True, False, True]
        assert ctx.decide(lambda v: v > 0.2, values).tolist() == [True, False, False]
        assert ctx.any(torch.tensor(True)) and not ctx.any(False)
        with pytest.raises(ValueError, match=r"Context.gather: expected \[n_local=3"):
            ctx.gather(torch.zeros(4))
        with pytest.raises(ValueError, match="at least one"):
            distributed.Context(0, 4, 0, torch.device("cpu"), "gloo").shard(3)
        # Blocks: contiguous, sizes differ by at most one.
        blocks = [
            distributed.Context(r, 3, r, torch.device("cpu"), "gloo").block(range(8)).tolist()
            for r in range(3)
        ]
        assert blocks == [[0, 1, 2], [3, 4, 5], [6, 7]]
    finally:
        ctx.close()


def test_export_best_names_global_ids(tmp_path: Path) -> None:
    ctx = distributed.init(backend="gloo")
    try:
        mb = ModelBatch.from_factory(make, ctx.shard([3, 8, 1]), seed=2)
        best = distributed.export_best(ctx, mb, torch.tensor([0.5, 0.9, float("nan")]), 2, tmp_path)
        assert [gid for gid, _ in best] == [8, 3]
        state = torch.load(tmp_path / "model_8.pt")
        exported = mb.model(1)
        assert isinstance(exported, nn.Sequential) and isinstance(exported[0], nn.Linear)
        assert torch.equal(state["0.weight"], exported[0].weight)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model_3.pt", "model_8.pt"]
    finally:
        ctx.close()


def test_model_axis_of_saved_tensors() -> None:
    from modelbatch._dist_checkpoint import _model_axis

    step = "state['optimizer']['param_groups'][]['step']"
    assert _model_axis(step, [(6, 4), (6, 3)], [4, 3]) == 1
    assert _model_axis("state['model']['w']", [(4, 5, 10), (3, 5, 10)], [4, 3]) == 0
    # Equal shards: the first axis, but the last for [K, N] tables.
    assert _model_axis("state['optimizer']['hparams']['betas']", [(2, 2)], [2]) == 0
    assert _model_axis(step, [(2, 2)], [2]) == 1
    assert _model_axis("state['scheduler']['t']", [(3,), (3,)], [4, 3]) is None
    with pytest.raises(ValueError, match="neither one block"):
        _model_axis("state['x']", [(2,), (5,)], [4, 3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nccl_world_of_one(tmp_path: Path) -> None:
    ctx = distributed.init(backend="nccl")
    try:
        assert ctx.backend == "nccl" and ctx.device.type == "cuda"
        ids = ctx.shard(range(5))
        mb = ModelBatch.from_factory(
            make, ids, seed=1, device=ctx.device, optimizer_cls=torch.optim.Adam
        )
        x, y = (t.to(ctx.device) for t in data())
        for _ in range(2):
            mb.zero_grad()
            mb.compute_loss(mb(x), y).backward()
            mb.step()
        assert mb.latest_losses is not None
        everywhere, on_main = ctx.gather(mb.latest_losses), ctx.gather(mb.latest_losses, dst=0)
        assert everywhere is not None and on_main is not None
        assert torch.equal(everywhere, mb.latest_losses)
        assert torch.equal(on_main, mb.latest_losses)
        distributed.successive_halving(ctx, mb, mb.latest_losses, keep=0.6)
        assert int(mb.active.sum()) == 3
        distributed.save(tmp_path / "c", ctx, mb, step=2)
        fresh = ModelBatch.from_factory(
            make, ids, seed=9, device=ctx.device, optimizer_cls=torch.optim.Adam
        )
        fresh.zero_grad()
        fresh.compute_loss(fresh(x), y).backward()
        fresh.step()  # creates the optimizer state that load fills
        distributed.load(tmp_path / "c", ctx, fresh)
        for name, t in mb.stacked_params().items():
            assert torch.equal(fresh.stacked_params()[name], t), name
        assert torch.equal(fresh.active, mb.active)
    finally:
        ctx.close()


def native_threads() -> list[str]:
    """Names of this process's native threads (Linux), [] elsewhere."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir())


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]))
    # ctx.close() tore the group down whole: a gloo thread still alive here
    # outlives the interpreter and aborts the process at exit, now and then.
    left = [name for name in native_threads() if "gloo" in name]
    assert not left, f"gloo threads outlive destroy_process_group: {left}"
