"""Packaging: one version, the dev tools for pip and uv alike, install lines that name this project."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import modelbatch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DIST = "torch-modelbatch"  # `modelbatch` on PyPI is another, older project


def test_the_version_has_one_source() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "modelbatch.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", modelbatch.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert f"## [{modelbatch.__version__}]" in changelog


def test_the_distribution_name_is_not_the_other_projects() -> None:
    assert PYPROJECT["project"]["name"] == DIST


def test_dev_tools_are_a_pip_extra_and_a_uv_dependency_group() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    groups = PYPROJECT["dependency-groups"]
    # `pip install -e ".[dev]"` and `uv sync` (default group "dev") install the same tools.
    assert sorted(groups["dev"]) == sorted(extras["dev"])
    assert sorted(groups["docs"]) == sorted(extras["docs"])
    for tool in ("pytest", "mypy", "ruff"):
        assert any(req.startswith(tool) for req in groups["dev"]), tool


def install_lines() -> list[tuple[str, str]]:
    paths = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    paths += [*(ROOT / "src").rglob("*.py"), *(ROOT / "examples").glob("*.py")]
    return [
        (f"{p.relative_to(ROOT)}:{n}", line)
        for p in paths
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\b(pip install|uv add|uv pip install)\b", line)
    ]


def test_install_instructions_never_name_the_other_project() -> None:
    lines = install_lines()
    assert len(lines) > 5  # the scan sees the install lines
    # `pip install modelbatch`, `"modelbatch[hf]"`, `uv add modelbatch` install the other project.
    wrong = re.compile(r"(?<![\w-])modelbatch(\[|\b(?!\.))")
    bad = [
        f"{where}: {line.strip()}"
        for where, line in lines
        for command in re.findall(r"(?:pip install|uv add|uv pip install)[^`;&|)]*", line)
        if wrong.search(command)
    ]
    assert not bad, "\n".join(bad)


def test_the_wrong_name_is_caught() -> None:
    wrong = re.compile(r"(?<![\w-])modelbatch(\[|\b(?!\.))")
    for command in ('pip install "modelbatch[hf]"', "pip install modelbatch", "uv add modelbatch"):
        assert wrong.search(command), command
    for command in ('pip install "torch-modelbatch[hf]"', 'pip install -e ".[hf]"'):
        assert not wrong.search(command), command
