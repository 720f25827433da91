"""modelbatch.plot: the figures hold what they claim (lines, points, labels, scales)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection, PolyCollection  # noqa: E402

from modelbatch import ModelBatch  # noqa: E402
from modelbatch import plot as mbp  # noqa: E402
from modelbatch.lifecycle import LifecycleLog, replace_model  # noqa: E402
from modelbatch.optim import BatchSGD  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_loss_curves_one_line_per_group_with_the_spread_of_its_seeds() -> None:
    g = torch.Generator().manual_seed(0)
    history = torch.rand(30, 6, generator=g) + torch.linspace(2, 0, 30)[:, None]
    groups = ["lr=0.1", "lr=0.1", "lr=0.1", "lr=0.01", "lr=0.01", "lr=0.001"]
    ax = mbp.loss_curves(history, groups=groups)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [
        "lr=0.1 (3 models)",
        "lr=0.01 (2 models)",
        "lr=0.001",
    ]
    np.testing.assert_allclose(lines[0].get_ydata(), history[:, :3].double().mean(1).numpy())
    np.testing.assert_allclose(lines[2].get_ydata(), history[:, 5].double().numpy())
    assert len(lines[0].get_xdata()) == 30
    # One band per group of two or more, spanning min..max of its members.
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    top = np.asarray(bands[0].get_paths()[0].vertices)[:, 1].max()
    assert top == pytest.approx(float(history[:, :3].max()), rel=1e-6)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        line.get_label() for line in lines
    ]
    assert ax.get_xlabel() == "step" and ax.get_yscale() == "linear"


def test_loss_curves_per_model_from_a_model_batch_smoothed_on_log_axes() -> None:
    torch.manual_seed(0)
    mb = ModelBatch([torch.nn.Linear(4, 3) for _ in range(3)])
    for _ in range(8):
        mb.compute_loss(mb(torch.randn(16, 4)), torch.randint(0, 3, (16,)))
    ax = mbp.loss_curves(mb, smooth=4, log_y=True)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["model 0", "model 1", "model 2"]
    h = mb.loss_history().double().numpy()
    # Trailing mean of 4: step 5 averages steps 2..5; step 1 averages steps 0..1.
    assert lines[1].get_ydata()[5] == pytest.approx(h[2:6, 1].mean())
    assert lines[1].get_ydata()[1] == pytest.approx(h[0:2, 1].mean())
    assert ax.get_yscale() == "log"
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_loss_curves_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"plot.loss_curves: history must be \[T, N\]"):
        mbp.loss_curves(torch.rand(5))
    with pytest.raises(ValueError, match=r"plot.loss_curves: groups must have one key per model"):
        mbp.loss_curves(torch.rand(5, 3), groups=[0, 1])


def test_metric_vs_hparams_one_panel_per_swept_value_log_axis_for_lr() -> None:
    lrs = [1e-4, 1e-3, 1e-2, 1e-1] * 2
    decays = [0.0] * 4 + [0.01] * 4
    configs = [
        {"lr": lr, "weight_decay": wd, "momentum": m, "nesterov": False}
        for lr, wd, m in zip(lrs, decays, np.linspace(0.0, 0.9, 8))
    ]
    loss = torch.tensor([0.9, 0.5, 0.3, 0.7, 0.8, 0.4, 0.2, 1.2])
    fig = mbp.metric_vs_hparams(loss, configs, metric_name="val loss")
    axes = fig.axes
    # nesterov is constant: no panel.
    assert [ax.get_xlabel() for ax in axes] == ["lr", "weight_decay", "momentum"]
    assert [ax.get_xscale() for ax in axes] == ["log", "symlog", "linear"]
    assert axes[0].get_ylabel() == "val loss"
    for ax, name in zip(axes, ["lr", "weight_decay", "momentum"]):
        points, star = [c for c in ax.collections if isinstance(c, PathCollection)]
        offsets = np.asarray(points.get_offsets())
        assert offsets.shape == (8, 2)
        np.testing.assert_allclose(offsets[:, 0], [c[name] for c in configs])
        np.testing.assert_allclose(offsets[:, 1], loss.numpy())
        # The best (lowest) model is starred: model 6.
        np.testing.assert_allclose(np.asarray(star.get_offsets())[0], [configs[6][name], 0.2])


def test_metric_vs_hparams_from_an_optimizer_and_forced_scales() -> None:
    mb = ModelBatch([torch.nn.Linear(3, 2) for _ in range(4)])
    opt = BatchSGD(list(mb.parameters()), [{"lr": 0.1 * (i + 1)} for i in range(4)])
    acc = torch.tensor([0.5, 0.7, 0.6, 0.4])
    fig = mbp.metric_vs_hparams(acc, opt, metric_name="acc", best="max", log_x=False)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "lr" and ax.get_xscale() == "linear"
    star = [c for c in ax.collections if isinstance(c, PathCollection)][1]
    np.testing.assert_allclose(np.asarray(star.get_offsets())[0], [0.2, 0.7])
    with pytest.raises(ValueError, match=r"plot\.metric_vs_hparams: no hyperparameter varies"):
        mbp.metric_vs_hparams(acc, {"lr": [0.1] * 4})


def test_bracket_draws_each_trial_from_start_to_stop() -> None:
    torch.manual_seed(0)
    mb = ModelBatch([torch.nn.Linear(3, 2) for _ in range(4)])
    opt = BatchSGD(list(mb.parameters()), [{"lr": 0.1}] * 4, model_batch=mb)
    log = LifecycleLog(4, [{"lr": 0.1}] * 4)
    # Rung at step 10: slots 2 and 3 replaced by trials 4 and 5; rung at 20: slot 0 and 4 retired.
    for slot in (2, 3):
        replace_model(
            mb,
            slot,
            lambda: torch.nn.Linear(3, 2),
            config={"lr": 0.2},
            optimizer=opt,
            log=log,
            step=10,
        )
    log.retire([0, 2], step=20)
    assert [log.trial_in(i) for i in range(4)] == [0, 1, 4, 5]
    assert [(t["start"], t["end"], t["outcome"]) for t in log.trials] == [
        (0, 20, "retired"),
        (0, None, "running"),
        (0, 10, "replaced"),
        (0, 10, "replaced"),
        (10, 20, "retired"),
        (10, None, "running"),
    ]
    assert log.trials[4]["config"] == {"lr": 0.2}

    ax = mbp.bracket(log, end=30, rungs=[10, 20])
    segments = {}
    for c in ax.collections:
        if isinstance(c, LineCollection) and str(c.get_label()).split(" (")[0] in (
            "retired",
            "replaced",
            "trained to the end",
        ):
            segments[c.get_label()] = sorted(
                (float(s[0, 1]), float(s[0, 0]), float(s[1, 0])) for s in c.get_segments()
            )
    # (row, start, stop): rows are trials in order of start.
    assert segments == {
        "retired (2)": [(0.0, 0.0, 20.0), (4.0, 10.0, 20.0)],
        "trained to the end (2)": [(1.0, 0.0, 30.0), (5.0, 10.0, 30.0)],
        "replaced (2)": [(2.0, 0.0, 10.0), (3.0, 0.0, 10.0)],
    }
    rung_lines = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in rung_lines] == [10, 20]
    assert ax.get_xlabel() == "step"
    with pytest.raises(ValueError, match="replace_model: log records when"):
        replace_model(mb, 0, lambda: torch.nn.Linear(3, 2), log=log)


def test_missing_matplotlib_says_how_to_install(monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"modelbatch\[plot\]"):
        mbp.loss_curves(torch.rand(4, 2))


def test_successive_halving_example_saves_its_plots(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "CUDA_VISIBLE_DEVICES": ""}
    args = ["--configs", "12", "--slots", "6", "--rung-epochs", "1", "--survivors", "2"]
    result = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "successive_halving.py"),
            *args,
            "--plot-dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("successive_halving_bracket.png", "successive_halving_hparams.png"):
        image = plt.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
