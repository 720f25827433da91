"""The plan of a MixedBatch: which models stack together, padded or depth-masked.

Runs once, at construction. Three steps:

1. Architectures: models that `_stack.check_compatible` accepts together
   (same class, shapes and configuration) form one architecture.
2. Families: architectures that differ only in hidden sizes (Linear widths,
   conv channels, BatchNorm features) and in the number of blocks of an
   `nn.Sequential` are aligned onto one template (the deepest of them).
3. Groups: within a family, architectures are merged greedily, largest first,
   while the padded stack wastes at most `max_waste` of its parameter
   elements; each group becomes one stacked `ModelBatch`.

Nothing here touches tensor values: shapes and module configuration only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from torch import nn

from ._stack import _config_of, check_compatible, split_name

__all__ = ["Arch", "Group", "Mismatch", "align", "plan_groups"]

#: layers whose size fields may differ between models of one group (padded with zeros).
_SIZE_KEYS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels")),
    (nn.modules.batchnorm._BatchNorm, ("num_features",)),
)


class Mismatch(Exception):
    """Two models cannot share one padded template; the message says where and why."""


def _size_keys(module: nn.Module) -> tuple[str, ...]:
    for cls, keys in _SIZE_KEYS:
        if isinstance(module, cls):
            return keys
    return ()


def _io(module: nn.Module) -> tuple[int | None, int | None]:
    """The feature size a module reads and writes, where the layer says (else None)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, module.num_features
    if isinstance(module, nn.Sequential):
        return _io_of(list(module))
    return None, None


def _io_of(modules: Sequence[nn.Module]) -> tuple[int | None, int | None]:
    ins = [i for i, _ in map(_io, modules) if i is not None]
    outs = [o for _, o in map(_io, modules) if o is not None]
    return (ins[0] if ins else None), (outs[-1] if outs else None)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _leaf_difference(a: nn.Module, b: nn.Module) -> str | None:
    """Why module `a` cannot be padded into module `b` (children not compared), or None."""
    if a.training != b.training:
        return f"training={a.training} vs {b.training}"
    keys = _size_keys(a)
    config_a = {k: v for k, v in _config_of(a).items() if k not in keys}
    config_b = {k: v for k, v in _config_of(b).items() if k not in keys}
    if config_a != config_b or (not keys and a.extra_repr() != b.extra_repr()):
        return f"{type(a).__name__}({a.extra_repr()}) vs {type(b).__name__}({b.extra_repr()})"
    sizes_differ = any(getattr(a, k) != getattr(b, k) for k in keys)
    if sizes_differ and getattr(a, "groups", 1) != 1:
        return f"grouped convolution (groups={a.groups}) with different channels"
    for kind in ("_parameters", "_buffers"):
        ta = {k: v for k, v in getattr(a, kind).items() if v is not None}
        tb = {k: v for k, v in getattr(b, kind).items() if v is not None}
        if ta.keys() != tb.keys():
            return f"tensors {sorted(ta)} vs {sorted(tb)}"
        for name, t in ta.items():
            u = tb[name]
            if t.dtype != u.dtype or t.dim() != u.dim() or t.requires_grad != u.requires_grad:
                return f"{name!r} {t.dtype} {tuple(t.shape)} vs {u.dtype} {tuple(u.shape)}"
            if t.shape != u.shape and not keys:
                return (
                    f"{name!r} of shape {tuple(t.shape)} vs {tuple(u.shape)} (not a padded layer)"
                )
    return None


Alignment = tuple[dict[str, str], dict[str, tuple[int, int]]]


def align(a: nn.Module, b: nn.Module, path_a: str = "", path_b: str = "") -> Alignment:
    """Place model `a` inside template `b`.

    Returns:
        (names, masked): `names` maps each parameter and buffer name of `a`
        to the template's name that holds it (a slice of it, when `b` is
        wider); `masked` maps the path of each `nn.Sequential` of `b` that is
        deeper than `a`'s to the range `[start, end)` of `b`'s children that
        `a` does not have (for `a` they are the identity).

    Raises:
        Mismatch: naming the first place where `a` does not fit in `b`.
    """
    where = repr(path_a) if path_a else "the top-level module"
    if type(a) is not type(b):
        raise Mismatch(f"{where}: {type(a).__name__} vs {type(b).__name__}")
    if isinstance(a, nn.Sequential) and type(a) is nn.Sequential and len(a) != len(b._modules):
        return _align_depth(a, cast(nn.Sequential, b), path_a, path_b)
    reason = _leaf_difference(a, b)
    if reason is not None:
        raise Mismatch(f"{where}: {reason}")
    if list(a._modules) != list(b._modules):
        raise Mismatch(f"{where}: submodules {list(a._modules)} vs {list(b._modules)}")
    names: dict[str, str] = {}
    for kind in ("_parameters", "_buffers"):
        for k, v in getattr(a, kind).items():
            if v is not None:
                names[_join(path_a, k)] = _join(path_b, k)
    masked: dict[str, tuple[int, int]] = {}
    for k, child in a._modules.items():
        other = b._modules[k]
        if child is None or other is None:
            if child is not other:
                raise Mismatch(f"{where}: submodule {k!r} is None in one model only")
            continue
        n, m = align(child, other, _join(path_a, k), _join(path_b, k))
        names.update(n)
        masked.update(m)
    return names, masked


def _align_depth(a: nn.Sequential, b: nn.Sequential, path_a: str, path_b: str) -> Alignment:
    """`a` is `b` with `d` consecutive children left out; find where (latest first)."""
    where = repr(path_a) if path_a else "the top-level module"
    ca, cb = list(a._modules.items()), list(b._modules.items())
    d = len(cb) - len(ca)
    if d < 0:
        raise Mismatch(f"{where}: {len(ca)} layers vs {len(cb)} in the deeper template")
    if reason := _leaf_difference(a, b):
        raise Mismatch(f"{where}: {reason}")
    last = f"{where}: no run of {d} layers of the deeper model maps its features to themselves"
    for p in range(len(ca), -1, -1):
        size_in, size_out = _io_of([m for _, m in cb[p : p + d]])
        if size_in is not None and size_out is not None and size_in != size_out:
            continue  # a masked (identity) run must keep the feature size
        try:
            names: dict[str, str] = {}
            masked: dict[str, tuple[int, int]] = {path_b: (p, p + d)}
            for i, (ka, ma) in enumerate(ca):
                kb, mb = cb[i if i < p else i + d]
                n, m = align(ma, mb, _join(path_a, ka), _join(path_b, kb))
                names.update(n)
                masked.update(m)
            return names, masked
        except Mismatch as err:
            last = str(err)
    raise Mismatch(last)


# ---------------------------------------------------------------------- the plan


@dataclass
class Arch:
    """One architecture: models that stack as they are."""

    index: int
    members: list[int]
    rep: nn.Module
    label: str
    numel: int
    tensors: int


@dataclass
class Group:
    """Architectures stacked as one tensor per template parameter.

    `names[k]` and `masked[k]` are arch k's alignment onto `template`;
    `shapes` the padded shape of each template tensor; `gates` the gated
    child ranges of each `nn.Sequential` path of the template.
    """

    archs: list[Arch]
    template: Arch
    names: list[dict[str, str]]
    masked: list[dict[str, tuple[int, int]]]
    shapes: dict[str, tuple[int, ...]]
    gates: dict[str, list[tuple[int, int]]]
    #: "stacked", "padded", "depth-masked" or "padded + depth-masked".
    kind: str = "stacked"
    #: the fraction of the stacked parameter elements that are padding or masked blocks.
    waste: float = 0.0
    members: list[int] = field(default_factory=list)


def _label(model: nn.Module) -> str:
    sizes = [str(_io(m)[1]) for m in model.modules() if _size_keys(m)]
    return f"{type(model).__name__}[{','.join(sizes)}]" if sizes else type(model).__name__


def _key(model: nn.Module) -> tuple:
    """A hashable structure key; equal keys are then confirmed by `check_compatible`."""
    return (
        type(model),
        tuple((n, type(m), m.extra_repr(), m.training) for n, m in model.named_modules()),
        tuple((n, tuple(t.shape), t.dtype, str(t.device)) for n, t in model.named_parameters()),
        tuple((n, tuple(t.shape), t.dtype, str(t.device)) for n, t in model.named_buffers()),
    )


def architectures(models: Sequence[nn.Module], labels: Sequence[str] | None) -> list[Arch]:
    """Group models into architectures with `check_compatible` (the same rules as ModelBatch)."""
    archs: list[Arch] = []
    by_key: dict[tuple, list[Arch]] = {}
    for i, m in enumerate(models):
        key = _key(m)
        for arch in by_key.get(key, []):
            try:
                check_compatible([arch.rep, m])
            except ValueError:
                continue
            if labels is not None and labels[i] != arch.label:
                continue
            arch.members.append(i)
            break
        else:
            arch = Arch(
                index=len(archs),
                members=[i],
                rep=m,
                label=labels[i] if labels is not None else _label(m),
                numel=sum(p.numel() for p in m.parameters()),
                tensors=sum(1 for _ in m.parameters()),
            )
            archs.append(arch)
            by_key.setdefault(key, []).append(arch)
    return archs


class _Aligner:
    """Alignments of one architecture onto another, computed once each."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], Alignment | Mismatch] = {}

    def __call__(self, a: Arch, b: Arch) -> Alignment:
        key = (a.index, b.index)
        if key not in self._cache:
            try:
                self._cache[key] = align(a.rep, b.rep)
            except Mismatch as err:
                self._cache[key] = err
        hit = self._cache[key]
        if isinstance(hit, Mismatch):
            raise hit
        return hit

    def group(self, archs: list[Arch]) -> Group:
        """One group of these architectures (raises Mismatch if one does not fit)."""
        template = max(archs, key=lambda a: (a.tensors, a.numel, -a.index))
        names, masked = zip(*(self(a, template) for a in archs))
        shapes = {n: tuple(t.shape) for n, t in _tensors(template.rep)}
        for arch, mapping in zip(archs, names):
            own = dict(_tensors(arch.rep))
            for n, t in mapping.items():
                shapes[t] = tuple(max(x, y) for x, y in zip(shapes[t], own[n].shape))
        gates: dict[str, list[tuple[int, int]]] = {}
        for path in sorted({p for m in masked for p in m}):
            ranges = [m[path] for m in masked if path in m and m[path][0] != m[path][1]]
            bounds = sorted({x for r in ranges for x in r})
            segments = [
                (s, e)
                for s, e in itertools.pairwise(bounds)
                if any(r0 <= s and e <= r1 for r0, r1 in ranges)
            ]
            if segments:
                gates[path] = segments
        _unify_chained_sizes(template.rep, shapes, gates)
        padded = any(
            tuple(t.shape) != shapes[names_k[n]]
            for a, names_k in zip(archs, names)
            for n, t in a.rep.named_parameters()
        )
        kind = " + ".join((["padded"] if padded else []) + (["depth-masked"] if gates else []))
        group = Group(list(archs), template, list(names), list(masked), shapes, gates)
        group.kind = kind or "stacked"
        group.members = sorted(i for a in archs for i in a.members)
        total = _stacked_numel(group)
        real = sum(a.numel * len(a.members) for a in archs)
        group.waste = 1.0 - real / total if total else 0.0
        return group


def _handles(module: nn.Module, path: str) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """Where a sized layer keeps its input and output size: `(tensor name, dim)` each."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        w = _join(path, "weight")
        return (w, 1), (w, 0)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        t = "weight" if module.weight is not None else "running_mean"
        if getattr(module, t, None) is None:
            return None
        handle = (_join(path, t), 0)
        return handle, handle
    return None


def _leaves(module: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    if type(module) is nn.Sequential:
        return [
            leaf
            for k, child in module._modules.items()
            if child is not None
            for leaf in _leaves(child, _join(path, k))
        ]
    return [(path, module)]


def _unify_chained_sizes(
    template: nn.Module,
    shapes: dict[str, tuple[int, ...]],
    gates: dict[str, list[tuple[int, int]]],
) -> None:
    """Give each hidden size one padded value along every `nn.Sequential` chain, in place.

    A layer that only some models have (a gated block) is padded from those
    models alone; its input comes from the layer before it, padded from all
    models. Sizes that feed one another (in the template: equal) are set to
    the largest of them; so are the input and output sizes of a gated run
    (the identity for the models that lack it).
    """
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def root(h: tuple[str, int]) -> tuple[str, int]:
        while parent.get(h, h) != h:
            h = parent[h]
        return h

    own = dict(_tensors(template))
    for path, seq in template.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        previous: tuple[str, int] | None = None
        for leaf_path, leaf in _leaves(seq, path):
            handles = _handles(leaf, leaf_path)
            if handles is None:
                if any(True for _ in leaf.parameters()):
                    previous = None  # an unknown layer with weights: the chain stops
                continue
            size_in, size_out = handles
            if previous is not None:
                same = own[previous[0]].shape[previous[1]] == own[size_in[0]].shape[size_in[1]]
                if same:  # (a Flatten in between changes the size: no link)
                    parent[root(size_in)] = root(previous)
            previous = size_out
    for path, segments in gates.items():
        children = list(template.get_submodule(path)._modules.items())
        for start, end in segments:
            sized = [
                h
                for k, child in children[start:end]
                if child is not None
                for leaf_path, leaf in _leaves(child, _join(path, k))
                if (h := _handles(leaf, leaf_path)) is not None
            ]
            if sized:
                parent.setdefault(sized[0][0], sized[0][0])
                parent[root(sized[-1][1])] = root(sized[0][0])
    classes: dict[tuple[str, int], int] = {}
    for key in list(parent):
        for x in (key, parent[key]):
            r = root(x)
            classes[r] = max(classes.get(r, 0), shapes[x[0]][x[1]])
    for key in list(parent):
        for name, dim in (key, parent[key]):
            size = classes[root((name, dim))]
            shape = list(shapes[name])
            shape[dim] = size
            shapes[name] = tuple(shape)
            # The layer's bias (and a BatchNorm's other tensors) share its output size.
            if dim == 0:
                prefix = split_name(name)[0]
                for other in shapes:
                    if split_name(other)[0] == prefix and shapes[other]:
                        grown = list(shapes[other])
                        grown[0] = max(grown[0], size)
                        shapes[other] = tuple(grown)


def _tensors(model: nn.Module) -> list:
    return [*model.named_parameters(), *model.named_buffers()]


def _orders(aligner: _Aligner, family: list[Arch]) -> list[list[Arch]]:
    """Orders to cut into groups: by size, by the template's tensor shapes (width first)
    and by depth first. The best cut over the three is kept."""
    template = family[0]

    def shapes(a: Arch) -> tuple:
        names = aligner(a, template)[0]
        own = dict(_tensors(a.rep))
        placed = {t: tuple(own[n].shape) for n, t in names.items()}
        return tuple(placed.get(n, ()) for n, _ in _tensors(template.rep))

    return [
        sorted(family, key=lambda a: (-a.numel, -a.tensors, a.index)),
        sorted(family, key=lambda a: (shapes(a), a.tensors, a.numel), reverse=True),
        sorted(family, key=lambda a: (a.tensors, shapes(a), a.numel), reverse=True),
    ]


def _partition(aligner: _Aligner, ordered: list[Arch], max_waste: float) -> list[Group]:
    """Cut an ordered family into consecutive groups, each wasting at most `max_waste`."""
    groups: list[Group] = []
    current: list[Arch] = []
    for arch in ordered:
        if current and max_waste > 0:
            try:
                candidate: Group | None = aligner.group([*current, arch])
            except Mismatch:
                candidate = None
            if candidate is not None and candidate.waste <= max_waste:
                current.append(arch)
                continue
        if current:
            groups.append(aligner.group(current))
        current = [arch]
    groups.append(aligner.group(current))
    return groups


def _stacked_numel(group: Group) -> int:
    """Parameter elements of the group's stacked tensors (padding included)."""
    params = {n for n, _ in group.template.rep.named_parameters()}
    per_model = sum(math.prod(s) for t, s in group.shapes.items() if t in params)
    return per_model * len(group.members)


def plan_groups(
    models: Sequence[nn.Module], max_waste: float, labels: Sequence[str] | None = None
) -> list[Group]:
    """The groups of a MixedBatch (see the module docstring)."""
    archs = architectures(models, labels)
    aligner = _Aligner()
    order = sorted(archs, key=lambda a: (-a.tensors, -a.numel, a.index))
    families: list[list[Arch]] = []
    for arch in order:
        for family in families:
            try:
                aligner(arch, family[0])
            except Mismatch:
                continue
            family.append(arch)
            break
        else:
            families.append([arch])
    groups: list[Group] = []
    for family in families:
        groups += min(
            [_partition(aligner, ordered, max_waste) for ordered in _orders(aligner, family)],
            key=lambda gs: (len(list(gs)), sum(_stacked_numel(g) for g in gs)),
        )
    groups.sort(key=lambda g: g.members[0])
    return groups
