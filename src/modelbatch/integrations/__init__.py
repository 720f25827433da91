"""Adapters for training frameworks.

Each adapter lives in its own submodule and imports its framework only when
that submodule is imported, so `import modelbatch` never pulls in a framework:

    from modelbatch.integrations.huggingface import BatchTrainer  # imports transformers
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = {"huggingface"}

__all__ = sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    # Lazy: `modelbatch.integrations.huggingface` imports transformers on first access only.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
