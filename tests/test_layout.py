"""The package's shape: small modules with one job each, and no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "asyncgone"
# Package entry points whose whole content is a docstring and a re-export or two.
TINY = {"__init__.py", "__main__.py"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_says_its_job_and_stays_small(path: Path) -> None:
    """Every module opens with a docstring whose first line says its job, and keeps within
    50 to 450 lines (package entry points may be shorter)."""
    tree = ast.parse(path.read_text())
    docstring = ast.get_docstring(tree)
    assert docstring, f"{path.name} has no docstring"
    assert len(docstring.splitlines()[0]) > 20, f"{path.name}: say the module's job"
    lines = len(path.read_text().splitlines())
    assert lines <= 450, f"{path.name} has {lines} lines"
    if path.name not in TINY:
        assert lines >= 50, f"{path.name} has {lines} lines: fold it into a neighbour"


def runtime_imports(path: Path) -> set[str]:
    """asyncgone modules ``path`` imports at import time (not under TYPE_CHECKING, not
    inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                if node.module is None:
                    found.update(f"{base}.{alias.name}" for alias in node.names)
                    continue
            else:
                target = node.module or ""
            if target.startswith("asyncgone"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("asyncgone"))
    return found


def test_no_import_cycles() -> None:
    """No asyncgone module imports, directly or through others, a module that imports it."""
    known = {module_name(p) for p in modules()}
    graph = {module_name(p): runtime_imports(p) & known for p in modules()}
    # A package's __init__ re-exports its submodules; importing the package from one of
    # them would be the cycle, which the edges below still show.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in PACKAGE_INITS and node.startswith(nxt + "."):
                continue  # a submodule importing a sibling through its package
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


PACKAGE_INITS = {module_name(p) for p in modules() if p.name == "__init__.py"}
