"""Checkpoints of a whole run in one safetensors file, and export of single models.

A checkpoint holds the stacked weights and buffers `[N, ...]`, the active mask,
and, when given, the optimizer, scheduler, grad scaler and data loader state,
the step count and the random number generators' states. Tensors go into the
safetensors body under prefixed names (`model/`, `optimizer/`, ...); the
structure around them, per-model configs and versions go into its JSON
metadata, with a CRC32 of every tensor and of the metadata itself.

Writes are atomic: a temporary file in the same directory is written, synced
and renamed over the target, so a crash leaves the previous checkpoint whole;
a writer holds an advisory lock on `<path>.lock`, so a second writer of the
same path is refused. Every reader opens the file once and verifies the
checksums of what it returns, so a reader racing a writer sees the old file
or the new one, whole. `load` validates the whole file against the objects it
restores before changing any of them, and rolls back if restoring fails midway.

Example:
    >>> save("run.safetensors", mb, optimizer=opt, step=step, configs=configs)
    >>> ckpt = load("run.safetensors", mb, optimizer=opt)  # mb, opt restored
    >>> ckpt.step, load_model_state("run.safetensors", 3)["fc.weight"].shape
    (1000, torch.Size([10, 64]))
"""

from __future__ import annotations

import copy
import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._batch import ModelBatch
from ._checkpoint_format import (
    FORMAT,
    FORMAT_VERSION,
    META_CRC_KEY,
    META_KEY,
    CheckpointFile,
    atomic_write,
    bad_file,
    crc,
    decode,
    dtype_name,
    encode,
    read_all,
    rng_state,
    safetensors_module,
    set_rng_state,
)

__all__ = [
    "Checkpoint",
    "export_best",
    "export_model",
    "load",
    "load_model_state",
    "read_checkpoint",
    "save",
]

_COMPONENTS = ("optimizer", "scheduler", "scaler", "loader")


@dataclass
class Checkpoint:
    """What `load` returns besides restoring the objects it was given.

    Attributes:
        step: the step count given to `save`.
        configs: the per-model configs given to `save` (N JSON values), or None.
        extra: any JSON value given to `save`.
        metadata: the checkpoint's whole metadata (N, model class, versions, ...).
    """

    step: int
    configs: list[Any] | None
    extra: Any
    metadata: dict[str, Any] = field(repr=False)


def _class_path(model_batch: ModelBatch) -> str:
    cls = type(model_batch._export_skeleton)
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------- save


def save(
    path: str | os.PathLike[str],
    model_batch: ModelBatch,
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    loader: Any = None,
    states: Mapping[str, Any] | None = None,
    step: int = 0,
    configs: Iterable[Any] | None = None,
    extra: Any = None,
    rng: bool = True,
) -> None:
    """Write the whole run to one safetensors file, atomically.

    Args:
        path: the checkpoint file; replaced only once the new one is complete.
        model_batch: the ModelBatch whose stacked weights `[N, ...]`, buffers
            and active mask `[N]` are saved.
        optimizer: defaults to `model_batch.optimizer`.
        scheduler: any object with `state_dict()`.
        scaler: defaults to `model_batch.grad_scaler`.
        loader: a data loader with `state_dict()` (its position and seeds).
        states: further objects with `state_dict()` by name, e.g.
            `{"early_stopping": stopper}`.
        step: the step count, returned by `load`.
        configs: N per-model configs (JSON values), returned by `load`.
        extra: any JSON value, returned by `load`.
        rng: save the torch (CPU and CUDA), numpy and Python RNG states.
    """
    path = Path(path)
    optimizer = model_batch.optimizer if optimizer is None else optimizer
    scaler = model_batch.grad_scaler if scaler is None else scaler
    tensors: dict[str, Tensor] = {}
    spec: dict[str, list[Any]] = {}
    for name, t in {**model_batch.stacked_params(), **model_batch.stacked_buffers()}.items():
        tensors[f"model/{name}"] = t.detach().to("cpu", copy=True).contiguous()
        spec[name] = [list(t.shape), dtype_name(t.dtype)]
    tensors["active"] = model_batch.active.detach().to("cpu", copy=True)
    configs = None if configs is None else list(configs)
    if configs is not None and len(configs) != model_batch.num_models:
        raise ValueError(
            f"checkpoint.save: configs must have one entry per model "
            f"(N={model_batch.num_models}), got {len(configs)}."
        )
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "num_models": model_batch.num_models,
        "model_class": _class_path(model_batch),
        "tensors": spec,
        # state-dict key -> the stacked tensor that holds it (tied weights share one)
        "export_keys": dict(model_batch._state_keys),
        "step": int(step),
        "configs": configs,
        "extra": extra,
        "library_version": _library_version(),
        "torch_version": torch.__version__,
    }
    meta["components"] = {
        key: {
            "class": type(obj).__qualname__,
            "state": encode(obj.state_dict(), key, tensors, f"{_label(key)}.state_dict()"),
        }
        for key, obj in _components(optimizer, scheduler, scaler, loader, states).items()
        if obj is not None
    }
    meta["rng"] = rng_state(tensors) if rng else None
    meta["checksums"] = {name: crc(t) for name, t in tensors.items()}
    meta["layout"] = {name: [dtype_name(t.dtype), list(t.shape)] for name, t in tensors.items()}
    try:
        text = json.dumps(meta)
    except TypeError as e:
        raise TypeError(
            f"checkpoint.save: configs and extra must be JSON values (dicts, lists, numbers, "
            f"strings); {e}."
        ) from e
    metadata = {META_KEY: text, META_CRC_KEY: str(zlib.crc32(text.encode()))}
    atomic_write(path, tensors, metadata)


def _components(
    optimizer: Any, scheduler: Any, scaler: Any, loader: Any, states: Mapping[str, Any] | None
) -> dict[str, Any]:
    found = dict(zip(_COMPONENTS, (optimizer, scheduler, scaler, loader)))
    for name, obj in (states or {}).items():
        if not isinstance(name, str) or not hasattr(obj, "state_dict"):
            raise TypeError(
                f"checkpoint: states must map names to objects with state_dict(), got "
                f"{name!r}: {type(obj).__name__}."
            )
        found[f"states/{name}"] = obj
    return found


def _label(key: str) -> str:
    """How a component is named in messages: `optimizer`, or `states['name']`."""
    return f"states[{key.removeprefix('states/')!r}]" if key.startswith("states/") else key


def _library_version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------- load


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a whole checkpoint file: (metadata, tensors on the CPU).

    The file is opened once and every tensor's checksum is verified, so a
    save running over the same path yields the old file or the new one, whole.

    Raises:
        ValueError: the file is truncated, corrupted (a checksum fails), or
            a tensor is missing; the message names the problem.
    """
    return read_all(Path(path), "checkpoint.read_checkpoint")


def _check_model(
    path: Path, meta: Mapping[str, Any], tensors: Mapping[str, Tensor], model_batch: ModelBatch
) -> None:
    n = model_batch.num_models
    if meta["num_models"] != n:
        raise bad_file(
            path,
            f"holds N={meta['num_models']} models, this ModelBatch has N={n}; build the "
            f"ModelBatch from {meta['num_models']} models.",
        )
    if meta["model_class"] != _class_path(model_batch):
        raise bad_file(
            path,
            f"holds models of class {meta['model_class']}, this ModelBatch holds "
            f"{_class_path(model_batch)}; build it from the checkpoint's class.",
        )
    own = {**model_batch.stacked_params(), **model_batch.stacked_buffers()}
    saved = meta["tensors"]
    if own.keys() != saved.keys():
        raise bad_file(
            path,
            f"has a different architecture: tensors only in the checkpoint "
            f"{sorted(saved.keys() - own.keys())}, only in the ModelBatch "
            f"{sorted(own.keys() - saved.keys())}.",
        )
    for name, t in own.items():
        shape, dtype = saved[name]
        if list(t.shape) != shape or dtype_name(t.dtype) != dtype:
            raise bad_file(
                path,
                f"has a different architecture: {name!r} is {dtype}{shape} in the checkpoint, "
                f"{dtype_name(t.dtype)}{list(t.shape)} in the ModelBatch.",
            )
    # What is stored, not what the metadata says: a tensor is copied into its
    # destination as it is, never broadcast over the models or cast.
    stored = {f"model/{name}": t for name, t in own.items()}
    stored["active"] = model_batch.active
    for key, t in stored.items():
        got = tensors.get(key)
        if got is None or got.shape != t.shape or got.dtype != t.dtype:
            found = "nothing" if got is None else f"{dtype_name(got.dtype)}{list(got.shape)}"
            raise bad_file(
                path,
                f"is corrupted: it stores {found} as {key!r}, where its metadata and the "
                f"ModelBatch need {dtype_name(t.dtype)}{list(t.shape)}.",
            )


def _shape_mismatch(saved: Any, live: Any, where: str) -> str | None:
    """The first tensor whose shape differs between a saved and a live structure, described."""
    if isinstance(saved, Tensor) and isinstance(live, Tensor):
        if saved.shape != live.shape:
            return f"{where} is {tuple(saved.shape)} in the checkpoint, {tuple(live.shape)} here"
    elif isinstance(saved, Mapping) and isinstance(live, Mapping):
        for k in saved.keys() & live.keys():
            problem = _shape_mismatch(saved[k], live[k], f"{where}[{k!r}]")
            if problem:
                return problem
    return None


def _kind_mismatch(saved: Any, live: Any, where: str, n: int) -> str | None:
    """The first stored tensor that the live one would cast or broadcast, described.

    Compared where both structures hold a tensor: the dtype and the number of
    dimensions must agree, and a live per-model tensor (leading axis N) needs
    the same N (a width beyond the model axis may differ, e.g. milestone lists).
    """
    if isinstance(saved, Tensor) and isinstance(live, Tensor):
        per_model = live.dim() >= 1 and live.shape[0] == n
        if (
            saved.dtype != live.dtype
            or saved.dim() != live.dim()
            or (per_model and saved.shape[0] != n)
        ):
            return (
                f"{where} is {dtype_name(saved.dtype)}{list(saved.shape)} in the checkpoint, "
                f"{dtype_name(live.dtype)}{list(live.shape)} here"
            )
    elif isinstance(saved, Mapping) and isinstance(live, Mapping):
        for k in saved.keys() & live.keys():
            problem = _kind_mismatch(saved[k], live[k], f"{where}[{k!r}]", n)
            if problem:
                return problem
    elif isinstance(saved, (list, tuple)) and isinstance(live, (list, tuple)):
        for i, (a, b) in enumerate(zip(saved, live)):
            problem = _kind_mismatch(a, b, f"{where}[{i}]", n)
            if problem:
                return problem
    return None


def _check_optimizer(path: Path, state: Mapping[str, Any], optimizer: Any, n: int) -> None:
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not isinstance(optimizer, torch.optim.Optimizer):
        return
    own = optimizer.param_groups
    if len(groups) != len(own) or any(
        len(g["params"]) != len(o["params"]) for g, o in zip(groups, own)
    ):
        raise bad_file(
            path,
            f"has optimizer param groups of sizes {[len(g['params']) for g in groups]}, the "
            f"optimizer {[len(o['params']) for o in own]}; build it over the same parameters.",
        )
    for g, o in zip(groups, own):
        for key, value in g.items():
            problem = _shape_mismatch(value, o.get(key), f"param group entry {key!r}")
            if key != "params" and problem:
                raise bad_file(path, f"does not match the optimizer: {problem}.")
    params = {i: p for g, o in zip(groups, own) for i, p in zip(g["params"], o["params"])}
    for pid, entries in state.get("state", {}).items():
        p = params.get(pid)
        for key, value in entries.items():
            if p is None or not isinstance(value, Tensor) or value.dim() == 0:
                continue
            bad = value.shape != p.shape if value.dim() == p.dim() else value.shape[0] != n
            if bad:
                raise bad_file(
                    path,
                    f"has optimizer state {key!r} of shape {tuple(value.shape)} for a parameter "
                    f"of shape {tuple(p.shape)}; the optimizer does not match the checkpoint.",
                )


def load(
    path: str | os.PathLike[str],
    model_batch: ModelBatch,
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    loader: Any = None,
    states: Mapping[str, Any] | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> Checkpoint:
    """Restore a run saved by `save` into existing objects, all or nothing.

    Args:
        path: the checkpoint file.
        model_batch: receives the weights, buffers and active mask (same N,
            model class and tensor shapes as the checkpoint).
        optimizer: defaults to `model_batch.optimizer`.
        scheduler: receives its saved state.
        scaler: receives its saved state; defaults to `model_batch.grad_scaler`.
        loader: receives its saved position and seeds.
        states: further objects with `load_state_dict()`, by the names given to `save`.
        restore_rng: restore the saved RNG states, so that training on is
            bitwise the same as never stopping.
        strict: refuse a checkpoint holding state for a component that was
            not given (an optimizer, say), since training on without it would
            not continue the run.

    Returns:
        The `Checkpoint`: step, per-model configs, extra, metadata.

    Raises:
        ValueError: the file is truncated or corrupted, or does not match
            the objects; nothing has been changed.
    """
    path = Path(path)
    optimizer = model_batch.optimizer if optimizer is None else optimizer
    scaler = model_batch.grad_scaler if scaler is None else scaler
    meta, tensors = read_all(path, "checkpoint.load")
    _check_model(path, meta, tensors, model_batch)
    given = _components(optimizer, scheduler, scaler, loader, states)
    saved = meta["components"]
    restoring: dict[str, Any] = {}
    for key in sorted(set(given) | set(saved), key=lambda k: (k.startswith("states/"), k)):
        obj, entry, label = given.get(key), saved.get(key), _label(key)
        if obj is None:
            if entry is not None and strict:
                raise bad_file(
                    path,
                    f"holds {label} state ({entry['class']}) but no {label} was given; pass "
                    f"it to restore it, or strict=False to skip it.",
                )
            continue
        if entry is None:
            raise bad_file(path, f"holds no {label} state, but a {label} was given; leave it out.")
        if entry["class"] != type(obj).__qualname__:
            raise bad_file(
                path,
                f"holds {label} state of a {entry['class']}, the given {label} is a "
                f"{type(obj).__qualname__}; build the same {label} as the saved run.",
            )
        try:
            state = decode(entry["state"], tensors)
        except (ValueError, TypeError, KeyError) as e:
            raise bad_file(path, f"is corrupted: {e} (in its {label} state).") from e
        restoring[key] = (obj, state)
    if "optimizer" in restoring:
        _check_optimizer(path, restoring["optimizer"][1], optimizer, model_batch.num_models)
    for key, (obj, state) in restoring.items():
        problem = _kind_mismatch(state, obj.state_dict(), "", model_batch.num_models)
        if problem:
            raise bad_file(
                path,
                f"does not match the {_label(key)}: its state entry {problem}; nothing is cast "
                f"or broadcast. Build the same {_label(key)} as the saved run.",
            )
    if restore_rng and meta.get("rng") is None:
        raise bad_file(path, "holds no RNG states; pass restore_rng=False.")

    own = {**model_batch.stacked_params(), **model_batch.stacked_buffers()}
    backup = {
        "model": {k: t.detach().clone() for k, t in own.items()},
        "active": model_batch.active.clone(),
        **{k: copy.deepcopy(obj.state_dict()) for k, (obj, _) in restoring.items()},
    }
    rng_backup: dict[str, Tensor] = {}
    rng_meta = rng_state(rng_backup) if restore_rng else None
    try:
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(tensors[f"model/{name}"])
            model_batch.active.copy_(tensors["active"])
        for obj, state in restoring.values():
            obj.load_state_dict(state)
        if restore_rng:
            set_rng_state(meta["rng"], tensors)
    except Exception:
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(backup["model"][name])
            model_batch.active.copy_(backup["active"])
        for key, (obj, _) in restoring.items():
            obj.load_state_dict(backup[key])
        if rng_meta is not None:
            set_rng_state(rng_meta, rng_backup)
        raise
    return Checkpoint(meta["step"], meta["configs"], meta["extra"], meta)


# ---------------------------------------------------------------------- single models


def _model_rows(f: CheckpointFile, indices: list[int]) -> list[dict[str, Tensor]]:
    """Models `indices`' ordinary state dicts from one opened checkpoint.

    Every stacked tensor they come from has its checksum verified first (its
    bytes are streamed, not kept); then only each model's slice is read.
    """
    meta, n = f.meta, f.meta["num_models"]
    keys: dict[str, str] = meta["export_keys"]
    for name in dict.fromkeys(keys.values()):
        entry = f.entry(f"model/{name}")
        if not entry.shape or entry.shape[0] != n:
            raise bad_file(
                f.path,
                f"is corrupted: 'model/{name}' has shape {list(entry.shape)}, not [N={n}, ...].",
                f.owner,
            )
        f.verify(f"model/{name}")
    states = []
    for i in indices:
        rows: dict[str, Tensor] = {}
        for name in keys.values():
            if name not in rows:
                rows[name] = f.row(f"model/{name}", i)
        # Tied weights: each key gets its own tensor, as from safetensors' slices
        # (safetensors refuses to save one tensor under two names).
        used: set[str] = set()
        state = {}
        for key, name in keys.items():
            state[key] = rows[name].clone() if name in used else rows[name]
            used.add(name)
        states.append(state)
    return states


def _model_index(owner: str, index: int, n: int) -> int:
    if not -n <= index < n:
        raise IndexError(f"{owner}: index {index} out of range for N={n} models.")
    return index % n


def load_model_state(path: str | os.PathLike[str], index: int) -> dict[str, Tensor]:
    """Model `index`'s ordinary state dict, read from a checkpoint without the others.

    The file is opened once; the checksums of the stacked tensors the model
    comes from are verified (streamed), then only slice `index` of each is
    read. The result loads into the user's class with `load_state_dict`.

    Raises:
        ValueError: the file is truncated or corrupted (a checksum fails).
    """
    owner = "checkpoint.load_model_state"
    with CheckpointFile(Path(path), owner) as f:
        i = _model_index(owner, index, f.meta["num_models"])
        return _model_rows(f, [i])[0]


def _write_state(state: Mapping[str, Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors_module().save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(dict(state), path)
    return path


def export_model(
    source: ModelBatch | str | os.PathLike[str], index: int, path: str | os.PathLike[str]
) -> Path:
    """Write model `index` as an ordinary state dict file.

    The file is a `torch.save`d dict of tensors (or safetensors when `path`
    ends in `.safetensors`): `MyNet().load_state_dict(torch.load(path))` needs
    no modelbatch.

    Args:
        source: a ModelBatch, or a checkpoint file (read as by `load_model_state`,
            checksums verified).
        index: the model.
        path: the output file.
    """
    owner = "checkpoint.export_model"
    if isinstance(source, ModelBatch):
        i = _model_index(owner, index, source.num_models)
        state = {k: v.cpu() for k, v in source._model_state(i).items()}
    else:
        with CheckpointFile(Path(source), owner) as f:
            state = _model_rows(f, [_model_index(owner, index, f.meta["num_models"])])[0]
    return _write_state(state, Path(path))


def best_order(owner: str, metric: Tensor, k: int, largest: bool) -> list[int]:
    """Positions of the `k` best values of `metric` `[N]`, best first; NaN ranks last, ties keep order."""
    values = metric.detach().double().cpu()
    values = -values if largest else values
    values = torch.where(values.isnan(), torch.full_like(values, math.inf), values)
    order = torch.argsort(values, stable=True).tolist()
    if not 1 <= k <= len(order):
        raise ValueError(f"{owner}: k must be in [1, {len(order)}], got {k}.")
    return order[:k]


def export_best(
    source: ModelBatch | str | os.PathLike[str],
    metric: Tensor | Iterable[float],
    k: int,
    directory: str | os.PathLike[str],
    *,
    largest: bool = True,
    suffix: str = ".pt",
) -> list[tuple[int, Path]]:
    """Export the best `k` models by a metric `[N]` as `model_<index><suffix>` files.

    From a checkpoint file, the file is opened once and its checksums are
    verified before any model is written, so all k models come from one
    checkpoint even while another process saves over it.

    Args:
        source: a ModelBatch or a checkpoint file.
        metric: one value per model; NaN ranks last.
        k: how many models.
        directory: where the files go (created if needed).
        largest: whether larger is better (accuracy) or smaller (loss).
        suffix: `.pt` (torch.save) or `.safetensors`.

    Returns:
        `(index, path)` pairs, best first.
    """
    owner = "checkpoint.export_best"
    values = torch.as_tensor(metric, dtype=torch.float64).detach().cpu().reshape(-1)
    f = None if isinstance(source, ModelBatch) else CheckpointFile(Path(source), owner)
    try:
        n = f.meta["num_models"] if f is not None else source.num_models  # type: ignore[union-attr]
        if values.numel() != n:
            raise ValueError(
                f"{owner}: metric must have one value per model (N={n}), got {values.numel()}."
            )
        best = best_order(owner, values, k, largest)
        if f is not None:
            states = _model_rows(f, best)
        else:
            assert isinstance(source, ModelBatch)
            states = [{key: v.cpu() for key, v in source._model_state(i).items()} for i in best]
    finally:
        if f is not None:
            f.close()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [
        (i, _write_state(state, directory / f"model_{i}{suffix}")) for i, state in zip(best, states)
    ]
