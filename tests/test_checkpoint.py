"""Checkpoints: bitwise resume, atomic writes, corrupted files, single-model export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modelbatch import ModelBatch
from modelbatch import optim as mb_optim
from modelbatch.amp import BatchGradScaler
from modelbatch.checkpoint import (
    export_best,
    export_model,
    load,
    load_model_state,
    read_checkpoint,
    save,
)
from modelbatch.data import PerModelLoader

# Tiny tensors: intra-op threads only add contention on a shared machine.
torch.set_num_threads(1)

N, D, C = 4, 6, 3
SRC = str(Path(__file__).resolve().parents[1] / "src")


class Net(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def make_batch(seed: int, n: int = N, hidden: int = 8) -> ModelBatch:
    torch.manual_seed(seed)
    return ModelBatch([Net(hidden) for _ in range(n)])


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(50, D, generator=g), torch.randint(0, C, (50,), generator=g)


def configs(family: str) -> list[dict]:
    """Different hyperparameters for every model."""
    per = {
        "BatchSGD": lambda i: {
            "lr": 0.02 * (i + 1),
            "momentum": 0.5 + 0.1 * i,
            "nesterov": i % 2 == 0,
        },
        "BatchAdam": lambda i: {
            "lr": 0.005 * (i + 1),
            "betas": (0.9, 0.99 - 0.01 * i),
            "amsgrad": i % 2 == 0,
        },
        "BatchAdamW": lambda i: {"lr": 0.005 * (i + 1), "weight_decay": 0.05 * i},
        "BatchRMSprop": lambda i: {
            "lr": 0.002 * (i + 1),
            "momentum": 0.1 * i,
            "centered": i % 2 == 1,
        },
        "BatchAdagrad": lambda i: {"lr": 0.01 * (i + 1), "lr_decay": 0.01 * i},
    }[family]
    return [per(i) for i in range(N)]


TORCH_OPTIMIZERS = {
    "torch-sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "torch-adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "torch-rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
}
FAMILIES = [
    *TORCH_OPTIMIZERS,
    "BatchSGD",
    "BatchAdam",
    "BatchAdamW",
    "BatchRMSprop",
    "BatchAdagrad",
]


def make_run(seed: int, family: str):
    """A run with an optimizer, a schedule, a data loader and (for some) a grad scaler."""
    mb = make_batch(seed)
    scaler = None
    sched: torch.optim.lr_scheduler.LRScheduler
    if family in TORCH_OPTIMIZERS:
        opt = TORCH_OPTIMIZERS[family](mb.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    elif family == "fallback-NAdam":  # a torch optimizer run over the stacked tensors, masked
        opt = mb_optim.OptimizerFactory(torch.optim.NAdam, {"lr": 0.01}).create_optimizer(mb)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    else:
        opt = getattr(mb_optim, family)(list(mb.parameters()), configs(family), model_batch=mb)
        sched = mb_optim.BatchStepLR(opt, step_size=[2, 3, 4, 5], gamma=[0.5, 0.6, 0.7, 0.8])
        if family in ("BatchAdam", "BatchSGD"):
            scaler = BatchGradScaler(
                mb, init_scale=torch.tensor([2.0**8, 2.0**10, 2.0**12, 2.0**14]), growth_interval=2
            )
    loader = PerModelLoader(*make_data(), num_models=N, batch_size=16, sampling="bootstrap")
    return mb, opt, sched, scaler, loader


def forever(loader):
    while True:
        yield from loader


def train(mb, opt, sched, scaler, batches, steps: int) -> None:
    for _ in range(steps):
        xb, yb = next(batches)
        loss = mb.compute_loss(mb(xb, per_model=True), yb, per_model=True)
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()


def weights(mb: ModelBatch) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mb.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_bitwise_the_same_as_never_stopping(tmp_path, family):
    path = tmp_path / "run.safetensors"
    mb, opt, sched, scaler, loader = make_run(0, family)
    batches = forever(loader)
    train(mb, opt, sched, scaler, batches, 5)
    mb.retire(2)
    cfgs = [{"i": i} for i in range(N)]
    save(path, mb, optimizer=opt, scheduler=sched, loader=loader, step=5, configs=cfgs)
    train(mb, opt, sched, scaler, batches, 4)
    expected, expected_opt = weights(mb), opt.state_dict()

    mb2, opt2, sched2, scaler2, loader2 = make_run(123, family)
    torch.manual_seed(999)  # the checkpoint's RNG state must win
    ckpt = load(path, mb2, optimizer=opt2, scheduler=sched2, loader=loader2)
    assert ckpt.step == 5 and ckpt.configs is not None and ckpt.configs[3] == {"i": 3}
    assert mb2.active.tolist() == [True, True, False, True]
    train(mb2, opt2, sched2, scaler2, forever(loader2), 4)
    assert_same(expected, weights(mb2))
    got_opt = opt2.state_dict()
    for pid, state in expected_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(value, got_opt["state"][pid][key]), key
    for key, value in expected_opt["param_groups"][0].get("hparams", {}).items():
        assert torch.equal(value, got_opt["param_groups"][0]["hparams"][key]), key
    if scaler is not None:
        assert torch.equal(scaler.get_scale(), scaler2.get_scale())
        assert not torch.equal(scaler.get_scale(), scaler.get_scale()[:1].expand(N))


def test_load_restores_numpy_and_python_rng(tmp_path):
    import random

    import numpy as np

    mb = make_batch(0)
    save(tmp_path / "c.safetensors", mb)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(7), random.random()
    load(tmp_path / "c.safetensors", mb)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all()
    assert expected[2] == got[2]


# ---------------------------------------------------------------------- atomic writes


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_rename_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    mb = make_batch(0)
    save(path, mb)
    before = weights(mb)
    with torch.no_grad():
        mb.stacked_params()["fc1.weight"].add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        save(path, mb)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~current_umask()
    load(path, mb)
    assert_same(before, weights(mb))


CRASH_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {src!r})
import torch
import safetensors.torch as st
from modelbatch import ModelBatch
from modelbatch import optim as mb_optim
from modelbatch.amp import BatchGradScaler
from modelbatch.checkpoint import save
torch.manual_seed(0)
mb = ModelBatch([torch.nn.Linear(6, 3) for _ in range(4)])
with torch.no_grad():
    mb.stacked.weight.add_(1.0)
real_save = st.save_file
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if {where!r} == "mid-write":
    def partial(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        die()
    st.save_file = partial
else:
    os.replace = die
save({path!r}, mb)
"""


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_writer_killed_midway_leaves_the_previous_checkpoint(tmp_path, where):
    path = tmp_path / "c.safetensors"
    torch.manual_seed(0)
    mb = ModelBatch([nn.Linear(6, 3) for _ in range(4)])
    save(path, mb)
    before = weights(mb)
    script = CRASH_SCRIPT.format(src=SRC, where=where, path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    # What a killed writer leaves: its temp file and its (released) lock file.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 3 and left[0].startswith(".c.safetensors.") and left[0].endswith(".tmp")
    assert left[1:] == ["c.safetensors", "c.safetensors.lock"]
    with torch.no_grad():
        mb.stacked_params()["weight"].zero_()
    load(path, mb)
    assert_same(before, weights(mb))
    # The next save of the same path removes both.
    save(path, mb)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


# ---------------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "c.safetensors"
    mb = make_batch(0)
    opt = torch.optim.Adam(mb.parameters(), lr=0.01)
    mb(torch.randn(5, D)).sum().backward()
    opt.step()
    save(path, mb, optimizer=opt)
    return path


def rewrite(path: Path, drop: str | None = None) -> None:
    import safetensors.torch as st
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        names = [k for k in f.keys() if k != drop]  # noqa: SIM118
        tensors = {k: f.get_tensor(k) for k in names}
    st.save_file(tensors, str(path), metadata=meta)


def patch_bytes(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def corrupt_data(path: Path) -> None:
    import json
    import struct

    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8 : 8 + header_len])["model/fc1.weight"]["data_offsets"][0]
    at = 8 + header_len + start + 1
    patch_bytes(path, at, bytes([data[at] ^ 0x10]))


def corrupt_metadata(path: Path) -> None:
    data = path.read_bytes()
    at = data.index(b'\\"num_models\\": 4')
    patch_bytes(path, at + len(b'\\"num_models\\": '), b"5")


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def not_ours(path: Path) -> None:
    import safetensors.torch as st

    st.save_file({"w": torch.randn(3)}, str(path))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncate, "is not a readable checkpoint (truncated or corrupted)"),
        (corrupt_data, "is corrupted: tensor 'model/fc1.weight' fails its checksum"),
        (corrupt_metadata, "is corrupted: its metadata fails the checksum"),
        (lambda p: rewrite(p, drop="model/fc2.bias"), "is incomplete: tensors ['model/fc2.bias']"),
        (not_ours, "not a modelbatch checkpoint"),
    ],
)
def test_damaged_files_are_refused_and_nothing_is_loaded(saved, damage, message):
    damage(saved)
    mb = make_batch(7)
    opt = torch.optim.Adam(mb.parameters(), lr=0.01)
    before = weights(mb)
    with pytest.raises(ValueError, match=r"checkpoint\.load: ") as info:
        load(saved, mb, optimizer=opt)
    assert message in str(info.value)
    assert_same(before, weights(mb))
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: make_batch(1, n=3), "holds N=4 models, this ModelBatch has N=3"),
        (
            lambda: make_batch(1, hidden=5),
            "different architecture: 'fc1.weight' is float32[4, 8, 6] in the checkpoint, "
            "float32[4, 5, 6] in the ModelBatch",
        ),
        (
            lambda: ModelBatch([nn.Sequential(nn.Linear(D, C)) for _ in range(N)]),
            "holds models of class test_checkpoint.Net",
        ),
    ],
)
def test_mismatched_models_are_refused_and_nothing_is_loaded(saved, build, message):
    mb = build()
    before = weights(mb)
    with pytest.raises(ValueError, match=r"checkpoint\.load: ") as info:
        load(saved, mb, strict=False)
    assert message in str(info.value)
    assert_same(before, weights(mb))


def test_missing_and_mismatched_components_are_named(saved):
    mb = make_batch(1)
    with pytest.raises(ValueError, match=r"holds optimizer state .* but no optimizer was given"):
        load(saved, mb)
    with pytest.raises(
        ValueError, match="holds optimizer state of a Adam, the given optimizer is a SGD"
    ):
        load(saved, mb, optimizer=torch.optim.SGD(mb.parameters(), lr=0.1))
    with pytest.raises(
        ValueError, match=r"optimizer param groups of sizes \[6\], the optimizer \[2\]"
    ):
        load(saved, mb, optimizer=torch.optim.Adam(list(mb.parameters())[:2]))
    with pytest.raises(ValueError, match="holds no scheduler state"):
        sched = torch.optim.lr_scheduler.StepLR(torch.optim.Adam(mb.parameters()), 2)
        load(saved, mb, optimizer=torch.optim.Adam(mb.parameters()), scheduler=sched)
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.load: no checkpoint file"):
        load(saved.with_name("nope.safetensors"), mb)


def test_failure_while_restoring_rolls_everything_back(tmp_path):
    class Exploding:
        def state_dict(self):
            return {"x": 1}

        def load_state_dict(self, state):
            if state == {"x": 1}:
                raise RuntimeError("cannot restore")

    path = tmp_path / "c.safetensors"
    mb = make_batch(0)
    opt = torch.optim.SGD(mb.parameters(), lr=0.1, momentum=0.9)
    mb(torch.randn(5, D)).sum().backward()
    opt.step()
    save(path, mb, optimizer=opt, scheduler=Exploding())
    mb2 = make_batch(3)
    opt2 = torch.optim.SGD(mb2.parameters(), lr=0.1, momentum=0.9)
    mb2(torch.randn(5, D)).sum().backward()
    opt2.step()
    before, before_opt = weights(mb2), opt2.state_dict()
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="cannot restore"):
        load(path, mb2, optimizer=opt2, scheduler=Exploding())
    assert_same(before, weights(mb2))
    for pid, state in before_opt["state"].items():
        assert torch.equal(
            state["momentum_buffer"], opt2.state_dict()["state"][pid]["momentum_buffer"]
        )
    assert torch.equal(rng, torch.get_rng_state())


# ---------------------------------------------------------------------- single models


def test_load_model_state_reads_one_model(saved):
    meta, tensors = read_checkpoint(saved)
    state = load_model_state(saved, 2)
    assert list(state) == list(meta["export_keys"])
    for k, v in state.items():
        assert torch.equal(v, tensors[f"model/{meta['export_keys'][k]}"][2])
    with pytest.raises(IndexError, match="index 4 out of range for N=4"):
        load_model_state(saved, 4)


PLAIN_SCRIPT = """
import sys
sys.modules["modelbatch"] = None  # modelbatch must not be importable here
import torch
from torch import nn
from safetensors.torch import load_file
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear({D}, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, {C})
    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))
x, y, expected = (torch.load(f) for f in ("x.pt", "y.pt", "state.pt"))
for path in sys.argv[1:]:
    state = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    assert set(state) == set(expected), path
    assert all(torch.equal(state[k], expected[k]) for k in state), path
    net = Net()
    net.load_state_dict(state)
    net.eval()
    torch.testing.assert_close(net(x), y, rtol=1e-6, atol=1e-6)
print("ok", len(sys.argv) - 1)
"""


def test_exported_model_loads_into_the_plain_class_without_modelbatch(tmp_path):
    mb = make_batch(0)
    mb(torch.randn(20, D))  # train-mode forward: running stats differ per model
    mb.eval()
    x = torch.randn(7, D)
    torch.save(x, tmp_path / "x.pt")
    torch.save(mb(x)[1], tmp_path / "y.pt")
    torch.save(mb.get_model_states()[1], tmp_path / "state.pt")
    source = tmp_path / "c.safetensors"
    save(source, mb)
    outs = [
        export_model(src, 1, tmp_path / f"m_{kind}{suffix}")
        for kind, src in (("batch", mb), ("file", source))
        for suffix in (".pt", ".safetensors")
    ]
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_SCRIPT.format(D=D, C=C), *map(str, outs)],
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.stdout.decode().strip() == "ok 4", proc.stderr.decode()


def test_export_best_picks_the_top_k(tmp_path):
    mb = make_batch(0)
    paths = export_best(mb, torch.tensor([0.5, float("nan"), 0.9, 0.7]), 3, tmp_path / "best")
    assert [i for i, _ in paths] == [2, 3, 0]
    for i, p in paths:
        assert_same(torch.load(p, weights_only=True), mb.get_model_states()[i])
    lowest = export_best(mb, [0.5, float("nan"), 0.9, 0.7], 2, tmp_path / "low", largest=False)
    assert [i for i, _ in lowest] == [0, 3]
    with pytest.raises(ValueError, match="k must be in"):
        export_best(mb, [1.0] * N, 0, tmp_path)
    saved = tmp_path / "run.safetensors"
    save(saved, mb)
    for source in (mb, saved):
        with pytest.raises(ValueError, match=rf"one value per model \(N={N}\), got {N - 1}"):
            export_best(source, [1.0] * (N - 1), 1, tmp_path / "short")
    assert not (tmp_path / "short").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_gpu(tmp_path):
    path = tmp_path / "run.safetensors"
    mb = make_batch(0).cuda()
    opt = mb_optim.BatchAdam(list(mb.parameters()), configs("BatchAdam"), model_batch=mb)
    x, y = torch.randn(16, D, device="cuda"), torch.randint(0, C, (16,), device="cuda")

    def run(steps: int) -> None:
        for _ in range(steps):
            loss = mb.compute_loss(mb(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    run(3)
    save(path, mb, optimizer=opt)
    run(3)
    expected = weights(mb)
    load(path, mb, optimizer=opt)
    assert opt.hparams["lr"].device.type == "cuda"
    run(3)
    # GPU kernels need not be bitwise deterministic: the GPU tier's tolerance.
    got = weights(mb)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_the_batchs_own_optimizer_and_scaler_are_saved_and_restored_by_default(tmp_path):
    path = tmp_path / "c.safetensors"

    def build(seed: int) -> ModelBatch:
        torch.manual_seed(seed)
        return ModelBatch(
            [Net() for _ in range(N)],
            optimizer_cls=torch.optim.Adam,
            lr_list=[0.01, 0.02, 0.03, 0.04],
        )

    mb = build(0)
    BatchGradScaler(mb, init_scale=torch.tensor([2.0**4, 2.0**5, 2.0**6, 2.0**7]))
    x, y = torch.randn(16, D), torch.randint(0, C, (16,))
    for _ in range(2):
        mb.zero_grad()
        mb.grad_scaler.scale(mb.compute_loss(mb(x), y)).backward()
        mb.grad_scaler.step(mb.optimizer)
        mb.grad_scaler.update()
    save(path, mb)
    mb2 = build(1)
    BatchGradScaler(mb2)
    load(path, mb2)
    assert isinstance(mb.optimizer, mb_optim.BatchOptimizer)
    assert isinstance(mb2.optimizer, mb_optim.BatchOptimizer)
    assert torch.equal(mb2.optimizer.hparams["lr"], mb.optimizer.hparams["lr"])
    assert torch.equal(mb2.optimizer.param_groups[0]["step"], mb.optimizer.param_groups[0]["step"])
    assert torch.equal(mb2.grad_scaler.get_scale(), mb.grad_scaler.get_scale())
    assert_same(weights(mb), weights(mb2))


def test_readers_name_themselves_in_errors(saved):
    not_ours(saved)
    with pytest.raises(ValueError, match=r"^checkpoint\.read_checkpoint: .* not a modelbatch"):
        read_checkpoint(saved)
    with pytest.raises(ValueError, match=r"^checkpoint\.load_model_state: .* not a modelbatch"):
        load_model_state(saved, 0)


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.out = nn.Linear(4, 9, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens))


def test_one_model_of_a_tied_architecture_reads_back_under_every_key(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = [_TiedLM() for _ in range(3)]
    mb = ModelBatch(models)
    path = tmp_path / "tied.safetensors"
    save(path, mb)
    state = load_model_state(path, 2)
    assert set(state) == {"emb.weight", "out.weight"}
    assert torch.equal(state["out.weight"], models[2].emb.weight.detach())
    plain = _TiedLM()
    plain.load_state_dict(state)
    tokens = torch.randint(0, 9, (2, 5))
    assert torch.equal(plain(tokens), models[2](tokens))
