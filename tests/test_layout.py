"""The package's layout keeps to DESIGN.md §2: layers import downwards only (no cycle),
modules stay a few hundred lines and functions short enough to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "snapfmt"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """snapfmt modules imported when *path* is imported (not under TYPE_CHECKING, not
    inside functions: those are imported when used)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("snapfmt"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                known = {module_name(m) for m in MODULES}
                found.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("snapfmt"))
    return found


def test_no_import_cycle() -> None:
    graph = {module_name(m): top_level_imports(m) for m in MODULES}

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError(
                "import cycle: " + " -> ".join([*trail[trail.index(name) :], name])
            )
        for target in sorted(graph.get(name, ())):
            if target != name and not name.startswith(target + "."):  # (a package's own)
                visit(target, [*trail, name])

    for name in graph:
        visit(name, [])


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_module_and_function_sizes(path: Path) -> None:
    text = path.read_text()
    assert text.count("\n") <= MAX_MODULE_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long
