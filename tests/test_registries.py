"""Every per-task registry knows the same tasks, and each task's entries fit together."""

import numpy as np

from unicon_tf.data import TASK_TARGETS
from unicon_tf.evaluate import MAIN_METRIC
from unicon_tf.evaluate.scores import SCORES
from unicon_tf.model import HEADS
from unicon_tf.serving.export import SERVING_OUTPUTS
from unicon_tf.train import DISTILLATION_LOSSES, TASK_LOSSES, TASK_METRICS


def test_every_per_task_registry_covers_the_same_tasks():
    registries = {"HEADS": HEADS, "TASK_TARGETS": TASK_TARGETS, "TASK_LOSSES": TASK_LOSSES,
                  "DISTILLATION_LOSSES": DISTILLATION_LOSSES, "MAIN_METRIC": MAIN_METRIC, "SCORES": SCORES,
                  "SERVING_OUTPUTS": SERVING_OUTPUTS, "TASK_METRICS": TASK_METRICS}
    tasks = set(HEADS)
    assert tasks == {"classification", "prognosis", "segmentation"}
    for name, registry in registries.items():
        assert set(registry) == tasks, f"{name} covers {sorted(registry)}, the heads {sorted(tasks)}"


def test_each_task_s_entries_fit_together():
    """A head's raw output goes through the task's loss, distillation, score, training
    metrics and serving outputs; the main metric is among the scores and training metrics."""
    rng = np.random.default_rng(0)
    examples = {
        "classification": (np.array([0, 1, 1, 0]), rng.normal(size=(4, 2)).astype(np.float32)),
        "prognosis": (np.array([[1.0, 1], [2.0, 0], [3.0, 1], [4.0, 1]], np.float32),
                      rng.normal(size=(4,)).astype(np.float32)),
        "segmentation": (rng.integers(0, 2, (4, 4, 4, 4)), rng.normal(size=(4, 4, 4, 4, 2)).astype(np.float32)),
    }
    for task, (target, output) in examples.items():
        assert np.isfinite(float(TASK_LOSSES[task](target, output))), task
        assert float(DISTILLATION_LOSSES[task](output, output, 2.0)) == 0.0, task
        assert MAIN_METRIC[task] in SCORES[task](target, output), task
        metrics = TASK_METRICS[task]("head", 2)
        assert f"head_{MAIN_METRIC[task]}" in [m.name for m in metrics], task
        for metric in metrics:
            metric.update_state(target, output)
            assert np.all(np.isfinite(np.asarray(metric.result()))), (task, metric.name)
        served = SERVING_OUTPUTS[task](output)
        assert served and all(len(np.asarray(v)) == 4 for v in served.values()), task
        assert set(TASK_TARGETS[task]) <= {"label", "time", "event", "mask"}, task
