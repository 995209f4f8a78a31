"""The rules the tree keeps (docs/architecture.md), checked from the source text.

Short functions and thin jobs, few modules directly in ``retriever/``, a library that imports
neither ``jobs`` nor ``serve``, and no import circle between the library's modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("retriever", "jobs", "serve")


def _modules(top: str) -> dict[str, ast.Module]:
    out = {}
    for path in sorted((ROOT / top).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    assert out, f"no Python modules under {ROOT / top}"
    return out


def _imports(tree: ast.Module, package: str) -> set[str]:
    """Absolute module names a module imports (relative imports resolved against it)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("top", CODE)
def test_no_function_over_60_lines(top):
    long = [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in _modules(top).items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_jobs_are_thin():
    fat = {path.name: n for path in (ROOT / "jobs").glob("*.py")
           if (n := len(path.read_text().splitlines())) > 150}
    assert not fat, fat


def test_few_modules_directly_in_the_library():
    top = sorted(p.name for p in (ROOT / "retriever").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 6, top


def test_the_library_imports_neither_jobs_nor_serve():
    leaks = sorted(f"{name} imports {imported}"
                   for name, tree in _modules("retriever").items()
                   for imported in _imports(tree, name)
                   if imported.split(".")[0] in ("jobs", "serve"))
    assert not leaks, leaks


def test_no_import_circle_in_the_library():
    modules = _modules("retriever")
    graph = {name: {m for m in _imports(tree, name) if m in modules and m != name}
             for name, tree in modules.items()}
    for name in graph:  # importing a package runs its __init__, not its submodules
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    done, path = set(), []

    def visit(name: str) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
