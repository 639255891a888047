"""Patient-level classification: class logits, cross-entropy, AUC.

| piece          | value                                                            |
|----------------|------------------------------------------------------------------|
| target         | the cohort's `label`, a class index (int32)                      |
| head           | `ClassificationHead`: class logits `(batch, num_classes)`        |
| loss           | cross-entropy on logits; distillation: KL at temperature T       |
| metrics        | `auc` (main; one-vs-rest macro for > 2 classes), `accuracy`      |
| serving        | `probabilities` `(batch, classes)`, `class` `(batch,)`           |

Example:
>>> import numpy as np
>>> CLASSIFICATION.scores(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]))
{'auc': 1.0, 'accuracy': 1.0}
"""

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from unicon_tf.model.heads import ClassificationHead
from unicon_tf.tasks.base import TaskKind, classes_problem, pairwise_resampled, register, softmax
from unicon_tf.tasks.losses import classification_loss, softmax_kl
from unicon_tf.tasks.metrics import LogitAUC


def classification_scores(labels: np.ndarray, logits: np.ndarray) -> dict:
    """`auc` and `accuracy` of class logits `(patients, classes)` against labels `(patients,)`;
    AUC is NaN when the split has one class."""
    probabilities = softmax(np.asarray(logits, np.float64))
    labels = np.asarray(labels).astype(int)
    accuracy = float(np.mean(probabilities.argmax(-1) == labels))
    if len(np.unique(labels)) < 2:
        return {"auc": float("nan"), "accuracy": accuracy}
    if probabilities.shape[-1] == 2:
        auc = roc_auc_score(labels, probabilities[:, 1])
    else:
        auc = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro",
                            labels=list(range(probabilities.shape[-1])))
    return {"auc": float(auc), "accuracy": accuracy}


class Classification(TaskKind):
    """Patient-level classification (see the module docstring)."""

    name = "classification"
    targets = ("label",)
    head = ClassificationHead
    main_metric = "auc"
    metric_names = {"auc": "AUC", "accuracy": "accuracy"}
    uses_classes = True
    ranking = True
    constant_chance = 0.5

    def target(self, example: dict) -> tf.Tensor:
        return example["label"]

    def loss_function(self, target: tf.Tensor, output: tf.Tensor,
                      sample_weight: tf.Tensor | None = None) -> tf.Tensor:
        return classification_loss(target, output, sample_weight=sample_weight)

    def distillation_loss(self, teacher_output: tf.Tensor, student_output: tf.Tensor,
                          temperature: float = 2.0) -> tf.Tensor:
        return softmax_kl(teacher_output, student_output, temperature)

    def metrics(self, head: str, num_classes: int = 2) -> list[keras.metrics.Metric]:
        return [keras.metrics.SparseCategoricalAccuracy(name=f"{head}_accuracy"),
                LogitAUC(num_classes, name=f"{head}_auc")]

    def scores(self, target: np.ndarray, output: np.ndarray) -> dict:
        return classification_scores(target, output)

    def resampled(self, prediction: dict, rows: np.ndarray) -> np.ndarray:
        """Two classes: AUC as the share of concordant positive-negative pairs, vectorised."""
        output = np.asarray(prediction["output"], np.float64)
        if output.shape[-1] != 2:
            return super().resampled(prediction, rows)
        positive = np.asarray(prediction["target"]) == 1
        risk = softmax(output)[:, 1]
        difference = risk[:, None] - risk[None, :]
        concordant = np.where(difference == 0, 0.5, (difference > 0).astype(np.float64))
        return pairwise_resampled(positive[:, None] & ~positive[None, :], concordant, rows)

    def serving_outputs(self, output: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": tf.nn.softmax(output, axis=-1), "class": tf.argmax(output, axis=-1)}

    def split_value(self, target: np.ndarray) -> int:
        return int(target)

    def split_problems(self, values: list, num_classes: int | None) -> tuple[str | None, list[str]]:
        """Refused: one class only, or a label outside the head's classes. Noted: classes of
        the head that no patient has.

        Example:
        >>> CLASSIFICATION.split_problems([1, 1, 1], 2)
        ('holds one class only (class 1, 3 patients): a classifier cannot learn to tell classes apart', [])
        """
        classes = _class_counts(values)
        notes = []
        if num_classes and max(classes) >= num_classes:
            return (f"holds label {max(classes)}, outside the head's {num_classes} classes "
                    f"(num_classes: {num_classes})"), notes
        if len(classes) < 2:
            return (f"holds one class only (class {next(iter(classes))}, {len(values)} patients): a classifier "
                    "cannot learn to tell classes apart"), notes
        if num_classes and len(classes) < num_classes:
            absent = sorted(set(range(num_classes)) - set(classes))
            notes.append(f"has no patient of class(es) {absent} of the head's {num_classes}: the head never learns them")
        return None, notes

    def validation_problem(self, values: list) -> str | None:
        if len(set(values)) < 2:
            return f"holds one class only ({_class_counts(values)}): its AUC cannot be measured"
        return None

    def schema_classes_problem(self, features: dict, num_classes: int | None) -> str | None:
        """The labels' classes (`features.label.classes`, those seen at ingestion) above the head's."""
        classes = features.get("label", {}).get("classes")
        if classes is not None and num_classes is not None and classes > num_classes:
            return classes_problem("label", "labels", num_classes, classes)
        return None


def _class_counts(labels: list) -> dict[int, int]:
    """`{label: patients}` in label order."""
    return {label: labels.count(label) for label in sorted(set(labels))}


CLASSIFICATION = register(Classification())
