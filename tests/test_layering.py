"""The package's structure: no import cycles, the data plane never imports the layers above it, and no
module outside ``raycxr/methods/`` branches on a method's name (a method's knowledge lives on its class).

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


# -- a method's knowledge stays in its class ------------------------------------------------------------
# where a method may branch on a name: its own package. models/ is checked too: a network names the method it
# belongs to in docstrings and the config section it reads (cfg.unichest), which this check leaves alone.
METHOD_HOMES = ("methods",)


def _strings(node: ast.AST) -> list[ast.Constant]:
    """The string constants of ``node``, looking into a tuple, list or set of them (``x in ("a", "b")``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [c for e in node.elts for c in _strings(e)]
    return []


def method_name_uses(path: Path, names: set[str]) -> list[str]:
    """``file:line 'name'`` for every string constant equal to one of ``names`` that ``path`` compares
    against (``==``, ``!=``, ``in``, ``not in``, ``match``/``case``) or uses as a dict key."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c for side in (node.left, *node.comparators) for c in _strings(side)]
        elif isinstance(node, ast.Dict):
            consts = [c for k in node.keys if k is not None for c in _strings(k)]
        elif isinstance(node, ast.MatchValue):
            consts = _strings(node.value)
        else:
            continue
        found += [c for c in consts if c.value in names]
    return [f"{path.name}:{c.lineno} {c.value!r}" for c in sorted(found, key=lambda c: (c.lineno, c.col_offset))]


def test_no_module_outside_methods_branches_on_a_method_name():
    from raycxr.methods import list_methods

    names = set(list_methods())
    assert {"unichest", "ark", "umif", "mixed"} <= names
    files = [f for f in PKG.rglob("*.py") if f.relative_to(PKG).parts[0] not in METHOD_HOMES]
    assert len(files) > 40
    uses = [u for f in files for u in method_name_uses(f, names)]
    assert uses == [], ("a method's knowledge belongs on its Method class (tune_space, local_parameters, "
                        f"segmentation_by_default...), not in a branch on its name: {uses}")


def test_the_method_name_checker_can_fail(tmp_path):
    f = tmp_path / "leaky.py"
    f.write_text("def f(cfg, kind):\n"
                 "    if cfg.method == 'unichest':\n"
                 "        return {'ark': 1}\n"
                 "    if kind in ('mixed', 'other'):\n"
                 "        return 2\n"
                 "    match kind:\n"
                 "        case 'umif':\n"
                 "            return 3\n"
                 "    return g('unichest'), 'ark'  # a name passed on or returned is not a branch\n")
    assert method_name_uses(f, {"unichest", "ark", "mixed", "umif"}) == [
        "leaky.py:2 'unichest'", "leaky.py:3 'ark'", "leaky.py:4 'mixed'", "leaky.py:7 'umif'"]


# -- the layers, package by package ----------------------------------------------------------------------
# What each package may import from the rest of raycxr (top-level names; its own modules always). Lower layers
# first: the data plane and the declarations, then the engine and the networks, the methods, the runners
# (one process, Ray, federated), and the commands on top. A new edge is a design decision: add it here.
DATA = {"manifest", "labels", "readers", "losses", "quarantine", "cache", "transforms", "schema", "registry",
        "reports", "text", "config", "checkpoint", "dataset", "objectives", "stats"}
ALLOWED = {
    "sites": DATA,
    "synth": DATA | {"sites"},
    "engine": DATA,
    "models": DATA,
    "methods": DATA | {"sites", "engine", "models"},
    "train": DATA | {"sites", "engine", "methods", "tracking"},
    "ray": DATA | {"sites", "engine", "methods", "train"},
    "eval": DATA | {"sites", "engine", "methods", "models"},
    "federated": DATA | {"sites", "engine", "methods", "train", "ray"},
    "study": DATA | {"sites", "engine", "methods", "models", "train", "eval", "synth", "tracking", "demo"},
}


def package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``package -> top-level raycxr names it imports`` (``raycxr.eval.report`` counts as ``eval``)."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        parts = module.split(".")
        if len(parts) < 2:
            continue
        for t in targets:
            tp = t.split(".")
            if len(tp) > 1 and tp[1] != parts[1]:
                edges.setdefault(parts[1], set()).add(tp[1])
    return edges


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    return [f"{pkg} -> {dep}" for pkg, allowed in ALLOWED.items() for dep in sorted(edges.get(pkg, ()))
            if dep not in allowed]


def test_every_package_imports_only_the_layers_below_it():
    edges = package_edges(import_graph())
    assert set(ALLOWED) <= set(edges) | {"sites"}  # the packages exist (sites may import nothing but data)
    assert layer_violations(edges) == []


def test_the_layer_checker_can_fail():
    graph = {"raycxr.engine.metrics": {"raycxr.methods.base", "raycxr.labels"},
             "raycxr.models.unichest": {"raycxr.engine", "raycxr.models.encoders"}}
    assert layer_violations(package_edges(graph)) == ["engine -> methods", "models -> engine"]


def unresolved_imports(root: Path = PKG) -> list[str]:
    """``file:line name`` for every raycxr import (lazy ones in function bodies too) whose target does not exist:
    a module moved in a refactor leaves such an import behind, and it fails only when that function runs."""
    import importlib

    bad = []
    for f in sorted(root.rglob("*.py")):
        name = module_name(f)
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("raycxr")):
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            try:
                mod = importlib.import_module(base)
            except ImportError:
                bad.append(f"{f.name}:{node.lineno} {base}")
                continue
            for alias in node.names:
                if alias.name == "*" or hasattr(mod, alias.name):
                    continue
                try:
                    importlib.import_module(f"{base}.{alias.name}")
                except ImportError:
                    bad.append(f"{f.name}:{node.lineno} {base}.{alias.name}")
    return bad


def test_every_import_inside_raycxr_resolves(tmp_path):
    assert unresolved_imports() == []
    # and the check can fail: a lazy import of a module that is not there
    (tmp_path / "raycxr").mkdir()
    (tmp_path / "raycxr" / "late.py").write_text("def f():\n    from .eval import no_such_module\n")
    global PKG
    old, PKG = PKG, tmp_path / "raycxr"
    try:
        assert unresolved_imports(PKG) == ["late.py:2 raycxr.eval.no_such_module"]
    finally:
        PKG = old
