"""Continual training: losses, metrics, plugins, strategies, stages, pipeline specs and
the baselines' training."""

from unicon_tf._quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before any module of this package imports TensorFlow or Keras

from unicon_tf.run import StageError  # noqa: E402
from unicon_tf.train.baselines import JointModel, train_baselines  # noqa: E402
from unicon_tf.train.continual import CachedHeadModel, ContinualModel  # noqa: E402
from unicon_tf.tasks.losses import classification_loss, cox_loss, dice_ce_loss  # noqa: E402
from unicon_tf.tasks.metrics import ConcordanceIndex, DiceScore, LogitAUC, c_index  # noqa: E402
from unicon_tf.train.pipeline import PipelineError, PipelineSpec, StageSpec, load_pipeline  # noqa: E402
from unicon_tf.train.plugins import EWC, Distillation, Plugin, WeightPenalty, load_fisher  # noqa: E402
from unicon_tf.train.stage import TrainingError, fit_stage, train_stage  # noqa: E402
from unicon_tf.train.strategies import STRATEGIES, configure_trainable  # noqa: E402

__all__ = [
    "CachedHeadModel", "ConcordanceIndex", "ContinualModel", "DiceScore", "Distillation", "EWC",
    "JointModel", "LogitAUC", "PipelineError", "PipelineSpec", "Plugin", "STRATEGIES", "StageError", "StageSpec",
    "TrainingError", "WeightPenalty", "c_index", "classification_loss",
    "configure_trainable", "cox_loss", "dice_ce_loss", "fit_stage", "load_fisher", "load_pipeline",
    "train_baselines", "train_stage",
]
