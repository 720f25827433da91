"""Buffers the forward writes: kept per model, written back, and held still for retired models.

A model's forward may change its buffers in place (BatchNorm running stats,
a counter's `add_`) or re-assign them (`self.count = self.count + 1`). Under
`functional_call` the first writes the stacked buffer directly and the second
would be lost; here it is written back. Retired models must stand still, so
while some model is retired the buffers that may change are handed to the
forward as copies and written back with `torch.where(active, new, old)`:
no branch on device values, so the same code runs under CUDA-graph capture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .optim._hparams import per_model

__all__ = ["BufferWatch", "running_stat_buffers"]

logger = logging.getLogger("modelbatch")


def running_stat_buffers(skeleton: nn.Module) -> frozenset[str]:
    """Names of the buffers that normalization layers update in training mode.

    Their update runs inside a vmap batching rule that does not bump the
    tensor's version counter, so they are known by their layer, not observed.
    """
    names = set()
    for prefix, module in skeleton.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for name, _ in module.named_buffers(recurse=False):
                names.add(f"{prefix}.{name}" if prefix else name)
    return frozenset(names)


def _capturing(active: Tensor) -> bool:
    return torch.compiler.is_compiling() or (
        active.is_cuda and torch.cuda.is_current_stream_capturing()
    )


class BufferWatch:
    """What the forward of one `ModelBatch` has been seen to write, and the write-back."""

    def __init__(self) -> None:
        self.in_place: set[str] = set()  # changed in place by some forward
        self.reassigned: set[str] = set()  # re-assigned by some forward
        self.observed: set[bool] = set()  # training modes seen in an eager forward
        self._active_seen: tuple[Tensor, int, bool] | None = None
        self._warned: set[str] = set()

    def some_retired(self, active: Tensor) -> bool:
        """Whether any model is retired; reads the mask once per change of it, not per forward.

        Under CUDA-graph capture or torch.compile the answer must hold for
        every replay, so it is always True there (the masked write-back is
        then part of the graph).
        """
        if _capturing(active):
            return True
        seen = self._active_seen
        if seen is None or seen[0] is not active or seen[1] != active._version:
            seen = (active, active._version, not bool(active.all()))
            self._active_seen = seen
        return seen[2]

    def working_copies(
        self, buffers: Mapping[str, Tensor], guard: bool, training: bool, norm_stats: Iterable[str]
    ) -> dict[str, Tensor]:
        """Copies of the buffers the forward may write, handed to it instead of the buffers.

        Re-assigned buffers are always copied: the write-back must not touch a
        tensor autograd saved. With `guard`, every buffer that may change is
        copied, so the retired models' values can be kept.
        """
        if not guard:
            names: Iterable[str] = self.reassigned
        elif training not in self.observed:
            names = buffers  # nothing learned for this mode yet: hold every buffer
        else:
            names = self.in_place | self.reassigned | (set(norm_stats) if training else set())
        return {name: buffers[name].clone() for name in names if name in buffers}

    def versions(self, buffers: Mapping[str, Tensor]) -> list[int] | None:
        if torch.compiler.is_compiling():
            return None
        return [b._version for b in buffers.values()]

    def write_back(
        self,
        buffers: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        work: Mapping[str, Tensor],
        new: Mapping[str, Tensor],
        guard: bool,
        active: Tensor,
        versions: list[int] | None,
        training: bool,
        replace: Callable[[str, Tensor], None],
    ) -> None:
        """Write the forward's buffer changes into the stacked buffers, retired models excluded.

        A buffer re-assigned for the first time was handed to the forward
        itself, which autograd may have saved: it is replaced by a new tensor
        (eagerly; never under capture) instead of being overwritten.
        """
        for name, value in new.items():
            if name in params:
                raise ValueError(
                    f"ModelBatch.forward: the model's forward re-assigns parameter {name!r}; "
                    "stacked parameters cannot be replaced inside forward. Change it in place "
                    "under torch.no_grad(), or compute the new value without storing it."
                )
            target = buffers[name]
            if not isinstance(value, Tensor) or value.shape != target.shape:
                got = tuple(value.shape[1:]) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"ModelBatch.forward: the model's forward re-assigns buffer {name!r} with "
                    f"{got} per model (was {tuple(target.shape[1:])}); a stacked buffer keeps "
                    "its shape. Assign a tensor of the same shape, or update it in place."
                )
            if value.dtype != target.dtype:
                raise ValueError(
                    f"ModelBatch.forward: the model's forward re-assigns buffer {name!r} with "
                    f"dtype {value.dtype} (was {target.dtype}); a stacked buffer keeps its dtype. "
                    f"Cast the new value, e.g. .to({target.dtype})."
                )
        changed: set[str] = set()
        if versions is not None:
            changed = {
                name for (name, b), v in zip(buffers.items(), versions) if b._version != v
            } | {name for name, copy in work.items() if copy._version != 0}
        with torch.no_grad():
            for name in {**work, **new}:
                target = buffers[name]
                value = new[name].detach() if name in new else work[name]
                if guard:
                    keep = per_model(active, target.dim())
                    value = torch.where(keep, value, target)
                if name in work or _capturing(active):
                    target.copy_(value)
                else:
                    replace(name, value.clone(memory_format=torch.contiguous_format))
        if versions is None:
            return
        missed = (changed - set(work) - self.in_place) if guard else set()
        for name in sorted(missed - self._warned):
            self._warned.add(name)
            logger.warning(
                "ModelBatch: the forward changed buffer %r in place for the first time while "
                "some models are retired; their copies changed this once and are held from "
                "the next forward on.",
                name,
            )
        self.in_place |= changed
        self.reassigned |= set(new)
        self.observed.add(training)
