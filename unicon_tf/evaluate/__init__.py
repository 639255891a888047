"""Evaluation: every head after every stage, continual-learning measures, blessing,
baselines and a report with figures."""

from unicon_tf.evaluate.baselines import KINDS, JointModel, load_baselines, run_baselines
from unicon_tf.evaluate.evaluator import evaluate_run, stage_records, write_label_maps
from unicon_tf.evaluate.matrix import bless, summarize
from unicon_tf.evaluate.report import format_gain, pet_gain, write_report
from unicon_tf.evaluate.scores import MAIN_METRIC, head_metrics, paired_bootstrap, predict_head, score

__all__ = [
    "KINDS", "JointModel", "MAIN_METRIC", "bless", "evaluate_run", "format_gain", "head_metrics", "load_baselines",
    "paired_bootstrap", "pet_gain", "predict_head", "run_baselines", "score", "stage_records", "summarize", "write_label_maps", "write_report",
]
