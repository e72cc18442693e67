"""The runtime package's shape: no import cycle, no module reaching into another's private names.

Read from the source (ast), not by importing it: an import cycle is a path of imports between
modules of latticaray/runtime that comes back to where it started. Imports under
``if TYPE_CHECKING:`` are left out (annotations only: the parts of a node name the node they
belong to that way); imports inside functions count, as they would run.
"""

from __future__ import annotations

import ast
import pathlib

import latticaray.runtime

ROOT = pathlib.Path(latticaray.runtime.__file__).parent
PACKAGE = "latticaray.runtime"
#: underscore names of other libraries the runtime may use (public despite the underscore)
FOREIGN_PRIVATE_OK = {"_exit"}  # os._exit


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((PACKAGE, *parts))] = ast.parse(path.read_text(), str(path))
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """Modules of the package that ``tree`` imports at run time."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            for alias in node.names:  # `from latticaray.runtime import refcount`
                if f"{node.module}.{alias.name}" in modules:
                    found.add(f"{node.module}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_import_cycle_in_the_runtime():
    modules = _modules()
    graph = {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}
    # a package imports its __init__ first: that edge is not a dependency of the module
    for name, targets in graph.items():
        targets.difference_update(p for p in list(targets) if name.startswith(p + "."))
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                walk(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    # the checker sees the imports it should: the node imports its parts
    assert "latticaray.runtime.local.tasks" in graph["latticaray.runtime.node"]


def _defined_private(tree: ast.Module) -> set[str]:
    """Underscore names this module defines: functions, classes, attributes of ``self``,
    module names and parameters."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
    return {n for n in names if n.startswith("_")}


def test_no_module_uses_another_modules_private_names():
    found = []
    for name, tree in _modules().items():
        own = _defined_private(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found += [
                    f"{name}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in own
                and node.attr not in FOREIGN_PRIVATE_OK
            ):
                found.append(f"{name}:{node.lineno}: .{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)
