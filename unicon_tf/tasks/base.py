"""The task-kind base class and registry: what every consumer of a task kind looks up.

A task kind (KerasHub's `Task`, one level up: not a model but everything a kind of head
needs along the pipeline) says, in one module of `unicon_tf.tasks`,

| attribute / method          | used by                                                   |
|-----------------------------|-----------------------------------------------------------|
| `targets`, `target`         | `data.dataset` (the cohort targets read, the training y)  |
| `head`, `family_heads`,     | `model.foundation` (`expand(task=...)`), pipeline checks  |
| `head_options`              |                                                           |
| `loss_options`, `loss`,     | `train.continual`, `train.plugins` (LwF, EWC), baselines  |
| `distillation_loss`         |                                                           |
| `metrics`, `main_metric`,   | training logs, model selection, blessing, the matrix      |
| `metric_names`, `ranking`   |                                                           |
| `scores`, `chance`,         | `evaluate.scores` (exact metrics, bootstrap intervals)    |
| `resampled`, `per_patient`  |                                                           |
| `serving_outputs`           | `serving.export` (SavedModel signatures), `predict`       |
| `dense`, `figure`           | voxel-wise kinds (label maps, sampling); the report       |
| `split_value`,              | `train.checks` (a head against its data's schema, a split |
| `split_problems`,           | that cannot teach the kind, a validation split that       |
| `validation_problem`,       | cannot measure it), before any training                   |
| `schema_classes_problem`    |                                                           |

`register(kind)` adds an instance to `TASKS`; `task_kind(name)` looks one up. The kinds
shipped are registered by `unicon_tf/tasks/__init__.py`, one import line each.

Example:
>>> from unicon_tf.tasks import task_kind
>>> task_kind("prognosis").main_metric
'c_index'
"""

from __future__ import annotations

import abc
import functools
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from unicon_tf.options import complete_loss_options

if TYPE_CHECKING:
    import tensorflow as tf

    from unicon_tf.model.encoder import SharedEncoder


class TaskKind(abc.ABC):
    """One kind of task head: its data, head, losses, metrics, scores and serving outputs.

    Subclasses set the class attributes and override the methods whose default does not
    fit (see the module docstring for who reads what).

    Attributes:
        name: the kind's name, the `task:` of a pipeline stage.
        targets: the cohort targets (`schema.json` `targets`) a head of this kind needs.
        head: the head class (a `unicon_tf.model.heads.Head`) on any encoder family.
        family_heads: encoder family name -> head class replacing `head` on it.
        main_metric: the metric of the matrix, blessing and model selection (higher is better).
        metric_names: metric key -> the name shown to people.
        loss_options: option -> accepted values (the first the default): a stage's `loss:`.
        uses_classes: whether the head takes `num_classes` (default 2).
        ranking: whether the main metric ranks pairs of patients (AUC, C-index): coarse on a
            few validation patients, so `monitor: auto` watches the loss there.
        constant_chance: the main metric of a constant prediction (None: it depends on the data).
        dense: whether the output is voxel-wise (label maps, foreground sampling).
        per_patient: the `scores` key of per-patient values a bootstrap averages (None: the
            bootstrap rescoring `target` and `output`).
        figure: the report's figure of a head of this kind (`unicon_tf.evaluate.report.FIGURES`).
    """

    name: str = ""
    targets: tuple[str, ...] = ()
    head: type = None
    family_heads: dict[str, type] = {}
    main_metric: str = ""
    metric_names: dict[str, str] = {}
    loss_options: dict[str, tuple] = {}
    uses_classes: bool = False
    ranking: bool = False
    constant_chance: float | None = None
    dense: bool = False
    per_patient: str | None = None
    figure: str | None = None

    def head_class(self, family: str = "residual") -> type:
        """The head class of this kind on an encoder of `family` (`unicon_tf.model.families`)."""
        return self.family_heads.get(family, self.head)

    def head_options(self, options: dict, head_class: type, encoder: SharedEncoder,
                     input_shape: tuple[int, int, int]) -> dict:
        """A head's constructor options completed for a `head_class` (`head_class(family)`) on
        `encoder` (a `SharedEncoder`) over volumes of `input_shape`:
        `num_classes` defaults to 2 where the head takes it, and is dropped where not."""
        if self.uses_classes:
            options.setdefault("num_classes", 2)
        else:
            options.pop("num_classes", None)
        return options

    @abc.abstractmethod
    def target(self, example: dict) -> tf.Tensor:
        """The training target of a parsed example (`unicon_tf.data.records.parse_example`)."""

    @abc.abstractmethod
    def loss_function(self, target: tf.Tensor, output: tf.Tensor, sample_weight: tf.Tensor | None = None,
                      **options: Any) -> tf.Tensor:
        """The task loss `(target, output, sample_weight) -> scalar` with `options` bound."""

    def check_loss_options(self, options: dict | None) -> dict:
        """`options` completed with the defaults of `loss_options`.

        Raises:
            ValueError: an option this kind's loss does not have, or a value it does not
                take (the message names the option).

        Example:
        >>> from unicon_tf.tasks import task_kind
        >>> task_kind("segmentation").check_loss_options({"dice": "per_patient"})
        {'dice': 'per_patient', 'ce_weighting': 'none'}
        """
        return complete_loss_options(self.loss_options, options, self.name)

    def loss(self, options: dict | None = None) -> Callable:
        """The task loss with its `loss_options` bound: `loss(target, output, sample_weight=None)`.

        Raises:
            ValueError: see `check_loss_options`.
        """
        return functools.partial(self.loss_function, **self.check_loss_options(options))

    @abc.abstractmethod
    def distillation_loss(self, teacher_output: tf.Tensor, student_output: tf.Tensor,
                          temperature: float = 2.0) -> tf.Tensor:
        """A scalar distance of the student's output from the teacher's (LwF)."""

    @abc.abstractmethod
    def metrics(self, head: str, num_classes: int = 2) -> list:
        """The Keras training metrics of a head, named `<head>_<metric>`."""

    @abc.abstractmethod
    def scores(self, target: np.ndarray, output: np.ndarray) -> dict:
        """The exact metrics of a split's outputs (NumPy), the main one under `main_metric`."""

    def chance(self, target: np.ndarray) -> float:
        """The main metric of a trivial prediction on patients with these targets."""
        return float(self.constant_chance)

    def resampled(self, prediction: dict, rows: np.ndarray) -> np.ndarray:
        """The main metric on bootstrap resamples `rows` `(resamples, patients)` of a head's
        per-patient predictions (`head_metrics`' fields) -> `(resamples,)`: the mean of
        the `per_patient` scores, else `scores` on each resample."""
        if self.per_patient is not None:
            return np.asarray(prediction[self.per_patient], np.float64)[rows].mean(axis=1)
        target, output = np.asarray(prediction["target"]), np.asarray(prediction["output"], np.float64)
        return np.array([self.scores(target[r], output[r])[self.main_metric] for r in rows])

    @abc.abstractmethod
    def serving_outputs(self, output: tf.Tensor) -> dict:
        """The named outputs of a SavedModel signature, from a head's raw output (TF tensors)."""

    def split_value(self, target: np.ndarray) -> Any:
        """One patient's training target (`target(example)` as NumPy) reduced to what the
        split checks count (`split_problems`); by default the target itself."""
        return target

    def split_problems(self, values: list, num_classes: int | None) -> tuple[str | None, list[str]]:
        """Whether a train split can teach this kind, from its patients' `split_value`s.

        Args:
            values: one `split_value` per patient of the split (at least one).
            num_classes: the head's classes (None where the kind takes none).

        Returns:
            `(refusal, notes)`: a phrase completing "the train split of <data> ..." that
            refuses the stage (None: it can teach), and phrases that are warned about. The
            default finds nothing.
        """
        return None, []

    def validation_problem(self, values: list) -> str | None:
        """A phrase completing "the val split of <data> ..." when the main metric cannot be
        measured on patients with these `split_value`s (None: it can; the default)."""
        return None

    def schema_classes_problem(self, features: dict, num_classes: int | None) -> str | None:
        """A problem line when the classes the data declares (`schema.json` `features`) do not
        fit a head of `num_classes` (None: they fit, or the kind has no classes; the default)."""
        return None


def classes_problem(feature: str, noun: str, num_classes: int | None, classes: int) -> str:
    """The `schema_classes_problem` line of a head of `num_classes` on data whose `feature`
    (`label`, `mask`) declares `classes`, e.g. "field 'num_classes': the head has 2 classes,
    the data's masks have 4 (features.mask.classes): ..."."""
    return (f"field 'num_classes': the head has {num_classes} classes, the data's {noun} have {classes} "
            f"(features.{feature}.classes): set num_classes: {classes} or ingest with matching classes")


def pairwise_resampled(comparable: np.ndarray, concordant: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A ratio of sums over patient pairs (AUC, Harrell's C-index) on bootstrap resamples.

    A resample weighs each pair by the product of its two patients' multiplicities: the
    value the metric has on the resampled patients (a patient is never paired with its own
    copy, as `comparable` has a zero diagonal).

    Args:
        comparable: `(n, n)` whether pair (i, j) counts.
        concordant: `(n, n)` its score (1, 1/2 or 0).
        rows: `(resamples, n)` patient positions.

    Returns:
        `(resamples,)`, NaN where a resample has no comparable pair.

    Example:
    >>> comparable = np.array([[0.0, 1.0], [0.0, 0.0]])
    >>> pairwise_resampled(comparable, np.ones((2, 2)), np.array([[0, 1], [0, 0]])).tolist()
    [1.0, nan]
    """
    weights = np.stack([np.bincount(r, minlength=len(comparable)) for r in rows]).astype(np.float64)
    pairs = np.einsum("ri,ij,rj->r", weights, comparable.astype(np.float64), weights)
    agree = np.einsum("ri,ij,rj->r", weights, comparable * concordant, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, agree / pairs, np.nan)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (NumPy), e.g. of class logits `(patients, classes)`."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


TASKS: dict[str, TaskKind] = {}
"""Task name -> its `TaskKind`; `expand(task=...)` and a stage's `task:` accept these names."""


def register(kind: TaskKind) -> TaskKind:
    """Add a task kind to `TASKS` (a kind module's last line).

    Raises:
        ValueError: a kind of that name is registered already.
    """
    if kind.name in TASKS:
        raise ValueError(f"A task kind named '{kind.name}' is registered already.")
    TASKS[kind.name] = kind
    return kind


def task_kind(name: str) -> TaskKind:
    """The task kind called `name`.

    Raises:
        ValueError: no such kind (the message lists them).
    """
    if name not in TASKS:
        raise ValueError(f"Unknown task '{name}': expected one of {sorted(TASKS)}.")
    return TASKS[name]


def metric_name(key: str) -> str:
    """The name shown to people of a metric key of any kind (`metric_names`), else the key."""
    return next((kind.metric_names[key] for kind in TASKS.values() if key in kind.metric_names), key)
