"""Stateful Keras metrics that read a head's raw output (logits, risk); each task kind
(`unicon_tf.tasks`) names the ones its heads log.

| task             | metrics                                             |
|------------------|-----------------------------------------------------|
| `classification` | accuracy, AUC (one-vs-rest macro for > 2 classes)   |
| `prognosis`      | Harrell's C-index (exactly scikit-survival's)       |
| `segmentation`   | `dice`: per-patient mean Dice; `dice_pooled`: Dice  |
|                  | pooled over every voxel of the split                |

The two Dice figures answer different questions and can be far apart: pooled over
voxels, large lesions dominate and a missed small lesion barely counts (0.90 pooled
against 0.49 per-patient mean on a small-lesion cohort); the per-patient mean gives every
patient the same weight, as a clinician would. `dice` (per-patient mean) is the main
metric everywhere: training logs (`val_<head>_dice`), model selection, `metrics.json`,
the stage x task matrix and blessing; `dice_pooled` is reported beside it.
"""

from typing import TYPE_CHECKING, Any

import keras
from keras import ops

if TYPE_CHECKING:
    import numpy as np
    import tensorflow as tf


def c_index(time: "np.ndarray | tf.Tensor", event: "np.ndarray | tf.Tensor", risk: "np.ndarray | tf.Tensor",
            tied_tol: float = 1e-8) -> "tf.Tensor":
    """Harrell's concordance index, defined as `sksurv.metrics.concordance_index_censored`.

    A pair (i, j) is comparable when i had an event and t_j > t_i, or t_j == t_i with j
    censored; it is concordant when r_i > r_j, and counts 1/2 when |r_i - r_j| <= tied_tol.

    Args:
        time, event, risk: 1D arrays or tensors of the same length.

    Returns:
        A scalar tensor; NaN when there is no comparable pair.

    Example:
    >>> float(c_index([1.0, 2.0, 3.0], [1, 1, 0], [3.0, 2.0, 1.0]))
    1.0
    """
    time = ops.cast(ops.reshape(ops.convert_to_tensor(time), (-1,)), "float64")
    event = ops.cast(ops.reshape(ops.convert_to_tensor(event), (-1,)), "bool")
    risk = ops.cast(ops.reshape(ops.convert_to_tensor(risk), (-1,)), "float64")
    later = time[None, :] > time[:, None]
    tied_censored = (time[None, :] == time[:, None]) & ~event[None, :]
    comparable = ops.cast(event[:, None] & (later | tied_censored), "float64")
    difference = risk[:, None] - risk[None, :]
    tied = ops.abs(difference) <= tied_tol
    score = ops.where(tied, 0.5, ops.cast(difference > 0, "float64"))
    pairs = ops.sum(comparable)
    return ops.where(pairs > 0, ops.sum(comparable * score) / ops.maximum(pairs, 1.0), float("nan"))


class ConcordanceIndex(keras.metrics.Metric):
    """Harrell's C-index over every example seen since the last reset (up to `capacity`).

    Args:
        capacity: the most examples kept per epoch (pairs are compared all at once).
        name: metric name.

    Example:
    >>> metric = ConcordanceIndex()
    >>> metric.update_state([[1.0, 1.0], [2.0, 0.0]], [2.0, 1.0])
    >>> float(metric.result())
    1.0
    """

    def __init__(self, capacity: int = 4096, name: str = "c_index", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.capacity = int(capacity)
        # Under tf.distribute every replica holds the same (gathered) examples: keep the
        # first replica's, not the sum of all (the default aggregation of metric variables).
        first = "only_first_replica"
        self.survival = self.add_variable(shape=(self.capacity, 2), initializer="zeros", name="survival",
                                          aggregation=first)
        self.risk = self.add_variable(shape=(self.capacity,), initializer="zeros", name="risk", aggregation=first)
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="int32", name="count", aggregation=first)

    def update_state(self, survival: "tf.Tensor", risk: "tf.Tensor", sample_weight: "tf.Tensor | None" = None) -> None:
        survival = ops.cast(ops.reshape(survival, (-1, 2)), "float32")
        risk = ops.cast(ops.reshape(risk, (-1,)), "float32")
        start = ops.minimum(self.count, self.capacity)
        room = self.capacity - start
        n = ops.minimum(ops.shape(risk)[0], room)
        index = ops.expand_dims(start + ops.arange(n), -1)
        self.survival.assign(ops.scatter_update(self.survival, index, survival[:n]))
        self.risk.assign(ops.scatter_update(self.risk, index, risk[:n]))
        self.count.assign(start + n)

    def result(self) -> "tf.Tensor":
        seen = ops.arange(self.count)
        survival, risk = ops.take(self.survival, seen, axis=0), ops.take(self.risk, seen, axis=0)
        return ops.cast(c_index(survival[:, 0], survival[:, 1], risk), "float32")

    def reset_state(self) -> None:
        for variable in (self.survival, self.risk, self.count):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "capacity": self.capacity}


class LogitAUC(keras.metrics.AUC):
    """ROC AUC from class logits: of class 1 for two classes, macro one-vs-rest otherwise."""

    def __init__(self, num_classes: int = 2, name: str = "auc", **kwargs: Any) -> None:
        self.num_classes = int(num_classes)
        multi = self.num_classes > 2
        super().__init__(name=name, multi_label=multi, num_labels=self.num_classes if multi else None, **kwargs)

    def update_state(self, labels: "tf.Tensor", logits: "tf.Tensor", sample_weight: "tf.Tensor | None" = None) -> None:
        probabilities = ops.softmax(logits, axis=-1)
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        if self.num_classes == 2:
            return super().update_state(labels, probabilities[:, 1], sample_weight)
        return super().update_state(ops.one_hot(labels, self.num_classes), probabilities, sample_weight)

    def result(self) -> "tf.Tensor":
        """The AUC; NaN when the examples seen hold fewer than two classes (as
        `unicon_tf.tasks.classification.classification_scores`), where Keras' AUC gives 0."""
        positives = self.true_positives[0] + self.false_negatives[0]  # per label for > 2 classes
        if self.num_classes == 2:
            classes = ops.cast(positives > 0, "int32") + ops.cast(self.true_negatives[0] + self.false_positives[0] > 0,
                                                                   "int32")
        else:
            classes = ops.sum(ops.cast(positives > 0, "int32"))
        return ops.where(classes >= 2, super().result(), float("nan"))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("multi_label", None), config.pop("num_labels", None)
        return {**config, "num_classes": self.num_classes}


class DiceScore(keras.metrics.Metric):
    """Dice of the argmax label map per foreground class, per patient or pooled over voxels.

    `average="patient"`: each patient's Dice (per class; a class absent from both truth
    and prediction scores 1), averaged over every patient seen, as
    `unicon_tf.tasks.segmentation.segmentation_scores`' `dice`. `average="pooled"`: one Dice
    per class from the intersections and sizes summed over every voxel seen (its
    `dice_pooled`). `result()` is the mean over foreground classes; `per_class()` gives
    each class.

    Args:
        num_classes: classes including background (class 0).
        average: `patient` or `pooled`.
        name: metric name.

    Raises:
        ValueError: an unknown `average`.

    Example:
    >>> import numpy as np
    >>> masks = np.zeros((2, 4, 4, 4), "int32"); masks[0, :2] = 1; masks[1, 0, 0, 0] = 1
    >>> logits = np.stack([1 - masks, masks], -1).astype("float32"); logits[1] = [1.0, 0.0]  # misses patient 1
    >>> [round(float(DiceScore(average=a)(masks, logits)), 3) for a in ("patient", "pooled")]
    [0.5, 0.985]
    """

    def __init__(self, num_classes: int = 2, average: str = "patient", name: str = "dice", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        if average not in ("patient", "pooled"):
            raise ValueError(f"DiceScore: average must be 'patient' or 'pooled', got {average!r}.")
        self.num_classes, self.average = int(num_classes), average
        shape = (self.num_classes,)
        if average == "pooled":
            self.intersection = self.add_variable(shape=shape, initializer="zeros", name="intersection")
            self.total = self.add_variable(shape=shape, initializer="zeros", name="total")
        else:
            self.dice_sum = self.add_variable(shape=shape, initializer="zeros", name="dice_sum")
            self.patients = self.add_variable(shape=(), initializer="zeros", name="patients")

    def update_state(self, mask: "tf.Tensor", logits: "tf.Tensor", sample_weight: "tf.Tensor | None" = None) -> None:
        truth = ops.one_hot(ops.cast(mask, "int32"), self.num_classes)
        predicted = ops.one_hot(ops.argmax(logits, axis=-1), self.num_classes)
        if self.average == "pooled":
            axes = tuple(range(len(truth.shape) - 1))
            self.intersection.assign_add(ops.sum(truth * predicted, axis=axes))
            self.total.assign_add(ops.sum(truth, axis=axes) + ops.sum(predicted, axis=axes))
            return
        axes = tuple(range(1, len(truth.shape) - 1))  # per patient: over the voxels
        overlap, total = ops.sum(truth * predicted, axis=axes), ops.sum(truth, axis=axes) + ops.sum(predicted, axis=axes)
        self.dice_sum.assign_add(ops.sum(_dice(overlap, total), axis=0))
        self.patients.assign_add(ops.cast(ops.shape(truth)[0], "float32"))

    def per_class(self) -> "tf.Tensor":
        """Dice of classes 1..num_classes-1."""
        if self.average == "pooled":
            return _dice(self.intersection, self.total)[1:]
        return (self.dice_sum / ops.maximum(self.patients, 1.0))[1:]

    def result(self) -> "tf.Tensor":
        return ops.mean(self.per_class())

    def reset_state(self) -> None:
        for variable in self.variables:
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes, "average": self.average}


def _dice(overlap, total):
    """2 |A & B| / (|A| + |B|), 1 where both are empty."""
    return ops.where(total > 0, 2.0 * overlap / ops.maximum(total, 1.0), 1.0)
