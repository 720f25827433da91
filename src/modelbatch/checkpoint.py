"""Checkpoints of a whole run in one safetensors file, and export of single models.

A checkpoint holds the stacked weights and buffers `[N, ...]`, the active mask,
and, when given, the optimizer, scheduler, grad scaler and data loader state,
the step count and the random number generators' states. Tensors go into the
safetensors body under prefixed names (`model/`, `optimizer/`, ...); the
structure around them, per-model configs and versions go into its JSON
metadata, with a CRC32 of every tensor and of the metadata itself.

Writes are atomic: a temporary file in the same directory is written, synced
and renamed over the target, so a crash leaves the previous checkpoint whole.
`load` validates the whole file against the objects it restores before
changing any of them, and rolls back if restoring fails midway.

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
    atomic_write,
    bad_file,
    crc,
    decode,
    encode,
    open_checkpoint,
    read_all,
    read_meta,
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
        spec[name] = [list(t.shape), str(t.dtype).removeprefix("torch.")]
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

    Raises:
        ValueError: the file is truncated, corrupted (a checksum fails), or
            a tensor is missing; the message names the problem.
    """
    return read_all(Path(path), "checkpoint.read_checkpoint")


def _check_model(path: Path, meta: Mapping[str, Any], model_batch: ModelBatch) -> None:
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
        if list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
            raise bad_file(
                path,
                f"has a different architecture: {name!r} is {dtype}{shape} in the checkpoint, "
                f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} in the ModelBatch.",
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
    _check_model(path, meta, model_batch)
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
        restoring[key] = (obj, decode(entry["state"], tensors))
    if "optimizer" in restoring:
        _check_optimizer(path, restoring["optimizer"][1], optimizer, model_batch.num_models)
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


def load_model_state(path: str | os.PathLike[str], index: int) -> dict[str, Tensor]:
    """Model `index`'s ordinary state dict, read from a checkpoint without the others.

    Only slice `index` of each stacked tensor is read from disk (safetensors
    slices); the result loads into the user's class with `load_state_dict`.
    The per-tensor checksums cover whole tensors and are not verified here.
    """
    path = Path(path)
    owner = "checkpoint.load_model_state"
    with open_checkpoint(path, owner) as handle:
        meta = read_meta(path, handle, owner)
        n = meta["num_models"]
        if not -n <= index < n:
            raise IndexError(f"{owner}: index {index} out of range for N={n} models.")
        try:
            return {
                key: handle.get_slice(f"model/{name}")[index % n]
                for key, name in meta["export_keys"].items()
            }
        except Exception as e:
            raise bad_file(path, f"is truncated or corrupted: {e}", owner) from e


def export_model(
    source: ModelBatch | str | os.PathLike[str], index: int, path: str | os.PathLike[str]
) -> Path:
    """Write model `index` as an ordinary state dict file.

    The file is a `torch.save`d dict of tensors (or safetensors when `path`
    ends in `.safetensors`): `MyNet().load_state_dict(torch.load(path))` needs
    no modelbatch.

    Args:
        source: a ModelBatch, or a checkpoint file (read via slices).
        index: the model.
        path: the output file.
    """
    if isinstance(source, ModelBatch):
        if not -source.num_models <= index < source.num_models:
            raise IndexError(
                f"checkpoint.export_model: index {index} out of range for "
                f"N={source.num_models} models."
            )
        state = {k: v.cpu() for k, v in source._model_state(index % source.num_models).items()}
    else:
        state = load_model_state(source, index)
    path = Path(path)
    if path.suffix == ".safetensors":
        safetensors_module().save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


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
    values = torch.as_tensor(metric, dtype=torch.float64).detach().cpu().reshape(-1)
    if isinstance(source, ModelBatch):
        n = source.num_models
    else:
        with open_checkpoint(Path(source), "checkpoint.export_best") as handle:
            n = read_meta(Path(source), handle, "checkpoint.export_best")["num_models"]
    if values.numel() != n:
        raise ValueError(
            f"checkpoint.export_best: metric must have one value per model (N={n}), "
            f"got {values.numel()}."
        )
    values = -values if largest else values
    values = torch.where(values.isnan(), torch.full_like(values, math.inf), values)
    order = torch.argsort(values, stable=True).tolist()
    if not 1 <= k <= len(order):
        raise ValueError(f"checkpoint.export_best: k must be in [1, {len(order)}], got {k}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [(i, export_model(source, i, directory / f"model_{i}{suffix}")) for i in order[:k]]
