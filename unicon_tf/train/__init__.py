"""Continual training: losses, metrics, plugins, strategies, stages and pipeline specs."""

from unicon_tf.train.continual import CachedHeadModel, ContinualModel
from unicon_tf.train.losses import DISTILLATION_LOSSES, TASK_LOSSES, classification_loss, cox_loss, dice_ce_loss
from unicon_tf.train.metrics import ConcordanceIndex, DiceScore, LogitAUC, c_index, task_metrics
from unicon_tf.train.pipeline import PipelineError, PipelineSpec, StageSpec, load_pipeline
from unicon_tf.train.plugins import Distillation, Plugin, WeightPenalty
from unicon_tf.train.stage import RunDirectory, StageError, TrainingError, load_fisher, train_stage
from unicon_tf.train.strategies import STRATEGIES, configure_trainable

__all__ = [
    "CachedHeadModel", "ConcordanceIndex", "ContinualModel", "DISTILLATION_LOSSES", "DiceScore", "Distillation",
    "LogitAUC", "PipelineError", "PipelineSpec", "Plugin", "RunDirectory", "STRATEGIES", "StageError", "StageSpec",
    "TASK_LOSSES", "TrainingError", "WeightPenalty", "c_index", "classification_loss", "configure_trainable",
    "cox_loss", "dice_ce_loss", "load_fisher", "load_pipeline", "task_metrics", "train_stage",
]
