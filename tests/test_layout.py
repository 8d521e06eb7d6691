"""The rules of the house that code review alone would let slip: `api/` and
`workers/` never import each other, `schemas/` (what both read) imports
neither, and no module imports itself back through others. An API and its
workers are separate processes, deployed and upgraded apart; an import between
them would make one load the other's dependencies (llama.cpp in the API,
FastAPI in a worker) and tie their versions together."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "workers", "schemas", "inferq")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts).removesuffix(".__init__")
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> Iterator[str]:
    """Every module of the project that `path` imports, at any depth of the
    file (type-checking-only imports count: they are arrows a reader follows)."""
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        for name in names:
            if name in MODULES:
                yield name


GRAPH = {name: set(_imports(path)) - {name} for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_api_and_workers_never_import_each_other() -> None:
    crossing = sorted(
        (module, target)
        for module, targets in GRAPH.items()
        for target in targets
        if {_top(module), _top(target)} == {"api", "workers"}
    )
    assert crossing == []


def test_schemas_import_only_schemas() -> None:
    outward = sorted(
        (module, target)
        for module, targets in GRAPH.items()
        if _top(module) == "schemas"
        for target in targets
        if _top(target) != "schemas"
    )
    assert outward == []


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). A
    package's import of its own submodules is not an arrow back."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target.startswith(module + "."):
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return found


def test_no_import_circle() -> None:
    assert _cycles() == []
