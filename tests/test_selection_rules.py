"""Like-for-like comparisons: one selection rule for every arm, selection that survives small
validation splits, models at chance level flagged, the baseline-aware blessing, and the
report's best and worst overlays."""

import json
import shutil

import keras
import numpy as np
import pytest
from conftest import UNICON_ORDER, write_pipeline

from unicon_tf import evaluate, train
from unicon_tf.components import Artifact, LocalRunner, evaluator, pusher
from unicon_tf.files import sha256
from unicon_tf.data import read_schema
from unicon_tf.evaluate.matrix import bless
from unicon_tf.evaluate.report import comparisons, format_comparisons, overlay_patients, pet_gain
from unicon_tf.evaluate.scores import head_metrics
from unicon_tf.model import model_parts
from unicon_tf.run import Run
from unicon_tf.train.config import TrainingConfig
from unicon_tf.train.selection import Selection, describe_rule, rule_key

SPLITS = {"train": {"count": 40}, "val": {"count": 16}, "test": {"count": 20}}


def test_every_arm_defaults_to_best_val_where_there_is_a_val_split():
    training = TrainingConfig(epochs=6)
    assert Selection.for_training("c", "classification", training, SPLITS).select == "best_val"
    no_val = {k: v for k, v in SPLITS.items() if k != "val"}
    assert Selection.for_training("c", "classification", training, no_val).select == "last"
    assert Selection.for_training("c", "classification", training.replace(select="last"), SPLITS).select == "last"
    # monitor auto: the loss for a ranking metric on a small split, the metric otherwise
    assert Selection.for_training("p", "prognosis", training, SPLITS).key == "val_p_loss"
    assert Selection.for_training("s", "segmentation", training, SPLITS).key == "val_s_dice"
    large = {**SPLITS, "val": {"count": 80}}
    assert Selection.for_training("c", "classification", training, large).key == "val_c_auc"
    assert Selection.for_training("p", "prognosis", training.replace(monitor="metric"), SPLITS).key == "val_p_c_index"


def test_min_epochs_and_smoothing_keep_a_lucky_first_epoch_out():
    values = [0.9, 0.5, 0.6, 0.7, 0.72]  # epoch 1 scores best by luck on a small split
    logs = [{"val_p_c_index": v} for v in values]

    def kept(**options):
        selection = Selection("p", "prognosis", "best_val", None, "metric", 5, val_patients=10, **options)
        for epoch, log in enumerate(logs, start=1):
            selection.update(epoch, log)
        return selection.record(5, logs)

    assert kept()["epoch"] == 1
    assert kept(min_epochs=2)["epoch"] == 5
    smoothed = kept(smoothing=2)  # means 0.70, 0.55, 0.65, 0.71 from epoch 2 on
    assert smoothed["epoch"] == 5 and smoothed["best"] == pytest.approx(0.71)
    assert smoothed["val_patients"] == 10 and smoothed["val_metric"] == 0.72
    assert smoothed["reason"].endswith("the best val_p_c_index (0.7100, mean of 2 epochs) on 10 validation patients")
    assert smoothed["rule"] == "best_val (val_p_c_index, epoch 5/5, 10 val patients)"
    # patience counts judged epochs only: min_epochs 4 and patience 1 cannot stop before epoch 5
    selection = Selection("p", "prognosis", "best_val", 1, "metric", 5, min_epochs=4)
    for epoch, log in enumerate(logs[:4], start=1):
        selection.update(epoch, log)
        assert not selection.stop()


@pytest.mark.parametrize("options, values, kept_epoch, stopped", [
    # Dice stuck at 0 while the lesions are missed: patience waits, the later epoch is kept
    ({}, [0.0, 0.0, 0.0, 0.0, 0.3, 0.2, 0.2], 5, True),
    ({}, [0.0] * 6, 6, False),  # never moved: the last, most trained epoch
    ({}, [float("nan"), 0.0, 0.0, 0.0], 4, False),  # a NaN epoch is skipped, not a move
    ({"smoothing": 2}, [0.0, 0.0, 0.0, 0.2, 0.1, 0.0, 0.0], 5, True),  # means 0, 0, 0.1, 0.15, 0.05, 0
    ({}, [0.3, 0.5, 0.5, 0.4], 2, True),  # once it has moved, a tie is no improvement again
])
def test_patience_waits_while_the_metric_has_not_moved_off_its_start(options, values, kept_epoch, stopped):
    def train(resume_after):  # resumed from a checkpoint's JSON state after epoch `resume_after`
        selection = Selection("s", "segmentation", "best_val", 2, "metric", len(values), **options)
        for epoch, value in enumerate(values, start=1):
            selection.update(epoch, {"val_s_dice": value})
            if epoch == resume_after:
                selection = Selection("s", "segmentation", "best_val", 2, "metric", len(values), **options,
                                      state=json.loads(json.dumps(selection.state())))
            if selection.stop():
                break
        return selection.kept_epoch(epoch), selection.stop()

    assert train(resume_after=None) == train(resume_after=2) == (kept_epoch, stopped)


def test_a_flat_start_is_named_in_the_reason():
    selection = Selection("s", "segmentation", "best_val", 2, "metric", 4)
    for epoch in range(1, 5):
        selection.update(epoch, {"val_s_dice": 0.0})
    assert selection.record(4)["reason"].endswith("(a flat start: val_s_dice had not moved, so the latest epoch "
                                                  "of that value)")
    moved = Selection("s", "segmentation", "best_val", 2, "metric", 4)
    for epoch, value in enumerate([0.0, 0.0, 0.2, 0.1], start=1):
        moved.update(epoch, {"val_s_dice": value})
    assert "flat start" not in moved.record(4)["reason"]


def test_a_model_at_chance_is_flagged_and_no_gain_is_claimed_against_it():
    rng = np.random.default_rng(0)
    time = rng.uniform(1, 10, 40)
    survival = np.stack([time, np.ones(40)], axis=1)
    ids = [f"p{i}" for i in range(40)]
    never_trained = head_metrics("prognosis", {"output": np.zeros(40), "target": survival, "patient_id": ids})
    trained = head_metrics("prognosis", {"output": -time, "target": survival, "patient_id": ids})
    assert never_trained["c_index"] == 0.5 and never_trained["at_chance"] is True
    assert trained["c_index"] == 1.0 and trained["at_chance"] is False and trained["interval"][0] > 0.5
    rule = {"select": "best_val", "monitor": "val_prognosis_loss", "epoch": 1, "epochs_run": 30, "val_patients": 10}

    def arm(kind, metrics, value, selection):
        return {"kind": kind, "split": "test", "tasks": ["prognosis"], "task_kinds": ["prognosis"],
                "main_metric": ["c_index"], "stages": ["prognosis"], "matrix": [[value]], "metrics": [[metrics]],
                "selection": [selection]}

    continual = arm("continual", trained, 1.0, rule)
    rows = comparisons(continual, {"single_task": arm("single_task", never_trained, 0.5, rule)})
    assert rows[0]["difference"] == 0.5 and not rows[0]["claimed"]
    line = format_comparisons(rows)[0]
    assert "no gain or loss claimed" in line and "single-task baseline at chance level" in line
    assert "+0.500" not in line and describe_rule(rule) in line
    # the report's forward transfer leaves the task out
    report_rows = comparisons(continual, {"single_task": arm("single_task", trained, 1.0, rule)})
    assert report_rows[0]["claimed"] and report_rows[0]["difference"] == 0.0
    # across different rules: flagged, not claimed
    last = {"select": "last", "epoch": 30, "max_epochs": 30}
    rows = comparisons(arm("continual", trained, 1.0, last), {"single_task": arm("single_task", trained, 1.0, rule)})
    assert not rows[0]["claimed"] and "NOT like-for-like" in format_comparisons(rows)[0]
    assert rule_key(last) != rule_key(rule)


def test_pet_gain_against_a_baseline_of_another_rule_is_not_claimed():
    dice = {"dice": 0.8, "patient_ids": ["a", "b"], "dice_per_patient": [0.8, 0.8], "patients": 2}
    ct = {"dice": 0.6, "patient_ids": ["a", "b"], "dice_per_patient": [0.5, 0.7], "patients": 2}
    best = {"select": "best_val", "monitor": "val_segmentation_dice", "epoch": 2, "epochs_run": 3}
    continual = {"tasks": ["segmentation", "segmentation_ctpet"], "task_kinds": ["segmentation"] * 2,
                 "matrix": [[0.6, None], [0.6, 0.8]], "metrics": [[ct, None], [ct, dice]],
                 "selection": [best, {"select": "last", "epoch": 3, "max_epochs": 3}]}
    single = {"tasks": ["segmentation", "segmentation_ctpet"], "matrix": [[0.7, None], [None, 0.8]],
              "metrics": [[ct, None], [None, dice]], "selection": [best, best]}
    gain = pet_gain(continual, {"single_task": single})
    assert "gain_vs_ct_baseline" not in gain and gain["flags"]
    assert "no gain claimed; NOT like-for-like" in evaluate.format_gain(gain)[1]


def test_bless_against_the_baseline_names_the_rule_and_the_reason():
    base = {"delta": 0.02, "value": 0.70, "comparison": {"difference": -0.01, "ci": [-0.05, 0.03], "pairs": 8},
            "at_chance": False, "rule": "best_val (x)", "own_rule": "best_val (x)", "same_rule": True}
    passed = bless([], [0.69], ["seg Dice"], baseline=base)
    assert passed["blessed"] and "within the bless rule min_vs_baseline 0.02" in passed["reasons"][-1]
    failed = bless([], [0.60], ["seg Dice"], baseline={**base, "comparison": {**base["comparison"],
                                                                                "difference": -0.10}})
    assert not failed["blessed"] and "below its single-task baseline 0.7000 by 0.1000" in failed["reasons"][-1]
    other_rule = bless([], [0.69], ["seg Dice"], baseline={**base, "same_rule": False, "own_rule": "last (epoch 3/3)"})
    assert not other_rule["blessed"] and "selected differently" in other_rule["reasons"][-1]
    missing = bless([], [0.69], ["seg Dice"], baseline={"delta": 0.02, "value": None})
    assert not missing["blessed"] and "no scored single-task baseline" in missing["reasons"][-1]
    chance = bless([], [0.69], ["seg Dice"], baseline={**base, "at_chance": True, "interval": [0.4, 0.6],
                                                       "chance": 0.5})
    assert "at chance level" in chance["reasons"][-1] and "no gain is claimed" in chance["reasons"][-1]


@pytest.mark.parametrize("value, message", [
    ({"min_vs_baseline": -0.1}, r"field 'bless': min_vs_baseline must be a number >= 0"),
    ({"min_baseline": 0.1}, r"field 'bless': unknown key\(s\) \['min_baseline'\]"),
    (0.1, r"field 'bless' must be a mapping"),
])
def test_bad_bless_options_are_refused_naming_file_stage_and_field(tmp_path, value, message):
    stage = {"name": "seg", "task": "segmentation", "bless": value}
    pipeline = write_pipeline(tmp_path, tmp_path / "data", stages=[stage])
    with pytest.raises(train.PipelineError, match=str(pipeline).replace(".", r"\.") + ": stage 'seg': " + message):
        train.load_pipeline(pipeline)


def _predict_everywhere(model_file, head, label):
    """Rewrite a saved model so that `head` predicts class `label` in every voxel."""
    model = keras.models.load_model(model_file)
    for weight in model_parts(model)["heads"][head].weights:
        if weight.shape[-1] == 2 and weight.path.endswith("kernel"):
            weight.assign(np.zeros(weight.shape, "float32"))
        if weight.shape == (2,) and weight.path.endswith("bias"):
            weight.assign(np.array([10.0, -10.0] if label == 0 else [-10.0, 10.0], "float32"))
    model.save(model_file)


def test_a_stage_below_its_baseline_by_more_than_delta_is_not_blessed_nor_pushed(trained_run, phantom_records,
                                                                                  tmp_path):
    source_pipeline, source_run, _ = trained_run
    run_dir, base = tmp_path / "run", tmp_path / "serving"
    shutil.copytree(source_run, run_dir)
    stages = [dict(s) for s in UNICON_ORDER[:3]]
    stages[2]["bless"] = {"min_vs_baseline": 0.001}  # a training key: the stage's fingerprint is unchanged
    pipeline = train.load_pipeline(write_pipeline(tmp_path, phantom_records, stages=stages))
    run = Run(run_dir)
    stage = run.stage(2, "segmentation")
    # The single-task baseline of the stage, in its place in the run: here the stage's own model
    # (trained under the same rule), made to mark every voxel: a small but positive Dice. The
    # continual head is made to find nothing (Dice 0 on every lesion): it loses to its baseline.
    single_run = Run.create(run.single_task_dir("segmentation"), f"{pipeline.name}-segmentation-alone")
    baseline = single_run.stage(0, "segmentation")
    shutil.copytree(stage.path, baseline.path)
    single_run.mark(0, "segmentation", "copied", status="trained", model=str(baseline.model))
    _predict_everywhere(baseline.model, "segmentation", label=1)
    _predict_everywhere(stage.model, "segmentation", label=0)
    shutil.rmtree(stage.evaluation, ignore_errors=True)
    record = json.loads(stage.record_file.read_text())  # as if trained from this pipeline: its record says so
    record["spec"]["training"]["bless"] = {"min_vs_baseline": 0.001}
    stage.record_file.write_text(json.dumps(record))

    runner = LocalRunner(pipeline, run_dir, base=base, verbose=0)
    single = runner._single_task("segmentation")  # found in the run, not trained again
    assert single.uri == str(baseline.path)
    previous = evaluate.score_stage(run.stage(1, "prognosis"), write_predictions=False)
    model = Artifact("Model", str(stage.path), "test", sha256(stage.model), {"stage": "segmentation"})
    context = {"id": "Evaluator.segmentation", "output_dir": stage.evaluation}
    outputs = evaluator.execute({"model": model, "baseline": Artifact("Evaluation", "", "test", "x", {
        "row": previous["row"]}), "single_task": single}, {"split": "test"}, context)
    pushed = pusher.execute({"model": model, "blessing": outputs["blessing"]}, {"base": str(base)},
                            {"id": "Pusher.segmentation"})["pushed_model"].properties
    assert not pushed["pushed"] and "below its single-task baseline" in pushed["reason"]
    assert not base.exists()  # nothing exported
    blessing = json.loads(stage.evaluation.joinpath("blessing.json").read_text())
    assert not blessing["blessed"] and "min_vs_baseline 0.001" in blessing["reasons"][-1]
    assert blessing["reasons"][0].startswith("classification AUC:")  # forgetting still checked
    assert blessing["baseline"]["comparison"]["difference"] < -0.001 and blessing["baseline"]["same_rule"]
    assert blessing["baseline"]["comparison"]["ci"] is not None

    # the report names the rule and the reason; the selection table gives the validation size
    val_patients = read_schema(phantom_records)["splits"]["val"]["count"]
    result = evaluate.evaluate_run(run_dir)
    assert result["selection"][2]["val_patients"] == val_patients
    assert result["validation"][2]["patients"] == val_patients and "at_chance" in result["validation"][2]
    report, _, _ = evaluate.write_report(run_dir, result, run.stage_records())
    text = report.read_text()
    assert "**segmentation**: NOT blessed" in text and "below its single-task baseline" in text
    assert "min_vs_baseline 0.001" in text
    assert "## Model selection" in text and f"| {val_patients} |" in text
    assert "best and worst test patients" in text and (report.parent / "overlay_segmentation.png").exists()


def test_stages_default_to_best_val(trained_run):
    _, _, records = trained_run
    assert [r["selection"]["select"] for r in records] == ["best_val"] * 4  # no `select` in the pipeline
    assert all(r["selection"]["val_patients"] for r in records)


def test_overlays_show_the_best_and_the_worst_patients():
    assert overlay_patients([0.9, 0.1, 0.5, 0.7, 0.0], patients=2) == [(0, "best"), (3, "best"), (4, "worst"),
                                                                         (1, "worst")]
    assert overlay_patients([0.4, 0.6], patients=2) == [(1, "best"), (0, "best")]  # each patient once


def test_an_experiment_flags_comparisons_across_rules_and_against_chance(tmp_path):
    from test_experiment import known_cells

    from unicon_tf.experiment import ExperimentPlan, aggregate
    from unicon_tf.experiment.report import write_report

    plan = ExperimentPlan(folds=3, seeds=(0, 1), fractions=(0.5, 1.0), baselines=("single_task",))
    best = {"select": "best_val", "monitor": "val_segmentation_dice"}
    cells = known_cells()
    for cell in cells:
        cell["stages"] = ["classification", "segmentation"]
        cell["selection"] = [best, best if cell["arm"] == "single_task" or cell["fraction"] == 1.0 else
                             {"select": "last", "epoch": 3, "max_epochs": 3}]

    def comparison(result, fraction, task):
        return next(c for c in result["comparisons"] if (c["fraction"], c["a"]["task"], c["b"]["arm"]) == (
            fraction, task, "single_task"))

    result = aggregate(cells, plan, resamples=200)
    same, mixed = comparison(result, 1.0, "segmentation"), comparison(result, 0.5, "segmentation")
    assert same["like_for_like"] and same["claimed"] and same["a"]["rules"] == ["best_val on the val metric"]
    assert not mixed["like_for_like"] and not mixed["claimed"] and mixed["a"]["rules"] == ["last"]
    # classification: the same AUC 0.75 in every fold, an interval of zero width above 0.5: not at chance
    assert not comparison(result, 1.0, "classification")["b_at_chance"]
    for cell in cells:
        cell["final"]["classification"] = 0.5 + (0.1 if cell["fold"] == 0 else -0.05)
    flagged = comparison(aggregate(cells, plan, resamples=200), 1.0, "classification")
    assert flagged["b_at_chance"] and not flagged["claimed"] and "at chance level" in flagged["flags"][-1]
    experiment = {"pipeline": "tiny", "plan": plan.to_json(), "patients": 12, **result}
    text = write_report(tmp_path, experiment, cells).read_text()
    assert "| best_val on the val metric / best_val on the val metric | - |" in text
    assert "| last / best_val on the val metric | **NOT like-for-like" in text
