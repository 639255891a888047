"""Continual training: losses, metrics, plugins, strategies, stages and pipeline specs."""

from unicon_tf._quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before any module of this package imports TensorFlow or Keras

from unicon_tf.train.continual import CachedHeadModel, ContinualModel  # noqa: E402
from unicon_tf.train.losses import DISTILLATION_LOSSES, TASK_LOSSES, classification_loss, cox_loss, dice_ce_loss  # noqa: E402
from unicon_tf.train.metrics import ConcordanceIndex, DiceScore, LogitAUC, c_index, task_metrics  # noqa: E402
from unicon_tf.train.pipeline import PipelineError, PipelineSpec, StageSpec, load_pipeline  # noqa: E402
from unicon_tf.train.plugins import Distillation, Plugin, WeightPenalty  # noqa: E402
from unicon_tf.train.stage import RunDirectory, StageError, TrainingError, load_fisher, train_stage  # noqa: E402
from unicon_tf.train.strategies import STRATEGIES, configure_trainable  # noqa: E402

__all__ = [
    "CachedHeadModel", "ConcordanceIndex", "ContinualModel", "DISTILLATION_LOSSES", "DiceScore", "Distillation",
    "LogitAUC", "PipelineError", "PipelineSpec", "Plugin", "RunDirectory", "STRATEGIES", "StageError", "StageSpec",
    "TASK_LOSSES", "TrainingError", "WeightPenalty", "c_index", "classification_loss", "configure_trainable",
    "cox_loss", "dice_ce_loss", "load_fisher", "load_pipeline", "task_metrics", "train_stage",
]
