"""Shared fixtures: skip a docs page or an example whose optional packages are missing.

`pip install -e ".[dev]" && python -m pytest -q` must pass with exactly what `.[dev]`
installs, so a script that needs an extra (transformers, lightning, optuna, ...)
is skipped, by name, when that extra is not importable, and runs otherwise.
What a script needs is read from the script itself: every module it imports at
its top level, plus the modules named in a marker for what its imports do not
show (`<!-- needs: accelerate -->` in a docs page, `# needs: accelerate` in an
example).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from collections.abc import Callable

import pytest

MARKER = re.compile(r"(?:<!--|#)\s*needs:\s*([A-Za-z0-9_. ]+)")


def needed_modules(code: str, text: str | None = None) -> list[str]:
    """Modules `code` imports at its top level, then those named by `needs:` markers in `text`.

    Imports inside functions or `try` blocks are optional by construction and
    are not listed; relative imports are the script's own.
    """
    names: list[str] = []
    for node in ast.parse(code).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    for match in MARKER.finditer(code if text is None else text):
        names += match.group(1).split()
    return list(dict.fromkeys(names))


def missing_module(name: str) -> str | None:
    """The missing third-party module that makes `name` unimportable, or None.

    A module of this package is imported (an integration imports its framework
    at import time); anything else is only looked up. An import error that is
    not a missing third-party module is a bug and propagates.
    """
    if name.split(".")[0] != "modelbatch":
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        return None if found else name
    try:
        importlib.import_module(name)
    except ImportError as error:
        cause: BaseException | None = error
        while cause is not None:
            missing = getattr(cause, "name", None) or ""
            if isinstance(cause, ModuleNotFoundError) and missing.split(".")[0] not in (
                "",
                "modelbatch",
            ):
                return missing
            cause = cause.__cause__
        raise
    return None


def skip_if_missing(code: str, text: str | None = None) -> None:
    """Skip the calling test, naming the modules, when `code` needs one that is missing."""
    missing = [m for m in map(missing_module, needed_modules(code, text)) if m]
    if missing:
        pytest.skip(f"needs {', '.join(dict.fromkeys(missing))} (an optional extra)")


@pytest.fixture
def requires() -> Callable[..., None]:
    """`requires(code, text=None)`: skip unless everything `code` needs is importable."""
    return skip_if_missing
