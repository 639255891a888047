"""What a stage's data must offer its head, checked before any training.

Two kinds of check, both run by `fit_stage` before the first step:

- `check_head_fits_data`: the head against the data folder's `schema.json`: its classes
  (`features.mask.classes` for segmentation, `features.label.classes` for classification),
  the modalities it reads, the targets its task needs, and the grid (the volumes' shape).
  A mismatch found only inside TensorFlow is a raw `InvalidArgumentError` ("label value
  of 3 ... outside [0, 2)"); here it is one error naming the stage, the field, the data
  folder and both values.
- `check_train_split`: whether the train split can teach the task at all. Refused: no
  patient, a prognosis split without an event (the Cox partial likelihood is 0, its
  gradient 0: nothing is learnt), a classification split of one class, a segmentation
  split whose masks are all empty. Warned about (`DataWarning`): fewer patients than a
  batch, prognosis with a single event, classes of the head missing from the split; a
  validation split that cannot measure the metric (`check_validation_split`).

Source: the failures of issue 23 (a 4-class mask under a 2-class head; an all-censored
prognosis split trained at loss 0 and blessed), after nnU-Net's dataset fingerprint check
and scikit-survival's refusal of data without events.
"""

import dataclasses
import pathlib
from collections.abc import Sequence
import warnings

import numpy as np
import tensorflow as tf

from unicon_tf.data import DataError, DataWarning
from unicon_tf.data.records import verify_shards
from unicon_tf.run import StageError
from unicon_tf.tasks import task_kind


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
    target = {"segmentation": ("mask", "masks", "features.mask.classes"),
              "classification": ("label", "labels", "features.label.classes")}.get(task)
    if target and not needed:
        feature, noun, where = target
        classes = schema["features"].get(feature, {}).get("classes")
        # Masks declare their classes at ingestion (every one may appear); labels count
        # those seen, so fewer than the head's is a split question (check_train_split).
        wrong = classes is not None and (classes != num_classes if task == "segmentation" else classes > num_classes)
        if wrong:
            problems.append(f"field 'num_classes': the head has {num_classes} classes, the data's {noun} have "
                            f"{classes} ({where}): set num_classes: {classes} or ingest with matching classes")
    if problems:
        raise DataMismatchError(f"Stage '{stage}' does not fit its data folder {data} (schema.json):\n  "
                                + "\n  ".join(problems) + ".")


@dataclasses.dataclass
class SplitTargets:
    """What one split's targets hold (`split_targets`)."""

    patients: int
    classes: dict  # classification: {class: patients}
    events: int | None  # prognosis: patients with an event
    foreground: int | None  # segmentation: patients whose mask has a foreground voxel
    mask_max: int | None  # segmentation: the largest mask value


def split_targets(data: pathlib.Path | str, schema: dict, split: str, task: str) -> "SplitTargets":
    """Read one split's targets of `task` (not its images): counts for `check_train_split`.

    Raises:
        DataError: a shard is missing or corrupt (naming it).
    """
    spec = {"patient_id": tf.io.FixedLenFeature([], tf.string)}
    if task == "classification":
        spec["label"] = tf.io.FixedLenFeature([], tf.int64)
    elif task == "prognosis":
        spec["event"] = tf.io.FixedLenFeature([], tf.int64)
    else:
        spec["mask"] = tf.io.FixedLenFeature([], tf.string)
    records = tf.data.TFRecordDataset(verify_shards(data, schema, split), compression_type="GZIP")
    patients, classes, events, foreground, mask_max = 0, {}, 0, 0, 0
    for serialized in records.map(lambda s: tf.io.parse_single_example(s, spec)):
        patients += 1
        if task == "classification":
            label = int(serialized["label"])
            classes[label] = classes.get(label, 0) + 1
        elif task == "prognosis":
            events += int(serialized["event"] > 0)
        else:
            mask = np.frombuffer(serialized["mask"].numpy(), np.uint8)
            top = int(mask.max()) if mask.size else 0
            foreground += top > 0
            mask_max = max(mask_max, top)
    return SplitTargets(patients, classes, events if task == "prognosis" else None,
                        foreground if task == "segmentation" else None,
                        mask_max if task == "segmentation" else None)


def check_train_split(stage: str, data: pathlib.Path | str, schema: dict, task: str, num_classes: int | None,
                      batch_size: int, split: str = "train") -> tuple["SplitTargets", list[str]]:
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
        The `SplitTargets` read, and the warnings given (a list of str, also issued as
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
    found = split_targets(data, schema, split, task)
    n = found.patients
    if n == 0:
        raise StageError(f"{where} holds no patient: nothing to train on.")
    refusal, notes = None, []
    if task == "prognosis":
        if found.events == 0:
            refusal = (f"has no event ({n} patients, all censored): the Cox loss and its gradient are 0, "
                       "nothing can be learnt")
        elif n < 2:
            refusal = "has 1 patient: the Cox partial likelihood compares patients and has no pair"
        elif found.events == 1:
            notes.append(f"{where} has 1 event in {n} patients: the C-index on it rests on one patient")
    elif task == "classification":
        if len(found.classes) < 2:
            only = next(iter(found.classes))
            refusal = f"holds one class only (class {only}, {n} patients): a classifier cannot learn to tell classes apart"
        elif num_classes and len(found.classes) < num_classes:
            absent = sorted(set(range(num_classes)) - set(found.classes))
            notes.append(f"{where} has no patient of class(es) {absent} of the head's {num_classes}: "
                         "the head never learns them")
        if num_classes and max(found.classes) >= num_classes:
            refusal = (f"holds label {max(found.classes)}, outside the head's {num_classes} classes "
                       f"(num_classes: {num_classes})")
    else:
        if found.foreground == 0:
            refusal = (f"has only empty masks ({n} patients, no foreground voxel): a segmentation head would "
                       "learn to predict background everywhere")
        elif num_classes and found.mask_max >= num_classes:
            refusal = (f"holds mask value {found.mask_max}, outside the head's {num_classes} classes "
                       f"(num_classes: {num_classes})")
    if refusal:
        raise StageError(f"{where} {refusal}: ingest other patients or change the stage.")
    if n < batch_size:
        notes.append(f"{where} has {n} patient(s), fewer than a batch (batch_size: {batch_size}): every step sees "
                     "the same few patients")
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    return found, notes


def check_validation_split(stage: str, data: pathlib.Path | str, schema: dict, task: str,
                           split: str = "val") -> list[str]:
    """Warn (`DataWarning`) when the validation split cannot measure the task's metric: one
    class (AUC) or no event (C-index). Model selection on it then keeps the last epoch, and
    a stage that selected on it is not blessed (`validation_never_measured`).

    Returns:
        The warnings given (a list of str; empty without a `val` split).
    """
    if split not in schema["splits"] or task == "segmentation":
        return []
    found = split_targets(data, schema, split, task)
    where = f"Stage '{stage}': the {split} split of {data}"
    notes = []
    if task == "classification" and len(found.classes) < 2:
        notes.append(f"{where} holds one class only ({found.classes}): its AUC cannot be measured")
    if task == "prognosis" and not found.events:
        notes.append(f"{where} has no event ({found.patients} patients): its C-index cannot be measured")
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
