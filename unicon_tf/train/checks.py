"""What a stage's data must offer its head, checked before any training.

Two kinds of check, both run by `fit_stage` before the first step:

- `check_head_fits_data`: the head against the data folder's `schema.json`: its classes
  (`features.mask.classes` for segmentation, `features.label.classes` for classification:
  `TaskKind.schema_classes_problem`),
  the modalities it reads, the targets its task needs, and the grid (the volumes' shape).
  A mismatch found only inside TensorFlow is a raw `InvalidArgumentError` ("label value
  of 3 ... outside [0, 2)"); here it is one error naming the stage, the field, the data
  folder and both values.
- `check_train_split`: whether the train split can teach the task at all. Each task kind
  says what its patients' targets must hold (`TaskKind.split_value`, `split_problems`,
  `validation_problem`, `schema_classes_problem`), so a kind added as one module brings its
  checks. Refused: no patient; for the shipped kinds, a prognosis split without an event
  (the Cox partial likelihood is 0, its gradient 0: nothing is learnt), a classification
  split of one class, a segmentation split whose masks are all empty, a regression split of
  one value. Warned about (`DataWarning`): fewer patients than a batch, prognosis with a
  single event, classes of the head missing from the split; a validation split that cannot
  measure the metric (`check_validation_split`).

Source: the failures of issue 23 (a 4-class mask under a 2-class head; an all-censored
prognosis split trained at loss 0 and blessed), after nnU-Net's dataset fingerprint check
and scikit-survival's refusal of data without events.
"""

import pathlib
from collections.abc import Sequence
import warnings

import numpy as np
import tensorflow as tf

from unicon_tf.data import DataError, DataWarning
from unicon_tf.data.records import parse_example, verify_shards
from unicon_tf.run import StageError
from unicon_tf.tasks import task_kind
from unicon_tf.tasks.base import TaskKind


class DataMismatchError(StageError, DataError):
    """A stage's head and its data's schema disagree (both a StageError and a DataError)."""

    def __init__(self, message: str) -> None:
        DataError.__init__(self, message)

    def __reduce__(self):
        return type(self), (self.reason,)


def check_head_fits_data(stage: str, data: pathlib.Path | str, schema: dict, task: str, modalities: Sequence[str],
                         num_classes: int | None, shape: Sequence[int]) -> None:
    """Raise StageError listing every way the head does not fit its data's schema.

    Args:
        stage: the stage's name (for the message).
        data: the data folder (for the message).
        schema: its `schema.json` (`unicon_tf.data.read_schema`).
        task: the head's task.
        modalities: the modalities the head reads.
        num_classes: the head's classes (None for prognosis).
        shape: the model's input grid `(D, H, W)`, voxels.

    Raises:
        DataMismatchError: (a StageError and a DataError) one line per mismatch, each naming
            the field and both values.

    Example:
    >>> schema = {"modalities": ["ct"], "targets": ["mask"], "preprocessing": {"shape": [8, 8, 8]},
    ...           "features": {"mask": {"classes": 4}}}
    >>> check_head_fits_data("seg", "ct8", schema, "segmentation", ["ct"], 2, (8, 8, 8))
    Traceback (most recent call last):
    ...
    unicon_tf.train.checks.DataMismatchError: Stage 'seg' does not fit its data folder ct8 (schema.json):
      field 'num_classes': the head has 2 classes, the data's masks have 4 (features.mask.classes)...
    """
    problems = []
    data_shape = list(schema["preprocessing"]["shape"])
    if data_shape != list(shape):
        problems.append(f"grid (input_shape): the model takes {list(shape)}, the data holds {data_shape} "
                        f"(preprocessing.shape): ingest with --shape {' '.join(map(str, shape))}")
    missing = [m for m in modalities if m not in schema["modalities"]]
    if missing:
        problems.append(f"field 'modalities': the head reads {missing}, but {data} has only {schema['modalities']}")
    needed = [t for t in task_kind(task).targets if t not in schema["targets"]]
    if needed:
        problems.append(f"field {'/'.join(needed)}: the cohort has no {needed} targets, which a {task} head needs "
                        f"(it has {schema['targets']})")
    classes = None if needed else task_kind(task).schema_classes_problem(schema["features"], num_classes)
    if classes:
        problems.append(classes)
    if problems:
        raise DataMismatchError(f"Stage '{stage}' does not fit its data folder {data} (schema.json):\n  "
                                + "\n  ".join(problems) + ".")


def split_values(data: pathlib.Path | str, schema: dict, split: str, task: str) -> list:
    """Each patient's training target of `task` in one split, reduced by the kind's
    `split_value` (its targets are read, not its images).

    Raises:
        DataError: a shard is missing or corrupt (naming it).
    """
    kind, targets_only = task_kind(task), {**schema, "modalities": []}
    records = tf.data.TFRecordDataset(verify_shards(data, schema, split), compression_type="GZIP")
    return [kind.split_value(np.asarray(kind.target(parse_example(serialized, targets_only))))
            for serialized in records]


def check_train_split(stage: str, data: pathlib.Path | str, schema: dict, task: str, num_classes: int | None,
                      batch_size: int, split: str = "train") -> tuple[list, list[str]]:
    """Refuse a train split that cannot teach `task`; warn about one that teaches it poorly.

    Args:
        stage: the stage's name.
        data: the data folder.
        schema: its `schema.json`.
        task: the head's task.
        num_classes: the head's classes (None for prognosis).
        batch_size: the stage's batch size.
        split: the split to check.

    Returns:
        The patients' `split_values`, and the warnings given (a list of str, also issued as
        `DataWarning`s), as a pair.

    Raises:
        StageError: the split is missing or empty, or cannot teach the task (the message
            names the stage, the data folder, the split and what it holds).

    Example:
    >>> check_train_split("survival", "runs/ct16", schema, "prognosis", None, 4)  # doctest: +SKIP
    Traceback (most recent call last):
    StageError: Stage 'survival': the train split of runs/ct16 has no event (12 patients, all censored)...
    """
    where = f"Stage '{stage}': the {split} split of {data}"
    if split not in schema["splits"] or not schema["splits"][split].get("count", 1):
        raise StageError(f"{where} is missing or empty (splits: {sorted(schema['splits'])}): nothing to train on.")
    values = split_values(data, schema, split, task)
    if not values:
        raise StageError(f"{where} holds no patient: nothing to train on.")
    refusal, notes = task_kind(task).split_problems(values, num_classes)
    notes = [f"{where} {note}" for note in notes]
    if refusal:
        raise StageError(f"{where} {refusal}: ingest other patients or change the stage.")
    if len(values) < batch_size:
        notes.append(f"{where} has {len(values)} patient(s), fewer than a batch (batch_size: {batch_size}): "
                     "every step sees the same few patients")
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    return values, notes


def check_validation_split(stage: str, data: pathlib.Path | str, schema: dict, task: str,
                           split: str = "val") -> list[str]:
    """Warn (`DataWarning`) when the validation split cannot measure the task's metric
    (`TaskKind.validation_problem`: one class for an AUC, no event for a C-index, one value
    for an R^2). Model selection on it then keeps the last epoch, and
    a stage that selected on it is not blessed (`validation_never_measured`).

    Returns:
        The warnings given (a list of str; empty without a `val` split).
    """
    kind = task_kind(task)
    if split not in schema["splits"] or type(kind).validation_problem is TaskKind.validation_problem:
        return []  # (a kind that cannot miss its metric, e.g. segmentation: the split is not read)
    problem = kind.validation_problem(split_values(data, schema, split, task))
    notes = [f"Stage '{stage}': the {split} split of {data} {problem}"] if problem else []
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    return notes


def validation_never_measured(record: dict) -> str | None:
    """Why a trained stage's model selection never had a validation value, or None.

    The stage's record (stage.json) holds each epoch's logs and the value its selection
    monitored (`select: best_val` or `patience`); when that value was NaN at every epoch
    (a validation split of one class, without an event, ...), nothing judged the weights
    kept, and the stage is not blessed. A stage that did not select on validation
    (`select: last`, no patience) is not judged here.

    Example:
    >>> record = {"selection": {"monitor": "val_g_auc"}, "history": [{"val_g_auc": float("nan")}]}
    >>> validation_never_measured(record)
    'its model selection monitored val_g_auc, which was never measurable (NaN at every one of 1 epoch(s))'
    """
    key = (record.get("selection") or {}).get("monitor")
    values = [float(logs[key]) for logs in record.get("history") or [] if key and key in logs]
    if values and all(np.isnan(v) for v in values):
        return (f"its model selection monitored {key}, which was never measurable (NaN at every one of "
                f"{len(values)} epoch(s))")
    return None
