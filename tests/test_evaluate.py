"""Evaluation: continual measures by hand, perfect scores, blessing, report, NIfTI, baselines."""

import json

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import UNICON_ORDER, write_pipeline

from unicon_tf import data, evaluate
from unicon_tf.cli import main
from unicon_tf.run import Run
from unicon_tf.tasks import task_kind

NAN = None
HAND = [[0.8, NAN, NAN], [0.7, 0.9, NAN], [0.6, 0.85, 0.7]]


def test_continual_measures_on_a_hand_made_matrix():
    summary = evaluate.summarize(HAND, baselines=[0.75, 0.8, 0.6])
    assert summary["average"] == pytest.approx((0.6 + 0.85 + 0.7) / 3)
    assert summary["backward_transfer"] == pytest.approx(((0.6 - 0.8) + (0.85 - 0.9)) / 2)
    assert summary["forgetting_per_task"] == pytest.approx([0.8 - 0.6, 0.9 - 0.85])
    assert summary["forgetting"] == pytest.approx(0.125)
    assert summary["forward_transfer_per_task"] == pytest.approx([0.05, 0.1, 0.1])
    assert summary["forward_transfer"] == pytest.approx(0.25 / 3)
    single = evaluate.summarize([[0.7]])
    assert single["average"] == 0.7 and single["backward_transfer"] is None and single["forgetting"] is None


def test_a_model_that_outputs_the_truth_scores_one():
    labels = np.array([0, 1, 1, 0, 1])
    assert evaluate.score("classification", labels, np.eye(2)[labels] * 10.0) == {"auc": 1.0, "accuracy": 1.0}
    time = np.array([5.0, 3.0, 8.0, 1.0, 4.0])
    survival = np.stack([time, [1, 1, 0, 1, 1]], 1)
    assert evaluate.score("prognosis", survival, -time) == {"c_index": 1.0}
    masks = np.zeros((2, 8, 8, 8), int)
    masks[0, 2:5, 2:5, 2:5], masks[1, 1:3, 1:3, 1:3] = 1, 2
    result = evaluate.score("segmentation", masks, np.eye(3)[masks] * 10.0)
    assert result == {"dice": 1.0, "dice_pooled": 1.0, "dice_per_class": [1.0, 1.0], "dice_per_patient": [1.0, 1.0]}
    wrong = evaluate.score("segmentation", masks, np.eye(3)[np.zeros_like(masks)] * 10.0)
    assert wrong["dice"] < 1.0
    # Patient 0 has class 1 only: class 2 (absent, not predicted) counts 1, class 1 gets 0.
    assert wrong["dice_per_patient"] == [0.5, 0.5]


def test_non_finite_outputs_are_flagged_not_scored_and_never_blessed():
    masks = np.zeros((2, 8, 8, 8), int)  # all background: an argmax of NaN logits (class 0) would "score" 1.0
    logits = np.full((2, 8, 8, 8, 2), np.nan, np.float32)
    for task, target, output in (("segmentation", masks, logits), ("classification", np.array([0, 1]), logits[:, 0, 0, 0]),
                                 ("prognosis", np.array([[1.0, 1.0], [2.0, 1.0]]), np.array([np.inf, 0.0]))):
        result = {"target": target, "output": output, "patient_id": ["A", "B"]}
        metrics = evaluate.head_metrics(task, result)
        assert np.isnan(metrics[task_kind(task).main_metric]) and metrics["non_finite_outputs"] >= 1
        assert metrics["patients"] == 2
    verdict = evaluate.bless([0.8], [0.8, float("nan")], ["classification", "segmentation"])
    assert not verdict["blessed"] and verdict["reasons"][-1].startswith("segmentation: not measured (non-finite")


def test_paired_bootstrap_matches_scipy_and_is_exact_for_a_constant_gain():
    from scipy import stats

    assert evaluate.paired_bootstrap([0.8, 0.9, 0.7], [0.7, 0.8, 0.6]) == pytest.approx((0.1, 0.1))
    rng = np.random.default_rng(4)
    base = rng.uniform(0.5, 0.9, 30)
    better = base + rng.normal(0.04, 0.05, 30)
    low, high = evaluate.paired_bootstrap(better, base, resamples=20000)
    reference = stats.bootstrap((better - base,), np.mean, n_resamples=20000, method="percentile",
                                random_state=0).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.004) and high == pytest.approx(reference.high, abs=0.004)
    assert low < np.mean(better - base) < high
    with pytest.raises(ValueError, match="equal-length"):
        evaluate.paired_bootstrap([0.5, 0.6], [0.5])


def test_a_regression_beyond_tolerance_is_not_blessed_and_named():
    tasks = ["classification", "prognosis", "segmentation"]
    before, after = HAND[1][:2], HAND[2]
    verdict = evaluate.bless(before, after, tasks, tolerance=0.01)
    assert not verdict["blessed"]
    assert any(r.startswith("classification: fell from 0.7000 to 0.6000") for r in verdict["reasons"])
    assert any(r.startswith("prognosis: fell from 0.9000 to 0.8500") for r in verdict["reasons"])
    lenient = evaluate.bless(before, after, tasks, tolerance=0.01, tolerances={"classification": 0.2, "prognosis": 0.1})
    assert lenient["blessed"], lenient["reasons"]
    assert not evaluate.bless(before, after, tasks, tolerance=0.5, threshold=0.75)["blessed"]  # own task too low
    assert evaluate.bless([], HAND[0][:1], tasks[:1], threshold=0.5)["blessed"]
    assert not evaluate.bless([0.8], [None, 0.9], tasks[:2])["blessed"]  # an earlier task not measured


def test_evaluate_run_scores_each_earlier_row_once(trained_run, tmp_path):
    """A row saved for the same model file, split and heads is read back, not re-scored; the
    last row is always scored (the report needs its predictions)."""
    import shutil

    _, run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    first = evaluate.evaluate_run(copy, stage="segmentation", write_predictions=False)
    saved_file = copy / "stages" / "00-classification" / "evaluation" / "metrics.json"
    saved = json.loads(saved_file.read_text())
    saved["metrics"]["classification"]["auc"] = -1.0  # a marker only a reused row can carry
    saved_file.write_text(json.dumps(saved))
    again = evaluate.evaluate_run(copy, write_predictions=False)
    assert again["matrix"][0][0] == -1.0
    assert again["matrix"][1][1] == first["matrix"][1][1] and again["matrix"][3][0] == first["matrix"][0][0]
    assert evaluate.evaluate_run(copy, stage="prognosis", split="val",
                                 write_predictions=False)["matrix"][0][0] != -1.0  # another split: re-scored


def test_evaluate_run_report_and_predictions(trained_run):
    _, run, records = trained_run
    result = evaluate.evaluate_run(run)
    assert result["tasks"] == ["classification", "prognosis", "segmentation", "segmentation_ctpet"]
    matrix = np.array([[np.nan if v is None else v for v in row] for row in result["matrix"]])
    assert np.isnan(matrix[0, 1]) and not np.isnan(np.diag(matrix)).any()
    # frozen / adapters: every earlier task keeps exactly its value
    for j in range(3):
        assert np.all(matrix[j:, j] == matrix[j, j])
    assert result["summary"]["forgetting"] == 0.0 and result["summary"]["backward_transfer"] == 0.0
    saved = json.loads((run / "evaluation" / "matrix.json").read_text())
    assert saved["matrix"] == result["matrix"]
    stage_dir = run / "stages" / "02-segmentation" / "evaluation"
    assert json.loads((stage_dir / "blessing.json").read_text())["blessed"] in (True, False)
    assert json.loads((stage_dir / "blessing.json").read_text()) == result["blessing"][2]
    assert set(json.loads((stage_dir / "metrics.json").read_text())["heads"]) == {
        "classification", "prognosis", "segmentation"}
    # Label maps on the input grid, with its affine.
    _, _, meta = next(iter(data.dataset(records[2]["data"]["path"], "test", task="segmentation", with_meta=True,
                                        batch_size=1)))
    patient = meta["patient_id"].numpy()[0].decode()
    written = nib.load(str(stage_dir / "predictions" / "segmentation" / f"{patient}.nii.gz"))
    np.testing.assert_allclose(written.affine, meta["affine"].numpy()[0], atol=1e-5)
    assert written.shape == (16, 16, 16) and set(np.unique(np.asarray(written.dataobj))) <= {0, 1}

    report, summary, gain = evaluate.write_report(run, result, Run(run).stage_records())
    assert gain["fused_head"] == "segmentation_ctpet" and gain["ct_head"] == "segmentation"
    low, high = gain["gain_vs_ct_head_ci"]  # both heads scored on the same test patients
    assert low <= gain["gain_vs_ct_head"] <= high and gain["patients"] == len(result["metrics"][-1][2]["patient_ids"])
    per_patient = gain["per_patient"]
    assert np.mean(per_patient["segmentation_ctpet"]) - np.mean(per_patient["segmentation (continual)"]) == pytest.approx(
        gain["gain_vs_ct_head"])
    text = report.read_text()
    for name in ("matrix_continual.png", "learning_curves.png", "kaplan_meier.png",
                 "overlay_segmentation.png", "overlay_segmentation_ctpet.png", "pet_gain.png"):
        assert f"]({name})" in text
        image = matplotlib.image.imread(report.parent / name)
        assert image.shape[:2] == (500, 800), name
        assert image[..., :3].std() > 0.01  # not blank
    assert "NOT blessed" in text or "blessed" in text
    for blessing in result["blessing"]:  # each stage's verdict, as evaluate_run gave it
        assert f"- **{blessing['stage']}**: {'blessed' if blessing['blessed'] else 'NOT blessed'}" in text


@pytest.mark.slow
def test_baselines_share_the_matrix_format(phantom_records, tmp_path):
    """Two stages (CT segmentation, then PET) keep this affordable: 2 single-task models,
    1 naive stage, 1 joint model."""
    from unicon_tf import train

    stages = [{"name": "segmentation", "task": "segmentation"}, UNICON_ORDER[3]]
    pipeline = write_pipeline(tmp_path, phantom_records, stages=stages, name="pair", epochs=1, depth=2)
    for stage in stages:
        train.train_stage(pipeline, stage["name"], tmp_path / "run", verbose=0)
    results = evaluate.evaluate_baselines(tmp_path / "run", train.train_baselines(pipeline, tmp_path / "run"))
    single, naive, joint = results["single_task"], results["naive"], results["joint"]
    for result in results.values():
        assert result["tasks"] == ["segmentation", "segmentation_ctpet"]
    assert single["matrix"][0][1] is None and single["matrix"][1][0] is None
    assert None not in (single["matrix"][0][0], single["matrix"][1][1])
    assert len(joint["matrix"]) == 1 and None not in joint["matrix"][0]
    assert naive["stages"] == ["segmentation", "pet"]
    continual = evaluate.evaluate_run(tmp_path / "run", write_predictions=False)
    # Stage 0 is shared: the same model file, not a retrained one.
    assert naive["matrix"][0][0] == single["matrix"][0][0] == continual["matrix"][0][0]
    first = [tmp_path / "run" / p / "stages" / "00-segmentation" / "model.keras"
             for p in ("", "baselines/naive", "baselines/single_task/segmentation")]
    assert len({path.read_bytes() for path in first}) == 1
    assert (tmp_path / "run" / "baselines" / "joint" / "model.keras").exists()
    loaded = evaluate.load_baselines(tmp_path / "run")
    assert set(loaded) == {"single_task", "naive", "joint"}
    report, summary, gain = evaluate.write_report(tmp_path / "run", continual, Run(tmp_path / "run").stage_records(),
                                                  loaded)
    # forward transfer is claimed only like for like and against a baseline better than chance
    row = evaluate.comparisons(continual, loaded)[0]
    assert row["claimed"] == (row["same_rule"] and not row["baseline_at_chance"])
    transfer = summary["forward_transfer_per_task"][0]
    if row["claimed"]:
        assert transfer == pytest.approx(continual["matrix"][0][0] - single["matrix"][0][0])
    else:
        assert transfer is None
    assert gain["ct_baseline_dice"] == single["matrix"][0][0]
    if gain["flags"]:
        assert "gain_vs_ct_baseline" not in gain
    else:
        low, high = gain["gain_vs_ct_baseline_ci"]
        assert low <= gain["gain_vs_ct_baseline"] <= high
    assert (report.parent / "matrix_joint.png").exists() and "## Baseline: naive" in report.read_text()


def test_cli_evaluate_prints_the_matrix(trained_run):
    _, run, _ = trained_run
    result = CliRunner().invoke(main, ["evaluate", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert "segmentation_ctpet" in result.output and "report:" in result.output and "forgetting +0.0000" in result.output
    missing = CliRunner().invoke(main, ["evaluate", "--run-dir", str(run), "--stage", "nope"])
    assert missing.exit_code == 1 and "stage 'nope' is not trained" in missing.output
