"""Compatibility checks, stacking and export of single models.

Everything here runs once, at construction or export, never in the training
step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "build_stacked_tree",
    "check_compatible",
    "map_tensors",
    "materialize",
    "meta_skeleton",
    "model_list",
    "replace_stacked",
    "split_name",
    "stack_tensors",
    "state_key_map",
]


def _describe(module: nn.Module) -> str:
    extra = module.extra_repr()
    return f"{type(module).__name__}({extra})"


def _config_of(module: nn.Module) -> dict[str, object]:
    """The non-tensor attributes that shape a module's behaviour.

    `extra_repr` covers what torch shows (Dropout p, Conv stride); plain
    attributes of user classes (an activation name, a flag) are compared
    too, so that no configuration of model 0 is silently applied to another.
    """
    config: dict[str, object] = {}
    for key, value in vars(module).items():
        if key == "training" or key.startswith("_"):
            continue
        if isinstance(value, (bool, int, float, str, tuple, type(None))):
            config[key] = value
    return config


def model_list(models: Sequence[nn.Module]) -> list[nn.Module]:
    """The models as a list, refusing a single module, an empty sequence and non-modules."""
    if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
        raise TypeError(
            "ModelBatch: expected a list of N models, got a single "
            f"{type(models).__name__}; pass [model] for one model, or "
            "[make_model() for _ in range(N)] for N."
        )
    if isinstance(models, (str, bytes)) or not isinstance(models, Iterable):
        raise TypeError(
            f"ModelBatch: expected a list of N models, got {type(models).__name__}; pass "
            "[make_model() for _ in range(N)]."
        )
    models = list(models)
    if len(models) == 0:
        raise ValueError("ModelBatch: expected at least one model, got an empty sequence.")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"ModelBatch: model {i} is a {type(m).__name__}, expected an nn.Module."
            )
    return models


_SHARED_FIX = (
    "ModelBatch trains independent models, each with its own weights: for N copies of one "
    "model pass [copy.deepcopy(model) for _ in range(N)], or build each model fresh; weights "
    "shared by every model are one model, train it as it is."
)


def _check_not_shared(models: Sequence[nn.Module]) -> None:
    """Refuse one module object, or one parameter/buffer tensor, given for two models."""
    owner: dict[int, int] = {}
    for i, m in enumerate(models):
        j = owner.setdefault(id(m), i)
        if j != i:
            raise ValueError(
                f"ModelBatch: models {j} and {i} are the same module object "
                f"({type(m).__name__}); stacking would make them independent copies. " + _SHARED_FIX
            )
    tensor_owner: dict[int, int] = {}
    for i, m in enumerate(models):
        for kind, named in (("parameter", m.named_parameters()), ("buffer", m.named_buffers())):
            for name, t in named:
                j = tensor_owner.setdefault(id(t), i)
                if j != i:
                    raise ValueError(
                        f"ModelBatch: models {j} and {i} share one {kind} tensor, {name!r}; "
                        "stacking would untie it. " + _SHARED_FIX
                    )


def check_compatible(models: Sequence[nn.Module], *, ignore_dropout_p: bool = False) -> None:
    """Raise a ValueError naming the first difference between model 0 and another model.

    Checks: same class of every submodule, same parameter and buffer names,
    shapes, dtypes and devices, same train/eval mode, same non-parameter
    configuration (`extra_repr` and plain attributes).

    Args:
        models: the N models to stack.
        ignore_dropout_p: accept Dropout modules whose `p` differs (per-model
            dropout rates are handled by the caller).
    """
    models = model_list(models)
    _check_not_shared(models)
    ref = models[0]
    ref_modules = dict(ref.named_modules())
    ref_params = dict(ref.named_parameters())
    ref_buffers = dict(ref.named_buffers())
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(ref):
            raise ValueError(
                f"ModelBatch: model {i} is a {type(m).__name__}, model 0 a {type(ref).__name__}; "
                "every model must be of one class."
            )
        modules = dict(m.named_modules())
        if modules.keys() != ref_modules.keys():
            extra = sorted(modules.keys() - ref_modules.keys())
            missing = sorted(ref_modules.keys() - modules.keys())
            raise ValueError(
                f"ModelBatch: model {i} has different submodules than model 0 "
                f"(only in model {i}: {extra}; only in model 0: {missing})."
            )
        for name, sub in modules.items():
            r = ref_modules[name]
            where = repr(name) if name else "the top-level module"
            if type(sub) is not type(r):
                raise ValueError(
                    f"ModelBatch: model {i} differs from model 0 in {where} "
                    f"({type(sub).__name__} vs {type(r).__name__})."
                )
            if sub.training != r.training:
                raise ValueError(
                    f"ModelBatch: model {i} differs from model 0 in {where} in training mode "
                    f"(training={sub.training} vs {r.training}); call .train() or .eval() on "
                    "every model before stacking."
                )
            is_dropout = isinstance(sub, nn.modules.dropout._DropoutNd)
            if is_dropout and ignore_dropout_p:
                if sub.inplace != r.inplace:
                    raise ValueError(
                        f"ModelBatch: model {i} differs from model 0 in {where} "
                        f"(inplace={sub.inplace} vs {r.inplace})."
                    )
                continue
            if sub.extra_repr() != r.extra_repr() or _config_of(sub) != _config_of(r):
                hint = ""
                if is_dropout:
                    hint = " Pass per_model_dropout=True or give all models the same p."
                raise ValueError(
                    f"ModelBatch: model {i} differs from model 0 in {where} "
                    f"({_describe(sub)} vs {_describe(r)}); model {i}'s configuration would "
                    f"be replaced by model 0's.{hint}"
                )
        for kind, ref_tensors, tensors in (
            ("parameter", ref_params, dict(m.named_parameters())),
            ("buffer", ref_buffers, dict(m.named_buffers())),
        ):
            if tensors.keys() != ref_tensors.keys():
                extra = sorted(tensors.keys() - ref_tensors.keys())
                missing = sorted(ref_tensors.keys() - tensors.keys())
                raise ValueError(
                    f"ModelBatch: model {i} has different {kind} names than model 0 "
                    f"(only in model {i}: {extra}; only in model 0: {missing})."
                )
            for name, t in tensors.items():
                r = ref_tensors[name]
                for attr in ("shape", "dtype", "device"):
                    if getattr(t, attr) != getattr(r, attr):
                        raise ValueError(
                            f"ModelBatch: model {i} differs from model 0 in {kind} {name!r} "
                            f"({attr} {getattr(t, attr)} vs {getattr(r, attr)})."
                        )
                if kind == "parameter" and t.requires_grad != r.requires_grad:
                    raise ValueError(
                        f"ModelBatch: model {i} differs from model 0 in parameter {name!r} "
                        f"(requires_grad={t.requires_grad} vs {r.requires_grad})."
                    )


def stack_tensors(models: Sequence[nn.Module], name: str, kind: str) -> torch.Tensor:
    """Stack one named parameter or buffer of every model along a new axis 0: `[N, ...]`."""
    getter = "get_parameter" if kind == "parameter" else "get_buffer"
    with torch.no_grad():
        return torch.stack([getattr(m, getter)(name).detach() for m in models]).contiguous()


def split_name(name: str) -> tuple[str, str]:
    """A dotted name as (the owning module's path, the leaf's name)."""
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def build_stacked_tree(
    models: Sequence[nn.Module],
) -> tuple[nn.Module, list[str], list[str]]:
    """An `nn.Module` tree mirroring model 0 that holds the stacked tensors.

    Returns:
        (tree, parameter names, buffer names). The tree's parameters and
        buffers carry the user's names and have shape `[N, ...]`.
    """
    ref = models[0]
    tree = nn.Module()
    containers: dict[str, nn.Module] = {"": tree}

    def container(path: str) -> nn.Module:
        if path in containers:
            return containers[path]
        parent_path, leaf = split_name(path)
        node = nn.Module()
        container(parent_path).add_module(leaf, node)
        containers[path] = node
        return node

    param_names = [n for n, _ in ref.named_parameters()]
    buffer_names = [n for n, _ in ref.named_buffers()]
    persistent = set(ref.state_dict(keep_vars=True).keys())
    for name in param_names:
        prefix, leaf = split_name(name)
        t = stack_tensors(models, name, "parameter")
        requires_grad = ref.get_parameter(name).requires_grad
        container(prefix).register_parameter(leaf, nn.Parameter(t, requires_grad=requires_grad))
    for name in buffer_names:
        prefix, leaf = split_name(name)
        container(prefix).register_buffer(
            leaf, stack_tensors(models, name, "buffer"), persistent=name in persistent
        )
    return tree, param_names, buffer_names


def map_tensors(model: nn.Module, fn: Callable[[Tensor], Tensor]) -> nn.Module:
    """Replace every parameter and buffer of `model` by `fn(tensor)`, in place, keeping ties.

    `Module.to("meta")` and `to_empty` convert each module's tensors on their
    own, so a weight tied between two modules comes out as two tensors. Here a
    tensor reachable under several names is converted once and shared again.
    """
    memo: dict[int, Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(fn(p.detach()), requires_grad=p.requires_grad)
                module._parameters[name] = memo[id(p)]  # type: ignore[assignment]
        for name, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in memo:
                    memo[id(b)] = fn(b)
                module._buffers[name] = memo[id(b)]
    return model


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose tensors live on the `meta` device (no memory), ties kept."""
    return map_tensors(copy.deepcopy(model), lambda t: t.to("meta"))


def materialize(skeleton: nn.Module, device: torch.device) -> nn.Module:
    """A copy of a meta skeleton with uninitialized tensors on `device`, ties kept."""
    return map_tensors(copy.deepcopy(skeleton), lambda t: torch.empty_like(t, device=device))


def state_key_map(model: nn.Module) -> dict[str, str]:
    """Map each key of `model.state_dict()` to the name its tensor is stacked under.

    Tied tensors (one parameter reachable under two names) are stacked once,
    under the first name `named_parameters` gives; every alias maps to it.
    """
    canonical: dict[int, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        canonical.setdefault(id(t), name)
    return {key: canonical[id(t)] for key, t in model.state_dict(keep_vars=True).items()}


def repeated(one: Tensor, n: int, device: torch.device, pin: bool = False) -> Tensor:
    """`[n, *shape]` copies of a one-model stacked tensor `[1, *shape]`, in new memory on `device`."""
    shape = one.shape[1:]
    out = torch.empty(n, *shape, dtype=one.dtype, device=device, pin_memory=pin)
    return out.copy_(one.detach().expand(n, *shape))


def replace_stacked(
    model_batch: Any, tensors: Mapping[str, Tensor], n: int, device: torch.device | None = None
) -> None:
    """Install `[n, ...]` tensors as the batch's stacked parameters and buffers: n models.

    Each parameter keeps its `requires_grad`; `active` becomes all True for the
    n models (on `device`, default where it was).
    """
    for name, new in tensors.items():
        prefix, leaf = split_name(name)
        owner = model_batch.stacked.get_submodule(prefix)
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            assert old is not None
            owner._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            owner._buffers[leaf] = new
    where = model_batch.active.device if device is None else device
    model_batch.num_models = n
    model_batch.active = torch.ones(n, dtype=torch.bool, device=where)
