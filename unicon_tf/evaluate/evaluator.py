"""Evaluate a run directory: every head after every stage, the matrix, blessings, NIfTI.

Outputs (next to the run's stages):

    <run>/stages/NN-<stage>/evaluation/metrics.json     every head's metrics after the stage
    <run>/stages/NN-<stage>/evaluation/blessing.json    blessed or not, with the reasons
    <run>/stages/NN-<stage>/evaluation/predictions/<head>/<patient>.nii.gz
                                                        label maps on the input grid (affine)
    <run>/evaluation/matrix.json                        stage x task matrix and its summary
"""

import json
import pathlib

import keras
import nibabel as nib
import numpy as np

from unicon_tf.evaluate.matrix import bless, summarize
from unicon_tf.evaluate.scores import MAIN_METRIC, head_metrics, predict_head


def stage_records(run_dir, upto=None):
    """The stage.json records of a run's trained stages, in order (up to stage `upto`)."""
    run_dir = pathlib.Path(run_dir)
    record_file = run_dir / "run.json"
    if not record_file.exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (run.json is missing).")
    run = json.loads(record_file.read_text())
    trained = sorted((e["index"], name) for name, e in run["stages"].items() if e.get("status") == "trained")
    records = []
    for index, name in trained:
        if index != len(records):
            break  # a gap: later stages did not start from this run's earlier ones
        folder = run_dir / "stages" / f"{index:02d}-{name}"
        records.append({**json.loads((folder / "stage.json").read_text()), "folder": folder})
        if name == upto:
            break
    if upto is not None and (not records or records[-1]["stage"] != upto):
        raise ValueError(f"{run_dir}: stage '{upto}' is not trained (trained: {[r['stage'] for r in records]}).")
    if not records:
        raise ValueError(f"{run_dir}: no trained stage to evaluate.")
    return records


def evaluate_run(run_dir, stage=None, split="test", write_predictions=True, kind="continual"):
    """Evaluate every stage of a run up to `stage` on every task seen so far.

    Args:
        run_dir: the run directory.
        stage: the last stage to evaluate (default: the last trained one).
        split: the data split to score.
        write_predictions: write segmentation label maps as NIfTI.
        kind: a label for the run (`continual`, `naive`, ...), kept in matrix.json.

    Returns:
        The matrix.json dict, plus `predictions` (the final model's outputs per head) that
        the report uses.

    Example:
    >>> result = evaluate_run("runs/chest_ct")  # doctest: +SKIP
    >>> result["summary"]["forgetting"]  # doctest: +SKIP
    0.0
    """
    run_dir = pathlib.Path(run_dir)
    records = stage_records(run_dir, stage)
    heads = [r["head"] for r in records]
    tasks = [r["task"] for r in records]
    matrix = [[None] * len(records) for _ in records]
    metrics = [[None] * len(records) for _ in records]
    blessings, predictions = [], {}
    for i, record in enumerate(records):
        model = keras.models.load_model(record["folder"] / "model.keras")
        evaluation = record["folder"] / "evaluation"
        evaluation.mkdir(exist_ok=True)
        for j in range(i + 1):
            source = records[j]
            result = predict_head(model, heads[j], source["data"]["path"], split)
            scores = head_metrics(tasks[j], result)
            metrics[i][j] = scores
            matrix[i][j] = scores[MAIN_METRIC[tasks[j]]]
            if i == len(records) - 1:
                predictions[heads[j]] = {**result, "task": tasks[j], "data": source["data"]["path"]}
            if write_predictions and tasks[j] == "segmentation" and j == i:
                write_label_maps(evaluation / "predictions" / heads[j], result)
        training = record["spec"]["training"]
        blessing = bless(matrix, i, heads, tolerance=training.get("tolerance", 0.01),
                         threshold=training.get("threshold", 0.0))
        blessings.append({"stage": record["stage"], **blessing})
        _write_json(evaluation / "metrics.json", {"stage": record["stage"], "split": split,
                                                  "heads": {heads[j]: metrics[i][j] for j in range(i + 1)}})
        _write_json(evaluation / "blessing.json", blessings[-1])
    result = {
        "run": str(run_dir), "kind": kind, "split": split, "stages": [r["stage"] for r in records],
        "tasks": heads, "task_kinds": tasks, "main_metric": [MAIN_METRIC[t] for t in tasks],
        "matrix": matrix, "metrics": metrics, "summary": summarize(matrix), "blessing": blessings,
    }
    (run_dir / "evaluation").mkdir(exist_ok=True)
    _write_json(run_dir / "evaluation" / "matrix.json", result)
    return {**result, "predictions": predictions}


def write_label_maps(folder, result):
    """One NIfTI label map per patient, on the grid (affine) of the preprocessed input."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.argmax(result["output"], axis=-1).astype(np.uint8)
    for patient, label_map, affine in zip(result["patient_id"], labels, result["affine"]):
        image = nib.Nifti1Image(label_map, affine.astype(np.float64))
        image.header.set_xyzt_units("mm")
        nib.save(image, str(folder / f"{patient}.nii.gz"))


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj, indent=2, default=_plain) + "\n")
    partial.replace(path)


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
