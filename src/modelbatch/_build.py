"""Build N stacked models straight from a factory, without N module instances.

`ModelBatch.from_factory(make, ids, seed=...)` lands here. Model `id`'s
random numbers depend only on `(seed, id)`: the same model comes out whatever
the other ids, the number of processes or the chunk it is built in.

Two ways to initialise, chosen by `init`:

- `"fast"`: one template `make()` tells the architecture; every parameter
  whose layer has a known default init (`nn.Linear`, `nn.Conv*d`,
  `nn.ConvTranspose*d`, `nn.Bilinear`, `nn.Embedding`, the RNN layers and
  cells) is drawn for all models at once on the target device, from the
  same distribution as torch's `reset_parameters` (uniform in
  `[-1/sqrt(fan_in), 1/sqrt(fan_in)]`, ...), with a counter-based hash of
  `(seed, id, parameter, element)`. Tensors that `make()` builds
  deterministically (norm weights and biases, running statistics, constants)
  are copied from the template. Equal in distribution to `make()`, bitwise
  reproducible from `(seed, id)` on a device type.
- `"exact"`: `make()` once per model under `torch.manual_seed(model_seed(seed, id))`,
  then stacked: bitwise what `make()` gives, N module instances, slow.

`"auto"` (the default) takes `"fast"` when every random tensor of the
template is recognised and its values fit the default init (so a `make()`
that calls `nn.init.xavier_uniform_` or `normal_` is noticed), else
`"exact"`, with a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._stack import meta_skeleton, repeated, replace_stacked, split_name
from .nn._convert import _device_of
from .nn._seeded import SEEDED_TWINS, hash_uniform, mix32

if TYPE_CHECKING:
    from ._batch import ModelBatch

__all__ = ["build_from_factory", "global_ids", "model_seeds"]

_M32 = 0xFFFFFFFF
# Streams keep the uses of one model's seed apart.
_STREAM_MODEL, _STREAM_PARAM, _STREAM_DROPOUT = 0x6A09E667, 0xBB67AE85, 0x3C6EF372
_INITS = ("auto", "fast", "exact")
_CONV = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_RNN = (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell)


def global_ids(owner: str, ids_or_n: int | Sequence[int] | Tensor) -> Tensor:
    """Global model ids `[N]` (int64, CPU) from a count or a sequence of distinct ints >= 0."""
    if isinstance(ids_or_n, int):
        if ids_or_n < 1:
            raise ValueError(f"{owner}: the number of models must be >= 1, got {ids_or_n}.")
        return torch.arange(ids_or_n, dtype=torch.int64)
    ids = torch.as_tensor(list(ids_or_n) if isinstance(ids_or_n, range) else ids_or_n)
    ids = ids.detach().cpu().reshape(-1)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{owner}: model ids must be integers, got dtype {ids.dtype}.")
    ids = ids.to(torch.int64)
    if ids.numel() == 0:
        raise ValueError(f"{owner}: expected at least one model id, got none.")
    if int(ids.min()) < 0 or int(ids.max()) > _M32:
        raise ValueError(f"{owner}: model ids must be in [0, 2**32), got {ids.tolist()[:8]}...")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"{owner}: model ids must be distinct, got repeats in {ids.tolist()}.")
    return ids


def _keys(seed: int, ids: Tensor, *salts: int) -> Tensor:
    """32-bit keys `[N]` (int64) from `(seed, id, *salts)`: a chain of `_mix32` rounds."""
    s = int(seed) & ((1 << 64) - 1)
    h = mix32((ids.to(torch.int64) + 0x9E3779B9) & _M32)
    for word in (s & _M32, s >> 32, *salts):
        h = mix32(h ^ (int(word) & _M32))
    return h


def model_seeds(seed: int, ids: int | Sequence[int] | Tensor) -> Tensor:
    """The seed of each model id, `[N]` int64 in `[0, 2**63)`: what `init="exact"` seeds `make()` with.

    Public as `modelbatch.distributed.init_seeds`.

    Example:
        >>> model_seeds(0, [3, 5]).shape
        torch.Size([2])
    """
    ids = global_ids("model_seeds", ids)
    return (_keys(seed, ids, _STREAM_MODEL, 0) << 31) ^ _keys(seed, ids, _STREAM_MODEL, 1)


# ---------------------------------------------------------------------- init rules


def _rule(module: nn.Module, leaf: str, param: Tensor) -> tuple[str, float, float] | None:
    """`("uniform", low, high)` or `("normal", mean, std)` for a parameter torch draws, else None."""
    kind = type(module)
    weight: Any = getattr(module, "weight", None)
    if kind in _CONV:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        if leaf == "weight":
            # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound gain * sqrt(3 / fan_in).
            bound = math.sqrt(1.0 / 3.0) * math.sqrt(3.0 / fan_in)
            return ("uniform", -bound, bound)
        if leaf == "bias":
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            return ("uniform", -bound, bound)
    if kind is nn.Bilinear and leaf in ("weight", "bias"):
        bound = 1 / math.sqrt(weight.size(1))
        return ("uniform", -bound, bound)
    if kind in (nn.Embedding,) and leaf == "weight":
        return ("normal", 0.0, 1.0)
    if kind in _RNN:
        hidden = int(getattr(module, "hidden_size", 0))
        bound = 1.0 / math.sqrt(hidden) if hidden > 0 else 0.0
        return ("uniform", -bound, bound)
    return None


def _fits(rule: tuple[str, float, float], value: Tensor) -> bool:
    """Whether a template's draw looks like it came from `rule` (catches custom inits)."""
    v = value.detach().double().reshape(-1)
    if v.numel() == 0:
        return True
    kind, a, b = rule
    if kind == "uniform":
        bound = max(abs(a), abs(b))
        if bool((v.abs() > bound * (1 + 1e-6)).any()):
            return False
        if v.numel() >= 64 and bound > 0:
            return abs(float(v.std()) / (bound / math.sqrt(3)) - 1) < 0.25
        return True
    if v.numel() >= 64:
        return abs(float(v.std()) / b - 1) < 0.25 and abs(float(v.mean()) - a) < 0.25 * b
    return True


def _plan(make: Callable[[], nn.Module], seed: int) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """The template model, a rule per random parameter, and what `"fast"` cannot reproduce."""
    template = _make(make, seed)
    other = _make(make, seed + 1)
    rules: dict[str, Any] = {}
    problems: list[str] = []
    modules = dict(template.named_modules())
    other_state = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    for name, t in [*template.named_parameters(), *template.named_buffers()]:
        prefix, leaf = split_name(name)
        module = modules[prefix]
        same = torch.equal(t, other_state[name])
        rule = _rule(module, leaf, t) if isinstance(t, nn.Parameter) else None
        if rule is not None and not same:
            if _fits(rule, t):
                rules[name] = rule
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    rules[name] = ("embedding", 0.0, 1.0, module.padding_idx)
            else:
                problems.append(f"{name!r} ({type(module).__name__}) has a custom init")
        elif not same:
            problems.append(f"{name!r} ({type(module).__name__}) is random with no known rule")
    return template, rules, problems


def _make(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed) & ((1 << 63) - 1))
        module = make()
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"ModelBatch.from_factory: make() returned a {type(module).__name__}, "
            "expected an nn.Module."
        )
    return module


def _draw(rule: Any, keys: Tensor, shape: torch.Size, dtype: torch.dtype, device: Any) -> Tensor:
    """`[n, *shape]` values of one parameter for the models whose keys `[n]` are given."""
    numel = math.prod(shape)
    u = hash_uniform(keys.to(device), numel, device)
    if rule[0] == "uniform":
        low, high = rule[1], rule[2]
        out = u.mul_(high - low).add_(low)
    else:
        # Box-Muller with a second, independent draw.
        u2 = hash_uniform(mix32(keys.to(device) ^ 0x5BD1E995), numel, device)
        out = (-2.0 * torch.log1p(-u)).sqrt_() * torch.cos(2 * math.pi * u2)
        out = out.mul_(rule[2]).add_(rule[1])
    out = out.to(dtype).reshape(len(keys), *shape)
    if rule[0] == "embedding" and rule[3] is not None:
        out[:, rule[3]] = 0
    return out


def _seeded_dropout(template: nn.Module) -> dict[str, Any]:
    return {
        name: SEEDED_TWINS[type(m)]
        for name, m in template.named_modules()
        if type(m) in SEEDED_TWINS
    }


# ---------------------------------------------------------------------- the builder


def build_from_factory(
    cls: type[ModelBatch],
    make: Callable[[], nn.Module],
    ids_or_n: int | Sequence[int] | Tensor,
    *,
    seed: int,
    device: Any,
    init: str,
    seeded_dropout: bool,
    chunk_elements: int,
    build_device: Any = None,
    **kwargs: Any,
) -> ModelBatch:
    owner = "ModelBatch.from_factory"
    if init not in _INITS:
        raise ValueError(f"{owner}: init must be one of {_INITS}, got {init!r}.")
    ids = global_ids(owner, ids_or_n)
    template, rules, problems = _plan(make, seed)
    if problems and init == "fast":
        raise ValueError(
            f"{owner}: init='fast' cannot reproduce make(): {'; '.join(problems)}; pass "
            "init='exact' (make() once per model) or use torch's default inits."
        )
    if problems and init == "auto":
        warnings.warn(
            f"{owner}: building the {len(ids)} models one by one (init='exact'), because "
            f"{'; '.join(problems)}.",
            stacklevel=3,
        )
    exact = init == "exact" or bool(problems)
    device = torch.device(device) if device is not None else _device_of(template)
    dropouts = _seeded_dropout(template) if seeded_dropout else {}

    from .nn._convert import _with_replacements

    def convert(model: nn.Module) -> nn.Module:
        if not dropouts:
            return model
        twins = {
            name: twin.from_torch(model.get_submodule(name)) for name, twin in dropouts.items()
        }
        return _with_replacements(model, twins)

    if exact:
        seeds = model_seeds(seed, ids).tolist()
        models = [convert(_make(make, s)).to(device) for s in seeds]
        mb = cls(models, **kwargs)
    else:
        mb = cls([convert(template).to(device)], **kwargs)
        draw = torch.device(build_device) if build_device is not None else device
        _grow(mb, ids, template, rules, seed, device, chunk_elements, draw)
    # Exports give the user's own layers back (torch dropout with its rate).
    object.__setattr__(mb, "_export_skeleton", meta_skeleton(template))
    _seed_dropouts(mb, dropouts, ids, seed)
    mb.model_ids = ids
    return mb


def _grow(
    mb: ModelBatch,
    ids: Tensor,
    template: nn.Module,
    rules: dict[str, Any],
    seed: int,
    device: torch.device,
    chunk_elements: int,
    draw: torch.device,
) -> None:
    """Swap the one-model batch's `[1, ...]` tensors for `[N, ...]` ones, drawn or copied.

    Values are drawn on `draw` a piece at a time and written to `device`; a
    CPU store drawn on a GPU is allocated in pinned memory (what offloading
    needs, without a second host copy).
    """
    pin = device.type == "cpu" and draw.type == "cuda"
    n = len(ids)
    order = {name: k for k, (name, _) in enumerate(template.named_parameters())}
    tensors = {**mb.stacked_params(), **mb.stacked_buffers()}
    grown: dict[str, Tensor] = {}
    for name, one in tensors.items():
        shape, dtype = one.shape[1:], one.dtype
        rule = rules.get(name)
        if rule is None:
            # Deterministic in make(): every model gets the template's value.
            new = repeated(one, n, device, pin)
        else:
            new = torch.empty(n, *shape, dtype=dtype, device=device, pin_memory=pin)
            keys = _keys(seed, ids, _STREAM_PARAM, order[name])
            step = max(1, chunk_elements // max(1, math.prod(shape)))
            for start in range(0, n, step):
                stop = min(n, start + step)
                part = _draw(rule, keys[start:stop], shape, dtype, draw)
                new[start:stop].copy_(part, non_blocking=pin)
        if pin:
            torch.cuda.synchronize(draw)
        grown[name] = new
    replace_stacked(mb, grown, n, device)


def _seed_dropouts(mb: ModelBatch, dropouts: dict[str, Any], ids: Tensor, seed: int) -> None:
    """Each seeded dropout layer of model `id` gets the key `(seed, id, layer)`."""
    buffers = mb.stacked_buffers()
    with torch.no_grad():
        for k, name in enumerate(dropouts):
            key = f"{name}.seed" if name else "seed"
            buffers[key].copy_(_keys(seed, ids, _STREAM_DROPOUT, k))
