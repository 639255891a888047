"""Evaluate a run directory: every head after every stage, the matrix, blessings, NIfTI.

Outputs (next to the run's stages):

    <run>/stages/NN-<stage>/evaluation/metrics.json     every head's metrics after the stage (reused
                                                        while the model file and the split are unchanged)
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

from unicon_tf.data.records import sha256
from unicon_tf.evaluate.matrix import bless, summarize
from unicon_tf.evaluate.scores import MAIN_METRIC, head_metrics, predict_head
from unicon_tf.files import write_json_atomic
from unicon_tf.train.stage import stage_folder
from unicon_tf.version import __version__


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
        folder = stage_folder(run_dir, index, name)
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
        evaluation = record["folder"] / "evaluation"
        label_maps = write_predictions and tasks[i] == "segmentation"
        key = {"split": split, "heads": heads[: i + 1], "label_maps": label_maps, "unicon_tf": __version__,
               "model_sha256": sha256(record["folder"] / "model.keras")}
        saved = _saved_metrics(evaluation / "metrics.json", key)
        if saved is None or i == len(records) - 1:  # the last row also gives the report its predictions
            model = keras.models.load_model(record["folder"] / "model.keras")
            for j in range(i + 1):
                source = records[j]
                result = predict_head(model, heads[j], source["data"]["path"], split)
                metrics[i][j] = head_metrics(tasks[j], result)
                if i == len(records) - 1:
                    predictions[heads[j]] = {**result, "task": tasks[j], "data": source["data"]["path"]}
                if label_maps and j == i:
                    write_label_maps(evaluation / "predictions" / heads[j], result)
            write_json_atomic(evaluation / "metrics.json", {"stage": record["stage"], **key,
                                                            "metrics": {heads[j]: metrics[i][j] for j in range(i + 1)}})
        else:
            metrics[i][: i + 1] = [saved[h] for h in heads[: i + 1]]
        matrix[i][: i + 1] = [m[MAIN_METRIC[t]] for m, t in zip(metrics[i][: i + 1], tasks)]
        training = record["spec"]["training"]
        blessing = bless(matrix, i, heads, tolerance=training.get("tolerance", 0.01),
                         threshold=training.get("threshold", 0.0))
        blessings.append({"stage": record["stage"], **blessing})
        write_json_atomic(evaluation / "blessing.json", blessings[-1])
    result = {
        "run": str(run_dir), "kind": kind, "split": split, "stages": [r["stage"] for r in records],
        "tasks": heads, "task_kinds": tasks, "main_metric": [MAIN_METRIC[t] for t in tasks],
        "matrix": matrix, "metrics": metrics, "summary": summarize(matrix), "blessing": blessings,
    }
    write_json_atomic(run_dir / "evaluation" / "matrix.json", result)
    return {**result, "predictions": predictions}


def _saved_metrics(path, key):
    """`{head: metrics}` of a stage evaluated before in the same way (same model file, split,
    heads, label maps and package version), or None: each earlier row is scored once."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["metrics"] if {k: saved.get(k) for k in key} == key else None


def write_label_maps(folder, result):
    """One NIfTI label map per patient, on the grid (affine) of the preprocessed input."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.argmax(result["output"], axis=-1).astype(np.uint8)
    for patient, label_map, affine in zip(result["patient_id"], labels, result["affine"]):
        image = nib.Nifti1Image(label_map, affine.astype(np.float64))
        image.header.set_xyzt_units("mm")
        nib.save(image, str(folder / f"{patient}.nii.gz"))
