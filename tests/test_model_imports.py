"""The modules of `unicon_tf.model` and `unicon_tf.tasks` import each other without a cycle,
and none hides one behind an import inside a function."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "unicon_tf"
CHECKED = ("model", "tasks")


def _module(path):
    return ".".join(("unicon_tf",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def _imports(tree):
    """`(module imported, whether at module level)` for every `unicon_tf` import."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("unicon_tf."):
                yield name, id(node) in top


def _graph():
    """`{module: modules it imports}` over the checked packages, and the function-level imports."""
    modules = {_module(p): p for folder in CHECKED for p in (PACKAGE / folder).glob("*.py")}
    graph, inner = {}, []
    for name, path in modules.items():
        edges = set()
        for imported, top_level in _imports(ast.parse(path.read_text())):
            if imported in modules and imported != name:
                edges.add(imported)
                if not top_level:
                    inner.append(f"{name} imports {imported} inside a function")
        graph[name] = edges
    return graph, inner


def test_no_import_cycle_and_no_function_level_import():
    graph, inner = _graph()
    assert not inner, inner
    assert "unicon_tf.model.parts" in graph["unicon_tf.model.pretrained"]  # the graph is read, not empty
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for following in sorted(graph[node]):
            if state.get(following) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(following):] + [following]))
            if following not in state:
                visit(following, trail + [following])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
