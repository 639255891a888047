"""Regression: one continuous value per patient, here the lesion volume in millilitres.

| piece          | value                                                                  |
|----------------|------------------------------------------------------------------------|
| target         | the lesion volume (mL) of the cohort's `mask`: foreground voxels times |
|                | the voxel volume of the example's `affine`, float32 `()`               |
| head           | `RegressionHead`: one value `(batch,)` from the pooled coarsest map    |
| loss           | Huber (delta 1 mL; `loss_options` `error: huber | squared` for MSE);   |
|                | distillation: MSE of the old outputs                                   |
| metrics        | `r2` (main: coefficient of determination, higher is better), `mae`     |
| serving        | `value` `(batch,)`                                                     |

The lesion volume is the continuous per-patient target every masked cohort (the phantom
included) holds, read from the stored mask the way a classification label is read from
the stored label, so the data layer is unchanged. A chance-level model predicts a
constant: its R^2 is at most 0.

Example:
>>> import numpy as np
>>> REGRESSION.scores(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
{'r2': 0.5, 'mae': 0.3333333333333333}
"""

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from unicon_tf.model.heads import ScalarHead
from unicon_tf.tasks.base import TaskKind, register
from unicon_tf.tasks.losses import patient_weights, risk_mse

HUBER_DELTA = 1.0  # mL: errors above it count linearly


@keras.saving.register_keras_serializable(package="unicon_tf")
class RegressionHead(ScalarHead):
    """One continuous value per patient from the coarsest features.

    Args: see `unicon_tf.model.heads.ScalarHead`.

    Example:
    >>> head = RegressionHead()
    >>> tuple(head([keras.ops.zeros((2, 4, 4, 4, 16))]).shape)
    (2,)
    """

    task = "regression"


def r_squared(target: np.ndarray, output: np.ndarray) -> np.ndarray:
    """R^2 = 1 - SS_res / SS_tot over the last axis (NaN where the targets do not vary).

    Args:
        target, output: `(..., patients)`.
    """
    target, output = np.asarray(target, np.float64), np.asarray(output, np.float64)
    total = np.sum(np.square(target - target.mean(axis=-1, keepdims=True)), axis=-1)
    residual = np.sum(np.square(target - output), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), np.nan)


class RSquared(keras.metrics.Metric):
    """R^2 over every example seen since the last reset (from running sums).

    Example:
    >>> metric = RSquared(name="r2")
    >>> metric.update_state(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    >>> float(metric.result())
    0.5
    """

    def __init__(self, name: str = "r2", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.sums = self.add_variable(shape=(4,), initializer="zeros", name="sums")  # n, sum y, sum y^2, sum residual^2

    def update_state(self, target: tf.Tensor, output: tf.Tensor, sample_weight: tf.Tensor | None = None) -> None:
        target = ops.reshape(ops.cast(target, "float32"), (-1,))
        output = ops.reshape(ops.cast(output, "float32"), (-1,))
        n = ops.cast(ops.shape(target)[0], "float32")
        self.sums.assign_add(ops.stack([n, ops.sum(target), ops.sum(target**2), ops.sum((target - output) ** 2)]))

    def result(self) -> tf.Tensor:
        n, total, squares, residual = (self.sums[i] for i in range(4))
        variation = squares - total**2 / ops.maximum(n, 1.0)
        return ops.where(variation > 0, 1.0 - residual / ops.maximum(variation, 1e-12), float("nan"))

    def reset_state(self) -> None:
        self.sums.assign(ops.zeros((4,)))


class Regression(TaskKind):
    """Regression of the lesion volume (see the module docstring)."""

    name = "regression"
    targets = ("mask",)
    head = RegressionHead
    main_metric = "r2"
    metric_names = {"r2": "R^2", "mae": "MAE (mL)"}
    loss_options = {"error": ("huber", "squared")}
    constant_chance = 0.0

    def target(self, example: dict) -> tf.Tensor:
        voxel_ml = tf.abs(tf.linalg.det(example["affine"][:3, :3])) / 1000.0
        return tf.reduce_sum(tf.cast(example["mask"] > 0, tf.float32)) * voxel_ml

    def loss_function(self, target: tf.Tensor, output: tf.Tensor, sample_weight: tf.Tensor | None = None,
                      error: str = "huber") -> tf.Tensor:
        difference = ops.cast(ops.reshape(output, (-1,)), "float32") - ops.cast(ops.reshape(target, (-1,)), "float32")
        size = ops.abs(difference)
        if error == "huber":
            per_patient = ops.where(size <= HUBER_DELTA, 0.5 * difference**2, HUBER_DELTA * (size - 0.5 * HUBER_DELTA))
        else:
            per_patient = difference**2
        return ops.mean(patient_weights(sample_weight, difference) * per_patient)

    def distillation_loss(self, teacher_output: tf.Tensor, student_output: tf.Tensor,
                          temperature: float = 2.0) -> tf.Tensor:
        return risk_mse(teacher_output, student_output)

    def metrics(self, head: str, num_classes: int = 2) -> list[keras.metrics.Metric]:
        return [RSquared(name=f"{head}_r2"), keras.metrics.MeanAbsoluteError(name=f"{head}_mae")]

    def scores(self, target: np.ndarray, output: np.ndarray) -> dict:
        target, output = np.asarray(target, np.float64), np.asarray(output, np.float64).reshape(-1)
        return {"r2": float(r_squared(target, output)), "mae": float(np.mean(np.abs(target - output)))}

    def resampled(self, prediction: dict, rows: np.ndarray) -> np.ndarray:
        """R^2 of every resample at once."""
        target, output = np.asarray(prediction["target"]), np.asarray(prediction["output"]).reshape(-1)
        return r_squared(target[rows], output[rows])

    def serving_outputs(self, output: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"value": output}

    def split_value(self, target: np.ndarray) -> float:
        return float(target)

    def split_problems(self, values: list, num_classes: int | None) -> tuple[str | None, list[str]]:
        """Refused: every patient with the same value (nothing to regress, R^2 undefined).

        Example:
        >>> REGRESSION.split_problems([0.0, 0.0, 0.0], None)[0]
        'has one value only (0 mL in all 3 patients): a regression head has no variation to learn'
        """
        if len(set(values)) < 2:
            return f"has one value only ({_one_value(values)}): a regression head has no variation to learn", []
        return None, []

    def validation_problem(self, values: list) -> str | None:
        if len(set(values)) < 2:
            return f"has one value only ({_one_value(values)}): its R^2 cannot be measured"
        return None


def _one_value(values: list) -> str:
    """`0 mL in all 3 patients`, `2.5 mL in its 1 patient`."""
    return f"{values[0]:g} mL in " + (f"all {len(values)} patients" if len(values) > 1 else "its 1 patient")


REGRESSION = register(Regression())
