"""Per-model metrics: the readable table, CSV, pandas and TensorBoard."""

from __future__ import annotations

import csv

import pytest
import torch

from modelbatch import ModelBatch, format_table, log_tensorboard, to_dataframe, write_csv


def rows() -> list[dict]:
    return [
        {"model": 0, "active": True, "lr": 1e-4, "wd": 0.0, "loss": 0.51234},
        {"model": 1, "active": False, "lr": 3e-3, "wd": 1e-3, "loss": 2.25},
        {"model": 2, "active": True, "lr": 2.5e-5, "wd": 0.1, "loss": float("nan")},
    ]


def column(table: str, name: str) -> list[str]:
    lines = table.splitlines()
    j = lines[0].split().index(name)
    return [line.split()[j] for line in lines[2:]]


def test_small_values_are_readable_and_a_column_shares_one_notation() -> None:
    table = format_table(rows())
    # Never "0.0000" for a nonzero value; the fewest digits that keep each value.
    assert column(table, "lr") == ["1.0e-04", "3.0e-03", "2.5e-05"]
    assert column(table, "wd") == ["0", "1.0e-03", "1.0e-01"]
    assert column(table, "loss") == ["0.5123", "2.2500", "nan"]
    assert column(table, "active") == ["True", "False", "True"]
    big = format_table([{"model": 0, "x": 123456.0}, {"model": 1, "x": 1.5}])
    assert column(big, "x") == ["1.235e+05", "1.500e+00"]


def test_write_csv_appends_with_one_header(tmp_path) -> None:
    path = tmp_path / "logs" / "per_model.csv"
    write_csv(path, rows(), step=10)
    write_csv(path, rows()[:1], step=20)
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert [r["step"] for r in got] == ["10", "10", "10", "20"]
    assert [r["model"] for r in got] == ["0", "1", "2", "0"]
    assert float(got[2]["lr"]) == 2.5e-5
    # Fixed columns: missing entries empty, extra ones dropped.
    other = tmp_path / "fixed.csv"
    write_csv(other, [{"model": 0, "extra": 1}], fieldnames=["model", "loss"])
    assert other.read_text().splitlines() == ["model,loss", "0,"]


def test_to_dataframe_one_row_per_model() -> None:
    pd = pytest.importorskip("pandas")
    torch.manual_seed(0)
    mb = ModelBatch([torch.nn.Linear(3, 2) for _ in range(5)])
    acc = torch.rand(5)
    df = to_dataframe(mb.summary(acc=acc))
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["model", "active", "acc"]
    assert df["model"].tolist() == list(range(5))
    assert torch.equal(torch.tensor(df["acc"].to_numpy()).float(), acc)


def test_to_dataframe_without_pandas_says_how_to_install(monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("no pandas")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError, match=r"to_dataframe: pandas is not installed"):
        to_dataframe(rows())


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            key = tag if events.parent == folder else f"{events.parent.name}:{tag}"
            found[key] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return found


def test_tensorboard_one_series_per_model(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    log_tensorboard(writer, rows(), step=3, prefix="val/")
    log_tensorboard(writer, rows()[:2], step=4, prefix="val/")
    writer.close()
    found = read_scalars(tmp_path)
    # Numeric columns only (not "model", not the bool "active"), one series per model.
    assert sorted(found) == sorted(
        f"val/{c}/model_{i}" for c in ("lr", "wd", "loss") for i in range(3)
    )
    assert found["val/lr/model_2"] == [(3, pytest.approx(2.5e-5))]
    assert found["val/loss/model_1"] == [(3, 2.25), (4, 2.25)]


def test_tensorboard_grouped(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    log_tensorboard(writer, rows(), step=7, grouped=True)
    writer.close()
    found = read_scalars(tmp_path)
    # add_scalars: one run folder per model under each column's tag, one chart per column.
    assert "lr_model_0:lr" in found
    assert found["lr_model_2:lr"] == [(7, pytest.approx(2.5e-5))]
    assert len([k for k in found if k.endswith(":loss")]) == 3
