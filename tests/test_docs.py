"""Every Python code block in README.md and the docs runs as written.

A page's blocks run top to bottom as one script, in a fresh namespace, as a
reader pastes them: every page is self-contained (its first block imports what
the page uses and makes its data). A page that needs an optional extra is
skipped when the extra is missing (see conftest.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import missing_module, needed_modules

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def page_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def page_script(path: Path) -> str:
    return "\n".join(page_blocks(path))


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if page_blocks(p)], ids=page_id)
def test_code_blocks_run(
    page: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    requires: Callable[..., None],
) -> None:
    script = page_script(page)
    requires(script, page.read_text())
    monkeypatch.chdir(tmp_path)
    exec(compile(script, str(page), "exec"), {"__name__": "__docs__"})


def test_optional_imports_are_detected_and_reported() -> None:
    code = (
        "import os\nfrom torch import nn\nimport surely_absent_pkg.sub\n"
        "def f():\n    import only_inside_a_function\n"
        "try:\n    import optional_in_try\nexcept ImportError:\n    pass\n"
    )
    assert needed_modules(code, "<!-- needs: extra_one extra_two -->") == [
        "os",
        "torch",
        "surely_absent_pkg.sub",
        "extra_one",
        "extra_two",
    ]
    assert needed_modules("# needs: accelerate\nimport torch\n") == ["torch", "accelerate"]
    assert missing_module("torch") is None
    assert missing_module("modelbatch.data") is None
    assert missing_module("surely_absent_pkg.sub") == "surely_absent_pkg.sub"
    with pytest.raises(ModuleNotFoundError):  # a missing module of ours is a bug, not a skip
        missing_module("modelbatch.surely_absent_module")


def test_a_page_needing_a_missing_extra_is_skipped(requires: Callable[..., None]) -> None:
    with pytest.raises(pytest.skip.Exception, match="needs surely_absent_pkg"):
        requires("import torch\n", "<!-- needs: surely_absent_pkg -->")
    requires("import torch\nfrom modelbatch import ModelBatch\n")  # all present: no skip
