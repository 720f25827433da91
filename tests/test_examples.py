"""Every example runs end to end (small settings) and prints its result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small settings keep CI fast; each example's defaults are what its docstring promises.
EXAMPLES = {
    "quickstart.py": (["--models", "8", "--epochs", "2"], "Best model"),
    "successive_halving.py": (
        ["--configs", "16", "--slots", "8", "--rung-epochs", "1", "--survivors", "2"],
        "Survivors:",
    ),
    "hf_trainer.py": (["--steps", "10"], "exported model"),
    "lightning.py": (["--epochs", "1"], "val acc: mean"),
    "sweep_digits.py": (["--quick"], "speedup"),
    "optuna_sweep.py": (
        ["--trials", "8", "--batch", "4", "--steps", "10", "--report-every", "5"],
        "best trial #",
    ),
    "ensemble_digits.py": (["--quick"], "Multi-seed study"),
    "distributed_sweep.py": (["--models", "16", "--epochs", "2", "--halve-every", "1"], "val_acc"),
    "arch_search.py": (["--quick"], "speedup vs loop"),
}


def test_every_example_is_listed() -> None:
    assert set(EXAMPLES) == {p.name for p in (ROOT / "examples").glob("*.py")}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name: str, tmp_path: Path) -> None:
    args, expected = EXAMPLES[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout, result.stdout[-2000:]
