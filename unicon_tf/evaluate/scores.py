"""Exact evaluation of one head on one split: predictions gathered, metrics in NumPy.

| task             | main metric | also reported                                 |
|------------------|-------------|-----------------------------------------------|
| `classification` | `auc`       | `accuracy` (AUC: one-vs-rest macro for > 2)   |
| `prognosis`      | `c_index`   | Harrell's C-index as scikit-survival's         |
| `segmentation`   | `dice`      | `dice_per_class` (foreground), per patient    |
"""

import keras
import numpy as np
from sklearn.metrics import roc_auc_score

from unicon_tf.data import dataset
from unicon_tf.model import model_parts
from unicon_tf.train.metrics import c_index

MAIN_METRIC = {"classification": "auc", "prognosis": "c_index", "segmentation": "dice"}


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
    """
    head_layer = model_parts(model)["heads"][head]
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


def dice_per_patient(masks, logits):
    """Dice per patient and foreground class, `(patients, classes - 1)`; empty vs empty is 1."""
    classes = logits.shape[-1]
    predicted = np.argmax(logits, axis=-1)
    scores = np.ones((len(masks), classes - 1))
    for c in range(1, classes):
        truth, guess = masks == c, predicted == c
        axes = tuple(range(1, truth.ndim))
        total = truth.sum(axes) + guess.sum(axes)
        overlap = (truth & guess).sum(axes)
        scores[:, c - 1] = np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)
    return scores


def segmentation_scores(masks, logits):
    """Mean `dice` over foreground classes of the per-patient mean, and `dice_per_class`."""
    per_class = dice_per_patient(np.asarray(masks), np.asarray(logits)).mean(axis=0)
    return {"dice": float(per_class.mean()), "dice_per_class": [float(d) for d in per_class]}


SCORES = {"classification": classification_scores, "prognosis": prognosis_scores,
          "segmentation": segmentation_scores}


def score(task, target, output):
    """The metrics dict of a task, its main metric under `MAIN_METRIC[task]`."""
    return SCORES[task](target, output)
