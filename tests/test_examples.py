"""Every example runs end to end (small settings) and prints its result.

An example that needs an optional extra (transformers, lightning, optuna) is
skipped when the extra is missing (see conftest.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small settings keep CI fast; each example's defaults are what its docstring promises.
# Each entry: the arguments, then patterns that must all appear in its output.
EXAMPLES: dict[str, tuple[list[str], list[str]]] = {
    "quickstart.py": (
        ["--models", "8", "--epochs", "2"],
        [
            r"epoch 1/2 .*loss min [\d.]+ median [\d.]+ max [\d.]+",  # progress, tqdm or not
            r"Trained 8 MLPs for 2 epochs on cpu in [\d.]+ s",
            r"Best model: #\d+",
            r"Done in [\d.]+ s",
        ],
    ),
    "successive_halving.py": (
        ["--configs", "16", "--slots", "8", "--rung-epochs", "1", "--survivors", "2"],
        ["Survivors:"],
    ),
    "hf_trainer.py": (["--steps", "10"], ["exported model"]),
    "lightning.py": (["--epochs", "1"], ["val acc: mean"]),
    "sweep_digits.py": (
        ["--quick"],
        [
            r"modelbatch: +[\d.]+ s",
            r"sequential: +[\d.]+ s",
            r"speedup: +[\d.]+ x",
            # The timing says what it compares: one-time costs out of both arms.
            r"one-time costs .* excluded from both arms",
            r"warm-up",
        ],
    ),
    "optuna_sweep.py": (
        ["--trials", "8", "--batch", "4", "--steps", "10", "--report-every", "5"],
        ["best trial #"],
    ),
    "ensemble_digits.py": (["--quick"], ["Multi-seed study"]),
    "distributed_sweep.py": (
        ["--models", "16", "--epochs", "2", "--halve-every", "1"],
        ["val_acc"],
    ),
    "arch_search.py": (["--quick"], ["speedup vs loop"]),
}


def test_every_example_is_listed() -> None:
    assert set(EXAMPLES) == {p.name for p in (ROOT / "examples").glob("*.py")}


def run_example(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name: str, tmp_path: Path, requires: Callable[..., None]) -> None:
    requires((ROOT / "examples" / name).read_text())
    args, expected = EXAMPLES[name]
    result = run_example(name, args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr  # tqdm writes its bar to stderr
    for pattern in expected:
        assert re.search(pattern, output), f"{pattern!r} not in:\n{output[-3000:]}"


def test_quickstart_shows_progress_without_tqdm(tmp_path: Path) -> None:
    # Without tqdm the progress is plain lines on stdout, one per epoch.
    (tmp_path / "tqdm.py").write_text("raise ImportError('tqdm is hidden for this test')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")]),
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--models",
            "4",
            "--epochs",
            "3",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = re.findall(r"^epoch (\d)/3 +[\d.]+ s +loss min", result.stdout, re.M)
    assert lines == ["1", "2", "3"], result.stdout[-2000:]
