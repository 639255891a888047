"""Exact evaluation of one head on one split: predictions gathered, metrics in NumPy.

| task             | main metric | also reported                                 |
|------------------|-------------|-----------------------------------------------|
| `classification` | `auc`       | `accuracy` (AUC: one-vs-rest macro for > 2)   |
| `prognosis`      | `c_index`   | Harrell's C-index as scikit-survival's         |
| `segmentation`   | `dice`      | `dice_pooled`, `dice_per_class` (foreground), `dice_per_patient` |

`dice` is the mean over patients of each patient's Dice (mean over foreground classes);
`dice_pooled` is one Dice over every voxel of the split (see `unicon_tf.train.metrics`).
Blessing and the stage x task matrix use `dice`.

`head_metrics` adds the patients a score covers (count and ids, in split order), so that
two models scored on the same patients can be compared patient by patient.
"""

import keras
import numpy as np
from sklearn.metrics import roc_auc_score

from unicon_tf.data import dataset
from unicon_tf.model import model_parts
from unicon_tf.train.metrics import MAIN_METRIC, c_index

__all__ = ["MAIN_METRIC", "head_metrics", "paired_bootstrap", "predict_head", "score", "segmentation_scores"]


def predict_head(model, head, data_dir, split="test", batch_size=4):
    """Run one head over a split; return outputs, targets and patient ids and affines.

    Args:
        model: a unicon model.
        head: the head's name.
        data_dir: an ingested cohort folder with the head's targets.
        split: the split to read.
        batch_size: batch size for inference.

    Returns:
        dict with `output` (the head's raw output for every patient), `target`,
        `patient_id` (str) and `affine` (4x4 per patient), in split order.

    Raises:
        ValueError: the model has no head `head` (the message names the heads it has).
    """
    heads = model_parts(model)["heads"]
    if head not in heads:
        raise ValueError(f"Model '{model.name}' has no head '{head}' (its heads: {sorted(heads)}).")
    head_layer = heads[head]
    sub = keras.Model({m: model.input[m] for m in head_layer.modalities}, model.output[head])
    ds = dataset(data_dir, split, task=head_layer.task, batch_size=batch_size, shuffle=False,
                 modalities=head_layer.modalities, with_meta=True)
    outputs, targets, ids, affines = [], [], [], []
    for inputs, target, meta in ds:
        outputs.append(np.asarray(sub(inputs, training=False)))
        targets.append(np.asarray(target))
        ids += [i.decode() for i in meta["patient_id"].numpy()]
        affines.append(meta["affine"].numpy())
    return {"output": np.concatenate(outputs), "target": np.concatenate(targets), "patient_id": ids,
            "affine": np.concatenate(affines)}


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def classification_scores(labels, logits):
    """`auc` and `accuracy` of class logits; AUC is NaN when the split has one class."""
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


def prognosis_scores(survival, risk):
    """Harrell's `c_index` of risk scores against `(time, event)`."""
    survival = np.asarray(survival)
    return {"c_index": float(c_index(survival[:, 0], survival[:, 1], risk))}


def _overlaps(masks, logits):
    """`(overlap, total)` per patient and foreground class, `(patients, classes - 1)` each."""
    classes = logits.shape[-1]
    predicted = np.argmax(logits, axis=-1)
    overlap, total = np.zeros((2, len(masks), classes - 1))
    for c in range(1, classes):
        truth, guess = masks == c, predicted == c
        axes = tuple(range(1, truth.ndim))
        total[:, c - 1] = truth.sum(axes) + guess.sum(axes)
        overlap[:, c - 1] = (truth & guess).sum(axes)
    return overlap, total


def _dice(overlap, total):
    return np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)


def dice_per_patient(masks, logits):
    """Dice per patient and foreground class, `(patients, classes - 1)`; empty vs empty is 1."""
    return _dice(*_overlaps(masks, logits))


def segmentation_scores(masks, logits):
    """`dice`: mean over foreground classes of the per-patient mean Dice; `dice_pooled`:
    mean over foreground classes of the Dice pooled over every voxel of every patient;
    `dice_per_class` (per-patient mean) and `dice_per_patient` (mean over foreground classes).

    Example:
    >>> masks = np.zeros((2, 4, 4, 4), int); masks[0, :2] = 1; masks[1, 0, 0, 0] = 1
    >>> logits = np.stack([1 - masks, masks], -1).astype(float); logits[1] = [1.0, 0.0]  # patient 1 missed
    >>> scores = segmentation_scores(masks, logits)
    >>> scores["dice"], round(scores["dice_pooled"], 3), scores["dice_per_patient"]
    (0.5, 0.985, [1.0, 0.0])
    """
    overlap, total = _overlaps(np.asarray(masks), np.asarray(logits))
    per_patient = _dice(overlap, total)
    per_class = per_patient.mean(axis=0)
    return {"dice": float(per_class.mean()), "dice_pooled": float(_dice(overlap.sum(0), total.sum(0)).mean()),
            "dice_per_class": [float(d) for d in per_class],
            "dice_per_patient": [float(d) for d in per_patient.mean(axis=1)]}


SCORES = {"classification": classification_scores, "prognosis": prognosis_scores,
          "segmentation": segmentation_scores}


def score(task, target, output):
    """The metrics dict of a task, its main metric under `MAIN_METRIC[task]`."""
    return SCORES[task](target, output)


def head_metrics(task, result):
    """The scores of a `predict_head` result, with `patients` (count) and `patient_ids`.

    Outputs holding a NaN or an infinity are not scored (an argmax would turn NaN logits
    into a confident class): the main metric is NaN and `non_finite_outputs` counts the
    values, so the stage is not blessed.
    """
    output = np.asarray(result["output"])
    non_finite = int(output.size - np.count_nonzero(np.isfinite(output)))
    scores = {MAIN_METRIC[task]: float("nan"), "non_finite_outputs": non_finite} if non_finite \
        else score(task, result["target"], output)
    return {**scores, "patients": len(result["patient_id"]), "patient_ids": list(result["patient_id"])}


def paired_bootstrap(a, b, resamples=2000, level=0.95, seed=0):
    """Confidence interval of `mean(a - b)` for paired per-patient scores, by resampling patients.

    Args:
        a, b: scores of the same patients under two models, in the same order.
        resamples: bootstrap resamples.
        level: confidence level of the percentile interval.
        seed: the resampling seed (the same inputs give the same interval).

    Returns:
        `(low, high)`.

    Example:
    >>> low, high = paired_bootstrap([0.9, 0.8, 0.85, 0.7], [0.8, 0.8, 0.8, 0.6])
    >>> bool(0.0 <= low <= 0.0625 <= high <= 0.1)
    True
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length, non-empty score lists, got {len(a)} and {len(b)}.")
    differences = a - b
    return bootstrap_interval(lambda rows: differences[rows[0]].mean(axis=-1), [len(differences)],
                              resamples=resamples, level=level, seed=seed, vectorized=True)


def bootstrap_interval(statistic, sizes, resamples=2000, level=0.95, seed=0, vectorized=False, method="linear"):
    """Percentile interval of a statistic under resampling of patients within groups (Efron's bootstrap).

    Args:
        statistic: `statistic(rows) -> float`, `rows` holding one array of patient indices
            per group, `(size,)`, drawn with replacement; with `vectorized`, called once
            with `(resamples, size)` arrays and returning `(resamples,)` values.
        sizes: patients per group; each group is resampled on its own (e.g. a test fold).
        resamples: bootstrap resamples.
        level: confidence level of the percentile interval.
        seed: the resampling seed (the same inputs give the same interval).
        vectorized: see `statistic`.
        method: NumPy's percentile method (`nearest` for a statistic with few values).

    Returns:
        `(low, high)`; resamples whose statistic is NaN (e.g. an AUC on one class) are
        left out, and `(nan, nan)` if all are.

    Example:
    >>> values = np.array([1.0, 2.0, 3.0, 4.0])
    >>> low, high = bootstrap_interval(lambda rows: values[rows[0]].mean(), [4])
    >>> bool(1.0 <= low < 2.5 < high <= 4.0)
    True
    """
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, n, size=(resamples, n)) for n in sizes]
    if vectorized:
        values = np.asarray(statistic(rows), np.float64)
    else:
        values = np.array([statistic([r[i] for r in rows]) for i in range(resamples)], np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    return (float(np.percentile(values, tail, method=method)),
            float(np.percentile(values, 100.0 - tail, method=method)))
