"""Train more models than fit on the GPU: the model axis in chunks through one worker.

The models live in a "store" `ModelBatch` (on the GPU, or in pinned host
memory with `offload=True`); one chunk-sized worker `ModelBatch` with its own
optimizer and captured step (`compile_step`, one CUDA graph for the one chunk
shape) trains them a chunk at a time. Per chunk the worker's tensors are
overwritten in place with the chunk's weights, buffers, active mask,
optimizer state, hyperparameters and step counts, the chunk runs every batch
of the round, and the results are written back. Models are independent, so
this is exact: on the CPU chunked training gives bitwise the models of
unchunked training, whatever the chunk size (tested). On CUDA the kernels a
chunk runs may differ with its shape (cuBLAS picks per shape), so results
agree to the GPU tolerance tier rather than bitwise.

A round of several batches per chunk amortizes the transfers: with offload,
each chunk's weights and optimizer state cross the PCIe bus twice per round,
not per step. The next chunk is copied in on a side stream while the current
one computes, and the finished one is copied out behind it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._batch import ModelBatch
from ._stack import materialize, replace_stacked

__all__ = ["ChunkedTrainer"]


Pair = tuple[Tensor, Tensor, "int | None"]


def _part(t: Tensor, axis: int | None, start: int, m: int) -> Tensor:
    """Models `[start, start + m)` of `t` along its model axis (all of it when None)."""
    return t if axis is None else t.narrow(axis, start, m)


def _model_axis(worker: Tensor, store: Tensor) -> int | None:
    """The axis along which a worker tensor holds fewer models than the store's (None: same shape)."""
    if worker.shape == store.shape:
        return None
    for d, (a, b) in enumerate(zip(worker.shape, store.shape)):
        if a != b:
            return d
    raise ValueError(
        f"ChunkedTrainer: cannot tell the model axis of a worker tensor {tuple(worker.shape)} "
        f"against the store's {tuple(store.shape)}."
    )


class _Mover:
    """Copies between the worker's tensors `[C, ...]` and slices of the store's `[N, ...]`.

    With the store in host memory and the worker on a GPU, copies in go
    through a staging set filled on a side stream (the next chunk's, while
    the current one computes), and copies out through another, drained on
    the side stream behind the compute. The pairs are listed again at every
    copy: an optimizer may replace a state tensor (a new memory layout).
    """

    def __init__(self, pairs: Callable[[], list[Pair]], device: torch.device) -> None:
        self.pairs = pairs
        first = pairs()
        store_device = first[0][1].device if first else device
        self.device = device
        self.async_ = device.type == "cuda" and store_device.type == "cpu"
        if self.async_:
            self.side = torch.cuda.Stream(device)
            self.stage_in = [torch.empty_like(w) for w, _, _ in first]
            self.stage_out = [torch.empty_like(w) for w, _, _ in first]
            self.fetched: Any = None
            self.in_free = torch.cuda.Event()
            self.out_free = torch.cuda.Event()
            self.in_free.record(torch.cuda.current_stream(device))
            self.out_free.record(torch.cuda.current_stream(device))

    def prefetch(self, start: int, stop: int) -> None:
        if not self.async_:
            return
        with torch.cuda.stream(self.side):
            self.side.wait_event(self.in_free)
            m = stop - start
            for stage, (_, store, axis) in zip(self.stage_in, self.pairs()):
                _part(stage, axis, 0, m).copy_(_part(store, axis, start, m), non_blocking=True)
            self.fetched = (start, stop, torch.cuda.Event())
            self.fetched[2].record(self.side)

    def load(self, start: int, stop: int) -> None:
        m = stop - start
        with torch.no_grad():
            if not self.async_:
                for worker, store, axis in self.pairs():
                    _part(worker, axis, 0, m).copy_(_part(store, axis, start, m))
                return
            if self.fetched is None or self.fetched[:2] != (start, stop):
                self.prefetch(start, stop)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.fetched[2])
            for stage, (worker, _, axis) in zip(self.stage_in, self.pairs()):
                _part(worker, axis, 0, m).copy_(_part(stage, axis, 0, m))
            self.in_free.record(current)
            self.fetched = None

    def save(self, start: int, stop: int) -> None:
        m = stop - start
        with torch.no_grad():
            if not self.async_:
                for worker, store, axis in self.pairs():
                    _part(store, axis, start, m).copy_(_part(worker, axis, 0, m))
                return
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.out_free)
            pairs = self.pairs()
            for stage, (worker, _, axis) in zip(self.stage_out, pairs):
                _part(stage, axis, 0, m).copy_(_part(worker, axis, 0, m))
            ready = torch.cuda.Event()
            ready.record(current)
            with torch.cuda.stream(self.side):
                self.side.wait_event(ready)
                for stage, (_, store, axis) in zip(self.stage_out, pairs):
                    _part(store, axis, start, m).copy_(_part(stage, axis, 0, m), non_blocking=True)
                self.out_free.record(self.side)

    def finish(self) -> None:
        if self.async_:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.side.synchronize()


class ChunkedTrainer:
    """Train a `ModelBatch` chunk by chunk through one chunk-sized worker (exact).

    Args:
        model_batch: the store: every model's weights and buffers. On the GPU,
            or on the CPU with `offload=True` (pinned there, moved a chunk at
            a time to `device`).
        factory: the optimizer (`modelbatch.OptimizerFactory`); the
            optimizer over the store, `trainer.optimizer`, holds every model's
            state and hyperparameters (edit them there; save it with
            `modelbatch.checkpoint.save(path, model_batch, optimizer=trainer.optimizer)`).
        configs: N per-model hyperparameter dicts (as for `create_optimizer`).
        loss_fn: the per-model loss; defaults to the batch's.
        chunk_size: models per chunk; None picks it from a probe step and the
            free GPU memory (all N on the CPU), backing off on out-of-memory.
        device: where the worker computes (default: the store's device).
        per_model: inputs and targets carry the model axis `[N, B, ...]`.
        compile: run the worker's step with `compile_step` (one CUDA graph).
        memory_fraction: share of the free GPU memory the chunk may take.

    Example:
        >>> trainer = ChunkedTrainer(mb, OptimizerFactory(torch.optim.Adam), configs,
        ...                          chunk_size=4096)
        >>> trainer.train([(x1, y1), (x2, y2)]).shape     # every chunk runs both batches
        torch.Size([2, N])

    Warning:
        With `per_model=True` the inputs `[N, B, ...]` are sliced per chunk
        on the device. The grad scaler (AMP) and gradient clipping of
        `compile_step` are not wired through here.
    """

    def __init__(
        self,
        model_batch: ModelBatch,
        factory: Any,
        configs: Sequence[Mapping[str, Any]] | None = None,
        *,
        loss_fn: Any = None,
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        offload: bool = False,
        per_model: bool = False,
        compile: bool = True,
        memory_fraction: float = 0.85,
    ) -> None:
        if not isinstance(model_batch, ModelBatch):
            raise TypeError(
                f"ChunkedTrainer: expected a ModelBatch, got {type(model_batch).__name__}."
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"ChunkedTrainer: chunk_size must be an int >= 1, got {chunk_size!r}.")
        self.store = model_batch
        self.n = model_batch.num_models
        self.device = torch.device(device) if device is not None else model_batch.active.device
        self.loss_fn, self.per_model, self.compile = loss_fn, per_model, compile
        self.memory_fraction = memory_fraction
        if offload and self.device.type == "cuda":
            _pin(model_batch)
        self.optimizer = factory.create_optimizer(model_batch, configs)
        if not hasattr(self.optimizer, "reset_models"):
            raise TypeError(
                "ChunkedTrainer: the optimizer needs per-model state (a modelbatch.optim "
                f"vectorized optimizer), got {type(self.optimizer).__name__}."
            )
        self._factory = factory
        self._configs = None if configs is None else [dict(c) for c in configs]
        self.chunk_size = min(self.n, chunk_size) if chunk_size else None
        self._worker: ModelBatch | None = None
        self._worker_opt: Any = None
        self._mover: _Mover | None = None
        self._step: Any = None
        self._written = False

    # ------------------------------------------------------------------ the worker

    def _build(self, size: int) -> None:
        """A worker of `size` models, its optimizer, step and the tensor pairs it swaps."""
        store = self.store
        one = ModelBatch([materialize(store.skeleton, self.device)], store.loss_fn, history_size=1)
        replace_stacked(
            one,
            {
                name: t[:size].detach().to(self.device, copy=True)
                for name, t in {**store.stacked_params(), **store.stacked_buffers()}.items()
            },
            size,
        )
        one.train(store.training)
        configs = None if self._configs is None else self._configs[:size]  # size <= N
        opt = self._factory.create_optimizer(one, configs)
        self._worker, self._worker_opt, self.chunk_size = one, opt, size
        from .fast import compile_step

        mode = "auto" if self.compile and self.device.type == "cuda" else "eager"
        self._step = compile_step(one, opt, self.loss_fn, per_model=self.per_model, mode=mode)
        self._mover = None

    def _pairs(self) -> list[Pair]:
        """(worker tensor, store tensor, model axis) for everything per model.

        Weights, buffers and the active mask; the optimizer's per-model
        hyperparameters, step counts and scalar tables (any tensor of a param
        group) and its state.
        """
        w, s = self._worker, self.store
        assert w is not None
        found = [(w.active, s.active)]
        own, theirs = (
            {**w.stacked_params(), **w.stacked_buffers()},
            {**s.stacked_params(), **s.stacked_buffers()},
        )
        found += [(own[k], theirs[k]) for k in own]
        wo, so = self._worker_opt, self.optimizer
        for wg, sg in zip(wo.param_groups, so.param_groups):
            for key, value in wg.items():
                if key == "params":
                    continue
                if isinstance(value, Tensor):
                    found.append((value, sg[key]))
                elif isinstance(value, Mapping):
                    found += [(v, sg[key][k]) for k, v in value.items() if isinstance(v, Tensor)]
            for wp, sp in zip(wg["params"], sg["params"]):
                ws, ss = wo.state[wp], so.state[sp]
                found += [(ws[k], ss[k]) for k in ws if isinstance(ws[k], Tensor)]
        return [(a, b, _model_axis(a, b)) for a, b in found if a.dim() > 0]

    def _probe(self, batch: tuple[Any, Tensor]) -> None:
        """One step of the worker through its compiled step, then a fresh optimizer state.

        It creates the worker's optimizer state (and settles its memory
        layout) before the pairs to swap are listed; the values it leaves are
        overwritten by the first chunk.
        """
        w = self._worker
        assert w is not None
        # Two steps: the first may move the weights to their gradients' layout,
        # the second then settles the optimizer state in that layout.
        for _ in range(2):
            self._step(*self._slice(batch, 0, w.num_models))
        self._worker_opt.reset_models(list(range(w.num_models)))
        mine, theirs = self._worker_opt.param_groups, self.optimizer.param_groups
        if [g.get("structure") for g in mine] != [g.get("structure") for g in theirs]:
            raise ValueError(
                "ChunkedTrainer: the models need optimizer state that the first chunk's do "
                f"not ({theirs[0].get('structure')} vs {mine[0].get('structure')}); give every "
                "model the same optional flags (amsgrad, momentum, centered)."
            )

    def _store_state(self) -> bool:
        """Allocate the store's optimizer state, shaped like the worker's; whether it was new.

        The values are written by `_fresh_state`, chunk by chunk: a fresh state
        may depend on each model's hyperparameters (Adagrad's initial
        accumulator value).
        """
        w, wo, so = self._worker, self._worker_opt, self.optimizer
        assert w is not None
        created = False
        for wg, sg in zip(wo.param_groups, so.param_groups):
            for wp, sp in zip(wg["params"], sg["params"]):
                if so.state.get(sp):
                    continue
                fresh = {}
                for k, v in wo.state[wp].items():
                    if isinstance(v, Tensor) and v.dim() and v.shape[0] == w.num_models:
                        v = torch.empty(
                            self.n,
                            *v.shape[1:],
                            dtype=v.dtype,
                            device=sp.device,
                            pin_memory=sp.is_pinned(),
                        )
                    fresh[k] = v
                so.state[sp] = fresh
                created = True
        return created

    def _fresh_state(self) -> None:
        """Every model's fresh optimizer state, made by the worker from its own hyperparameters."""
        mover, size, n = self._mover, self.chunk_size, self.n
        assert mover is not None and size is not None and self._worker is not None
        for start in range(0, n, size):
            stop = min(n, start + size)
            mover.load(start, stop)
            self._worker_opt.reset_models(list(range(self._worker.num_models)))
            mover.save(start, stop)
        mover.finish()

    def _auto_size(self, batch: tuple[Any, Tensor]) -> int:
        """Models per chunk from a probe step's peak memory and the free GPU memory."""
        if self.device.type != "cuda":
            return self.n
        probe = min(self.n, 256)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self._build(probe)
        self._probe(batch)
        torch.cuda.synchronize(self.device)
        per_model = (torch.cuda.max_memory_allocated(self.device) - base) / probe
        if self.store.active.device.type == "cpu":
            # Two staging copies (in and out) of everything swapped per model.
            w, wo = self._worker, self._worker_opt
            assert w is not None
            tensors = [*w.parameters(), *w.buffers()]
            tensors += [v for st in wo.state.values() for v in st.values() if isinstance(v, Tensor)]
            swapped = sum(t.numel() * t.element_size() for t in tensors)
            per_model += 2 * swapped / probe
        self._worker, self._worker_opt, self._step = None, None, None
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        # The CUDA graph's own pool holds another set of activations.
        return max(1, min(self.n, int(free * self.memory_fraction / (per_model * 1.25))))

    # ------------------------------------------------------------------ training

    def _slice(self, batch: tuple[Any, Tensor], start: int, stop: int) -> tuple[Any, Tensor]:
        inputs, targets = batch
        if not self.per_model:
            return inputs, targets
        size = self.chunk_size or (stop - start)

        def cut(t: Tensor) -> Tensor:
            part = t[start:stop]
            if part.shape[0] < size:
                pad = part[:1].expand(size - part.shape[0], *part.shape[1:])
                part = torch.cat([part, pad])
            return part

        if isinstance(inputs, tuple):
            return tuple(cut(t) for t in inputs), cut(targets)
        return cut(inputs), cut(targets)

    def step(self, inputs: Any, targets: Tensor) -> Tensor:
        """One training step of every model (one round of one batch): losses `[N]`."""
        return self.train([(inputs, targets)])[0]

    def train(self, batches: Iterable[tuple[Any, Tensor]]) -> Tensor:
        """Train every model on each batch in turn, a chunk at a time: losses `[T, N]`.

        Args:
            batches: T `(inputs, targets)` pairs on the worker's device, shared
                `[B, ...]` (or `[N, B, ...]` with `per_model=True`); every
                chunk runs all of them, so they are held for the round.
        """
        batches = list(batches)
        if not batches:
            raise ValueError("ChunkedTrainer.train: expected at least one (inputs, targets) batch.")
        while True:
            self._written = False
            try:
                return self._round(batches)
            except torch.cuda.OutOfMemoryError:
                # The store changes only when a chunk is written back: until then,
                # halving the chunk and starting the round over is exact.
                if self._written or (self.chunk_size or 1) <= 1:
                    raise
                if self._mover is not None:
                    self._mover.finish()
                self._worker, self._worker_opt, self._mover, self._step = None, None, None, None
                gc.collect()
                torch.cuda.empty_cache()
                self.chunk_size = max(1, (self.chunk_size or self.n) // 2)

    def _round(self, batches: list[tuple[Any, Tensor]]) -> Tensor:
        if self.chunk_size is None:
            self.chunk_size = self._auto_size(batches[0])
        if self._worker is None or self._worker.num_models != self.chunk_size:
            self._build(self.chunk_size)
            self._probe(batches[0])
            created = self._store_state()
            self._mover = _Mover(self._pairs, self.device)
            if created:
                self._fresh_state()
        mover, size, n = self._mover, self.chunk_size, self.n
        assert self._worker is not None and mover is not None
        losses = torch.empty(len(batches), n, device=self.device)
        starts = list(range(0, n, size))
        mover.prefetch(starts[0], min(n, starts[0] + size))
        for c, start in enumerate(starts):
            stop = min(n, start + size)
            mover.load(start, stop)
            if stop - start < size:
                # The last chunk is padded with retired slots: they compute but never
                # change, and are not written back.
                self._worker.active[stop - start :] = False
            if c + 1 < len(starts):
                mover.prefetch(starts[c + 1], min(n, starts[c + 1] + size))
            for t, batch in enumerate(batches):
                inputs, targets = self._slice(batch, start, stop)
                losses[t, start:stop] = self._step(inputs, targets)[: stop - start]
            mover.save(start, stop)
            self._written = True
        mover.finish()
        for t in range(len(batches)):
            self.store.record_losses(losses[t])
        return losses


def _pin(model_batch: ModelBatch) -> None:
    """Move the store's tensors to pinned host memory, in place (asynchronous copies need it)."""
    with torch.no_grad():
        for t in [*model_batch.parameters(), *model_batch.buffers()]:
            if t.device.type == "cpu" and not t.is_pinned():
                t.data = t.data.pin_memory()
