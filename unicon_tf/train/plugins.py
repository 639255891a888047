"""Continual-learning methods as small plugins that own their state (in the style of Avalanche).

The training loop (`ContinualModel`) treats every plugin alike through `Plugin`:

- `heads`: the old heads whose outputs the plugin reads (the loop adds them to the
  network it trains, with the modalities they need);
- `head_terms(inputs, outputs)`: unweighted per-head terms, logged as `<head>_<name>`;
- `penalty(inputs, outputs)`: the weighted term added to the loss, logged as `<name>`;
- `active`: whether the term enters the training loss (an inactive plugin is still
  evaluated in `test_step`, to report, and still ends the stage);
- `end_stage(...)`: called once when the stage's training ends (EWC computes its Fisher).

Plugins hold no Keras variables, so they are never saved with a model.

- `Distillation` (LwF, Li and Hoiem 2017): old heads' outputs on this stage's inputs are
  kept close to those of a frozen teacher (the previous stage's model).
- `WeightPenalty`: L2-SP (Li et al. 2018) pulls shared weights towards their values at the
  start of the stage.
- `EWC`: the same pull weighted by a diagonal Fisher (Kirkpatrick et al. 2017), in its
  online form (Schwarz et al. 2018, "Progress & Compress"): at the end of every stage the
  Fisher of that stage's task, at the stage's final weights, is added to the running one,
  decayed by gamma: F <- gamma F + F_stage. gamma = 1 keeps every earlier task at full
  weight; gamma < 1 lets old tasks fade.
"""

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from unicon_tf.tasks import task_kind
from unicon_tf.train.strategies import set_trainable

if TYPE_CHECKING:
    import keras

    from unicon_tf.run import StageFolder


class Plugin(abc.ABC):
    """A named loss term and what it needs from the training loop (see the module docstring)."""

    name = "plugin"
    heads = {}
    weight = 0.0

    @property
    def active(self) -> bool:
        """Whether the term enters the training loss (its weight is positive)."""
        return self.weight > 0

    def head_terms(self, inputs: Mapping[str, tf.Tensor], outputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """`{head: unweighted term}` for each head the plugin covers (none by default)."""
        return {}

    @abc.abstractmethod
    def penalty(self, inputs: Mapping[str, tf.Tensor], outputs: Mapping[str, tf.Tensor], head_terms: Mapping[str, tf.Tensor] | None = None) -> tf.Tensor:
        """The weighted scalar term for a batch (`head_terms` reused when already computed)."""

    def end_stage(self, network: "keras.Model", head: str, data: Iterable[tuple[Mapping[str, tf.Tensor], Mapping[str, tf.Tensor]]], folder: "StageFolder") -> None:
        """Called once after the stage's last epoch.

        Args:
            network: the trained network (its weights are the stage's result).
            head: the head the stage trained.
            data: the stage's training examples, `(inputs, {head: target})`, one per batch,
                unaugmented and in order.
            folder: the stage's `StageFolder`, where a plugin keeps state for later stages.
        """

    def describe(self) -> dict[str, Any]:
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
        alpha: weight of the term; with 0 the plugin only reports (inactive).
        temperature: softmax temperature of the class and segmentation KL.
        modalities: the modalities the stage's inputs provide.

    Example:
    >>> from unicon_tf.model import foundation
    >>> teacher = foundation((8, 8, 8), width=4, depth=2)
    >>> plugin = Distillation(teacher, {"classification": "classification"}, alpha=0.5, modalities=["ct"])
    >>> x = {"ct": np.zeros((2, 8, 8, 8, 1), np.float32)}
    >>> float(plugin.penalty(x, teacher(x)))  # the student is the teacher: nothing to distil
    0.0
    """

    name = "distillation"

    def __init__(self, teacher: "keras.Model", heads: Mapping[str, str], alpha: float = 1.0, temperature: float = 2.0,
                 modalities: Iterable[str] = ("ct",)) -> None:
        import keras

        from unicon_tf.model import model_parts

        available = set(modalities)
        teacher_heads = model_parts(teacher)["heads"]
        self.heads = {h: t for h, t in heads.items() if set(teacher_heads[h].modalities) <= available}
        inputs = {m: teacher.input[m] for m in teacher.input if m in available}
        outputs = {h: teacher.output[h] for h in self.heads}
        self._teacher = _Untracked(keras.Model(inputs, outputs, name=f"{teacher.name}_teacher"))
        set_trainable(self._teacher.model, False)
        self.weight, self.temperature = float(alpha), float(temperature)

    def head_terms(self, inputs: Mapping[str, tf.Tensor], outputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """`{head: distillation loss}` for every distilled head (unweighted)."""
        if not self.heads:
            return {}
        model = self._teacher.model
        targets = model({m: inputs[m] for m in model.input}, training=False)
        return {h: task_kind(task).distillation_loss(tf.stop_gradient(targets[h]), outputs[h], self.temperature)
                for h, task in self.heads.items()}

    def penalty(self, inputs: Mapping[str, tf.Tensor], outputs: Mapping[str, tf.Tensor], head_terms: Mapping[str, tf.Tensor] | None = None) -> tf.Tensor:
        terms = self.head_terms(inputs, outputs) if head_terms is None else head_terms
        return self.weight * tf.add_n(list(terms.values())) if terms else tf.constant(0.0)

    def describe(self) -> dict[str, Any]:
        return {"plugin": "Distillation", "alpha": self.weight, "temperature": self.temperature,
                "heads": sorted(self.heads)}


class WeightPenalty(Plugin):
    """L2-SP: beta / 2 * sum_i F_i (w_i - w_i*)^2 over shared variables, F_i = 1 (see `EWC`).

    Args:
        variables: the shared variables to hold (e.g. the encoder's base weights that train).
        beta: weight of the term.

    Example:
    >>> import keras
    >>> w = keras.Variable(np.ones(3, np.float32))
    >>> l2sp = WeightPenalty([w], beta=2.0)
    >>> _ = w.assign([1.0, 2.0, 3.0])
    >>> float(l2sp.penalty({}, {}))  # 2 / 2 * (0 + 1 + 4)
    5.0
    """

    name = "l2sp"

    def __init__(self, variables: Iterable["keras.Variable"], beta: float = 0.01,
                 importance: Mapping[str, np.ndarray] | None = None) -> None:
        self.variables = list(variables)
        self.weight = float(beta)
        self.reference = [tf.constant(v.numpy()) for v in self.variables]
        importance = importance or {}
        self.importance = [tf.constant(np.asarray(importance.get(v.path, 1.0), np.float32)) for v in self.variables]

    def penalty(self, inputs: Mapping[str, tf.Tensor], outputs: Mapping[str, tf.Tensor], head_terms: Mapping[str, tf.Tensor] | None = None) -> tf.Tensor:
        if not self.variables:
            return tf.constant(0.0)
        total = tf.add_n([tf.reduce_sum(f * tf.square(v - r))
                          for v, r, f in zip(self.variables, self.reference, self.importance)])
        return 0.5 * self.weight * total

    def describe(self) -> dict[str, Any]:
        return {"plugin": type(self).__name__, "kind": self.name, "beta": self.weight, "variables": len(self.variables)}


class EWC(WeightPenalty):
    """Online Elastic Weight Consolidation: `WeightPenalty` weighted by the running Fisher.

    Args:
        variables: the shared variables to hold this stage.
        fisher_variables: the variables whose Fisher diagonal is kept (the encoder's base
            weights, trainable or not: a later stage may train them).
        beta: weight of the term; 0 for a stage that only computes its Fisher for a later
            EWC stage (inactive).
        fisher: the running `{variable path: Fisher diagonal}` of the earlier stages (from
            `load_fisher`), or None before the first. Variables without an entry are held
            with importance 1.
        gamma: decay of the running Fisher at each stage's end (Schwarz et al. 2018).

    Example:
    >>> import keras
    >>> w = keras.Variable(np.ones(2, np.float32), name="w")
    >>> ewc = EWC([w], [w], beta=2.0, fisher={w.path: np.array([0.0, 3.0], np.float32)})
    >>> _ = w.assign([2.0, 2.0])
    >>> float(ewc.penalty({}, {}))  # 2 / 2 * (0 * 1 + 3 * 1)
    3.0
    """

    name = "ewc"

    def __init__(self, variables: Iterable["keras.Variable"], fisher_variables: Iterable["keras.Variable"],
                 beta: float = 1.0, fisher: Mapping[str, np.ndarray] | None = None, gamma: float = 1.0) -> None:
        super().__init__(variables, beta=beta, importance=fisher)
        self.fisher_variables = list(fisher_variables)
        self.fisher, self.gamma = fisher, float(gamma)

    def end_stage(self, network: "keras.Model", head: str, data: Iterable[tuple[Mapping[str, tf.Tensor], Mapping[str, tf.Tensor]]], folder: "StageFolder") -> None:
        """Add this stage's Fisher to the decayed running one and save it in `folder`."""
        from unicon_tf.model import model_parts

        task = model_parts(network)["heads"][head].task
        new = diagonal_fisher(network, self.fisher_variables, head, task_kind(task).loss(), data)
        running = {k: v + self.gamma * self.fisher[k] if self.fisher and k in self.fisher else v
                   for k, v in new.items()}
        np.savez(folder.fisher, **{k.replace("/", "|"): v for k, v in running.items()})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gamma": self.gamma}


def diagonal_fisher(network: "keras.Model", variables: Sequence["keras.Variable"], head: str,
                    task_loss: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], data: Iterable[tuple[Mapping[str, tf.Tensor], Mapping[str, tf.Tensor]]]) -> dict[str, np.ndarray]:
    """Empirical diagonal Fisher: the mean over examples of each variable's squared gradient
    of the task loss (one example per batch, inference mode).

    Returns:
        `{variable.path: array of the variable's shape}`, non-negative.
    """
    sums = [np.zeros(v.shape, np.float32) for v in variables]
    count = 0
    for x, y in data:
        with tf.GradientTape() as tape:
            loss = task_loss(y[head], network(x, training=False)[head])
        for total, grad in zip(sums, tape.gradient(loss, variables)):
            if grad is not None:
                total += np.square(np.asarray(grad))
        count += 1
    return {v.path: total / max(count, 1) for v, total in zip(variables, sums)}


def load_fisher(folder: "StageFolder") -> dict[str, np.ndarray] | None:
    """The running Fisher an `EWC` stage saved in `folder` (a `StageFolder`), or None."""
    if not folder.fisher.exists():
        return None
    with np.load(folder.fisher) as saved:
        return {k.replace("|", "/"): saved[k] for k in saved.files}
