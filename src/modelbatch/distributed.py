"""The model axis sharded over processes launched by `torchrun`: one process per GPU.

Each rank (process) owns a contiguous block of global model ids and trains
them as an ordinary `ModelBatch`: independent models need no gradient
communication, so a training step never talks to another rank. What crosses
ranks is small and explicit: per-model metrics gathered by global id,
lifecycle decisions computed identically on every rank from those metrics
(each rank then applies its own part), and checkpoints written shard by shard
with `torch.distributed.checkpoint` and read back under any world size.

A model's init and dropout masks (`ModelBatch.from_factory`), its data order
(`data_seeds`) and its hyperparameters (index them by global id) depend only on
its global id and the run's seed, so a sweep gives the same models with 1, 2
or 64 processes.

Example:
    >>> # torchrun --nproc-per-node 8 sweep.py
    >>> ctx = modelbatch.distributed.init()          # NCCL on GPUs, gloo on CPUs
    >>> ids = ctx.shard(range(100_000))              # this rank's global ids
    >>> mb = ModelBatch.from_factory(make_model, ids, seed=0, device=ctx.device)
    >>> ...                                          # the usual loop, no communication
    >>> ctx.gather(mb.latest_losses).shape           # on every rank, by global id
    torch.Size([100000])
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import secrets
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._batch import ModelBatch
from ._build import global_ids
from ._metrics import per_model_rows
from .nn._seeded import mix32

__all__ = [
    "Context",
    "DistributedCheckpoint",
    "export_best",
    "init",
    "load",
    "save",
    "successive_halving",
]

_M32 = 0xFFFFFFFF


def _split(n: int, world: int) -> list[int]:
    """Balanced contiguous blocks: the first `n % world` ranks hold one model more."""
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


@dataclass(eq=False)
class Context:
    """This process's place in the run: rank, world size, device, and the model shard.

    Built by `init()`. `shard(ids)` splits the global model ids into
    contiguous blocks (sizes differ by at most one) and remembers the split;
    `gather`, `local`, `decide` and `summary` then speak of the models by
    their position in `ids` (for `range(N)`, their global id).

    Attributes:
        rank: this process's rank, in `[0, world_size)`.
        world_size: how many processes.
        local_rank: the rank on this node (picks the GPU).
        device: this rank's device (`cuda:<local_rank>` with NCCL, else CPU).
        backend: `"nccl"` or `"gloo"`.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool = False
    ids: Tensor | None = field(default=None, repr=False)
    counts: list[int] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ the shard

    def block(self, ids: int | Sequence[int] | Tensor) -> Tensor:
        """This rank's contiguous block of `ids` (or of `range(n)`), `[n_local]` int64, unrecorded."""
        all_ids = global_ids("Context.shard", ids)
        counts = _split(len(all_ids), self.world_size)
        if min(counts) == 0:
            raise ValueError(
                f"Context.shard: {len(all_ids)} models cannot give each of the "
                f"{self.world_size} ranks at least one; run with at most {len(all_ids)} "
                "processes or more models."
            )
        start = sum(counts[: self.rank])
        return all_ids[start : start + counts[self.rank]].clone()

    def shard(self, ids: int | Sequence[int] | Tensor) -> Tensor:
        """Split the global model ids over the ranks and return this rank's block, `[n_local]`.

        Example:
            >>> ctx.shard(range(7))   # rank 0 of 2; rank 1 gets tensor([4, 5, 6])
            tensor([0, 1, 2, 3])
        """
        local = self.block(ids)
        self.ids = global_ids("Context.shard", ids)
        self.counts = _split(len(self.ids), self.world_size)
        return local

    @property
    def num_models(self) -> int:
        """N, the number of models over all ranks."""
        return len(self._ids())

    @property
    def local_ids(self) -> Tensor:
        """This rank's global ids, `[n_local]`."""
        start = self.offset
        return self._ids()[start : start + self.counts[self.rank]]

    @property
    def offset(self) -> int:
        """Position of this rank's first model in `ids`."""
        self._ids()
        return sum(self.counts[: self.rank])

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs and writes reports)."""
        return self.rank == 0

    def _ids(self) -> Tensor:
        if self.ids is None:
            raise RuntimeError(
                "modelbatch.distributed: no model shard yet; call ctx.shard(ids) first."
            )
        return self.ids

    def data_seeds(self, seed: int) -> Tensor:
        """Per-model data seeds `[n_local]` for `PerModelLoader(..., seed=...)`.

        Model `id` gets `modelbatch.data.model_seeds(seed, id + 1)[id]`, the seed
        a one-process `PerModelLoader(seed=seed)` over `range(N)` gives it, so
        its sample order is the same under any world size.
        """
        from .data import model_seeds

        local = self.local_ids
        return model_seeds(seed, int(local.max()) + 1)[local]

    # ------------------------------------------------------------------ communication

    def gather(self, values: Tensor, *, dst: int | None = None) -> Tensor | None:
        """This rank's per-model values `[n_local, ...]` gathered into `[N, ...]` by position.

        Args:
            values: one entry per local model (e.g. `mb.latest_losses`).
            dst: None gathers to every rank; a rank gathers to that rank
                only (the others get None).

        Returns:
            `[N, ...]` on `values`' device, entry k for the model `ids[k]`.
        """
        counts = self.counts
        self._ids()
        if values.dim() == 0 or values.shape[0] != counts[self.rank]:
            raise ValueError(
                f"Context.gather: expected [n_local={counts[self.rank]}, ...] values of this "
                f"rank's models, got shape {tuple(values.shape)}."
            )
        is_bool = values.dtype == torch.bool
        out_device = values.device
        send = values.detach().to(self.device)
        if is_bool:
            send = send.to(torch.uint8)
        width = max(counts)
        if send.shape[0] < width:
            pad = send.new_zeros((width - send.shape[0], *send.shape[1:]))
            send = torch.cat([send, pad])
        send = send.contiguous()
        if dst is None:
            parts = [torch.empty_like(send) for _ in range(self.world_size)]
            dist.all_gather(parts, send)
        else:
            parts = (
                [torch.empty_like(send) for _ in range(self.world_size)] if dst == self.rank else []
            )
            dist.gather(send, parts if dst == self.rank else None, dst=dst)
            if dst != self.rank:
                return None
        out = torch.cat([p[:c] for p, c in zip(parts, counts)])
        return (out.bool() if is_bool else out).to(out_device)

    def local(self, values: Tensor) -> Tensor:
        """This rank's part `[n_local, ...]` of per-model values over all models `[N, ...]`."""
        n = self.num_models
        if values.dim() == 0 or values.shape[0] != n:
            raise ValueError(
                f"Context.local: expected [N={n}, ...] values of all models, got shape "
                f"{tuple(values.shape)}."
            )
        return values[self.offset : self.offset + self.counts[self.rank]]

    def decide(self, rule: Callable[..., Tensor], *values: Tensor) -> Tensor:
        """Apply a lifecycle rule to gathered metrics, identically on every rank; this rank's part.

        Args:
            rule: `(*[N, ...] values) -> [N, ...]`, a deterministic function
                of the gathered values (e.g. which models to retire).
            *values: per-model values of this rank's models, `[n_local, ...]` each.

        Returns:
            This rank's part of `rule`'s answer, `[n_local, ...]`.

        Example:
            >>> retire = ctx.decide(lambda loss: loss > loss.median(), val_loss)
            >>> mb.retire(retire)
        """
        gathered = [self.gather(v) for v in values]
        return self.local(rule(*gathered))

    def any(self, flag: bool | Tensor) -> bool:
        """Whether `flag` holds on any rank (e.g. `ctx.any(mb.active.any())`)."""
        t = torch.tensor([1 if bool(flag) else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def summary(self, model_batch: ModelBatch, **columns: Tensor) -> list[dict[str, Any]]:
        """`model_batch.summary` of every rank's models, rows named by global id, on every rank.

        Args:
            model_batch: this rank's models.
            **columns: further `[n_local]` per-model tensors.
        """
        base: dict[str, Tensor] = {"active": model_batch.active}
        if model_batch.latest_losses is not None:
            base["loss"] = model_batch.latest_losses
        gathered = {}
        for name, col in {**base, **columns}.items():
            g = self.gather(torch.as_tensor(col, device=model_batch.active.device))
            assert g is not None
            gathered[name] = g
        return per_model_rows(gathered, self.num_models, ids=self._ids())

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down, if `init` created it."""
        if self.owns_group and dist.is_initialized():
            # No rank tears its end down while another still talks to it.
            self.barrier()
            dist.destroy_process_group()
        self.owns_group = False

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def init(
    backend: str | None = None,
    *,
    device: torch.device | str | None = None,
    timeout: datetime.timedelta | None = None,
) -> Context:
    """Join the run: the process group from torchrun's environment, and this rank's device.

    Under `torchrun` (or any launcher that sets `RANK`, `WORLD_SIZE`,
    `MASTER_ADDR`, `MASTER_PORT`, `LOCAL_RANK`: SLURM with a few exports, Ray
    Train's TorchTrainer...) this is `init_process_group(init_method="env://")`;
    run as a plain script, it is a world of one process (an in-memory store),
    so the same program runs with and without a launcher. An existing
    process group is adopted as it is.

    Args:
        backend: `"nccl"` (the default when CUDA is available) or `"gloo"`.
        device: this rank's device; default `cuda:<LOCAL_RANK>` with NCCL, else CPU.
        timeout: for the process group's collectives.

    Returns:
        The `Context`; use it as a context manager to tear the group down at exit.
    """
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend not in ("nccl", "gloo"):
            raise ValueError(
                f"modelbatch.distributed.init: backend must be 'nccl' or 'gloo', got {backend!r}."
            )
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise ValueError(
                    "modelbatch.distributed.init: backend='nccl' needs CUDA; pass backend='gloo'."
                )
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        if "RANK" in env and "WORLD_SIZE" in env:
            dist.init_process_group(backend, init_method="env://", **kwargs)
        else:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, **kwargs)
        owns = True
    backend = str(dist.get_backend())
    if device is None:
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
    return Context(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=torch.device(device),
        backend=backend,
        owns_group=owns,
    )


# ---------------------------------------------------------------------- lifecycle


def successive_halving(
    ctx: Context,
    model_batch: ModelBatch,
    metric: Tensor,
    *,
    keep: float = 0.5,
    mode: str = "min",
) -> Tensor:
    """One successive-halving round over all ranks: keep the best `keep` share of the active models.

    Every rank gathers the metric and the active mask, ranks the active models
    (ties by position, NaN last) and retires the rest of its own models.

    Args:
        ctx: the context whose shard `model_batch` holds.
        model_batch: this rank's models.
        metric: `[n_local]` validation metric of this rank's models.
        keep: the share of the active models that stays (at least one stays).
        mode: `"min"` (a loss) or `"max"` (an accuracy).

    Returns:
        `[n_local]` bool: this rank's models retired by this round.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"successive_halving: mode must be 'min' or 'max', got {mode!r}.")
    if not 0 < keep <= 1:
        raise ValueError(f"successive_halving: keep must be in (0, 1], got {keep!r}.")

    def rule(values: Tensor, active: Tensor) -> Tensor:
        v = values.double() if mode == "min" else -values.double()
        v = torch.where(active & ~v.isnan(), v, torch.full_like(v, float("inf")))
        order = torch.argsort(v, stable=True)
        n_keep = max(1, int(int(active.sum()) * keep))
        survivors = torch.zeros_like(active)
        survivors[order[:n_keep]] = True
        return active & ~survivors

    retire = ctx.decide(rule, metric.detach(), model_batch.active)
    model_batch.active &= ~retire
    return retire


def export_best(
    ctx: Context,
    model_batch: ModelBatch,
    metric: Tensor,
    k: int,
    directory: str | os.PathLike[str],
    *,
    largest: bool = True,
    suffix: str = ".pt",
) -> list[tuple[int, Path]]:
    """Export the best `k` models of all ranks as `model_<global id><suffix>`; each rank writes its own.

    Args:
        ctx: the context whose shard `model_batch` holds.
        model_batch: this rank's models.
        metric: `[n_local]`, one value per local model; NaN ranks last.
        k: how many models over all ranks.
        directory: where the files go (created if needed; seen by every rank).
        largest: whether larger is better (accuracy) or smaller (loss).
        suffix: `.pt` (torch.save) or `.safetensors`.

    Returns:
        `(global id, path)` pairs, best first, on every rank.
    """
    from .checkpoint import export_model

    gathered = ctx.gather(torch.as_tensor(metric).detach().double())
    assert gathered is not None
    values = -gathered if largest else gathered
    values = torch.where(values.isnan(), torch.full_like(values, float("inf")), values)
    order = torch.argsort(values.cpu(), stable=True).tolist()
    if not 1 <= k <= len(order):
        raise ValueError(f"distributed.export_best: k must be in [1, {len(order)}], got {k}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids, start, count = ctx._ids(), ctx.offset, ctx.counts[ctx.rank]
    best = [(int(ids[pos]), directory / f"model_{int(ids[pos])}{suffix}", pos) for pos in order[:k]]
    for _, path, pos in best:
        if start <= pos < start + count:
            export_model(model_batch, pos - start, path)
    ctx.barrier()
    return [(gid, path) for gid, path, _ in best]


# ---------------------------------------------------------------------- checkpoints

_FORMAT = "modelbatch.distributed_checkpoint"
_VERSION = 1
_META = "modelbatch.json"


@dataclass
class DistributedCheckpoint:
    """What `load` returns besides restoring the objects: step, extra and the metadata."""

    step: int
    extra: Any
    metadata: dict[str, Any] = field(repr=False)


def _flatten(obj: Any, prefix: str, tensors: dict[str, Tensor], where: str) -> Any:
    """A JSON structure for `obj` (the checkpoint format's encoding), tensors kept in place."""
    from ._checkpoint_format import encode

    if isinstance(obj, Tensor):
        name = f"{prefix}/{len(tensors)}"
        tensors[name] = obj.detach()
        return {"__tensor__": name}
    if isinstance(obj, Mapping):
        return {
            "__dict__": [
                [
                    _flatten(k, prefix, tensors, where),
                    _flatten(v, prefix, tensors, f"{where}[{k!r}]"),
                ]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, prefix, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, prefix, tensors, where) for v in obj]
    return encode(obj, prefix, tensors, where)


def _checksums(t: Tensor) -> Tensor:
    """A 32-bit hash of each model's bytes, `[n]` int64, computed where `t` lives."""
    n = t.shape[0]
    raw = t.detach().contiguous().reshape(n, -1).view(torch.uint8)
    if raw.shape[1] % 4:
        raw = torch.cat([raw, raw.new_zeros(n, 4 - raw.shape[1] % 4)], dim=1)
    words = raw.view(torch.int32).to(torch.int64) & _M32
    pos = mix32(torch.arange(words.shape[1], device=t.device, dtype=torch.int64) + 0x9E3779B9)
    return mix32(words ^ pos).sum(dim=1) & _M32


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


def _as_sharded(local: Tensor, offset: int, n: int, rank: int) -> Any:
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    shard = Shard.from_tensor_and_offsets(local, [offset] + [0] * (local.dim() - 1), rank)
    return init_from_local_shards([shard], n, *local.shape[1:])


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
    found = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "loader": loader}
    found.update({f"states/{k}": v for k, v in (states or {}).items()})
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
    ids = _local_ids(ctx, model_batch, owner)
    del ids
    n_local, n = model_batch.num_models, ctx.num_models
    tree: dict[str, Any] = {
        "model": {**model_batch.stacked_params(), **model_batch.stacked_buffers()},
        "active": model_batch.active,
    }
    for key, obj in _components(model_batch, optimizer, scheduler, scaler, loader, states).items():
        tree[key] = obj.state_dict()
    tensors: dict[str, Tensor] = {}
    structure = _flatten(tree, "t", tensors, "state")
    shapes = [(name, tuple(t.shape)) for name, t in tensors.items()]
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, (n_local, shapes))
    sharded = {
        name
        for k, (name, shape) in enumerate(shapes)
        if all(len(s[k][1]) >= 1 and s[k][1][0] == c for c, s in everyone)
    }
    token: list[Any] = [secrets.token_hex(6) if ctx.is_main else None]
    dist.broadcast_object_list(token, src=0)
    tmp = path.parent / f".{path.name}.tmp-{token[0]}"
    if ctx.is_main and not path.parent.is_dir():
        raise FileNotFoundError(f"{owner}: the directory {path.parent} does not exist.")
    state: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    crcs: dict[str, int] = {}
    with _sharded_tensors():
        for name, t in tensors.items():
            if name in sharded:
                local = t.contiguous()
                state[name] = _as_sharded(local, ctx.offset, n, ctx.rank)
                state[f"sum/{name}"] = _as_sharded(_checksums(local), ctx.offset, n, ctx.rank)
                specs[name] = [[n, *t.shape[1:]], str(t.dtype).removeprefix("torch."), True]
            else:
                state[name] = t
                if ctx.is_main:
                    from ._checkpoint_format import crc

                    crcs[name] = crc(t.to("cpu", copy=True).contiguous())
                specs[name] = [list(t.shape), str(t.dtype).removeprefix("torch."), False]
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


def _class_path(model_batch: ModelBatch) -> str:
    cls = type(model_batch._export_skeleton)
    return f"{cls.__module__}.{cls.__qualname__}"


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
    state: dict[str, Any] = {}
    with _sharded_tensors():
        for name, (shape, dtype, is_sharded) in meta["tensors"].items():
            dt = getattr(torch, dtype)
            if is_sharded:
                dest[name] = torch.empty(n_local, *shape[1:], dtype=dt, device=device)
                sums[name] = torch.empty(n_local, dtype=torch.int64, device=device)
                state[name] = _as_sharded(dest[name], ctx.offset, meta["num_models"], ctx.rank)
                state[f"sum/{name}"] = _as_sharded(
                    sums[name], ctx.offset, meta["num_models"], ctx.rank
                )
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
            bad = (_checksums(t) != sums[name]).nonzero().reshape(-1)
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
