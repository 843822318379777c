"""No import cycles in harmprune, read from the source with ``ast`` (nothing is imported).

The rule: a module's imports form a graph whose nodes are the modules of ``src/harmprune``; an edge A -> B is
any ``import``/``from ... import`` in A that names B (a name imported from a package that is a submodule counts
as that submodule). Importing ``a.b.c`` also imports the packages ``a.b`` and ``a`` first, so those are edges too,
except to A's own parent packages, which Python has always started before A.

* Import time: the imports A runs when it is imported (module level, outside ``if TYPE_CHECKING:``) must form no
  cycle, or which module works depends on which one was imported first.
* Lazy imports (inside functions) keep ``harmprune --help`` fast and optional dependencies optional; they count
  as edges too, and must not close a cycle either: a two-way dependency means a shared piece lives in the wrong
  module. Plug-in loading by name (``importlib.import_module`` in the judge and experiment registries) is not an
  ``import`` statement and is not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import harmprune

ROOT = Path(harmprune.__file__).resolve().parent


def module_names(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports_of(tree: ast.Module, lazy: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module: at import time only, or (``lazy``) also those inside functions."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if not lazy and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph(lazy: bool, root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named: set[str] = set()
        for node in imports_of(ast.parse(path.read_text(encoding="utf-8")), lazy):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)
        own_parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        edges = set()
        for target in named:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix not in own_parents and prefix != name:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_path_through(sorted(component), graph))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def _path_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A cycle inside a strongly connected component, from its first module back to it (for the message)."""
    members, start = set(component), component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        step = next((w for w in nxt if w not in seen), None) or nxt[0]
        if step in seen:
            return path[path.index(step):] + [step]
        path.append(step)
        seen.add(step)


def test_the_checker_finds_a_lazy_cycle_and_a_package_import_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text("from pkg import a\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.c import x\n")
    (pkg / "sub" / "d.py").write_text("from . import e\n")
    (pkg / "sub" / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import d\n")
    (pkg / "c.py").write_text("import pkg.sub.d\n")  # imports pkg.sub first, whose __init__ imports c
    assert cycles(import_graph(lazy=False, root=pkg)) == [["pkg.c", "pkg.sub", "pkg.c"]]
    assert sorted(cycles(import_graph(lazy=True, root=pkg))) == [["pkg.a", "pkg.b", "pkg.a"],
                                                                  ["pkg.c", "pkg.sub", "pkg.c"]]


def test_no_import_cycle_at_import_time():
    assert cycles(import_graph(lazy=False)) == []


def test_no_import_cycle_through_lazy_imports_either():
    assert cycles(import_graph(lazy=True)) == []
