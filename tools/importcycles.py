#!/usr/bin/env python3
"""List the import cycles among the modules of a package (static: ast, nothing is imported).

    python tools/importcycles.py                      # latticaray, every import counted
    python tools/importcycles.py --runtime-only       # ignore `if TYPE_CHECKING:` imports
    python tools/importcycles.py --exclude latticaray.mesh.nat --exclude latticaray.runtime

Every ``import`` and ``from ... import`` in a module counts, at any depth (a function-level
import is still a dependency), including those under ``if TYPE_CHECKING:`` unless
``--runtime-only``. ``from pkg import name`` depends on ``pkg`` and, when ``name`` is a
submodule, on ``pkg.name``. Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and
``a.b``; those implicit edges are not counted (a package's ``__init__`` re-exporting its own
submodules is not a cycle). A cycle is a strongly connected component of more than one
module. Prints each cycle with one import line per edge; exits 1 if there is any, else 0.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    type_only: bool


def module_files(root: str, package: str) -> dict[str, str]:
    """Module name -> file path for every .py file of ``package`` under ``root``."""
    base = os.path.join(root, *package.split("."))
    modules: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        rel = os.path.relpath(dirpath, root)
        parts = rel.split(os.sep)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            if name == "__init__.py":
                modules[".".join(parts)] = os.path.join(dirpath, name)
            else:
                modules[".".join(parts + [name[:-3]])] = os.path.join(dirpath, name)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import node with whether it sits under ``if TYPE_CHECKING:``."""

    def walk(node: ast.AST, type_only: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, type_only
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk_stmt(stmt, True)
                for stmt in child.orelse:
                    yield from walk_stmt(stmt, type_only)
            else:
                yield from walk(child, type_only)

    def walk_stmt(
        stmt: ast.AST, type_only: bool
    ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt, type_only
        else:
            yield from walk(stmt, type_only)

    yield from walk(tree, False)


def edges_of(module: str, path: str, modules: dict[str, str]) -> list[Edge]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    out: list[Edge] = []

    def add(target: str, node: ast.stmt, type_only: bool) -> None:
        # the module itself, or the closest enclosing module of the package (none: external)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != module:
            out.append(Edge(module, target, node.lineno, type_only))

    for node, type_only in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, type_only)
            continue
        if node.level:
            parts = module.split(".")
            # a package's own __init__ is at its level; a module's level-1 parent is its package
            keep = len(parts) - node.level + (1 if is_package else 0)
            if keep <= 0:
                continue
            base = ".".join(parts[:keep])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        if not base:
            continue
        names = [alias.name for alias in node.names]
        submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
        if base in modules and len(submodules) < len(names):
            add(base, node, type_only)
        elif base not in modules and not submodules:
            add(base, node, type_only)
        for sub in submodules:
            add(sub, node, type_only)
    return out


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in discovery order, members sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def find_cycles(
    root: str, package: str, runtime_only: bool = False, exclude: tuple[str, ...] = ()
) -> tuple[list[list[str]], dict[tuple[str, str], list[Edge]]]:
    """The cycles (sorted module lists) and, per edge inside one, the import lines making it."""
    modules = module_files(root, package)

    def excluded(name: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in exclude)

    graph: dict[str, set[str]] = {m: set() for m in modules if not excluded(m)}
    lines: dict[tuple[str, str], list[Edge]] = {}
    for module, path in modules.items():
        if excluded(module):
            continue
        for edge in edges_of(module, path, modules):
            if runtime_only and edge.type_only:
                continue
            if excluded(edge.target):
                continue
            graph[module].add(edge.target)
            lines.setdefault((edge.source, edge.target), []).append(edge)
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    cycles.sort()
    return cycles, lines


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", nargs="?", default="latticaray")
    p.add_argument("--root", default=os.path.dirname(here), help="directory holding the package")
    p.add_argument("--runtime-only", action="store_true", help="ignore TYPE_CHECKING imports")
    p.add_argument("--exclude", action="append", default=[], help="a module or package prefix")
    args = p.parse_args(argv)
    cycles, lines = find_cycles(args.root, args.package, args.runtime_only, tuple(args.exclude))
    for cycle in cycles:
        members = set(cycle)
        print(f"cycle of {len(cycle)} modules: {', '.join(cycle)}")
        for (source, target), edges in sorted(lines.items()):
            if source in members and target in members:
                for edge in edges:
                    how = " (TYPE_CHECKING)" if edge.type_only else ""
                    print(f"    {source}:{edge.line} -> {target}{how}")
    if cycles:
        print(f"{len(cycles)} import cycle(s)")
        return 1
    print("no import cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
