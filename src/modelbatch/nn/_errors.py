"""Turn vmap's internal errors at forward into an error that names the user's layer."""

from __future__ import annotations

from types import TracebackType

from torch import nn

__all__ = ["UnbatchableLayerError", "explain_forward_error"]

# Substrings of the errors torch.vmap raises for operations it cannot batch.
_VMAP_MARKERS = (
    "Batching rule not implemented",
    "vmap",
    "BatchedTensor",
    "functorch",
    "data-dependent",
    "data dependent",
)


class UnbatchableLayerError(RuntimeError):
    """A layer of the user's model cannot run under `torch.vmap`."""


def _hint(message: str) -> str:
    if ".item()" in message or "data-dependent" in message or "data dependent" in message:
        return (
            "It reads a tensor's value in Python (.item(), float(), int(), bool(), or an `if` "
            "on a tensor), which cannot differ per model; rewrite that part with tensor ops "
            "(e.g. torch.where), or train these models one by one."
        )
    return (
        "torch has no vmap rule for an operation it uses; replace the layer with a "
        "vmap-friendly one (see the layer coverage page of the docs), or train these models "
        "one by one."
    )


def _innermost_module(tb: TracebackType | None, names: dict[int, str]) -> str | None:
    """The name of the innermost skeleton module whose code is on the traceback."""
    found = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def explain_forward_error(err: BaseException, skeleton: nn.Module) -> Exception | None:
    """A clearer error for `err`, raised inside a vmapped forward of `skeleton`, or None.

    Only errors that come from vmap itself are rewritten; the layer is found
    from the traceback, so the hot path pays nothing for this.
    """
    message = str(err)
    if not any(marker in message for marker in _VMAP_MARKERS):
        return None
    names = {id(m): name for name, m in skeleton.named_modules()}
    name = _innermost_module(err.__traceback__, names)
    if name is None:
        return None
    layer = skeleton.get_submodule(name)
    where = f"layer {name!r}" if name else "the model's own forward"
    first_line = message.strip().splitlines()[0] if message.strip() else type(err).__name__
    # vmap's messages go on to ask for a torch issue; the first sentence is the cause.
    first_line = first_line.split(". ")[0].rstrip(".") + "."
    return UnbatchableLayerError(
        f"ModelBatch.forward: {where} ({type(layer).__name__}) cannot run under torch.vmap: "
        f"{first_line} {_hint(message)}"
    )
