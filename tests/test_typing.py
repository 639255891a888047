"""Every public function and method of the typed modules carries parameter and return annotations.

The modules are parsed with `ast` (nothing is imported, so the check takes no TensorFlow
start-up). Public means: a module-level function or a method of a public class whose name
does not start with `_`, plus `__init__` of a public class; `self`/`cls` (the first
parameter of a method that is not a staticmethod) need no annotation. Functions nested in
functions are private to them and not checked. `TYPED_MODULES` grows until it is the
whole package: a module joins once `unannotated` finds nothing in it.
"""

import ast
import pathlib
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "unicon_tf"

TYPED_MODULES = (
    "unicon_tf",
    "unicon_tf._keras_hook",
    "unicon_tf._quiet",
    "unicon_tf.cli",
    "unicon_tf.components",
    "unicon_tf.components.base",
    "unicon_tf.components.evaluator",
    "unicon_tf.components.example_gen",
    "unicon_tf.components.graph",
    "unicon_tf.components.pusher",
    "unicon_tf.components.runner",
    "unicon_tf.components.trainer",
    "unicon_tf.data",
    "unicon_tf.data.augment",
    "unicon_tf.data.beam",
    "unicon_tf.data.dataset",
    "unicon_tf.data.dicom",
    "unicon_tf.data.errors",
    "unicon_tf.data.examples",
    "unicon_tf.data.ingest",
    "unicon_tf.data.manifest",
    "unicon_tf.data.phantom",
    "unicon_tf.data.preprocess",
    "unicon_tf.data.real_ct",
    "unicon_tf.data.records",
    "unicon_tf.data.sampling",
    "unicon_tf.data.shards",
    "unicon_tf.data.suv",
    "unicon_tf.demo",
    "unicon_tf.evaluate",
    "unicon_tf.evaluate.baselines",
    "unicon_tf.evaluate.evaluator",
    "unicon_tf.evaluate.matrix",
    "unicon_tf.evaluate.report",
    "unicon_tf.evaluate.scores",
    "unicon_tf.experiment",
    "unicon_tf.experiment.aggregate",
    "unicon_tf.experiment.folds",
    "unicon_tf.experiment.report",
    "unicon_tf.experiment.runner",
    "unicon_tf.files",
    "unicon_tf.kubeflow",
    "unicon_tf.kubeflow.artifacts",
    "unicon_tf.kubeflow.compiler",
    "unicon_tf.model",
    "unicon_tf.model.adapters",
    "unicon_tf.model.blocks",
    "unicon_tf.model.encoder",
    "unicon_tf.model.families",
    "unicon_tf.model.foundation",
    "unicon_tf.model.heads",
    "unicon_tf.model.i3resnet",
    "unicon_tf.model.parts",
    "unicon_tf.model.pretrained",
    "unicon_tf.model.stems",
    "unicon_tf.model.storage",
    "unicon_tf.model.torch_checkpoint",
    "unicon_tf.model.unetr",
    "unicon_tf.model.vit",
    "unicon_tf.names",
    "unicon_tf.options",
    "unicon_tf.presets",
    "unicon_tf.presets.networks",
    "unicon_tf.presets.registry",
    "unicon_tf.run",
    "unicon_tf.serving",
    "unicon_tf.serving.export",
    "unicon_tf.serving.inference",
    "unicon_tf.tasks",
    "unicon_tf.tasks.base",
    "unicon_tf.tasks.classification",
    "unicon_tf.tasks.losses",
    "unicon_tf.tasks.metrics",
    "unicon_tf.tasks.prognosis",
    "unicon_tf.tasks.regression",
    "unicon_tf.tasks.segmentation",
    "unicon_tf.train",
    "unicon_tf.train.assembly",
    "unicon_tf.train.baselines",
    "unicon_tf.train.caching",
    "unicon_tf.train.checkpoints",
    "unicon_tf.train.checks",
    "unicon_tf.train.config",
    "unicon_tf.train.continual",
    "unicon_tf.train.distribute",
    "unicon_tf.train.epochs",
    "unicon_tf.train.pipeline",
    "unicon_tf.train.plugins",
    "unicon_tf.train.precision",
    "unicon_tf.train.record",
    "unicon_tf.train.selection",
    "unicon_tf.train.stage",
    "unicon_tf.train.strategies",
    "unicon_tf.version",
    "unicon_tf.weights_error",
)
"""Dotted names of the modules whose public functions must be fully annotated."""


def module_path(name):
    """The source file of dotted module `name` under the package (a package: its `__init__.py`)."""
    relative = pathlib.Path(*name.split(".")[1:])
    package = PACKAGE / relative / "__init__.py"
    return package if package.is_file() else (PACKAGE / relative).with_suffix(".py")


def package_modules():
    """Dotted names of every module under `unicon_tf`, sorted."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


def _missing(function, method):
    """Names of `function`'s parameters without an annotation, plus `return` when it has none."""
    args = function.args
    positional = args.posonlyargs + args.args
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in function.decorator_list)
    if method and not static:
        positional = positional[1:]  # self or cls
    params = positional + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a is not None]
    missing = [p.arg for p in params if p.annotation is None]
    return missing + (["return"] if function.returns is None else [])


def _definitions(statements, prefix="", in_class=False):
    """`(qualified name, node, is method)` of the functions in `statements`, descending into
    public classes and into `if`/`try`/`with` blocks, never into function bodies."""
    for node in statements:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node, in_class
        elif isinstance(node, ast.ClassDef):
            if not node.name.startswith("_"):
                yield from _definitions(node.body, f"{prefix}{node.name}.", True)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    yield from _definitions(block, prefix, in_class)


def unannotated(source, module="<source>"):
    """`module:line name (missing: ...)` for each public function of `source` lacking annotations.

    Example:
    >>> unannotated("def f(x, y: int) -> int: ...")
    ['<source>:1 f (missing: x)']
    """
    found = []
    for qualified, function, method in _definitions(ast.parse(source).body):
        name = function.name
        if name.startswith("_") and not (method and name == "__init__"):
            continue
        missing = _missing(function, method)
        if missing:
            found.append(f"{module}:{function.lineno} {qualified} (missing: {', '.join(missing)})")
    return found


def test_typed_modules_are_modules_of_the_package():
    assert sorted(set(TYPED_MODULES)) == sorted(TYPED_MODULES), "a module is listed twice"
    unknown = sorted(set(TYPED_MODULES) - set(package_modules()))
    assert not unknown, f"TYPED_MODULES names modules that do not exist: {unknown}"


def test_public_functions_of_typed_modules_are_annotated():
    found = [line for name in TYPED_MODULES
             for line in unannotated(module_path(name).read_text(encoding="utf-8"), name)]
    assert not found, "public functions without full annotations:\n" + "\n".join(found)


def test_every_module_of_the_package_parses():
    for name in package_modules():
        ast.parse(module_path(name).read_text(encoding="utf-8"), filename=str(module_path(name)))


@pytest.mark.parametrize("source, expected", [
    ("def f(a, *args, b: int = 0, **kwargs) -> None: ...", ["f (missing: a, args, kwargs)"]),
    ("def f(a: int): ...", ["f (missing: return)"]),
    ("def _private(a): ...", []),
    ("""
     class Layer:
         def __init__(self, units):
             def nested(x):  # private to __init__
                 return x
         @classmethod
         def make(cls) -> 'Layer': ...
         @staticmethod
         def helper(x) -> int: ...
         @property
         def size(self): ...
         def _hidden(self, x): ...
     """, ["Layer.__init__ (missing: units, return)", "Layer.helper (missing: x)", "Layer.size (missing: return)"]),
    ("class _Private:\n    def run(self, x): ...", []),
    ("class Outer:\n    class Inner:\n        def run(self, x: int): ...", ["Outer.Inner.run (missing: return)"]),
    ("try:\n    import a\nexcept ImportError:\n    def fallback(x) -> None: ...", ["fallback (missing: x)"]),
])
def test_unannotated_finds_what_is_missing(source, expected):
    found = unannotated(textwrap.dedent(source))
    assert [line.split(" ", 1)[1] for line in found] == expected
