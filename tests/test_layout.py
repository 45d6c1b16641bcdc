"""The package's layout as README "Contents" describes it: what each core module needs to be copied, no
import circles, no core module importing a tool, no command importing another command's helpers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffmatch"

NEEDS = {
    "config": set(),
    "files": set(),
    "png": {"files"},
    "rle": set(),
    "augment": {"config"},
    "data": {"config", "files", "augment"},
    "vlm": {"config", "files", "rle"},
    "ceg": {"config", "files", "png", "rle", "vlm", "metrics"},
    "encoder": {"config", "files"},
    "decoders": set(),
    "model": {"config", "files", "encoder", "decoders"},
    "losses": set(),
    "step": {"config", "losses"},
    "metrics": {"config"},
    "evaluate": {"config", "files", "png", "augment", "data", "metrics", "model", "encoder", "decoders", "checks"},
    "train": {"config", "files", "png", "augment", "data", "metrics", "model", "encoder", "decoders", "losses",
              "step", "evaluate", "checks", "board"},
}
"""Core module -> the modules it needs at run time (directly or through them), as in README "Contents"."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The diffmatch modules a file imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
                   for stmt in node.body for inner in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "diffmatch":
            module = node.module.removeprefix("diffmatch").lstrip(".")
            found.update([module] if module else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("diffmatch.") for a in node.names if a.name.startswith("diffmatch."))
    return found


GRAPH = {module_name(p): imports(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def closure(name: str) -> set[str]:
    """Every diffmatch module ``name`` needs at run time, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        for dep in GRAPH.get(todo.pop(), set()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_a_core_module_needs_what_the_readme_says(name: str) -> None:
    assert closure(name) == NEEDS[name]


def test_no_import_circles() -> None:
    circles = sorted(name for name in GRAPH if name in closure(name))  # a module that needs itself
    assert circles == []


def test_every_module_is_in_the_readme() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    top = {name.split(".")[0] for name in GRAPH if name}
    missing = sorted(name for name in top if name != "synthetic" and f"`{name}.py`" not in readme)
    assert missing == [] and "`synthetic/`" in readme
