"""Evaluation: every head after every stage, continual-learning measures, blessing,
baselines' scores and a report with figures. (Training, baselines' included, is in
`unicon_tf.train`.)"""

from unicon_tf._quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before any module of this package imports TensorFlow or Keras

from unicon_tf.evaluate.baselines import evaluate_baselines, load_baselines  # noqa: E402
from unicon_tf.evaluate.evaluator import evaluate_run, evaluate_stage, score_stage, write_label_maps  # noqa: E402
from unicon_tf.evaluate.matrix import bless, summarize  # noqa: E402
from unicon_tf.evaluate.report import (  # noqa: E402
    comparisons, format_comparisons, format_gain, format_rules, pet_gain, write_report)
from unicon_tf.evaluate.scores import head_metrics, paired_bootstrap, predict_head, score  # noqa: E402

__all__ = [
    "bless", "comparisons", "evaluate_baselines", "evaluate_run", "evaluate_stage", "format_comparisons",
    "format_gain", "format_rules", "head_metrics", "load_baselines", "paired_bootstrap", "pet_gain", "predict_head",
    "score", "score_stage", "summarize", "write_label_maps", "write_report",
]
