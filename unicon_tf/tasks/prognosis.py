"""Survival prognosis: one Cox risk score per patient, Harrell's C-index.

| piece          | value                                                            |
|----------------|------------------------------------------------------------------|
| target         | the cohort's `(time, event)`, float32 `(2,)`                     |
| head           | `PrognosisHead`: log relative hazard `(batch,)`                  |
| loss           | negative Cox partial log-likelihood; distillation: MSE of risks  |
| metrics        | `c_index` (main; exactly scikit-survival's)                      |
| serving        | `risk` `(batch,)`                                                |

Example:
>>> import numpy as np
>>> PROGNOSIS.scores(np.array([[1.0, 1], [2.0, 1], [3.0, 0]]), np.array([3.0, 2.0, 1.0]))
{'c_index': 1.0}
"""

import numpy as np
import tensorflow as tf

from unicon_tf.model.heads import PrognosisHead
from unicon_tf.tasks.base import TaskKind, pairwise_resampled, register
from unicon_tf.tasks.losses import cox_loss, risk_mse
from unicon_tf.tasks.metrics import ConcordanceIndex, c_index


class Prognosis(TaskKind):
    """Survival prognosis (see the module docstring)."""

    name = "prognosis"
    targets = ("time", "event")
    head = PrognosisHead
    main_metric = "c_index"
    metric_names = {"c_index": "C-index"}
    ranking = True
    constant_chance = 0.5
    figure = "kaplan_meier"

    def target(self, example: dict) -> tf.Tensor:
        return tf.stack([example["time"], tf.cast(example["event"], tf.float32)])

    def loss_function(self, target: tf.Tensor, output: tf.Tensor,
                      sample_weight: tf.Tensor | None = None) -> tf.Tensor:
        return cox_loss(target, output, sample_weight=sample_weight)

    def distillation_loss(self, teacher_output: tf.Tensor, student_output: tf.Tensor,
                          temperature: float = 2.0) -> tf.Tensor:
        return risk_mse(teacher_output, student_output)

    def metrics(self, head: str, num_classes: int = 2) -> list:
        return [ConcordanceIndex(name=f"{head}_c_index")]

    def scores(self, target: np.ndarray, output: np.ndarray) -> dict:
        survival = np.asarray(target)
        return {"c_index": float(c_index(survival[:, 0], survival[:, 1], output))}

    def resampled(self, prediction: dict, rows: np.ndarray) -> np.ndarray:
        """Harrell's C-index as the share of concordant comparable pairs, vectorised."""
        target = np.asarray(prediction["target"])
        time, event = target[:, 0], target[:, 1].astype(bool)
        risk = np.asarray(prediction["output"], np.float64).reshape(-1)
        later = time[None, :] > time[:, None]
        tied_censored = (time[None, :] == time[:, None]) & ~event[None, :]
        difference = risk[:, None] - risk[None, :]
        concordant = np.where(np.abs(difference) <= 1e-8, 0.5, (difference > 0).astype(np.float64))
        return pairwise_resampled(event[:, None] & (later | tied_censored), concordant, rows)

    def serving_outputs(self, output: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"risk": output}

    def split_value(self, target: np.ndarray) -> bool:
        """Whether the patient had the event."""
        return bool(target[1] > 0)

    def split_problems(self, values: list, num_classes: int | None) -> tuple[str | None, list[str]]:
        """Refused: no event, or one patient (no pair). Noted: a single event.

        Example:
        >>> PROGNOSIS.split_problems([False, False], None)[0]
        'has no event (2 patients, all censored): the Cox loss and its gradient are 0, nothing can be learnt'
        """
        events, n = sum(values), len(values)
        if events == 0:
            return (f"has no event ({n} patients, all censored): the Cox loss and its gradient are 0, "
                    "nothing can be learnt"), []
        if n < 2:
            return "has 1 patient: the Cox partial likelihood compares patients and has no pair", []
        if events == 1:
            return None, [f"has 1 event in {n} patients: the C-index on it rests on one patient"]
        return None, []

    def validation_problem(self, values: list) -> str | None:
        return None if any(values) else f"has no event ({len(values)} patients): its C-index cannot be measured"


PROGNOSIS = register(Prognosis())
