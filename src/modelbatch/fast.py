"""The fast training step (one CUDA graph per step) and batched evaluation.

Eager `torch.vmap` spends a fixed few milliseconds of Python and kernel-launch
overhead per step whatever N is, so small models leave the GPU idle.
`compile_step` captures forward, per-model loss, backward, per-model
clipping/unscaling and the optimizer update into one CUDA graph and replays
it: one launch per step. Everything the step reads that may change between
steps (hyperparameters, the active mask, scaler state) is a tensor read inside
the graph, so changing it needs no re-capture.

Nothing here synchronizes the host with the GPU per step: losses come back
as device tensors `[N]` and stay there until the caller reads them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from ._batch import ModelBatch
from ._step import TrainStep, _as_args

__all__ = ["EvalResult", "FastStep", "compile_step", "evaluate"]

LossFn = Callable[..., Tensor]
_MODES = ("auto", "graph", "eager")


def _signature(tree: Any) -> tuple:
    """What a captured graph is specialised to: each input leaf's shape, dtype and device."""
    leaves, spec = tree_flatten(tree)
    sig = tuple(
        (tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else ("const", t)
        for t in leaves
    )
    return (str(spec), sig)


class _Graph:
    """One captured step: the graph, its static inputs and outputs, the grads it writes."""

    def __init__(self, graph: Any, inputs: Any, losses: Tensor, grads: list) -> None:
        self.graph = graph
        self.inputs = inputs
        self.losses = losses
        # Held so the grad tensors the graph writes stay alive (and in place)
        # while other graphs or eager steps point `param.grad` elsewhere.
        self.grads = grads


def device_max_norm(
    owner: str, max_norm: float | Tensor | None, n: int, device: torch.device
) -> Tensor | None:
    """`max_norm` as one `[N]` float32 device tensor for the whole run (or None).

    A Python float or list converted at every step would be a host-to-device
    copy baked into a captured graph.
    """
    if max_norm is None:
        return None
    limit = torch.as_tensor(max_norm, dtype=torch.float32).to(device)
    if limit.dim() == 0:
        limit = limit.expand(n).clone()
    if tuple(limit.shape) != (n,):
        raise ValueError(
            f"{owner}: max_norm must be a float or [N={n}], got shape "
            f"{tuple(limit.shape)}; pass one value per model."
        )
    return limit


class _Replayed:
    """Warm-up, capture and replay of a training step as CUDA graphs, one per input shape.

    Subclasses give `_body(inputs, targets) -> losses` (the whole step, from
    forward to update), `_leaves()` (the tensors backward writes gradients
    to) and `optimizer`. The first `warmup` steps of an input shape run
    eagerly on a side stream (they create the optimizer state), the next one
    captures the step with no gradients allocated (so backward writes, not
    adds, the graph's own grad tensors), later ones copy the inputs into the
    graph's static tensors and replay it. At most `max_graphs` shapes are
    captured; further shapes run eagerly.
    """

    owner = "compile_step"
    optimizer: Any
    warmup: int
    max_graphs: int

    def _init_graphs(self) -> None:
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: dict[tuple, int] = {}
        self._grads_of: tuple | None = None
        self._warned_full = False

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _leaves(self) -> list[Tensor]:
        raise NotImplementedError

    def _body(self, inputs: Any, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def _before_replay(self) -> None:
        """Host-side work before a replay (nothing by default)."""

    def _eager(self, inputs: Any, targets: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self._grads_of = None
        return self._body(inputs, targets)

    def _warm(self, inputs: Any, targets: Tensor) -> Tensor:
        """An eager step on a side stream, as torch's CUDA-graph recipe warms up."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            losses = self._eager(inputs, targets)
        current.wait_stream(side)
        losses.record_stream(current)
        return losses

    def _capture(self, inputs: Any, targets: Tensor) -> _Graph:
        static = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, (inputs, targets))
        for p in self._leaves():
            # With no grad at capture, backward writes (not adds) the graph's own
            # grad tensors on every replay: no zero_grad in the graph.
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = self._body(*static)
        return _Graph(graph, static, losses, [p.grad for p in self._leaves()])

    def _graph_step(self, inputs: Any, targets: Tensor) -> Tensor:
        """One step through the graph of this input shape (warm-up and capture first)."""
        key = _signature((inputs, targets))
        entry = self._graphs.get(key)
        if entry is None:
            seen = self._seen.get(key, 0)
            if seen < self.warmup or len(self._graphs) >= self.max_graphs:
                if seen >= self.warmup and not self._warned_full:
                    self._warned_full = True
                    warnings.warn(
                        f"{self.owner}: {len(self._graphs)} input shapes already have a graph "
                        f"(max_graphs={self.max_graphs}); new shapes run the eager step. "
                        "Keep batch shapes fixed (drop_last=True) or raise max_graphs.",
                        stacklevel=3,
                    )
                self._seen[key] = seen + 1
                return self._warm(inputs, targets)
            entry = self._capture(inputs, targets)
            self._graphs[key] = entry
        self._before_replay()
        static_in, static_tgt = entry.inputs
        for dst, src in zip(tree_flatten(static_in)[0], tree_flatten(inputs)[0]):
            if isinstance(dst, Tensor):
                dst.copy_(src, non_blocking=True)
        static_tgt.copy_(targets, non_blocking=True)
        entry.graph.replay()
        if self._grads_of != key:
            # Let `param.grad` show this step's gradients (a loop over tensors, not models).
            for p, g in zip(self._leaves(), entry.grads):
                p.grad = g
            self._grads_of = key
        # A fresh tensor: the static one is overwritten by the next replay.
        return entry.losses.clone()


class FastStep(_Replayed):
    """A training step for a ModelBatch, replayed as one CUDA graph where possible.

    Built by `compile_step`; call it as `step(x, y) -> losses [N]`. See
    `compile_step` for the arguments.

    Attributes:
        mode: `"graph"` or `"eager"`, what the step actually runs.
        reason: why the step runs eagerly, or None.
        num_graphs: how many input shapes have a captured graph.
    """

    def __init__(
        self,
        model_batch: ModelBatch,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn | None = None,
        *,
        scaler: Any = None,
        max_norm: float | Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
        per_model: bool = False,
        mode: str = "auto",
        warmup: int = 2,
        max_graphs: int = 4,
        compile_model: bool = False,
        relayout: bool = True,
        low_precision: bool = True,
    ) -> None:
        if not isinstance(model_batch, ModelBatch):
            raise TypeError(
                f"compile_step: expected a ModelBatch, got {type(model_batch).__name__}; "
                "wrap the models with modelbatch.ModelBatch(models) first."
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"compile_step: expected a torch.optim.Optimizer over the stacked parameters, "
                f"got {type(optimizer).__name__}."
            )
        if mode not in _MODES:
            raise ValueError(f"compile_step: mode must be one of {_MODES}, got {mode!r}.")
        if warmup < 1:
            raise ValueError(
                f"compile_step: warmup must be >= 1 (optimizer state must exist before "
                f"capture), got {warmup}."
            )
        own = {id(p) for p in model_batch.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in own:
                    raise ValueError(
                        "compile_step: the optimizer holds a parameter of shape "
                        f"{tuple(p.shape)} that is not one of this ModelBatch's stacked "
                        "parameters; build the optimizer over model_batch.parameters()."
                    )
        self.model_batch = model_batch
        self.optimizer = optimizer
        device = model_batch.active.device
        max_norm = device_max_norm("compile_step", max_norm, model_batch.num_models, device)
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._init_graphs()
        self._warned_lr = False
        self.reason: str | None = None
        if mode == "eager":
            self.reason = "mode='eager' was asked for"
        elif device.type != "cuda":
            self.reason = f"CUDA graphs need a CUDA device and the models are on {device}"
        else:
            self.reason = self._make_capturable()
        self.mode = "eager" if self.reason is not None else "graph"
        self._lr_factors = self._lr_objects()
        self._step = TrainStep(
            model_batch,
            optimizer,
            loss_fn,
            # The batch's own scaler (set by BatchGradScaler(model_batch)) unless one is given.
            scaler=scaler,
            max_norm=max_norm,
            autocast_dtype=autocast_dtype,
            per_model=per_model,
            relayout=relayout,
            low_precision=low_precision,
        )
        self._forward_loss: Callable[[Any, Tensor], Tensor] = self._step.forward_loss
        if compile_model:
            self._forward_loss = torch.compile(self._step.forward_loss)
        if self.reason is not None and mode != "eager":
            if mode == "graph":
                raise RuntimeError(f"compile_step: mode='graph' is impossible: {self.reason}.")
            warnings.warn(
                f"compile_step: running the eager step, because {self.reason}.", stacklevel=3
            )

    def _make_capturable(self) -> str | None:
        """Turn on torch optimizers' `capturable` flag; the reason capture is impossible, or None."""
        groups = self.optimizer.param_groups
        if all(g.get("capturable", True) for g in groups):
            return None
        if len(self.optimizer.state) > 0:
            return (
                f"the {type(self.optimizer).__name__} was built with capturable=False and has "
                "already stepped (its step counters live on the CPU); build it with "
                "capturable=True"
            )
        # No state yet: with capturable=True the state is created on the device
        # at the first (eager) step and the update math is the same.
        for g in groups:
            if "capturable" in g:
                g["capturable"] = True
        return None

    # ------------------------------------------------------------------ the step

    def _lr_objects(self) -> list:
        return [g.get("lr") for g in self.optimizer.param_groups]

    def _body(self, inputs: Any, targets: Tensor) -> Tensor:
        """Forward, per-model loss, backward, clipping/unscaling and update; losses `[N]`."""
        losses = self._forward_loss(inputs, targets)
        self._step.backward_update(losses)
        return losses.detach()

    def _leaves(self) -> list[Tensor]:
        return self._step.leaves

    def _before_replay(self) -> None:
        if self._step._weights is not None:
            # A parameter changed in place outside the step (a load, a replaced model):
            # its low-precision copy is written again before the replay reads it.
            self.optimizer.refresh_low_precision()  # type: ignore[attr-defined]

    def _record(self, losses: Tensor) -> Tensor:
        self.model_batch.record_losses(losses)
        return losses

    def _check_lr_factors(self) -> None:
        """Drop the graphs if a group's lr factor is no longer the one they read.

        A 0-dim tensor factor (what the graph path makes of a float) is read by
        the graph, and torch's schedulers `fill_` it in place: nothing to do.
        A float, or a tensor replaced by another object (`load_state_dict`),
        is baked into the graph, which must then be captured again.
        """
        now = self._lr_objects()
        same = all(
            a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)
            for a, b in zip(now, self._lr_factors)
        )
        if not same:
            self._lr_factors = now
            if self._graphs:
                self._graphs.clear()
                self._grads_of = None
                if not self._warned_lr:
                    self._warned_lr = True
                    warnings.warn(
                        "compile_step: a param group's lr was replaced by a new object (or a "
                        "float lr changed), which the CUDA graph had baked in; the step "
                        "re-captures. Change lr factors in place (torch's LR schedulers do).",
                        stacklevel=3,
                    )

    def __call__(self, inputs: Any, targets: Tensor) -> Tensor:
        """One training step of every active model.

        Args:
            inputs: the model's input, shared `[B, ...]` (or `[N, B, ...]`
                with `per_model=True`); a tuple for several inputs.
            targets: shared `[B, ...]` or per model `[N, B, ...]`.

        Returns:
            Per-model losses `[N]` (float32, on the device, detached; retired
            models give 0). Reading them synchronizes; the step itself does not.
        """
        if self.mode == "eager":
            return self._record(self._eager(inputs, targets))
        self._check_lr_factors()
        return self._record(self._graph_step(inputs, targets))


def compile_step(
    model_batch: ModelBatch,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn | None = None,
    *,
    scaler: Any = None,
    max_norm: float | Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    per_model: bool = False,
    mode: str = "auto",
    warmup: int = 2,
    max_graphs: int = 4,
    compile_model: bool = False,
    relayout: bool = True,
    low_precision: bool = True,
) -> FastStep:
    """A training step `step(x, y) -> losses [N]` that runs as one CUDA graph.

    The step does forward, per-model loss (retired models give 0), backward,
    per-model unscaling and clipping, and the optimizer update. On CUDA it is
    captured once per input shape and replayed: the first `warmup` steps of a
    shape run eagerly (on a side stream; they are real training steps and
    create the optimizer state), the next one captures and replays. A last
    batch of another size gets its own graph the same way (at most
    `max_graphs` shapes; further shapes run eagerly). Parameters and
    gradients are those of the eager step.

    Hyperparameters, the active mask and scaler state are tensors read inside
    the graph: change them in place (`opt.hparams["lr"][i] = ...`,
    `model_batch.retire(i)`) and the next replay uses them. Replacing those
    tensors with new ones (`.to()`, reassigning a buffer) is not seen by the
    graph; build a new step after moving the batch. The shared lr factor of a
    modelbatch optimizer (`group["lr"]`, which torch LR schedulers drive)
    becomes a 0-dim tensor on the device, so a per-step torch schedule also
    needs no re-capture.

    On the CPU, or where capture is impossible (a torch optimizer built with
    `capturable=False` that has already stepped), the eager step runs and a
    warning says why, once.

    Args:
        model_batch: the models.
        optimizer: an optimizer over `model_batch.parameters()`; torch
            optimizers are switched to `capturable=True` if they have not
            stepped yet.
        loss_fn: per-model loss; defaults to the batch's.
        scaler: a per-model grad scaler (`modelbatch.amp.BatchGradScaler`).
        max_norm: clip each model's gradient norm to this (`[N]` or a scalar).
        autocast_dtype: run forward and loss under `torch.autocast` with this dtype.
        per_model: inputs and targets carry the model axis `[N, B, ...]`.
        mode: `"auto"` (graph on CUDA, else eager), `"graph"` (raise if
            impossible) or `"eager"`.
        warmup: eager steps per input shape before capture (>= 1).
        max_graphs: most input shapes captured.
        compile_model: also compile forward and loss with `torch.compile` (fuses
            elementwise work; costs compile time at the first step).
        relayout: after the first backward store each parameter
            (and its grad and optimizer state) in the memory layout its gradient
            arrives in, so autograd stops copying weight gradients every step.
            Values, shapes and names are unchanged; `param.stride()` may change.
        low_precision: with a bf16/fp16 `autocast_dtype` and a modelbatch
            optimizer, the forward reads low-precision weight copies that the
            optimizer writes in its update kernel, and the update reads the
            low-precision gradients directly: no weight or gradient is cast per
            step. The float32 parameters stay the weights of record.

    Returns:
        A `FastStep`; `step(x, y)` returns the per-model losses `[N]` on the device.

    Example:
        >>> mb = ModelBatch([nn.Linear(4, 3) for _ in range(8)])
        >>> step = compile_step(mb, torch.optim.SGD(mb.parameters(), lr=0.1))
        >>> step(torch.randn(16, 4), torch.randint(0, 3, (16,))).shape
        torch.Size([8])

    Warning:
        Inside the graph every step sees the same input and output addresses:
        the returned losses are fresh tensors, but `param.grad` tensors are
        reused by every replay.
    """
    return FastStep(
        model_batch,
        optimizer,
        loss_fn,
        scaler=scaler,
        max_norm=max_norm,
        autocast_dtype=autocast_dtype,
        per_model=per_model,
        mode=mode,
        warmup=warmup,
        max_graphs=max_graphs,
        compile_model=compile_model,
        relayout=relayout,
        low_precision=low_precision,
    )


def eval_batches(owner: str, loader: Iterable[Any], device: torch.device) -> Iterator[tuple]:
    """The loader's `(inputs, targets)` pairs, moved to `device` (an evaluation loop's input)."""
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"{owner}: expected the loader to yield (inputs, targets) pairs, got "
                f"{type(batch).__name__}; wrap it to yield two items."
            )
        yield tree_map(
            lambda t: t.to(device, non_blocking=True) if isinstance(t, Tensor) else t, batch
        )


def eval_autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """`torch.autocast` with `dtype` for an evaluation forward, or nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class EvalResult(NamedTuple):
    """Per-model evaluation: mean loss `[N]` and accuracy `[N]` (None for non-class targets)."""

    loss: Tensor
    accuracy: Tensor | None


@torch.no_grad()
def evaluate(
    model_batch: ModelBatch,
    loader: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    per_model: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Every model's mean loss and accuracy over a loader, in eval mode, without grad.

    Args:
        model_batch: the models; put back in their training mode afterwards.
        loader: yields `(inputs, targets)`, shared `[B, ...]` or, with
            `per_model=True`, `[N, B, ...]`; moved to the models' device.
        loss_fn: per-model loss with a mean over the batch; defaults to the batch's.
        per_model: inputs and targets carry the model axis.
        autocast_dtype: run the forward under `torch.autocast` with this dtype.

    Returns:
        `EvalResult(loss [N], accuracy [N])`, on the device; the loss is the
        batch-size-weighted mean of the per-batch losses; accuracy is None
        unless targets are integer class indices. Retired models are
        evaluated too.

    Example:
        >>> evaluate(mb, [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]).loss.shape
        torch.Size([8])
    """
    mb = model_batch
    n = mb.num_models
    device = mb.active.device
    loss_sum = torch.zeros(n, device=device)
    correct = torch.zeros(n, device=device)
    count = 0
    hit_count = 0
    classes = True
    was_training = mb.training
    mb.eval()
    try:
        for inputs, targets in eval_batches("evaluate", loader, device):
            with eval_autocast(device, autocast_dtype):
                outputs = mb(*_as_args(inputs), per_model=per_model)
            outputs = outputs.float()
            losses = mb.per_model_losses(outputs, targets, loss_fn, per_model=per_model or None)
            size = targets.shape[1] if per_model else targets.shape[0]
            loss_sum += losses * size
            count += size
            classes = classes and not targets.is_floating_point() and outputs.dim() >= 3
            if classes:
                target = targets if per_model else targets.unsqueeze(0)
                hits = outputs.argmax(dim=-1) == target
                correct += hits.flatten(1).sum(dim=1)
                hit_count += hits[0].numel()
    finally:
        mb.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the loader yielded no batches; pass a non-empty loader.")
    return EvalResult(loss_sum / count, correct / hit_count if classes else None)
