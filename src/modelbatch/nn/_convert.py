"""Prepare user models for stacking: substitute layers that vmap cannot batch."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["prepare_models"]


def prepare_models(
    models: Sequence[nn.Module], *, per_model_dropout: bool = False
) -> list[nn.Module]:
    """Return the models to stack (copies where a layer had to be substituted)."""
    if per_model_dropout:
        raise NotImplementedError("ModelBatch: per_model_dropout is not available yet.")
    return list(models)
