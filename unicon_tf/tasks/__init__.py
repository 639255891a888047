"""Task kinds: one module per kind, each everything a head of that kind needs end to end.

Each kind module's docstring tabulates its target, head, loss, metrics and serving outputs.

Adding a kind is one module defining a `TaskKind` subclass and calling `register`, plus
its import line below (see `unicon_tf.tasks.base` for what a kind defines).

Example:
>>> {"classification", "prognosis", "segmentation"} <= set(TASKS)
True
>>> task_kind("segmentation").main_metric
'dice'
"""

from unicon_tf.tasks.base import TASKS, TaskKind, metric_name, register, task_kind  # first: the kinds register here
from unicon_tf.tasks import classification, prognosis, regression, segmentation  # noqa: E402,F401 (each registers itself)

__all__ = ["TASKS", "TaskKind", "metric_name", "register", "task_kind"]
