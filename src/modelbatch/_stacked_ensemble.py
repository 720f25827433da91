"""An ensemble for inference: one ordinary `nn.Module` over the members' stacked weights."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._combine import COMBINES, ensemble_classify, ensemble_regress
from ._stack import build_stacked_tree, meta_skeleton
from .nn._convert import prepare_models, vmap_forward_context

__all__ = ["TASKS", "StackedEnsemble", "check_task"]

TASKS = ("classification", "regression")


def check_task(owner: str, task: str, combine: str) -> None:
    if task not in TASKS:
        raise ValueError(f"{owner}: task must be one of {TASKS}, got {task!r}.")
    if combine not in COMBINES:
        raise ValueError(f"{owner}: combine must be one of {COMBINES}, got {combine!r}.")


def members_forward(
    skeleton: nn.Module,
    state: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    device: torch.device,
    randomness: str = "error",
) -> Any:
    """Every member's output on shared inputs `[B, ...]`: one vmap over the stacked `state`."""

    def run_one(state_i: dict[str, Tensor], a: tuple, kw: dict) -> Any:
        return functional_call(skeleton, state_i, a, kw)

    # The context flips global attention switches, which torch.compile cannot trace:
    # compiled, they stay as the caller set them (see StackedEnsemble's warning).
    ctx = (
        contextlib.nullcontext() if torch.compiler.is_compiling() else vmap_forward_context(device)
    )
    with ctx:
        vmapped = torch.vmap(run_one, in_dims=(0, None, None), randomness=randomness)
        return vmapped(state, args, kwargs)


class StackedEnsemble(nn.Module):
    """K members of one architecture as one inference module returning the ensemble's prediction.

    Holds the members' parameters and buffers stacked `[K, *shape]` under
    `members.<name>` and the member weights `[K]` as `member_weights`; the
    forward runs every member with one `torch.vmap` over `functional_call`
    (members always in eval mode) and combines their outputs. It needs none of
    modelbatch's training classes: rebuild it from an instance of the model's
    class and load a state dict, or `torch.export` it.

    Args:
        model: an instance of the members' class (its weights only shape the
            empty ensemble; `load_state_dict` or `export_ensemble` fill it).
        num_members: K.
        task: `"classification"` (returns `[B, ..., C]` as `combine` says) or
            `"regression"` (returns `(mean, variance)`, each `[B, ...]`).
        combine: for classification, `"probs"`, `"logits"` or `"vote"`
            (see `ensemble_classify`).

    Warning:
        Under `torch.compile` the forward leaves torch's attention switches
        alone; for members with `nn.MultiheadAttention` call
        `torch.backends.mha.set_fastpath_enabled(False)` before compiling.

    Example:
        >>> ens = StackedEnsemble(nn.Linear(4, 3), 8)
        >>> ens.load_state_dict(torch.load("ensemble.pt"))  # saved from export_ensemble(...)
        >>> ens(torch.randn(16, 4)).shape
        torch.Size([16, 3])
    """

    member_weights: Tensor
    _skeleton: nn.Module

    def __init__(
        self,
        model: nn.Module,
        num_members: int,
        *,
        task: str = "classification",
        combine: str = "probs",
    ) -> None:
        super().__init__()
        check_task("StackedEnsemble", task, combine)
        if num_members < 1:
            raise ValueError(f"StackedEnsemble: num_members must be >= 1, got {num_members}.")
        prepared = prepare_models([model])[0]
        self.members, self._param_names, self._buffer_names = build_stacked_tree(
            [prepared] * num_members
        )
        self.members.requires_grad_(False)
        ref = next(iter(self.members.parameters()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else None
        weights = torch.full((num_members,), 1.0 / num_members, dtype=dtype, device=device)
        self.register_buffer("member_weights", weights)
        # Outside the module tree, as in ModelBatch: .to() and state_dict() see the stacked tensors.
        object.__setattr__(self, "_skeleton", meta_skeleton(prepared).eval())
        self.num_members = num_members
        self.task = task
        self.combine = combine

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, model={type(self._skeleton).__name__}, "
            f"task={self.task!r}, combine={self.combine!r}"
        )

    def member_state(self) -> dict[str, Tensor]:
        """The stacked parameters and buffers by the model's names, each `[K, *shape]`."""
        state: dict[str, Tensor] = {
            name: self.members.get_parameter(name) for name in self._param_names
        }
        state.update({name: self.members.get_buffer(name) for name in self._buffer_names})
        return state

    def member_outputs(self, *args: Any, **kwargs: Any) -> Any:
        """Every member's output on shared inputs `[B, ...]`: `[K, B, ...]`."""
        return members_forward(
            self._skeleton, self.member_state(), args, kwargs, self.member_weights.device
        )

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        """The ensemble's prediction on shared inputs `[B, ...]`."""
        outputs = self.member_outputs(*args, **kwargs)
        if self.task == "regression":
            return ensemble_regress(outputs, self.member_weights)
        return ensemble_classify(outputs, self.member_weights, combine=self.combine)
