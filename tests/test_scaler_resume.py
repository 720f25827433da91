"""A per-model grad scaler whose model overflowed right before a checkpoint, resumed in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")

# One script, two modes: "full" trains STEPS steps without stopping and saves a
# checkpoint after step SAVE_AT; "resume" builds everything afresh (other seeds),
# loads that checkpoint and trains the remaining steps. Both write their end state.
SCRIPT = r"""
import sys
sys.path.insert(0, {src!r})
import torch
from torch import nn
from modelbatch import ModelBatch
from modelbatch.amp import BatchGradScaler
from modelbatch.checkpoint import load, save
from modelbatch.optim import BatchAdam, BatchStepLR

torch.set_num_threads(1)
N, B, D, STEPS, SAVE_AT, OVERFLOW = 4, 8, 6, 10, 5, 2
mode, path, out = sys.argv[1:4]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 16)
        self.drop = nn.Dropout(0.2)  # the RNG must resume too
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def build(seed):
    torch.manual_seed(seed)
    mb = ModelBatch([Net() for _ in range(N)])
    configs = [{{"lr": 1e-2 * (i + 1), "amsgrad": i % 2 == 0}} for i in range(N)]
    opt = BatchAdam(list(mb.parameters()), configs, model_batch=mb)
    sched = BatchStepLR(opt, step_size=[2, 3, 4, 5], gamma=0.5)
    scaler = BatchGradScaler(mb, init_scale=[2.0**8, 2.0**10, 2.0**16, 2.0**12], growth_interval=2)
    return mb, opt, sched, scaler


def batch(t):
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(N, B, D, generator=g)
    y = torch.randint(0, 3, (N, B), generator=g)
    if t == SAVE_AT - 1:
        # Finite forward and loss, but model 2's scaled gradient overflows fp32.
        x[OVERFLOW, 0] = 1e36
    return x, y


def train_step(mb, opt, sched, scaler, t, log):
    x, y = batch(t)
    before = [p.detach().clone() for p in mb.parameters()]
    loss = mb.compute_loss(mb(x, per_model=True), y, per_model=True)
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    found = scaler.found_inf(opt).clone()
    scaler.update()
    sched.step()
    moved = torch.stack([(p.detach() != b).flatten(1).any(1) for p, b in zip(mb.parameters(), before)]).any(0)
    log.append({{"found_inf": found.tolist(), "moved": moved.tolist()}})


def end_state(mb, opt, scaler, log):
    return {{
        "weights": {{k: v.clone() for k, v in mb.state_dict().items()}},
        "opt": opt.state_dict(),
        "scale": scaler.get_scale(),
        "tracker": scaler.get_growth_tracker(),
        "log": log,
        "rng": torch.get_rng_state(),
    }}


log = []
if mode == "full":
    mb, opt, sched, scaler = build(0)
    for t in range(STEPS):
        train_step(mb, opt, sched, scaler, t, log)
        if t == SAVE_AT - 1:
            save(path, mb, optimizer=opt, scheduler=sched, step=t + 1)
            log[-1]["scale_at_save"] = scaler.get_scale().tolist()
            log[-1]["opt_step_at_save"] = opt.param_groups[0]["step"].tolist()
else:
    mb, opt, sched, scaler = build(123)
    torch.manual_seed(999)
    ckpt = load(path, mb, optimizer=opt, scheduler=sched)
    for t in range(ckpt.step, STEPS):
        train_step(mb, opt, sched, scaler, t, log)
torch.save(end_state(mb, opt, scaler, log), out)
"""


def run(tmp_path: Path, mode: str) -> dict:
    script = tmp_path / "scaler_run.py"
    script.write_text(SCRIPT.format(src=SRC))
    out = tmp_path / f"{mode}.pt"
    ckpt = tmp_path / "run.safetensors"
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(ckpt), str(out)],
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return torch.load(out, weights_only=False)


def test_an_overflow_right_before_a_checkpoint_resumes_bitwise_in_a_fresh_process(tmp_path):
    full = run(tmp_path, "full")
    log = full["log"]
    at_save = log[4]
    # The step before the checkpoint: model 2 overflowed and stood still, the others moved.
    assert at_save["found_inf"] == [0.0, 0.0, 1.0, 0.0]
    assert at_save["moved"] == [True, True, False, True]
    # Its scale backed off: 2**16 grew twice (growth_interval=2) to 2**18, then halved.
    assert at_save["scale_at_save"] == [2.0**10, 2.0**12, 2.0**17, 2.0**14]
    # One row per parameter ([K, N] step table): every parameter of model 2 held back once.
    rows = at_save["opt_step_at_save"]
    assert rows and all(row == [5, 5, 4, 5] for row in rows)
    assert all(entry["found_inf"] == [0.0] * 4 for entry in log[:4])

    resumed = run(tmp_path, "resume")
    assert len(resumed["log"]) == 5 and resumed["log"] == log[5:]
    assert full["weights"].keys() == resumed["weights"].keys()
    for key, value in full["weights"].items():
        assert torch.equal(value, resumed["weights"][key]), key
    assert torch.equal(full["scale"], resumed["scale"])
    assert torch.equal(full["tracker"], resumed["tracker"])
    for pid, state in full["opt"]["state"].items():
        for key, value in state.items():
            got = resumed["opt"]["state"][pid][key]
            assert torch.equal(value, got) if isinstance(value, torch.Tensor) else value == got
    for key, value in full["opt"]["param_groups"][0]["hparams"].items():
        assert torch.equal(value, resumed["opt"]["param_groups"][0]["hparams"][key]), key
    assert torch.equal(
        full["opt"]["param_groups"][0]["step"], resumed["opt"]["param_groups"][0]["step"]
    )
    assert torch.equal(full["rng"], resumed["rng"])
