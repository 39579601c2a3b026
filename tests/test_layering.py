"""The dependency rule of docs/architecture.md, read statically (ast) off every import in packdit/, including
imports inside functions, so a lazy import cannot hide an edge:

* the base layer (plain value types, official layers, loaders) imports nothing above it;
* packdit/reference/ is a leaf: it imports the base value types and official layers only, never a kernel;
* nothing at run time imports packdit.reference except the dispatcher, packdit.nn.functional;
* packdit/ops/ imports only ops and the base layer (so the layout, in the base layer, imports no op);
* the import graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "packdit"
DISPATCHER = "packdit.nn.functional"
NATIVE = "packdit._C"  # the compiled extension, loaded by packdit._ext
BASE = {"packdit.rope", "packdit.layout", "packdit.layout_positions", "packdit.official", "packdit._ext",
        "packdit._validate", "packdit._backends", "packdit.determinism", NATIVE}
REFERENCE_MAY_IMPORT = {"packdit.rope", "packdit.layout", "packdit.official"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported packdit module, line) for every import statement anywhere in the file; ``from a import b``
    counts as importing ``a.b`` when that is a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in known else node.module, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            found.append(("<dynamic import>", node.lineno))
    return [(name, line) for name, line in found if name.startswith("packdit") or name == "<dynamic import>"]


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    modules = _modules()
    return {name: _imports(path, {*modules, NATIVE}) for name, path in modules.items()}


def _edges(graph, importer: str) -> set[str]:
    """Modules ``importer`` runs when imported: each import and the packages above it that ``importer`` is not
    inside (importing ``packdit.nn.x`` from outside ``packdit.nn`` runs ``packdit/nn/__init__.py`` first). The
    top-level ``packdit`` package is left out: every module is inside it."""
    targets = set()
    for name, _ in graph[importer]:
        parts = name.split(".")
        for depth in range(2, len(parts) + 1):
            target = ".".join(parts[:depth])
            if target in graph and (depth == len(parts) or not importer.startswith(target + ".")):
                targets.add(target)
    targets.discard(importer)
    return targets


def _closure(graph, start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in _edges(graph, stack.pop()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_module_list_is_complete(graph):
    assert {DISPATCHER, *BASE, *REFERENCE_MAY_IMPORT} - {NATIVE} <= set(graph), "a module of the rule was renamed"
    assert not [(m, line) for m, imports in graph.items() for name, line in imports if name == "<dynamic import>"]


def test_base_layer_imports_only_itself(graph):
    bad = [(m, name, line) for m in BASE - {NATIVE} for name, line in graph[m] if name not in BASE]
    assert not bad, f"base modules import upward: {bad}"


def test_reference_is_a_leaf(graph):
    bad = [(m, name, line) for m, imports in graph.items() if _in(m, "packdit.reference")
           for name, line in imports if not _in(name, "packdit.reference") and name not in REFERENCE_MAY_IMPORT]
    assert not bad, f"packdit.reference imports beyond the plain value types: {bad}"
    leaked = {m for m in _closure(graph, "packdit.reference") if not (_in(m, "packdit.reference") or m in BASE)}
    assert not leaked, f"packdit.reference reaches {leaked}"


def test_only_the_dispatcher_imports_the_reference(graph):
    bad = [(m, name, line) for m, imports in graph.items() if not _in(m, "packdit.reference") and m != DISPATCHER
           for name, line in imports if _in(name, "packdit.reference")]
    assert not bad, f"runtime modules import packdit.reference directly: {bad}"


def test_ops_import_only_ops_and_the_base_layer(graph):
    bad = [(m, name, line) for m, imports in graph.items() if _in(m, "packdit.ops")
           for name, line in imports if not (_in(name, "packdit.ops") or name in BASE)]
    assert not bad, f"packdit.ops imports above its layer: {bad}"
    assert not {m for m in _closure(graph, "packdit.layout") if _in(m, "packdit.ops")}


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components; any component of more than one module is a cycle
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in _edges(graph, v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"
