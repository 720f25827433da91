"""Every Python code block in README.md and the docs runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def page_blocks(path: Path) -> str:
    return "\n".join(BLOCK.findall(path.read_text()))


@pytest.mark.parametrize("page", [p for p in PAGES if page_blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Blocks of one page build on each other, as a reader runs them in order.
    monkeypatch.chdir(tmp_path)
    exec(compile(page_blocks(page), str(page), "exec"), {"__name__": "__docs__"})
