"""Prepare user models for stacking: substitute layers that vmap cannot batch.

Runs once, at `ModelBatch` construction. The user's models are never
modified: a model that needs a substitution is replaced by a shallow copy in
which only the modules on the path to the substituted layer are new; every
parameter and buffer is the user's own tensor (nothing is copied).

Substitutions (torch type -> `modelbatch.nn` twin, same parameter names):

| torch layer | when | why |
| --- | --- | --- |
| `nn.LSTM`, `nn.GRU`, `nn.RNN`, `nn.LSTMCell` | always | no vmap batching rule |
| `nn.GRUCell`, `nn.RNNCell`, `nn.Bilinear` | always | vmap would loop over the models |
| `nn.BatchNorm1d/2d/3d` | always | `momentum=None` reads a tensor as a float; vmap applies the affine as extra passes |
| `nn.RReLU` | always | no vmap batching rule |
| `nn.Conv1d/2d/3d` | `groups=1`, `padding_mode="zeros"` | vmap runs N groups; the twin picks a faster lowering |
| `nn.MaxPool*d`, `AvgPool*d`, `AdaptiveAvgPool*d` | always | vmap's rule copies a `[B, N, C, ...]` input |
| `nn.Dropout`, `Dropout1d/2d/3d`, `AlphaDropout`, `FeatureAlphaDropout` | `per_model_dropout=True` | p must be a per-model tensor |
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._stack import split_name
from ._cells import GRUCell, LSTMCell, RNNCell
from ._conv import TORCH_TWINS as CONV_TWINS
from ._dropout import TORCH_TWINS as DROPOUT_TWINS
from ._pool import TORCH_TWINS as POOL_TWINS
from ._rnn import GRU, LSTM, RNN
from ._twins import BatchNorm1d, BatchNorm2d, BatchNorm3d, Bilinear, RReLU, _CumulativeBatchNorm

__all__ = ["prepare_models", "restore_config", "substitution_for", "vmap_forward_context"]

logger = logging.getLogger("modelbatch")

Substitute = Callable[[nn.Module, "torch.device"], nn.Module]

# torch layer -> its twin; each twin has `from_torch(module)`.
_ALWAYS: dict[type[nn.Module], Any] = {
    nn.LSTM: LSTM,
    nn.GRU: GRU,
    nn.RNN: RNN,
    nn.LSTMCell: LSTMCell,
    nn.GRUCell: GRUCell,
    nn.RNNCell: RNNCell,
    nn.RReLU: RReLU,
    nn.Bilinear: Bilinear,
}
_BATCHNORM: dict[type[nn.Module], Any] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def substitution_for(module: nn.Module, per_model_dropout: bool = False) -> Substitute | None:
    """How to replace `module` for vmap, or None when torch's own layer works.

    Raises:
        ValueError: for a layer known not to work under vmap and without a twin.
    """
    kind = type(module)
    if kind in _ALWAYS:
        return lambda m, _: _ALWAYS[kind].from_torch(m)
    if kind in CONV_TWINS and module.groups == 1 and module.padding_mode == "zeros":
        return lambda m, _: CONV_TWINS[kind].from_torch(m)
    if kind in _BATCHNORM:
        return lambda m, _: _BATCHNORM[kind].from_torch(m)
    if kind in POOL_TWINS:
        return lambda m, _: POOL_TWINS[kind].from_torch(m)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
        if not module.track_running_stats or isinstance(module, _CumulativeBatchNorm):
            # modelbatch's own twin already runs under vmap.
            return None
        raise ValueError(
            f"ModelBatch: {kind.__name__}(momentum=None) cannot run under torch.vmap (the "
            "cumulative average reads num_batches_tracked as a Python float); use "
            "nn.BatchNorm1d/2d/3d or give a momentum, e.g. momentum=0.1."
        )
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
        raise ValueError(
            f"ModelBatch: {kind.__name__}(sparse=True) cannot be stacked (sparse gradients "
            "have no model axis under torch.vmap); use sparse=False."
        )
    if per_model_dropout and kind in DROPOUT_TWINS:
        twin = DROPOUT_TWINS[kind]
        return lambda m, device: twin.from_torch(m, device)
    return None


def _check_same_rate(models: Sequence[nn.Module], name: str, module: nn.Module) -> None:
    """A dropout class without a twin keeps one rate for all models: refuse differing rates."""
    for i, model in enumerate(models[1:], start=1):
        p = model.get_submodule(name).p
        if p != module.p:
            raise ValueError(
                f"ModelBatch: per_model_dropout=True has no per-model version of "
                f"{type(module).__name__} ({name!r}); model {i} has p={p}, model 0 p={module.p}. "
                "Use a torch dropout class (nn.Dropout, Dropout1d/2d/3d, AlphaDropout, "
                "FeatureAlphaDropout) or give all models the same p."
            )


def _device_of(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _with_replacements(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A shallow copy of `model` with the named submodules replaced; the user's model is untouched."""
    if "" in replacements:
        return replacements[""]
    clones: dict[str, nn.Module] = {}

    def clone(path: str) -> nn.Module:
        if path not in clones:
            original = model.get_submodule(path)
            node = copy.copy(original)
            node._modules = dict(original._modules)
            if path:
                parent_path, leaf = split_name(path)
                clone(parent_path)._modules[leaf] = node
            clones[path] = node
        return clones[path]

    for name, new in replacements.items():
        parent_path, leaf = split_name(name)
        clone(parent_path)._modules[leaf] = new
    return clones[""]


def prepare_models(
    models: Sequence[nn.Module], *, per_model_dropout: bool = False
) -> list[nn.Module]:
    """Return the models to stack, with layers that vmap cannot batch substituted.

    Args:
        models: N compatible models (already checked by `check_compatible`).
        per_model_dropout: replace every torch dropout module by its
            `modelbatch.nn` twin whose `p` is a buffer, so that each model
            keeps its own rate.

    Returns:
        N models: the user's own where nothing was substituted, else shallow
        copies sharing every parameter and buffer with the user's.
    """
    models = list(models)
    plan: dict[str, Substitute] = {}
    for name, module in models[0].named_modules():
        sub = substitution_for(module, per_model_dropout)
        if sub is not None:
            plan[name] = sub
        elif per_model_dropout and isinstance(module, nn.modules.dropout._DropoutNd):
            _check_same_rate(models, name, module)
    if not plan:
        return models
    automatic = [
        f"{name or 'model'} ({type(models[0].get_submodule(name)).__name__})"
        for name in plan
        if type(models[0].get_submodule(name)) not in DROPOUT_TWINS
        and type(models[0].get_submodule(name)) not in CONV_TWINS
        and type(models[0].get_submodule(name)) not in POOL_TWINS
        and not (
            type(models[0].get_submodule(name)) in _BATCHNORM
            and models[0].get_submodule(name).momentum is not None
        )
    ]
    if automatic:
        logger.info(
            "ModelBatch: running %s as vmap-friendly modelbatch.nn layers (same parameter "
            "names and math; exported models use torch's layers).",
            ", ".join(automatic),
        )
    prepared = []
    for model in models:
        device = _device_of(model)
        replacements = {name: sub(model.get_submodule(name), device) for name, sub in plan.items()}
        prepared.append(_with_replacements(model, replacements))
    return prepared


def restore_config(module: nn.Module, buffers: Mapping[str, Tensor], index: int) -> None:
    """Give an exported torch module model `index`'s own dropout rates.

    `buffers` are the stacked buffers of a `ModelBatch`; a per-model dropout
    layer `name` keeps its rates there as `name.p` `[N]`.
    """
    for name, sub in module.named_modules():
        key = f"{name}.p" if name else "p"
        if isinstance(sub, nn.modules.dropout._DropoutNd) and key in buffers:
            sub.p = float(buffers[key][index])


@contextlib.contextmanager
def vmap_forward_context(device: torch.device) -> Iterator[None]:
    """Route attention through kernels that vmap batches, for one vmapped forward.

    - The fused "fast path" of `nn.MultiheadAttention` and
      `nn.TransformerEncoderLayer` (eval mode) has no batching rule and no
      backward: vmap would run it model by model and gradients would fail.
    - On CPU, `scaled_dot_product_attention` picks a flash kernel without a
      batching rule; the math backend is made of batched matmuls.
    """
    was_enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        if device.type == "cpu":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was_enabled)
