"""The task-kind registry: each kind's pieces fit together, and every consumer looks kinds up there."""

import ast
import pathlib

import numpy as np
import pytest

from unicon_tf.tasks import TASKS, task_kind

RNG = np.random.default_rng(0)
EXAMPLES = {  # (target, raw head output) of 4 patients
    "classification": (np.array([0, 1, 1, 0]), RNG.normal(size=(4, 2)).astype(np.float32)),
    "prognosis": (np.array([[1.0, 1], [2.0, 0], [3.0, 1], [4.0, 1]], np.float32), RNG.normal(size=(4,)).astype(np.float32)),
    "segmentation": (RNG.integers(0, 2, (4, 4, 4, 4)), RNG.normal(size=(4, 4, 4, 4, 2)).astype(np.float32)),
    "regression": (np.array([1.0, 2.5, 0.5, 4.0], np.float32), RNG.normal(size=(4,)).astype(np.float32)),
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_kind_s_pieces_fit_together(task):
    """A head's raw output goes through the kind's loss, distillation, scores, training
    metrics and serving outputs; the main metric is among the scores and training metrics."""
    kind = task_kind(task)
    target, output = EXAMPLES[task]
    assert kind.name == task and kind.targets and kind.head.task == task
    assert np.isfinite(float(kind.loss()(target, output))), task
    assert float(kind.distillation_loss(output, output, 2.0)) == 0.0, task
    scores = kind.scores(target, output)
    assert kind.main_metric in scores, task
    metrics = kind.metrics("head", 2)
    assert f"head_{kind.main_metric}" in [m.name for m in metrics], task
    for metric in metrics:
        metric.update_state(target, output)
        assert np.all(np.isfinite(np.asarray(metric.result()))), (task, metric.name)
    served = kind.serving_outputs(output)
    assert served and all(len(np.asarray(v)) == 4 for v in served.values()), task
    prediction = {"task": task, "target": target, "output": output, **scores}
    resampled = kind.resampled(prediction, np.arange(4)[None, :])  # the identity resample: the score itself
    assert resampled[0] == pytest.approx(scores[kind.main_metric], nan_ok=True), task


def test_unknown_task_names_the_kinds():
    with pytest.raises(ValueError, match=r"Unknown task 'survival': expected one of \['classification'"):
        task_kind("survival")


def _task_name_lookups(tree):
    """The task-name constants a module compares with, keys a dict by or indexes with."""
    def named(node):
        return isinstance(node, ast.Constant) and node.value in TASKS
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(named(n) for n in [node.left, *node.comparators]):
            yield node.lineno
        elif isinstance(node, ast.Dict) and any(named(k) for k in node.keys if k is not None):
            yield node.lineno
        elif isinstance(node, ast.Subscript) and named(node.slice):
            yield node.lineno


def test_no_table_keyed_by_task_name_outside_the_task_kinds():
    """The consumers look kinds up: no module outside `unicon_tf/tasks/` compares with,
    keys a table by or indexes with a task name (the demo's pipeline aside; `options.py` and
    `train/config.py` declare the kinds' options for checks without TensorFlow, held in step
    with the kinds by `test_declarations_without_tensorflow_match_the_kinds`)."""
    package = pathlib.Path(__file__).resolve().parents[1] / "unicon_tf"
    skipped = {"tasks", "demo.py", "options.py", "config.py"}
    found = [f"{path.relative_to(package)}:{line}" for path in sorted(package.rglob("*.py"))
             if not skipped & {path.parent.name, path.name}
             for line in _task_name_lookups(ast.parse(path.read_text()))]
    assert not found, found


def test_declarations_without_tensorflow_match_the_kinds():
    """A pipeline file is checked without TensorFlow against `unicon_tf.options` and
    `unicon_tf.train.config` for the shipped kinds: their loss options and dense kinds are
    the kinds' own; a kind not declared there is read from its registry entry."""
    from unicon_tf.options import DENSE_TASKS, TASKS as DECLARED
    from unicon_tf.train.config import LOSS_OPTIONS, kind_declaration

    assert set(DECLARED) <= set(TASKS) and {"classification", "prognosis", "segmentation"} <= set(DECLARED)
    for task, kind in TASKS.items():
        declared = kind_declaration(task)
        assert {k: tuple(v) for k, v in declared.loss_options.items()} == \
            {k: tuple(v) for k, v in kind.loss_options.items()}, task
        assert declared.dense == kind.dense, task
        if task in DECLARED:
            assert (task in DENSE_TASKS) == kind.dense and (task in LOSS_OPTIONS) == bool(kind.loss_options), task
