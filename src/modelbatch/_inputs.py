"""Inputs of `ModelBatch.forward`: which are per model, where they live, and likely mistakes.

Everything here reads shapes, dtypes and devices only (never a tensor's
values), so the forward stays free of host-device syncs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import (
    TreeSpec,
    _broadcast_to_and_flatten,
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_map,
    tree_unflatten,
)

__all__ = [
    "PerModel",
    "InputReading",
    "check_devices",
    "explain_dtype_error",
    "input_names",
    "model_axis_dims",
    "per_model_flags",
]

# None (shared, with a check for the likely mistake), a bool for every input,
# one entry per positional argument, or a mapping from positions and keyword
# names to entries; an entry is a bool or a pytree of bools matching its argument.
PerModel = bool | Sequence[Any] | Mapping[int | str, Any] | None


def input_names(args: tuple, kwargs: dict) -> list[str]:
    """The user's name of every leaf of `(args, kwargs)`: `args[0]`, `kwargs['y'][1]`, ..."""
    named, _ = tree_flatten_with_path((args, kwargs))
    return [("args" if path[0].idx == 0 else "kwargs") + keystr(path[1:]) for path, _ in named]  # type: ignore[attr-defined]


def _entry_flags(entry: Any, where: str) -> None:
    """Check that one entry of a per_model spec is a bool or a pytree of bools."""
    leaves, _ = tree_flatten(entry)
    if not leaves or not all(isinstance(v, bool) for v in leaves):
        raise TypeError(
            f"ModelBatch.forward: per_model entry for {where} must be True, False or a "
            f"structure of bools matching the argument, got {entry!r}."
        )


def per_model_flags(
    per_model: PerModel, args: tuple, kwargs: dict, spec: TreeSpec, num_leaves: int
) -> list[bool]:
    """One flag per leaf of `(args, kwargs)`: True where the leaf carries the model axis."""
    if per_model is None or isinstance(per_model, bool):
        return [bool(per_model)] * num_leaves
    arg_entries: list[Any] = [False] * len(args)
    kw_entries: dict[str, Any] = dict.fromkeys(kwargs, False)
    if isinstance(per_model, Mapping):
        for key, entry in per_model.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise TypeError(
                    "ModelBatch.forward: per_model keys must be positions (int) or keyword "
                    f"names (str), got {key!r}."
                )
            if isinstance(key, int):
                if not -len(args) <= key < len(args):
                    raise ValueError(
                        f"ModelBatch.forward: per_model names position {key}, but the call has "
                        f"{len(args)} positional argument(s)."
                    )
                _entry_flags(entry, f"args[{key}]")
                arg_entries[key] = entry
            else:
                if key not in kwargs:
                    raise ValueError(
                        f"ModelBatch.forward: per_model names keyword {key!r}, but the call's "
                        f"keywords are {sorted(kwargs)}."
                    )
                _entry_flags(entry, f"kwargs[{key!r}]")
                kw_entries[key] = entry
    elif isinstance(per_model, (tuple, list)):
        if len(per_model) != len(args):
            raise ValueError(
                f"ModelBatch.forward: per_model has {len(per_model)} entries, the call "
                f"{len(args)} positional argument(s); give one bool per positional argument, "
                "or a dict such as {0: False, 1: True, 'mask': True}."
            )
        for i, entry in enumerate(per_model):
            _entry_flags(entry, f"args[{i}]")
        arg_entries = list(per_model)
    else:
        raise TypeError(
            "ModelBatch.forward: per_model must be None, a bool, a tuple with one bool per "
            f"positional argument or a dict of positions/keywords, got {type(per_model).__name__}."
        )
    flags = _broadcast_to_and_flatten((tuple(arg_entries), kw_entries), spec)
    if flags is None:
        raise ValueError(
            "ModelBatch.forward: a per_model entry does not match the structure of its "
            "argument; give a bool per argument, or a tuple/dict of bools shaped like it."
        )
    return [bool(f) for f in flags]


def model_axis_dims(
    per_model: PerModel,
    flags: list[bool],
    args: tuple,
    kwargs: dict,
    leaves: list[Any],
    spec: TreeSpec,
    n: int,
) -> Any:
    """`torch.vmap`'s `in_dims` for `(args, kwargs)`: 0 for per-model tensors, None for shared.

    Non-tensor leaves are shared; one that an explicit entry marks per model raises.
    """
    blanket = isinstance(per_model, bool)
    dims: list[int | None] = []
    for k, (leaf, flag) in enumerate(zip(leaves, flags)):
        if not isinstance(leaf, Tensor):
            if flag and not blanket:
                raise TypeError(
                    f"ModelBatch.forward: per_model marks input {input_names(args, kwargs)[k]} "
                    f"({type(leaf).__name__}) as per model; only tensors carry a model axis: "
                    f"pass a tensor [N={n}, ...]."
                )
            dims.append(None)
            continue
        if flag and (leaf.dim() == 0 or leaf.shape[0] != n):
            what = (
                "per_model=True expects every input tensor to be"
                if blanket
                else f"per_model marks {input_names(args, kwargs)[k]} as per model: expected"
            )
            raise ValueError(
                f"ModelBatch.forward: {what} [N={n}, B, ...], got shape {tuple(leaf.shape)}; "
                "mark inputs shared by all models as per_model=False."
            )
        dims.append(0 if flag else None)
    return tree_unflatten(dims, spec)


def check_devices(leaves: list[Any], device: torch.device, args: tuple, kwargs: dict) -> None:
    """Refuse an input tensor on another device than the models (a 0-dim CPU tensor is fine)."""
    for k, leaf in enumerate(leaves):
        if (
            isinstance(leaf, Tensor)
            and leaf.device != device
            and not (leaf.dim() == 0 and leaf.device.type == "cpu")
        ):
            name = input_names(args, kwargs)[k]
            raise ValueError(
                f"ModelBatch.forward: input {name} is on {leaf.device}, the models are on "
                f"{device}; move it with .to({str(device)!r}) (or the models with "
                f"mb.to({str(leaf.device)!r}))."
            )


# How torch's "expected scalar type X" messages name the integer and bool dtypes.
_TYPE_NAMES = {
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
}


def explain_dtype_error(
    err: BaseException, leaves: list[Any], args: tuple, kwargs: dict, dtype: torch.dtype | None
) -> Exception | None:
    """A clearer error for torch's dtype mismatch inside the forward, naming the input, or None.

    Only rewrites an error that names dtypes, and only when an input's dtype
    differs from the models' parameter dtype `dtype` (legitimate promotion
    never reaches here: it raises nothing).
    """
    message = str(err)
    if dtype is None or not any(m in message for m in ("scalar type", "dtype", "Found dtype")):
        return None
    names = input_names(args, kwargs)
    others = [
        (names[k], leaf.dtype)
        for k, leaf in enumerate(leaves)
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.dtype != dtype
    ]
    # A floating input of another precision is the likely cause; integer inputs
    # (token ids, indices) are normal, so blame one only if torch names its type.
    culprits = [c for c in others if c[1].is_floating_point] or [
        c for c in others if _TYPE_NAMES.get(c[1], "?") in message
    ]
    if not culprits:
        return None
    name, got = culprits[0]
    first_line = message.strip().splitlines()[0]
    fix = f"convert it with .to({dtype})"
    if got.is_floating_point:
        fix += f", or the models with mb.to({got})"
    return TypeError(
        f"ModelBatch.forward: input {name} has dtype {got}, the models' parameters are "
        f"{dtype} (torch: {first_line}); {fix}."
    )


class InputReading:
    """Decides whether an input given without `per_model` was meant per model.

    An input `[N, B, ...]` given as shared runs every model on all N slices:
    outputs come back `[N, N, B, ...]` and training goes on. This is flagged
    when the first input tensor's leading size is N and either

    - an earlier call showed the model takes inputs of one rank less, or
    - a probe of the model on the `meta` device (no memory, no data, once per
      shape) shows that read as shared it would fail while read per model it
      works, or, for a model that takes inputs of any rank (a stack of
      `nn.Linear`), that it would carry the leading `[N, B]` through to its
      output (it treats the model axis as one more batch axis).

    For a model of any input rank, a shared batch of exactly N examples can
    look the same, e.g. `[N, T, F]` sequences mapped to `[N, T, C]`: the
    error then says to pass `per_model=False`. A call that fixed the rank
    earlier settles it.

    An explicit `per_model=False` is never second-guessed.
    """

    def __init__(self) -> None:
        self.ranks: set[int] = set()
        self._probed: dict[tuple, bool] = {}

    def record(self, leaves: list[Any], flags: list[bool]) -> None:
        """Remember the rank each model saw for the first input tensor."""
        for leaf, flag in zip(leaves, flags):
            if isinstance(leaf, Tensor):
                self.ranks.add(leaf.dim() - 1 if flag else leaf.dim())
                return

    def check_shared(
        self, skeleton: nn.Module, args: tuple, kwargs: dict, leaves: list[Any], n: int
    ) -> None:
        """Raise if inputs given without `per_model` look like one batch per model."""
        k, first = next(((k, t) for k, t in enumerate(leaves) if isinstance(t, Tensor)), (-1, None))
        if first is None or first.dim() < 2 or first.shape[0] != n:
            return
        if first.dim() in self.ranks:
            return
        if first.dim() - 1 not in self.ranks:
            key = tuple(
                (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t) for t in leaves
            )
            if key not in self._probed:
                if len(self._probed) > 64:
                    self._probed.clear()
                self._probed[key] = _probe(skeleton, args, kwargs, first, n)
            if not self._probed[key]:
                return
        shape = tuple(first.shape)
        raise ValueError(
            f"ModelBatch.forward: input {input_names(args, kwargs)[k]} of shape {shape} starts "
            f"with N={n}, the number of models, and the model takes inputs of shape "
            f"{shape[1:]}: read as shared, every model would run on all {n} slices (outputs "
            f"[{n}, {n}, ...]). Pass per_model=True for one batch per model, or "
            f"per_model=False if it is one shared batch of {n} examples."
        )


def _probe(skeleton: nn.Module, args: tuple, kwargs: dict, first: Tensor, n: int) -> bool:
    """Whether the model, run on `meta` copies of the inputs, reads `[N, ...]` as per model."""
    from .nn._convert import vmap_forward_context

    def on_meta(change: Callable[[Tensor], Tensor] | None) -> Tensor | None:
        def convert(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            t = t.to("meta")
            return change(t) if change is not None and t.dim() > 0 and t.shape[0] == n else t

        a, kw = tree_map(convert, (args, kwargs))
        with torch.no_grad(), vmap_forward_context(torch.device("meta")):
            out = skeleton(*a, **kw)
        return next((t for t in tree_flatten(out)[0] if isinstance(t, Tensor)), None)

    def runs(change: Callable[[Tensor], Tensor]) -> bool:
        try:
            on_meta(change)
        except Exception:
            return False
        return True

    try:
        shared = on_meta(None)
    except Exception:
        # Read as shared it fails; read per model it runs: the model axis was meant.
        return runs(lambda t: t[0])
    if shared is None or shared.dim() < 2:
        return False
    if not runs(lambda t: t.unsqueeze(0)):
        # The model takes no input of one more dimension: this one is its batch.
        return False
    if first.dim() == 2 and shared.dim() <= 2:
        # [N, F] -> [N, F] is a layer with as many outputs as inputs on a shared batch;
        # per-model [N, B] inputs (token ids) come back with a feature axis more.
        return False
    # A model of any input rank: it carried the leading [N, B] through to its output.
    return tuple(shared.shape[:2]) == tuple(first.shape[:2])
