"""Continual-learning methods as small composable plugins (in the style of Avalanche).

A plugin adds one named term to a stage's training loss; `ContinualModel` sums the terms of
all its plugins. Plugins hold no Keras variables, so they are never saved with a model.

- `Distillation` (LwF, Li and Hoiem 2017): old heads' outputs on this stage's inputs are
  kept close to those of a frozen teacher (the previous stage's model).
- `WeightPenalty`: L2-SP (Li et al. 2018) pulls shared weights towards their values at the
  start of the stage; with a diagonal Fisher as importance it is EWC (Kirkpatrick et al. 2017).
"""

import abc

import numpy as np
import tensorflow as tf

from unicon_tf.train.losses import DISTILLATION_LOSSES
from unicon_tf.train.strategies import set_trainable


class Plugin(abc.ABC):
    """A named loss term: `penalty(inputs, outputs)` returns a scalar tensor."""

    name = "plugin"

    @abc.abstractmethod
    def penalty(self, inputs, outputs):
        """The weighted loss term for a batch of stage inputs and the network's outputs."""

    def describe(self):
        """Hyper-parameters to record in the stage registry."""
        return {"plugin": type(self).__name__}


class _Untracked:
    """Holds a model out of Keras' reach, so a teacher never becomes a student's weight."""

    def __init__(self, model):
        self.model = model


class Distillation(Plugin):
    """Learning without Forgetting: match old heads to a frozen teacher on the new inputs.

    Args:
        teacher: the previous stage's model (its own copy of the weights; not trained).
        heads: `{head name: task}` of old heads to distil; heads whose modalities the
            stage's inputs lack are skipped.
        alpha: weight of the term.
        temperature: softmax temperature of the class and segmentation KL.
        modalities: the modalities the stage's inputs provide.

    Example:
    >>> plugin = Distillation(teacher, {"classification": "classification"}, alpha=1.0,
    ...                       modalities=["ct"])  # doctest: +SKIP
    """

    name = "distillation"

    def __init__(self, teacher, heads, alpha=1.0, temperature=2.0, modalities=("ct",)):
        import keras

        available = set(modalities)
        self.heads = {h: t for h, t in heads.items() if set(_head_modalities(teacher, h)) <= available}
        inputs = {m: teacher.input[m] for m in teacher.input if m in available}
        outputs = {h: teacher.output[h] for h in self.heads}
        self._teacher = _Untracked(keras.Model(inputs, outputs, name=f"{teacher.name}_teacher"))
        set_trainable(self._teacher.model, False)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def teacher_outputs(self, inputs):
        model = self._teacher.model
        return model({m: inputs[m] for m in model.input}, training=False)

    def terms(self, inputs, outputs):
        """`{head: distillation loss}` for every distilled head (unweighted)."""
        if not self.heads:
            return {}
        targets = self.teacher_outputs(inputs)
        return {h: DISTILLATION_LOSSES[task](tf.stop_gradient(targets[h]), outputs[h], self.temperature)
                for h, task in self.heads.items()}

    def penalty(self, inputs, outputs):
        terms = self.terms(inputs, outputs)
        return self.alpha * tf.add_n(list(terms.values())) if terms else tf.constant(0.0)

    def describe(self):
        return {"plugin": "Distillation", "alpha": self.alpha, "temperature": self.temperature,
                "heads": sorted(self.heads)}


def _head_modalities(model, head):
    from unicon_tf.model import model_parts

    return model_parts(model)["heads"][head].modalities


class WeightPenalty(Plugin):
    """beta / 2 * sum_i F_i (w_i - w_i*)^2 over shared variables; F = 1 is L2-SP, a Fisher is EWC.

    Args:
        variables: the shared variables to hold (e.g. the encoder's base weights).
        beta: weight of the term.
        importance: optional `{variable.path: array}` diagonal Fisher (EWC); variables
            without an entry are held with importance 1.

    Example:
    >>> l2sp = WeightPenalty(encoder.base_weights(), beta=0.01)  # doctest: +SKIP
    """

    def __init__(self, variables, beta=0.01, importance=None):
        self.variables = list(variables)
        self.beta = float(beta)
        self.kind = "ewc" if importance is not None else "l2sp"
        self.name = self.kind
        self.reference = [tf.constant(v.numpy()) for v in self.variables]
        importance = importance or {}
        self.importance = [tf.constant(np.asarray(importance.get(v.path, 1.0), np.float32)) for v in self.variables]

    def penalty(self, inputs, outputs):
        if not self.variables:
            return tf.constant(0.0)
        total = tf.add_n([tf.reduce_sum(f * tf.square(v - r))
                          for v, r, f in zip(self.variables, self.reference, self.importance)])
        return 0.5 * self.beta * total

    def describe(self):
        return {"plugin": "WeightPenalty", "kind": self.kind, "beta": self.beta, "variables": len(self.variables)}
