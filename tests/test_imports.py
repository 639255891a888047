"""The import graph of unicon_tf, read from the source with `ast`: no cycle, and no
function-level import of a unicon_tf module that is there to dodge one.

Every `import` and `from ... import` of every module counts, at module level and inside
functions, as does `importlib.import_module("unicon_tf....")` with a literal name. An edge
goes to the module an import names (`from unicon_tf.data import ingest` -> the module
`unicon_tf.data.ingest`; `from unicon_tf.data import DataError` -> the package
`unicon_tf.data`), not to the packages Python initialises on the way (those would make
every package `__init__` that re-exports its submodules a cycle). Imports of other
packages (TensorFlow, Beam, KFP, highdicom) are not edges: an optional dependency
imported inside a function is fine. Imports under `if TYPE_CHECKING:` are not edges either:
they are read by type checkers only and never run.
"""

import ast
import dataclasses
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "unicon_tf"


@dataclasses.dataclass(frozen=True)
class Edge:
    """`source` imports `target` at `line`; `local` when the import is inside a function."""

    source: str
    target: str
    line: int
    local: bool


def module_names(root=PACKAGE):
    """`{dotted module name: path}` of every module of the package under `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imported(node, module, is_package):
    """The dotted names an import statement or `importlib.import_module` call reads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's own package, `level - 1` further up
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def _is_type_checking_block(node):
    """Whether `node` is `if TYPE_CHECKING:` (or `if typing.TYPE_CHECKING:`)."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def import_graph(root=PACKAGE):
    """Every import edge between the package's modules.

    Args:
        root: the package folder.

    Returns:
        `[Edge]`, one per import statement and imported module.
    """
    modules = module_names(root)
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                     for n in ast.walk(f) if n is not f}
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = _imported(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom) and names:  # `from a import b`: the module a.b if b is one, else a
                base, members = names[0], names[1:]
                names = [m for m in members if m in modules] or [base]
                names += [base] if len(names) < len(members) and base not in names else []
            for name in names:
                if name in modules and name != module:
                    edges.append(Edge(module, name, node.lineno, id(node) in functions))
    return edges


def _reaches(graph, start, goal):
    """Whether `goal` can be reached from `start` along `graph` (`{module: {module}}`)."""
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(graph.get(node, ()))
    return False


def cycles(edges):
    """The strongly connected components (more than one module) of `edges`, each sorted (Tarjan)."""
    graph = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_graph_sees_module_level_function_level_and_importlib_imports():
    edges = {(e.source, e.target): e.local for e in import_graph()}
    assert edges[("unicon_tf.model", "unicon_tf._quiet")] is False  # `from unicon_tf._quiet import ...`
    assert edges[("unicon_tf.cli", "unicon_tf.demo")] is True  # inside a command
    assert ("unicon_tf.data.ingest", "unicon_tf.data.manifest") in edges  # `from unicon_tf.data.manifest import`
    assert ("unicon_tf.data", "unicon_tf.data.ingest") in edges  # a package re-exporting its module
    assert edges[("unicon_tf._keras_hook", "unicon_tf.model")] is True  # importlib.import_module("unicon_tf.model")
    assert not any(e.target.startswith(("tensorflow", "keras", "apache_beam", "kfp")) for e in import_graph())


def test_cycles_finds_a_cycle_closed_by_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n    import json\n    return a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    edges = import_graph(package)
    assert {(e.source, e.target, e.local) for e in edges} == {("pkg.a", "pkg.b", False), ("pkg.b", "pkg.a", True)}
    assert cycles(edges) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_at_module_level():
    edges = [e for e in import_graph() if not e.local]
    assert cycles(edges) == [], "modules that import each other (move what both need into a third module)"


def test_no_function_level_import_dodges_a_cycle():
    """A function-level import of a unicon_tf module is fine (a lazy TensorFlow import, a CLI
    command's own), unless moving it to module level would close a cycle."""
    edges = import_graph()
    graph = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    dodging = [f"{e.source}:{e.line} imports {e.target}, which imports {e.source} back"
               for e in edges if e.local and _reaches(graph, e.target, e.source)]
    assert dodging == [], "\n".join(dodging)


if __name__ == "__main__":  # the import picture (the cycles left): python tests/test_imports.py
    for component in cycles(import_graph()):
        print(" <-> ".join(component))
