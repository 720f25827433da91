"""Adapters for training frameworks.

Each adapter lives in its own submodule and imports its framework only when
that submodule is imported, so `import modelbatch` never pulls in a framework:

    from modelbatch.integrations.huggingface import BatchTrainer  # imports transformers
    from modelbatch.integrations.lightning import BatchLightningModule  # imports lightning
    from modelbatch.integrations.optuna import optimize_batched  # imports optuna
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = {"huggingface", "lightning", "optuna"}

__all__ = sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    # Lazy: each submodule imports its framework on first access only.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
