"""The package's layout as the README's module map describes it: what each core module needs to be copied,
no import circles, no core module importing a tool or the lab, and a tree that shows it: the method's
modules flat at the top, the lab in ``lab/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffmatch"

NEEDS = {
    "config": set(),
    "cli": set(),
    "atomic": set(),
    "images": {"cli"},
    "pairs": {"atomic", "cli", "images"},
    "png": {"atomic"},
    "rle": set(),
    "augment": {"config"},
    "subsets": {"atomic", "cli", "config", "images", "pairs"},
    "data": {"atomic", "augment", "cli", "config", "images", "pairs", "subsets"},
    "vlm": {"cli", "config", "rle"},
    "ceg": {"cli", "config", "rle", "vlm"},
    "pseudo": {"atomic", "ceg", "cli", "config", "images", "metrics", "pairs", "png", "rle", "vlm"},
    "encoder": {"cli", "config"},
    "decoders": set(),
    "model": {"cli", "config", "decoders", "encoder"},
    "device": {"cli"},
    "checkpoint": {"atomic", "cli", "config", "decoders", "encoder", "model"},
    "losses": set(),
    "step": {"config", "losses"},
    "metrics": {"config"},
    "checks": {"atomic", "augment", "cli", "config", "data", "images", "pairs", "subsets"},
    "evaluate": {"atomic", "augment", "checkpoint", "checks", "cli", "config", "data", "decoders", "device", "encoder",
                 "images", "metrics", "model", "pairs", "png", "subsets"},
    "board": {"atomic", "augment", "checkpoint", "checks", "cli", "config", "data", "decoders", "device", "encoder",
              "evaluate", "images", "metrics", "model", "pairs", "png", "subsets"},
    "run": {"atomic", "augment", "board", "checkpoint", "checks", "cli", "config", "data", "decoders", "device",
            "encoder", "evaluate", "images", "losses", "metrics", "model", "pairs", "png", "step",
            "subsets"},
    "train": {"atomic", "augment", "board", "checkpoint", "checks", "cli", "config", "data", "decoders", "device",
              "encoder", "evaluate", "images", "losses", "metrics", "model", "pairs", "png", "run",
              "step", "subsets"},
}
"""Core module -> the modules it needs at run time (directly or through them), as in the README's module map."""

TOOLS = {"predict", "geotiff", "prepare", "tiles", "vlm_run", "vlm_models"}
"""Commands around the method: new pairs, data preparation, VLM outputs from open models."""
LAB_COMMANDS = {"bench", "demo", "pretrain", "synthetic"}
"""One-line entry modules that keep the lab's commands (``python -m diffmatch.bench``, ...) at the top."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def skipped(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` (types only) or ``__name__ == "__main__"`` (run as a script, a module is ``__main__``,
    so what its main block imports cannot import it back)."""
    if getattr(test, "id", None) == "TYPE_CHECKING":
        return True
    return (isinstance(test, ast.Compare) and getattr(test.left, "id", None) == "__name__"
            and getattr(test.comparators[0], "value", None) == "__main__")


def imports(path: Path) -> set[str]:
    """The diffmatch modules a file imports at run time (``if TYPE_CHECKING:`` and main blocks left out)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and skipped(node.test)
                   for stmt in node.body for inner in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "diffmatch":
            module = node.module.removeprefix("diffmatch").lstrip(".")
            for alias in node.names:  # ``from diffmatch.lab import bench`` imports the module lab.bench
                inner = f"{module}.{alias.name}".lstrip(".")
                found.add(inner if is_module(inner) else module)
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
    top = {name.split(".")[0] for name in GRAPH if name} - {"lab"}
    missing = sorted(name for name in top if f"`{name}.py`" not in readme)
    assert missing == [] and "`lab/`" in readme


def test_the_tree_shows_the_method() -> None:
    """The method's modules, the tools and the lab's one-line commands at the top; the lab in one folder."""
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == set(NEEDS) | TOOLS | LAB_COMMANDS
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders == {"lab", "splits"}


def test_nothing_but_the_lab_commands_imports_the_lab() -> None:
    users = {name for name, deps in GRAPH.items() if not name.startswith("lab")
             and any(dep == "lab" or dep.startswith("lab.") for dep in deps)}
    assert users == LAB_COMMANDS


@pytest.mark.parametrize("name", sorted(LAB_COMMANDS))
def test_a_lab_command_only_starts_its_lab_module(name: str) -> None:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    defined = [node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Assign)]
    assert defined == [] and f"diffmatch.lab.{name}" in {f"diffmatch.{m}" for m in GRAPH[name]}
