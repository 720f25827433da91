"""MixedBatch: models of several architectures trained as one unit.

A `ModelBatch` stacks models of one architecture. `MixedBatch` takes models
of several and plans stacked groups (see `MixedBatch.plan`):

- models of one architecture stack as they are;
- models that differ only in hidden sizes (Linear widths, conv channels,
  BatchNorm features) are padded with zeros to the largest size; a mask
  keeps every padded weight, its gradient and its optimizer state exactly 0,
  so each model trains exactly as it would alone;
- models whose `nn.Sequential` differs only in how many blocks it has are
  stacked on the deepest one; a per-model gate makes the blocks a model
  does not have the identity (their weights stay 0 and never update).

Padding is chosen where it wastes at most `max_waste` of the stacked
parameter elements; beyond that, separate groups. Every group is one
`ModelBatch`, and the whole step (every group's forward, one `[N]` loss
vector in the user's model order, one backward, the optimizers) is one
call, captured as one CUDA graph by `compile_mixed_step`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ._batch import ModelBatch
from ._buffers import _capturing
from ._indices import model_indices
from ._layout import restrided
from ._metrics import format_table, per_model_rows
from ._mixed_optim import MixedOptimizer
from ._mixed_plan import Arch, Group, plan_groups
from ._mixed_step import MixedStep, compile_mixed_step
from ._stack import (
    map_tensors,
    materialize,
    meta_skeleton,
    repeated,
    replace_stacked,
    split_name,
    state_key_map,
)
from .fast import _signature, device_max_norm

__all__ = ["MixedBatch", "MixedOptimizer", "MixedStep", "compile_mixed_step"]

LossFn = Callable[..., Tensor]

#: `max_waste` when none is given, by the models' device type. Measured: on a CPU
#: padded arithmetic costs its full price (a depth sweep of width-64 MLPs, 36% padding:
#: 2x slower than one group per depth; width-16, 20%: 1.2x faster); on a GPU small
#: models are bound by kernel launches, which fewer groups save: on an H200 the
#: 1,024-MLP sweep of benchmarks/arch_search.py steps in 8.25 / 5.27 / 4.71 / 4.82 /
#: 4.56 / 5.06 / 8.08 ms at max_waste 0 / 0.2 / 0.3 / 0.4 / 0.5 / 0.6 / 0.75.
DEFAULT_MAX_WASTE = {"cpu": 0.2, "cuda": 0.5}


class _GatedSequential(nn.Sequential):
    """`nn.Sequential` whose child ranges `[start, end)` each run only where the model's gate is on.

    `gate` is a `[S]` bool buffer (`[N, S]` once stacked); for a model whose
    gate s is off, range s is the identity: its output is its input exactly,
    and its parameters get an exactly zero gradient.
    """

    gate: Tensor
    segments: tuple[tuple[int, int], ...]

    def forward(self, x: Any) -> Any:
        starts = {s: k for k, (s, _) in enumerate(self.segments)}
        saved: Any = None
        gate_k = -1
        for i, module in enumerate(self):
            if i in starts:
                saved, gate_k = x, starts[i]
            x = module(x)
            if gate_k >= 0 and i + 1 == self.segments[gate_k][1]:
                x = torch.where(self.gate[gate_k], x, saved)
                gate_k = -1
        return x


def _template(group: Group, device: torch.device) -> nn.Module:
    """The group's deepest model, widened to the padded shapes, gated, zero-filled on `device`."""
    skeleton = meta_skeleton(group.template.rep)
    for name, shape in group.shapes.items():
        prefix, leaf = split_name(name)
        owner = skeleton.get_submodule(prefix)
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            assert old is not None
            owner._parameters[leaf] = nn.Parameter(
                torch.empty(shape, dtype=old.dtype, device="meta"),
                requires_grad=old.requires_grad,
            )
        else:
            old_buf = owner._buffers[leaf]
            assert old_buf is not None
            owner._buffers[leaf] = torch.empty(shape, dtype=old_buf.dtype, device="meta")
    for module in skeleton.modules():
        # Keep the layers' size fields truthful for printing; the forward reads the tensors.
        for attr, dim in (("out_features", 0), ("in_features", 1), ("out_channels", 0)):
            weight = getattr(module, "weight", None)
            if hasattr(module, attr) and isinstance(weight, Tensor) and weight.dim() > dim:
                setattr(module, attr, weight.shape[dim])
        if isinstance(module, nn.modules.conv._ConvNd) and isinstance(module.weight, Tensor):
            module.in_channels = module.weight.shape[1] * module.groups
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            module.num_features = module.weight.shape[0]
    for path, segments in group.gates.items():
        seq = skeleton.get_submodule(path)
        seq.__class__ = _GatedSequential
        object.__setattr__(seq, "segments", tuple(segments))
        seq.register_buffer("gate", torch.ones(len(segments), dtype=torch.bool, device="meta"))
    module = materialize(skeleton, device)
    with torch.no_grad():
        map_tensors(module, lambda t: t.zero_() if t.dtype != torch.bool else t.fill_(True))
    return module


def _region(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, s) for s in shape)


class MixedBatch(nn.Module):
    """Models of several architectures, trained as one unit with one global model index.

    Args:
        models: N models; any mix of architectures. Models of one class that
            differ only in hidden sizes or in the number of blocks of an
            `nn.Sequential` may share one padded stack (see `max_waste`).
        loss_fn: per-model loss `loss_fn(output [B, ...], target [B, ...]) -> scalar`.
            Defaults to `F.cross_entropy`.
        max_waste: the largest fraction of a group's stacked parameter
            elements that may be padding or masked blocks; 0 never pads (one
            group per architecture), 1 pads every family into one group.
            None: `DEFAULT_MAX_WASTE` for the models' device (0.5 on CUDA,
            0.2 elsewhere).
        labels: a name per model's architecture (for the plan and summaries);
            models with different labels never share an architecture.
        verify: at the first forward of each input shape, check that every
            padded or depth-masked architecture gives the output its own
            module gives (in eval mode), and raise if not.
        history_size: how many losses the loss history keeps.

    Example:
        >>> models = [nn.Sequential(nn.Linear(4, w), nn.ReLU(), nn.Linear(w, 3)) for w in (8, 16)]
        >>> mb = MixedBatch(models)
        >>> mb(torch.randn(5, 4)).shape
        torch.Size([2, 5, 3])

    Warning:
        Padding assumes each model's forward treats hidden units one by one
        (Linear, conv, BatchNorm, elementwise activations): a LayerNorm or a
        reduction over a padded size would see the padding. `verify` catches
        such a forward at the first call; `max_waste=0` never pads.
    """

    _history: deque[Tensor]
    _order: Tensor
    _export_store: dict[int, tuple[nn.Module, dict[str, str], dict[str, str]]]

    def __init__(
        self,
        models: Sequence[nn.Module],
        loss_fn: LossFn | None = None,
        *,
        max_waste: float | None = None,
        labels: Sequence[str] | None = None,
        verify: bool = True,
        history_size: int = 10_000,
    ) -> None:
        super().__init__()
        if isinstance(models, nn.Module) and not isinstance(models, (nn.ModuleList, nn.Sequential)):
            raise TypeError(
                f"MixedBatch: expected a sequence of models, got a single "
                f"{type(models).__name__}; pass a list of models."
            )
        models = list(models)
        if not models:
            raise ValueError("MixedBatch: expected at least one model, got an empty sequence.")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(
                    f"MixedBatch: model {i} is a {type(m).__name__}, expected an nn.Module."
                )
        device = next((p.device for p in models[0].parameters()), torch.device("cpu"))
        if max_waste is None:
            max_waste = DEFAULT_MAX_WASTE.get(device.type, DEFAULT_MAX_WASTE["cpu"])
        if not 0.0 <= float(max_waste) <= 1.0:
            raise ValueError(
                f"MixedBatch: max_waste must be in [0, 1], got {max_waste}; 0 never pads, "
                "1 pads every family of architectures into one group."
            )
        if labels is not None and len(labels) != len(models):
            raise ValueError(
                f"MixedBatch: got {len(labels)} labels for {len(models)} models; pass one per model."
            )
        self.num_models = len(models)
        self.max_waste = float(max_waste)
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.verify = verify
        self._plan = plan_groups(models, self.max_waste, labels)
        self._archs: list[Arch] = sorted(
            (a for g in self._plan for a in g.archs), key=lambda a: a.index
        )
        groups = []
        where: list[tuple[int, int]] = [(0, 0)] * self.num_models
        self._arch_of: list[int] = [0] * self.num_models
        for g, group in enumerate(self._plan):
            for j, i in enumerate(group.members):
                where[i] = (g, j)
            for a in group.archs:
                for i in a.members:
                    self._arch_of[i] = a.index
            groups.append(self._build_group(group, models, device))
        self.groups = nn.ModuleList(groups)
        self._where = where
        offsets = [0]
        for group in self._plan:
            offsets.append(offsets[-1] + len(group.members))
        # Position of model i in the concatenation of the groups' outputs.
        order = torch.tensor([offsets[g] + j for g, j in where], dtype=torch.long, device=device)
        self.register_buffer("_order", order, persistent=False)
        for g, group in enumerate(self._plan):
            members = torch.tensor(group.members, dtype=torch.long, device=device)
            self.register_buffer(f"_members_{g}", members, persistent=False)
        self._register_masks(models, device)
        for a in self._archs:
            a.rep = None  # type: ignore[assignment]  # the user's modules are not kept
        self._verified: set[tuple] = set()
        self._history = deque(maxlen=history_size)
        self.latest_losses: Tensor | None = None
        self.grad_scaler = None

    # ------------------------------------------------------------------ construction

    def _build_group(
        self, group: Group, models: Sequence[nn.Module], device: torch.device
    ) -> ModelBatch:
        template = _template(group, device)
        n = len(group.members)
        # n copies of the zero-filled template (padding 0, gates on), written over below.
        mb = ModelBatch([template], self.loss_fn)
        one = {**mb.stacked_params(), **mb.stacked_buffers()}
        replace_stacked(mb, {k: repeated(t, n, device) for k, t in one.items()}, n, device)
        own = {**mb.stacked_params(), **mb.stacked_buffers()}
        local = {i: j for j, i in enumerate(group.members)}
        with torch.no_grad():
            for arch, names, masked in zip(group.archs, group.names, group.masked):
                for i in arch.members:
                    m = models[i]
                    tensors = dict([*m.named_parameters(), *m.named_buffers()])
                    for name, target in names.items():
                        t = tensors[name]
                        own[target][local[i]][_region(t.shape)].copy_(t)
                    for path, (start, end) in masked.items():
                        if path in group.gates:
                            gate = own[f"{path}.gate" if path else "gate"][local[i]]
                            for k, (s, e) in enumerate(group.gates[path]):
                                gate[k] = not (start <= s and e <= end)
        return mb

    def _register_masks(self, models: Sequence[nn.Module], device: torch.device) -> None:
        """`[n, *shape]` bool masks, True on padding, for the padded groups' parameters."""
        self._masked: list[list[tuple[str, str]]] = []
        object.__setattr__(self, "_export_store", {})
        for g, group in enumerate(self._plan):
            mb = self._group(g)
            entries: list[tuple[str, str]] = []
            if group.kind != "stacked":
                local = {i: j for j, i in enumerate(group.members)}
                for name, p in mb.stacked_params().items():
                    pad = torch.ones(p.shape, dtype=torch.bool, device=device)
                    for arch, names in zip(group.archs, group.names):
                        owned = {t: n for n, t in names.items()}
                        if name not in owned:
                            continue
                        shape = models[arch.members[0]].get_parameter(owned[name]).shape
                        rows = torch.tensor([local[i] for i in arch.members], device=device)
                        index: tuple[Any, ...] = (rows, *_region(shape))
                        pad[index] = False
                    if bool(pad.any()):
                        key = f"_pad_{g}_{len(entries)}"
                        self.register_buffer(key, pad, persistent=False)
                        entries.append((name, key))
            self._masked.append(entries)
        for a in self._archs:
            rep = models[a.members[0]]
            group = next(gr for gr in self._plan if a in gr.archs)
            names = group.names[group.archs.index(a)]
            keys = {k: names[c] for k, c in state_key_map(rep).items()}
            # Kept outside the module tree: each architecture's own structure on `meta`.
            self._export_store[a.index] = (meta_skeleton(rep), keys, names)

    # ------------------------------------------------------------------ the plan

    @property
    def plan(self) -> str:
        """The grouping as a table: each group's models, architectures, kind and waste."""
        rows = []
        for g, group in enumerate(self._plan):
            params = set(self._group(g).stacked_params())
            widths = [
                str(s[0])
                for t, s in group.shapes.items()
                if t in params and t.endswith("weight") and len(s) >= 2
            ]
            rows.append(
                {
                    "group": g,
                    "models": len(group.members),
                    "archs": len(group.archs),
                    "kind": group.kind,
                    "sizes": f"[{','.join(widths)}]",
                    "waste": round(group.waste, 3),
                    "architectures": ", ".join(a.label for a in group.archs[:3])
                    + (f", ... ({len(group.archs)})" if len(group.archs) > 3 else ""),
                }
            )
        head = (
            f"MixedBatch: {self.num_models} models, {len(self._archs)} architectures, "
            f"{len(self._plan)} groups (max_waste={self.max_waste})"
        )
        return head + "\n" + format_table(rows)

    def _group(self, g: int) -> ModelBatch:
        return cast(ModelBatch, self.groups[g])

    def group_of(self, i: int) -> tuple[int, int]:
        """`(group, local index)` of global model i."""
        return self._where[i]

    def labels(self) -> list[str]:
        """Each model's architecture label, `[N]` in the user's order."""
        return [self._archs[a].label for a in self._arch_of]

    def members(self, g: int) -> Tensor:
        """The global indices of group g's models `[n_g]`, in the group's order."""
        return getattr(self, f"_members_{g}")

    # ------------------------------------------------------------------ forward

    @property
    def active(self) -> Tensor:
        """`[N]` bool, which models train (a gathered copy; change it with `retire`/`activate`)."""
        return torch.cat([self._group(g).active for g in range(len(self.groups))])[self._order]

    def forward(self, *args: Any, per_model: bool = False, **kwargs: Any) -> Tensor:
        """Run every model: shared inputs `[B, ...]` (or `[N, B, ...]` with `per_model=True`).

        Returns:
            `[N, B, ...]` in the user's model order; every model's output must
            have one shape (the same task), else use `forward_groups`.
        """
        outputs = self.forward_groups(*args, per_model=per_model, **kwargs)
        shapes = [tuple(o.shape[1:]) if isinstance(o, Tensor) else None for o in outputs]
        first = shapes[self._where[0][0]]
        for g, shape in enumerate(shapes):
            if shape is None or shape != first:
                i = int(self.members(g)[0])
                got = "a non-tensor output" if shape is None else f"output {shape} per model"
                raise ValueError(
                    f"MixedBatch.forward: model {i} ({self.labels()[i]}) gives {got}, model 0 "
                    f"({self.labels()[0]}) output {first}; one [N, B, ...] output needs one "
                    "output shape for every model. Call forward_groups for the per-group outputs."
                )
        return torch.cat(outputs)[self._order]

    def forward_groups(self, *args: Any, per_model: bool = False, **kwargs: Any) -> list[Any]:
        """Every group's output, `[n_g, B, ...]` each, in group order (see `members(g)`)."""
        if self.verify and not _capturing(self._order):
            key = _signature((args, kwargs, per_model))
            if key not in self._verified:
                self._check_padding(args, kwargs, per_model)
                self._verified.add(key)
        outputs = []
        for g, mb in enumerate(self.groups):
            if per_model:
                members = self.members(g)
                a, kw = tree_map(
                    lambda t, members=members: (
                        t.index_select(0, members) if isinstance(t, Tensor) else t
                    ),
                    (args, kwargs),
                )
                outputs.append(mb(*a, per_model=True, **kw))
            else:
                outputs.append(mb(*args, **kwargs))
        return outputs

    @torch.no_grad()
    def _check_padding(self, args: tuple, kwargs: dict, per_model: bool) -> None:
        """Each padded architecture's output against its own module's, once per input shape."""
        was_training = self.training
        self.eval()
        try:
            for g, group in enumerate(self._plan):
                if group.kind == "stacked":
                    continue
                mb = self._group(g)
                a, kw = args, kwargs
                if per_model:
                    members = self.members(g)
                    a, kw = tree_map(
                        lambda t, m=members: t.index_select(0, m) if isinstance(t, Tensor) else t,
                        (a, kw),
                    )
                out = mb(*a, per_model=per_model, **kw)
                for arch in group.archs:
                    i = arch.members[0]
                    j = self._where[i][1]
                    a, kw = args, kwargs
                    if per_model:
                        a, kw = tree_map(
                            lambda t, i=i: t[i] if isinstance(t, Tensor) else t, (a, kw)
                        )
                    ref = self.model(i)(*a, **kw)
                    got = out[j]
                    bad = not isinstance(ref, Tensor) or ref.shape != got.shape
                    if not bad:
                        # Padding adds exact zeros to sums: only the summation order changes
                        # (more under TF32 on CUDA). A forward that reads the padding is off
                        # by the size of the output.
                        tol = 1e-2 if got.is_cuda else 1e-4
                        err = (got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
                        bad = not bool(err <= tol)
                    if bad:
                        detail = (
                            f"shape {tuple(got.shape)} vs {tuple(ref.shape)}"
                            if isinstance(ref, Tensor) and ref.shape != got.shape
                            else "values differ"
                        )
                        raise ValueError(
                            f"MixedBatch: padding changes model {i}'s output ({arch.label} in "
                            f"group {g}, {group.kind}: {detail}); its forward is not agnostic to "
                            "hidden sizes (a norm, reduction or output size over a padded "
                            "dimension?). Pass max_waste=0 to stack only identical architectures."
                        )
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ losses and metrics

    # The per-model loss and metric code of ModelBatch, reused as is: it reads only
    # num_models, loss_fn, active, grad_scaler and the history. Typed Any: their `self` is
    # annotated ModelBatch.
    _targets_per_model: Any = ModelBatch._targets_per_model
    per_model_losses: Any = ModelBatch.per_model_losses
    compute_loss: Any = ModelBatch.compute_loss
    mask_retired: Any = ModelBatch.mask_retired
    record_losses: Any = ModelBatch.record_losses
    loss_history: Any = ModelBatch.loss_history
    clear_history: Any = ModelBatch.clear_history
    accuracy: Any = ModelBatch.accuracy
    format_summary: Any = ModelBatch.format_summary

    def summary(self, **columns: Tensor | Sequence[Any]) -> list[dict[str, Any]]:
        """One row per model: index, architecture, group, active, latest loss and given columns."""
        base: dict[str, Tensor | Sequence[Any]] = {
            "arch": self.labels(),
            "group": [g for g, _ in self._where],
            "active": self.active,
        }
        if self.latest_losses is not None:
            base["loss"] = self.latest_losses
        return per_model_rows({**base, **columns}, self.num_models)

    # ------------------------------------------------------------------ active mask

    def _split(self, owner: str, indices: Any) -> list[Tensor]:
        """Global indices (or an `[N]` mask) as each group's local `[n_g]` bool mask."""
        chosen = torch.zeros(self.num_models, dtype=torch.bool, device=self._order.device)
        chosen[model_indices(owner, indices, self.num_models, self._order.device)] = True
        return [chosen[self.members(g)] for g in range(len(self.groups))]

    def retire(self, indices: int | Sequence[int] | Tensor) -> None:
        """Stop training these models: their loss is 0 and the optimizers leave them unchanged."""
        for g, local in enumerate(self._split("MixedBatch.retire", indices)):
            self._group(g).active[local] = False

    def activate(self, indices: int | Sequence[int] | Tensor) -> None:
        """Train these models again."""
        for g, local in enumerate(self._split("MixedBatch.activate", indices)):
            self._group(g).active[local] = True

    # ------------------------------------------------------------------ padding

    def padding_masks(self) -> list[list[tuple[Tensor, Tensor]]]:
        """Per group, `(stacked parameter, pad mask)` pairs; the mask is True on padding.

        Each mask is kept in its parameter's memory layout (which a step may
        change once, see `relayout`), so masking is one vectorized pass.
        """
        out = []
        for g, entries in enumerate(self._masked):
            params = self._group(g).stacked_params()
            pairs = []
            for name, key in entries:
                p, mask = params[name], getattr(self, key)
                if mask.stride() != p.stride():
                    mask.data = restrided(mask, p.stride())
                pairs.append((p, mask))
            out.append(pairs)
        return out

    @torch.no_grad()
    def mask_padding_grads(self) -> None:
        """Zero the gradient on padding and masked blocks (before clipping and the update)."""
        for entries in self.padding_masks():
            for p, pad in entries:
                if p.grad is not None:
                    p.grad.masked_fill_(pad, 0.0)

    @torch.no_grad()
    def zero_padding(self) -> None:
        """Set padding and masked blocks back to exactly 0 (after the update)."""
        for entries in self.padding_masks():
            for p, pad in entries:
                p.masked_fill_(pad, 0.0)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | Tensor) -> Tensor:
        """Clip each model's gradient by its own norm; returns the norms `[N]` before clipping."""
        from .optim import clip_grad_norm_

        limit = device_max_norm(
            "MixedBatch.clip_grad_norm_", max_norm, self.num_models, self._order.device
        )
        assert limit is not None
        norms = [clip_grad_norm_(mb, limit[self.members(g)]) for g, mb in enumerate(self.groups)]
        return torch.cat(norms)[self._order]

    # ------------------------------------------------------------------ export

    def model(self, i: int) -> nn.Module:
        """Model i as a fresh module of the user's class, with its own (unpadded) shapes."""
        if not -self.num_models <= i < self.num_models:
            raise IndexError(f"MixedBatch.model: index {i} out of range for N={self.num_models}.")
        i = i % self.num_models
        skeleton, keys, names = self._export_store[self._arch_of[i]]
        module = materialize(skeleton, self._order.device)
        module.load_state_dict(self._model_state(i, module))
        # Non-persistent buffers are not in the state dict; to_empty left them uninitialized.
        g, j = self._where[i]
        stacked = self._group(g).stacked_buffers()
        with torch.no_grad():
            for name, buf in module.named_buffers():
                if name not in keys and names.get(name) in stacked:
                    buf.copy_(stacked[names[name]][j][_region(buf.shape)])
        module.train(self.training)
        return module

    def _model_state(self, i: int, module: nn.Module) -> dict[str, Tensor]:
        g, j = self._where[i]
        _, keys, _ = self._export_store[self._arch_of[i]]
        mb = self._group(g)
        own = {**mb.stacked_params(), **mb.stacked_buffers()}
        shapes = {k: t.shape for k, t in module.state_dict(keep_vars=True).items()}
        return {k: own[name][j][_region(shapes[k])].detach().clone() for k, name in keys.items()}

    def get_model_states(self) -> list[dict[str, Tensor]]:
        """N ordinary state dicts in the user's order; each loads into its model's class."""
        return [self.model(i).state_dict() for i in range(self.num_models)]

    def extra_repr(self) -> str:
        return (
            f"num_models={self.num_models}, architectures={len(self._archs)}, "
            f"groups={len(self._plan)}"
        )

    def train(self, mode: bool = True) -> MixedBatch:
        super().train(mode)
        for mb in self.groups:
            mb.train(mode)
        return self
