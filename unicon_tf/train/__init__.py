"""Continual training: losses, metrics, plugins, strategies, stages, pipeline specs and
the baselines' training.

The names below import their modules on first use (PEP 562), TensorFlow quietly first
where they need it: reading a pipeline file (`unicon_tf.train.pipeline`,
`unicon_tf.train.config`) imports neither TensorFlow nor Keras.
"""

import importlib
import importlib.util

from unicon_tf._quiet import import_tensorflow_quietly

_EXPORTS = {
    "StageError": "unicon_tf.run",
    "JointModel": "unicon_tf.train.baselines", "train_baselines": "unicon_tf.train.baselines",
    "CachedHeadModel": "unicon_tf.train.continual", "ContinualModel": "unicon_tf.train.continual",
    **dict.fromkeys(("classification_loss", "cox_loss", "dice_ce_loss"),
                    "unicon_tf.tasks.losses"),
    **dict.fromkeys(("ConcordanceIndex", "DiceScore", "LogitAUC", "c_index"),
                    "unicon_tf.tasks.metrics"),
    **dict.fromkeys(("PipelineError", "PipelineSpec", "StageSpec", "load_pipeline"), "unicon_tf.train.pipeline"),
    "TrainingConfig": "unicon_tf.train.config",
    **dict.fromkeys(("EWC", "Distillation", "Plugin", "WeightPenalty", "load_fisher"), "unicon_tf.train.plugins"),
    **dict.fromkeys(("TrainingError", "fit_stage", "train_stage"), "unicon_tf.train.stage"),
    "STRATEGIES": "unicon_tf.train.strategies", "configure_trainable": "unicon_tf.train.strategies",
}
_TENSORFLOW_FREE = {"unicon_tf.run", f"{__name__}.pipeline", f"{__name__}.config"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    """Import the module that defines `name` (TensorFlow quietly first, where it needs it)."""
    module = _EXPORTS.get(name)
    if module is None and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        module, name = f"{__name__}.{name}", None  # a submodule: `unicon_tf.train.stage`
    if module is None:
        raise AttributeError(f"module 'unicon_tf.train' has no attribute {name!r}")
    if module not in _TENSORFLOW_FREE:
        import_tensorflow_quietly()  # before any module of this package imports TensorFlow or Keras
    imported = importlib.import_module(module)
    return imported if name is None else getattr(imported, name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
