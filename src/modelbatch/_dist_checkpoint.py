"""Checkpoints of a sharded run on `torch.distributed.checkpoint`, readable under any world size.

Private to `modelbatch.distributed`, which re-exports `save`, `load` and
`DistributedCheckpoint`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import secrets
import shutil
import warnings
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._batch import ModelBatch
from ._checkpoint_format import DTYPES, dtype_name, encode
from .checkpoint import _class_path
from .checkpoint import _components as _named_components
from .nn._seeded import mix32

if TYPE_CHECKING:
    from .distributed import Context

__all__ = ["DistributedCheckpoint", "load", "save"]

_M32 = 0xFFFFFFFF


_FORMAT = "modelbatch.distributed_checkpoint"
_VERSION = 1
_META = "modelbatch.json"


@dataclass
class DistributedCheckpoint:
    """What `load` returns besides restoring the objects: step, extra and the metadata."""

    step: int
    extra: Any
    metadata: dict[str, Any] = field(repr=False)


# Tables whose models lie on their last axis: the optimizer's per-(parameter, model)
# step counts and scalars `[K, N]`, a schedule's per-(group, model) values `[G, N]`.
_MODELS_LAST = ("['step']", "['scalars']", "state['scheduler']")


def _model_axis(path: str, shapes: list[tuple[int, ...]], counts: list[int]) -> int | None:
    """The axis along which a tensor holds each rank's models, from every rank's shape; None if shared.

    An axis qualifies when on every rank it has that rank's model count and
    every other axis is the same on all ranks. Where several qualify (equal
    shards), the first is taken, or the last for the tables named in `_MODELS_LAST`.
    """
    dims = {len(s) for s in shapes}
    if len(dims) != 1:
        raise ValueError(f"distributed.save: {path} has shapes {shapes} on the ranks.")
    ok = []
    for d in range(dims.pop()):
        others = {tuple(x for i, x in enumerate(s) if i != d) for s in shapes}
        if all(s[d] == c for s, c in zip(shapes, counts)) and len(others) == 1:
            ok.append(d)
    if not ok:
        if len(set(shapes)) != 1:
            raise ValueError(
                f"distributed.save: {path} has shapes {shapes} on the ranks, which is neither "
                "one block of models per rank nor the same tensor everywhere."
            )
        return None
    return ok[-1] if any(mark in path for mark in _MODELS_LAST) else ok[0]


def _checksums(t: Tensor, words_per_piece: int = 1 << 25) -> Tensor:
    """A 32-bit hash of each model's bytes, `[n]` int64, computed where `t` lives.

    Models are hashed a few at a time, so the int64 temporaries stay small
    next to the tensor itself.
    """
    n = t.shape[0]
    raw = t.detach().contiguous().reshape(n, -1).view(torch.uint8)
    width = (raw.shape[1] + 3) // 4
    pos = mix32(torch.arange(width, device=t.device, dtype=torch.int64) + 0x9E3779B9)
    out = torch.empty(n, dtype=torch.int64, device=t.device)
    step = max(1, words_per_piece // max(1, width))
    for start in range(0, n, step):
        part = raw[start : start + step]
        if part.shape[1] % 4:
            part = torch.cat([part, part.new_zeros(part.shape[0], 4 - part.shape[1] % 4)], dim=1)
        words = part.view(torch.int32).to(torch.int64) & _M32
        out[start : start + step] = mix32(words ^ pos).sum(dim=1) & _M32
    return out


@contextlib.contextmanager
def _sharded_tensors() -> Iterator[None]:
    # ShardedTensor is what torch.distributed.checkpoint reshards with arbitrary
    # (uneven) blocks; DTensor's even chunks cannot express a balanced split.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*")
        warnings.filterwarnings("ignore", message=".*overwrit.*")
        yield
    # A ShardedTensor still alive when the process group is destroyed aborts the process.
    gc.collect()


def _as_sharded(local: Tensor, offset: int, n: int, rank: int, axis: int) -> Any:
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    offsets = [0] * local.dim()
    offsets[axis] = offset
    size = list(local.shape)
    size[axis] = n
    shard = Shard.from_tensor_and_offsets(local, offsets, rank)
    return init_from_local_shards([shard], *size)


def _components(
    model_batch: ModelBatch,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    loader: Any,
    states: Mapping[str, Any] | None,
) -> dict[str, Any]:
    optimizer = model_batch.optimizer if optimizer is None else optimizer
    scaler = model_batch.grad_scaler if scaler is None else scaler
    found = _named_components(optimizer, scheduler, scaler, loader, states)
    return {k: v for k, v in found.items() if v is not None}


def _local_ids(ctx: Context, model_batch: ModelBatch, owner: str) -> Tensor:
    ids = getattr(model_batch, "model_ids", None)
    local = ctx.local_ids
    if ids is None:
        ids = local
    if model_batch.num_models != len(local) or not torch.equal(ids.cpu(), local):
        raise ValueError(
            f"{owner}: this rank's ModelBatch holds models {ids.tolist()[:8]}..., the context's "
            f"shard is {local.tolist()[:8]}...; build it with "
            "ModelBatch.from_factory(make, ctx.shard(ids), ...)."
        )
    return ids


def _fsync_dir(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(
    path: str | os.PathLike[str],
    ctx: Context,
    model_batch: ModelBatch,
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    loader: Any = None,
    states: Mapping[str, Any] | None = None,
    step: int = 0,
    extra: Any = None,
) -> None:
    """Write the run as a `torch.distributed.checkpoint` directory, each rank its own shard.

    Call on every rank. Every tensor whose leading dimension is this rank's
    model count (weights, buffers, the active mask, optimizer moments and
    per-model hyperparameters, loader seeds...) is saved as a block of the
    global `[N, ...]` tensor, so `load` can read it back under any world
    size; other tensors are saved once. Each model's bytes get a checksum.
    The directory is written under a temporary name and renamed into place
    when complete (a previous checkpoint at `path` is moved aside first and
    deleted after), so a crash never leaves a half-written checkpoint at `path`.
    `path` must be on a file system every rank sees.

    Args:
        path: the checkpoint directory.
        ctx: the context (its shard is `model_batch`'s models).
        model_batch: this rank's models.
        optimizer: defaults to `model_batch.optimizer`.
        scheduler: any object with `state_dict()`.
        scaler: defaults to `model_batch.grad_scaler`.
        loader: a data loader with `state_dict()` (e.g. `PerModelLoader`).
        states: further objects with `state_dict()` by name.
        step: the step count, returned by `load`.
        extra: any JSON value, returned by `load`.
    """
    import torch.distributed.checkpoint as dcp

    owner = "distributed.save"
    path = Path(path)
    # Checked on every rank before the first collective: a rank that raised after it
    # would leave the others waiting in one until the process group's timeout.
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{owner}: the directory {path.parent} does not exist.")
    _local_ids(ctx, model_batch, owner)  # refuses a batch that is not this rank's block
    n_local, n = model_batch.num_models, ctx.num_models
    tree: dict[str, Any] = {
        "model": {**model_batch.stacked_params(), **model_batch.stacked_buffers()},
        "active": model_batch.active,
    }
    for key, obj in _components(model_batch, optimizer, scheduler, scaler, loader, states).items():
        tree[key] = obj.state_dict()
    tensors: dict[str, Tensor] = {}
    paths: dict[str, str] = {}
    structure = encode(tree, "t", tensors, "state", paths)
    shapes = [tuple(t.shape) for t in tensors.values()]
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, (n_local, shapes))
    counts = [c for c, _ in everyone]
    axes = {
        name: _model_axis(paths[name], [s[k] for _, s in everyone], counts)
        for k, name in enumerate(tensors)
    }
    token: list[Any] = [secrets.token_hex(6) if ctx.is_main else None]
    dist.broadcast_object_list(token, src=0)
    tmp = path.parent / f".{path.name}.tmp-{token[0]}"
    state: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    crcs: dict[str, int] = {}
    with _sharded_tensors():
        for name, t in tensors.items():
            axis = axes[name]
            if axis is not None:
                local = t.contiguous()
                sums = _checksums(local.movedim(axis, 0))
                state[name] = _as_sharded(local, ctx.offset, n, ctx.rank, axis)
                state[f"sum/{name}"] = _as_sharded(sums, ctx.offset, n, ctx.rank, 0)
                shape = list(t.shape)
                shape[axis] = n
                specs[name] = [shape, dtype_name(t.dtype), axis]
            else:
                state[name] = t
                if ctx.is_main:
                    from ._checkpoint_format import crc

                    crcs[name] = crc(t.to("cpu", copy=True).contiguous())
                specs[name] = [list(t.shape), dtype_name(t.dtype), None]
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))
        del state
    if ctx.is_main:
        meta = {
            "format": _FORMAT,
            "format_version": _VERSION,
            "num_models": n,
            "ids": ctx._ids().tolist(),
            "saved_world_size": ctx.world_size,
            "model_class": _class_path(model_batch),
            "model_tensors": sorted(tree["model"].keys()),
            "components": sorted(k for k in tree if k not in ("model", "active")),
            "tensors": specs,
            "structure": structure,
            "checksums": crcs,
            "step": int(step),
            "extra": extra,
        }
        text = json.dumps(meta)
        body = json.dumps({"meta": text, "crc32": zlib.crc32(text.encode())})
        with open(tmp / _META, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        old = path.parent / f".{path.name}.old-{token[0]}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    ctx.barrier()


def _read_meta(path: Path, owner: str) -> dict[str, Any]:
    file = path / _META
    if not file.is_file():
        raise FileNotFoundError(f"{owner}: no distributed checkpoint at {path} (no {_META}).")
    try:
        body = json.loads(file.read_text())
        text = body["meta"]
        if zlib.crc32(text.encode()) != body["crc32"]:
            raise ValueError("checksum")
        meta = json.loads(text)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{owner}: {path} is corrupted: its {_META} fails the checksum.") from e
    if meta.get("format") != _FORMAT or meta.get("format_version", 0) > _VERSION:
        raise ValueError(
            f"{owner}: {path} has format {meta.get('format')!r} version "
            f"{meta.get('format_version')}; this modelbatch reads {_FORMAT!r} up to {_VERSION}."
        )
    return meta


def load(
    path: str | os.PathLike[str],
    ctx: Context,
    model_batch: ModelBatch,
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    loader: Any = None,
    states: Mapping[str, Any] | None = None,
) -> DistributedCheckpoint:
    """Restore a run saved by `save`, under any world size: each rank reads its own models.

    Call on every rank, after `ctx.shard` with the saved run's ids and with
    `model_batch` built for this rank's shard (`ModelBatch.from_factory(make,
    ctx.shard(ids), ...)`) and the same components as were saved. Every
    loaded model's bytes are checked against their checksums before anything
    is changed.

    Returns:
        The step, extra and metadata given to `save`.

    Raises:
        ValueError: the checkpoint does not match (N, ids, class, tensors,
            components) or is corrupted; nothing has been changed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ._checkpoint_format import crc, decode

    owner = "distributed.load"
    path = Path(path)
    meta = _read_meta(path, owner)
    _local_ids(ctx, model_batch, owner)
    if meta["ids"] != ctx._ids().tolist():
        raise ValueError(
            f"{owner}: {path} holds models {meta['ids'][:8]}... (N={meta['num_models']}), the "
            f"context's ids are {ctx._ids().tolist()[:8]}... (N={ctx.num_models}); call "
            "ctx.shard with the saved run's ids."
        )
    if meta["model_class"] != _class_path(model_batch):
        raise ValueError(
            f"{owner}: {path} holds models of class {meta['model_class']}, this ModelBatch "
            f"{_class_path(model_batch)}."
        )
    own = {**model_batch.stacked_params(), **model_batch.stacked_buffers()}
    if sorted(own) != meta["model_tensors"]:
        raise ValueError(
            f"{owner}: {path} has a different architecture: tensors "
            f"{meta['model_tensors']}, the ModelBatch {sorted(own)}."
        )
    given = _components(model_batch, optimizer, scheduler, scaler, loader, states)
    if sorted(given) != meta["components"]:
        raise ValueError(
            f"{owner}: {path} holds state for {meta['components']}, given {sorted(given)}; "
            "pass the same components as were saved."
        )
    n_local, device = model_batch.num_models, model_batch.active.device
    dest: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    axes: dict[str, int] = {}
    state: dict[str, Any] = {}
    with _sharded_tensors():
        for name, (shape, dtype, axis) in meta["tensors"].items():
            dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
            if dt is None:
                raise ValueError(
                    f"{owner}: {path} is corrupted: its metadata names an unknown dtype "
                    f"{dtype!r} for {name!r} (known: {sorted(DTYPES)})."
                )
            if axis is not None:
                axes[name] = axis
                local_shape = list(shape)
                local_shape[axis] = n_local
                dest[name] = torch.empty(local_shape, dtype=dt, device=device)
                sums[name] = torch.empty(n_local, dtype=torch.int64, device=device)
                n = meta["num_models"]
                state[name] = _as_sharded(dest[name], ctx.offset, n, ctx.rank, axis)
                state[f"sum/{name}"] = _as_sharded(sums[name], ctx.offset, n, ctx.rank, 0)
            else:
                dest[name] = torch.empty(shape, dtype=dt, device=device)
                state[name] = dest[name]
        try:
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
        except (Exception, CheckpointException) as e:  # DCP raises on every rank
            first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{owner}: {path} is unreadable (truncated or corrupted): {first}"
            ) from e
        finally:
            del state
    problem = ""
    for name, t in dest.items():
        if name in sums:
            bad = (_checksums(t.movedim(axes[name], 0)) != sums[name]).nonzero().reshape(-1)
            if bad.numel():
                gid = int(ctx.local_ids[int(bad[0])])
                problem = f"model {gid}'s {name!r} fails its checksum"
                break
        elif crc(t.to("cpu", copy=True).contiguous()) != meta["checksums"].get(name, -1):
            problem = f"{name!r} fails its checksum"
            break
    # Every rank raises, not only the one that read the bad bytes.
    if ctx.any(bool(problem)):
        where = problem or "another rank's models fail their checksums"
        raise ValueError(f"{owner}: {path} is corrupted: {where}.")
    tree = decode(meta["structure"], dest)
    for name, t in own.items():
        saved = tree["model"][name]
        if saved.shape != t.shape or saved.dtype != t.dtype:
            raise ValueError(
                f"{owner}: {path} has {name!r} as {saved.dtype}{list(saved.shape)}, the "
                f"ModelBatch {t.dtype}{list(t.shape)}."
            )
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(tree["model"][name])
        model_batch.active.copy_(tree["active"])
    for key, obj in given.items():
        obj.load_state_dict(tree[key])
    ctx.barrier()
    return DistributedCheckpoint(meta["step"], meta["extra"], meta)
