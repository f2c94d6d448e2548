"""The package's import structure: no import cycles, and the data plane never imports the layers above it.

Imports are read from the source with ``ast`` (including imports inside function bodies, which hide
cycles from a plain ``import``); ``if TYPE_CHECKING:`` blocks are left out, as they never run.
Importing ``a.b.c`` also imports the packages ``a`` and ``a.b``, so those count as edges too (except a
module's own packages, which Python imports before the module itself).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "raycxr"
DATA_PLANE = ("raycxr.manifest", "raycxr.labels", "raycxr.readers", "raycxr.losses", "raycxr.quarantine",
              "raycxr.cache")
UPPER = ("raycxr.train", "raycxr.eval", "raycxr.methods", "raycxr.export", "raycxr.tune")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The raycxr modules (and their parent packages) that ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):  # the module and every parent package it imports
                cand = ".".join(parts[:i])
                # a module's own packages are imported before it runs: importing them adds no edge
                if cand in modules and cand != name and cand not in own_packages:
                    found.add(cand)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert cycles(graph) == []


@pytest.mark.parametrize("module", DATA_PLANE)
def test_the_data_plane_does_not_import_the_layers_above(module):
    graph = import_graph()
    assert module in graph
    upward = sorted(m for m in reachable(graph, module) if m.startswith(UPPER))
    assert upward == [], f"{module} imports {upward}"


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a hand-made graph with a cycle and an upward edge is caught."""
    graph = {"raycxr.labels": {"raycxr.train.local"}, "raycxr.train.local": {"raycxr.methods"},
             "raycxr.methods": {"raycxr.train.local"}}
    assert cycles(graph) == [["raycxr.methods", "raycxr.train.local"]]
    assert "raycxr.train.local" in reachable(graph, "raycxr.labels")
    # and the source reader sees an import hidden in a function body
    (tmp_path / "raycxr").mkdir()
    f = tmp_path / "raycxr" / "m.py"
    f.write_text("def f():\n    from .train import local\n")
    global PKG
    old, PKG = PKG, tmp_path / "raycxr"
    try:
        assert imports_of(f, {"raycxr.train", "raycxr.train.local"}) == {"raycxr.train", "raycxr.train.local"}
    finally:
        PKG = old
