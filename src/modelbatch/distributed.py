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

import datetime
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._batch import ModelBatch
from ._build import global_ids
from ._build import model_seeds as init_seeds
from ._dist_checkpoint import DistributedCheckpoint, load, save
from ._metrics import per_model_rows

__all__ = [
    "Context",
    "DistributedCheckpoint",
    "export_best",
    "init",
    "init_seeds",
    "load",
    "save",
    "successive_halving",
]


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
        return local

    @property
    def counts(self) -> list[int]:
        """How many models each rank holds, in rank order."""
        return _split(len(self._ids()), self.world_size)

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
        # torch._dynamo imported after the group exists (torch.optim imports it)
        # keeps the group alive past destroy_process_group: its gloo threads then
        # outlive the interpreter and abort the process at exit. Imported first,
        # the group is torn down whole.
        importlib.import_module("torch._dynamo")
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
    from .checkpoint import best_order, export_model

    gathered = ctx.gather(torch.as_tensor(metric).detach().double())
    assert gathered is not None
    order = best_order("distributed.export_best", gathered, k, largest)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids, start, count = ctx._ids(), ctx.offset, ctx.counts[ctx.rank]
    best = [(int(ids[pos]), directory / f"model_{int(ids[pos])}{suffix}", pos) for pos in order]
    for _, path, pos in best:
        if start <= pos < start + count:
            export_model(model_batch, pos - start, path)
    ctx.barrier()
    return [(gid, path) for gid, path, _ in best]
