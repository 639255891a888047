"""Evaluate a trained stage (every head it has so far), or a whole run (the stage x task matrix).

`evaluate_stage` is what the Evaluator component runs: it needs the stage's folder and,
to bless it, the previous stage's row of main metrics; it writes to its own folder
(`unicon_tf.run.Evaluation`, by default `<stage>/evaluation/`):

    metrics.json                  every head's metrics after the stage (reused while the
                                  model file, the split and the package are unchanged),
                                  each with its 95% interval over patients and chance
                                  level, and the stage's own head on `val` (`validation`)
    blessing.json                 blessed or not, with the reasons and the metric judged
                                  per head (the main metric: AUC, C-index, per-patient
                                  mean Dice `dice`, never the pooled `dice_pooled`); with
                                  `bless: {min_vs_baseline}`, the comparison with the
                                  stage's single-task baseline
    predictions/<head>/<patient>.nii.gz
                                  label maps on the input grid (affine)

`evaluate_run` evaluates every stage of a run in order and writes the run's
`evaluation/matrix.json`.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from unicon_tf.evaluate.matrix import bless, summarize
from unicon_tf.data import read_schema
from unicon_tf.evaluate.scores import head_metrics, paired_difference, predict_head
from unicon_tf.train.selection import describe_rule, rule_key
from unicon_tf.train.checks import validation_never_measured
from unicon_tf.tasks import metric_name, task_kind
from unicon_tf.files import sha256, write_json_atomic
from unicon_tf.model.storage import load_model
from unicon_tf.run import Evaluation, Run, StageFolder
from unicon_tf.version import __version__


def score_stage(stage: StageFolder | pathlib.Path | str, split: str = "test", out: Evaluation | pathlib.Path | str | None = None,
                write_predictions: bool = True, fresh: bool = False) -> dict[str, Any]:
    """Score every head of a stage's model on the `split` of each head's own data.

    Args:
        stage: the stage's folder (`StageFolder` or path: a Model artifact's URI).
        split: the data split to score.
        out: the output folder (`Evaluation` or path; default `<stage>/evaluation`).
        write_predictions: write segmentation label maps of the stage's own head as NIfTI.
        fresh: score again even when `metrics.json` holds this model's scores, and return
            the predictions.

    Returns:
        A dict: `stage` (name), `tasks` (head names, in stage order), `task_kinds`,
        `row` (each head's main metric), `metrics` (each head's metrics dict),
        `record` (the stage's stage.json), `folder` (the `Evaluation`),
        `predictions` (`{head: predict_head result + task, data}` when scored, else {}),
        `validation` (the stage's own head scored on the `val` split, `head_metrics`, or
        None without one) and `selection` (the stage's selection record).

    Raises:
        StageError: the folder holds no trained stage.
        DataError: a head's data is missing or corrupt.
    """
    stage = stage if isinstance(stage, StageFolder) else StageFolder(stage)
    record = stage.record()
    out = out if isinstance(out, Evaluation) else Evaluation(out or stage.evaluation)
    heads = [h["head"] for h in record["heads"]]
    tasks = [h["task"] for h in record["heads"]]
    label_maps = write_predictions and task_kind(tasks[-1]).dense
    key = {"split": split, "heads": heads, "label_maps": label_maps, "unicon_tf": __version__,
           "model_sha256": sha256(stage.model)}
    saved = out.metrics()
    predictions = {}
    if fresh or saved is None or {k: saved.get(k) for k in key} != key or "validation" not in saved:
        model = load_model(stage.model)
        metrics = []
        for entry in record["heads"]:
            result = predict_head(model, entry["head"], entry["data"], split)
            metrics.append(head_metrics(entry["task"], result))
            predictions[entry["head"]] = {**result, "task": entry["task"], "data": entry["data"]}
        own = record["heads"][-1]
        validation = None
        if split != "val" and "val" in read_schema(own["data"])["splits"]:
            validation = head_metrics(own["task"], predict_head(model, own["head"], own["data"], "val"))
        if label_maps:
            write_label_maps(out.predictions(heads[-1]), predictions[heads[-1]])
        out.write_metrics({"stage": record["stage"], **key, "metrics": dict(zip(heads, metrics)),
                           "validation": validation})
    else:
        metrics, validation = [saved["metrics"][h] for h in heads], saved["validation"]
    return {"stage": record["stage"], "tasks": heads, "task_kinds": tasks,
            "row": [m[task_kind(t).main_metric] for m, t in zip(metrics, tasks)], "metrics": metrics, "record": record,
            "folder": out, "predictions": predictions, "validation": validation, "selection": record.get("selection")}


def evaluate_stage(stage: StageFolder | pathlib.Path | str, previous_row: Sequence[float | None] | None = None,
                   split: str = "test", out: Evaluation | pathlib.Path | str | None = None, write_predictions: bool = True,
                   fresh: bool = False, single_task: StageFolder | pathlib.Path | str | None = None) -> dict[str, Any]:
    """Score a stage (`score_stage`) and bless it: what the Evaluator component runs.

    Blessing (`unicon_tf.evaluate.matrix.bless`): no earlier head fell by more than the
    stage's `tolerance`, its own head reaches `threshold`, and, when the stage sets `bless:
    {min_vs_baseline: delta}`, its own head reaches the single-task baseline of the same
    run minus delta (per-patient paired bootstrap interval given; a baseline selected by
    another rule is not compared, a baseline at chance level is flagged).

    Args:
        stage, split, out, write_predictions, fresh: see `score_stage`.
        previous_row: the main metrics of the earlier heads after the previous stage (its
            `row`), which the blessing compares with; None for the first stage.
        single_task: the folder (`StageFolder` or path) of the stage's single-task
            baseline, scored on the same split; needed by `min_vs_baseline`.

    Returns:
        `score_stage`'s dict plus `blessing` (`stage`, `blessed`, `reasons`, `metrics`:
        `{head: main metric}`, e.g. `dice`, the per-patient mean, and `baseline`: the
        baseline-aware rule's comparison or None), also written to the output folder's
        `blessing.json`.
        A stage that selected its weights on a validation value that was NaN at every epoch
        (`unicon_tf.train.checks.validation_never_measured`) is not blessed: nothing judged
        the weights it kept.

    Raises:
        StageError, DataError: see `score_stage`.

    Example:
    >>> result = evaluate_stage("runs/chest_ct/stages/01-prognosis", previous_row=[0.8])  # doctest: +SKIP
    >>> result["blessing"]["blessed"], result["row"]  # doctest: +SKIP
    (True, [0.8, 0.61])
    """
    result = score_stage(stage, split, out, write_predictions, fresh)
    training = result["record"]["spec"]["training"]
    metrics = [task_kind(t).main_metric for t in result["task_kinds"]]
    labels = [f"{head} {metric_name(metric)}" for head, metric in zip(result["tasks"], metrics)]
    delta = (training.get("bless") or {}).get("min_vs_baseline")
    baseline = None if delta is None else versus_baseline(result, single_task, split, delta)
    verdict = bless(previous_row or [], result["row"], labels, tolerance=training["tolerance"],
                    threshold=training["threshold"], baseline=baseline)
    unmeasured = validation_never_measured(result["record"])
    if unmeasured:  # nothing judged the weights kept: not pushed, whatever the test split says
        verdict = {**verdict, "blessed": False, "reasons": verdict["reasons"] + [f"{labels[-1]}: {unmeasured}"]}
    result["blessing"] = {"stage": result["stage"], **verdict, "metrics": dict(zip(result["tasks"], metrics)),
                          "baseline": baseline}
    result["folder"].write_blessing(result["blessing"])
    return result


def versus_baseline(result: Mapping[str, Any], single_task: StageFolder | pathlib.Path | str | None, split: str,
                    delta: float) -> dict[str, Any]:
    """The stage's own head against its single-task baseline (`bless`'s `baseline` argument).

    Args:
        result: `score_stage`'s dict of the stage.
        single_task: the baseline's folder, or None when there is none.
        split: the split both are scored on.
        delta: the stage's `min_vs_baseline`.
    """
    if single_task is None:
        return {"delta": delta, "value": None}
    base = score_stage(single_task, split, write_predictions=False)
    task, head = result["task_kinds"][-1], result["tasks"][-1]
    where = base["tasks"].index(head) if head in base["tasks"] else 0
    own_metrics, base_metrics = result["metrics"][-1], base["metrics"][where]
    own_rule, rule = result.get("selection"), base.get("selection")
    return {"delta": delta, "value": base["row"][where], "at_chance": base_metrics.get("at_chance"),
            "interval": base_metrics.get("interval"), "chance": base_metrics.get("chance"),
            "comparison": paired_difference(task, own_metrics, base_metrics),
            "rule": describe_rule(rule), "own_rule": describe_rule(own_rule),
            "same_rule": rule_key(rule) == rule_key(own_rule)}


def evaluate_run(run_dir: pathlib.Path | str, stage: str | None = None, split: str = "test", write_predictions: bool = True,
                 kind: str = "continual") -> dict[str, Any]:
    """Evaluate every stage of a run up to `stage` on every task seen so far.

    Args:
        run_dir: the run directory.
        stage: the last stage to evaluate (default: the last trained one).
        split: the data split to score.
        write_predictions: write segmentation label maps as NIfTI.
        kind: a label for the run (`continual`, `naive`, ...), kept in matrix.json.

    Returns:
        The matrix.json dict: `run`, `kind`, `split`, `stages`, `tasks` (head names),
        `task_kinds`, `main_metric`, `matrix` (stage x task, None above the diagonal),
        `metrics` (the same cells' metrics dicts), `summary` (see `summarize`),
        `blessing` (one per stage), `selection` (each stage's selection record: the rule
        it was selected by) and `validation` (each stage's own head on `val`); plus
        `predictions` (the final model's outputs per head, see `evaluate_stage`) that the
        report uses.

    Raises:
        FileNotFoundError: `run_dir` is not a run directory.
        ValueError: no stage is trained, or `stage` is not.

    Example:
    >>> result = evaluate_run("runs/chest_ct")  # doctest: +SKIP
    >>> result["summary"]["forgetting"]  # doctest: +SKIP
    0.0
    """
    run = Run(run_dir)
    folders = run.trained_stages(stage)
    if not folders:
        raise ValueError(f"{run.path}: no trained stage to evaluate.")
    n = len(folders)
    results = []
    for i, folder in enumerate(folders):
        previous = results[-1]["row"] if results else None
        results.append(evaluate_stage(folder, previous, split, write_predictions=write_predictions,
                                      fresh=i == n - 1,  # the last row also gives the report its predictions
                                      single_task=single_task_folder(run, folder.record()["stage"])))
    last = results[-1]
    matrix = [r["row"] + [None] * (n - len(r["row"])) for r in results]
    result = {
        "run": str(run.path), "kind": kind, "split": split, "stages": [r["stage"] for r in results],
        "tasks": last["tasks"], "task_kinds": last["task_kinds"],
        "main_metric": [task_kind(t).main_metric for t in last["task_kinds"]], "matrix": matrix,
        "metrics": [r["metrics"] + [None] * (n - len(r["metrics"])) for r in results],
        "summary": summarize(matrix), "blessing": [r["blessing"] for r in results],
        "selection": [r["selection"] for r in results], "validation": [r["validation"] for r in results],
    }
    write_json_atomic(run.matrix_file, result)
    return {**result, "predictions": last["predictions"]}


def single_task_folder(run: Run, stage: str) -> StageFolder | None:
    """The trained single-task baseline of `stage` in `run` (a `StageFolder`), or None."""
    folder = Run(run.single_task_dir(stage)).stage(0, stage) if (run.single_task_dir(stage) / "run.json").exists() \
        else None
    return folder if folder is not None and folder.is_trained() else None


def write_label_maps(folder: pathlib.Path | str, result: Mapping[str, Any]) -> None:
    """One NIfTI label map per patient, on the grid (affine) of the preprocessed input."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.argmax(result["output"], axis=-1).astype(np.uint8)
    for patient, label_map, affine in zip(result["patient_id"], labels, result["affine"]):
        image = nib.Nifti1Image(label_map, affine.astype(np.float64))
        image.header.set_xyzt_units("mm")
        nib.save(image, str(folder / f"{patient}.nii.gz"))
