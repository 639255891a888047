"""Exact evaluation of one head on one split: predictions gathered, metrics in NumPy.

Each task kind scores its outputs (`unicon_tf.tasks`: `scores`, `main_metric`, `chance`,
`resampled`); this module gathers a head's predictions, adds the patients a score
covers, bootstrap intervals and paired comparisons. Blessing and the stage x task matrix
use each kind's `main_metric`.

`head_metrics` adds the patients a score covers (count and ids, in split order), so that
two models scored on the same patients can be compared patient by patient.
"""

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from unicon_tf.data import dataset
from unicon_tf.model import model_parts
from unicon_tf.tasks import task_kind
from unicon_tf.tasks.classification import classification_scores
from unicon_tf.tasks.segmentation import segmentation_scores

__all__ = ["chance_level", "classification_scores", "head_metrics", "paired_bootstrap", "paired_difference",
           "patient_bootstrap", "predict_head", "resampled_metric", "score", "segmentation_scores"]


def predict_head(model: keras.Model, head: str, data_dir: pathlib.Path | str, split: str = "test",
                 batch_size: int = 4) -> dict[str, Any]:
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


def score(task: str, target: np.ndarray, output: np.ndarray) -> dict[str, Any]:
    """The metrics dict of a task kind's outputs, its main metric under the kind's `main_metric`.

    Example:
    >>> score("prognosis", np.array([[1.0, 1], [2.0, 1], [3.0, 0]]), np.array([3.0, 2.0, 1.0]))
    {'c_index': 1.0}
    """
    return task_kind(task).scores(target, output)


def head_metrics(task: str, result: Mapping[str, Any], resamples: int = 2000) -> dict[str, Any]:
    """The scores of a `predict_head` result, with the patients they cover, their interval
    and the chance level.

    Besides `score`'s metrics: `patients` (count) and `patient_ids`; `interval`, the 95%
    percentile interval of the main metric under a bootstrap over patients; `chance`, the
    main metric of a trivial prediction (0.5 for AUC and C-index: a constant score;
    for Dice, predicting no lesion anywhere: the share of patients with nothing to find);
    `at_chance`, whether the interval reaches down to it (a model not shown to be better
    than the trivial one, e.g. a baseline that never trained: no gain is claimed against it). For
    kinds without per-patient scores (classification, prognosis) `target` and `output` per patient are kept too, so that
    two models can be compared on resamples of the same patients (`paired_difference`).

    Outputs holding a NaN or an infinity are not scored (an argmax would turn NaN logits
    into a confident class): the main metric is NaN and `non_finite_outputs` counts the
    values, so the stage is not blessed.

    Args:
        task: the head's task.
        result: `predict_head`'s dict (`output`, `target`, `patient_id`).
        resamples: bootstrap resamples of the interval.

    Example:
    >>> result = {"output": np.array([0.4, 0.3, 0.2, 0.1]), "target": np.array([[1, 1], [2, 1], [3, 0], [4, 1]]),
    ...           "patient_id": ["a", "b", "c", "d"]}
    >>> m = head_metrics("prognosis", result)
    >>> m["c_index"], m["chance"], m["at_chance"]
    (1.0, 0.5, False)
    """
    output = np.asarray(result["output"])
    non_finite = int(output.size - np.count_nonzero(np.isfinite(output)))
    kind = task_kind(task)
    scores = {kind.main_metric: float("nan"), "non_finite_outputs": non_finite} if non_finite \
        else kind.scores(result["target"], output)
    scores.update(patients=len(result["patient_id"]), patient_ids=list(result["patient_id"]))
    if kind.per_patient is None:
        scores.update(target=np.asarray(result["target"]).tolist(), output=output.tolist())
    scores["chance"] = chance_level(task, result["target"])
    low, high = (float("nan"),) * 2
    if not non_finite and len(result["patient_id"]):
        low, high = bootstrap_interval(lambda rows: resampled_metric({"task": task, **scores}, rows[0]),
                                       [len(result["patient_id"])], resamples=resamples, vectorized=True)
    scores["interval"] = None if np.isnan(low) else [low, high]
    scores["at_chance"] = None if np.isnan(low) else bool(low <= scores["chance"] + 1e-12)
    return scores


def chance_level(task: str, target: np.ndarray) -> float:
    """The main metric of a trivial prediction (the kind's `chance`): 0.5 for AUC and
    C-index (every patient scored alike); for per-patient Dice, predicting background
    everywhere (Dice 1 for a patient and class with nothing to find, else 0)."""
    return task_kind(task).chance(target)


def paired_difference(task: str, a: Mapping[str, Any], b: Mapping[str, Any], resamples: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """`mean metric(a) - metric(b)` of two models scored on the same patients, with a paired
    bootstrap interval over patients.

    Args:
        task: the heads' task.
        a, b: `head_metrics` dicts (matched by `patient_ids`).

    Returns:
        `{"difference", "ci", "pairs"}` (`ci` None when no resample is defined).
    """
    boot = patient_bootstrap([({"task": task, **a}, {"task": task, **b})], resamples=resamples, seed=seed)
    main = task_kind(task).main_metric
    return {"difference": float(a[main] - b[main]), "ci": boot["ci"],
            "pairs": boot["pairs"]}


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> tuple[float, float]:
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


def bootstrap_interval(statistic: Callable[[list[np.ndarray]], Any], sizes: Sequence[int], resamples: int = 2000,
                       level: float = 0.95, seed: int = 0, vectorized: bool = False,
                       method: str = "linear") -> tuple[float, float]:
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


def resampled_metric(prediction: Mapping[str, Any], rows: np.ndarray) -> np.ndarray:
    """The main metric of a head's per-patient test predictions (`head_metrics`' fields, or
    `unicon_tf.experiment.runner._per_patient`, with `task`)
    on bootstrap resamples: `rows` `(resamples, patients)` of patient positions -> `(resamples,)`.

    The task kind's `resampled`: Dice is the mean per-patient Dice; AUC (two classes) and
    Harrell's C-index are ratios of sums over patient pairs weighed by the patients'
    multiplicities (`unicon_tf.tasks.base.pairwise_resampled`), the same value `score`
    gives on the resampled patients; other metrics are scored resample by resample.
    """
    return task_kind(prediction["task"]).resampled(prediction, rows)


def patient_bootstrap(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], resamples: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over patients of `mean over groups of metric(a) - metric(b)`.

    Args:
        pairs: `[(prediction a, prediction b)]`, one pair per fold-seed test set, the two
            predictions of the same head kind on the same patients (matched by id).

    Returns:
        `{"ci", "pairs", "patients"}`: the percentile interval (None without pairs), the
        patient pairs and the distinct patients.
    """
    aligned = []
    for a, b in pairs:
        where = {pid: i for i, pid in enumerate(b["patient_ids"])}
        common = [(i, where[pid]) for i, pid in enumerate(a["patient_ids"]) if pid in where]
        if common:
            aligned.append((a, b, np.array([i for i, _ in common]), np.array([j for _, j in common])))
    if not aligned:
        return {"ci": None, "pairs": 0, "patients": 0}

    def difference(rows):
        per_group = [resampled_metric(a, ia[r]) - resampled_metric(b, ib[r]) for (a, b, ia, ib), r in zip(aligned, rows)]
        return np.mean(per_group, axis=0)

    low, high = bootstrap_interval(difference, [len(ia) for _, _, ia, _ in aligned], resamples=resamples,
                                   level=level, seed=seed, vectorized=True)
    patients = {a["patient_ids"][i] for a, _, ia, _ in aligned for i in ia}
    return {"ci": None if np.isnan(low) else [low, high], "pairs": int(sum(len(ia) for _, _, ia, _ in aligned)),
            "patients": len(patients)}
