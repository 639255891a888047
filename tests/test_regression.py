"""The regression task kind (lesion volume) end to end: train a stage, evaluate it with its
metric, export its SavedModel signature and predict with it."""

import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import UNICON_ORDER, write_pipeline

from unicon_tf import data, evaluate, serving, train
from unicon_tf.run import Run
from unicon_tf.tasks import task_kind
from unicon_tf.tasks.regression import r_squared


def test_regression_target_is_the_lesion_volume_in_ml(phantom_records):
    """The target of each patient is its mask's foreground voxels times the voxel volume
    (12 mm spacing: 1.728 mL a voxel)."""
    every = data.dataset(phantom_records, "train", batch_size=64, shuffle=False)
    volumes = data.dataset(phantom_records, "train", task="regression", batch_size=64, shuffle=False)
    (_, targets), (_, values) = next(iter(every)), next(iter(volumes))
    voxels = np.sum(targets["mask"].numpy() > 0, axis=(1, 2, 3))
    assert voxels.min() > 0
    np.testing.assert_allclose(values.numpy(), voxels * 1.728, rtol=1e-5)


@pytest.mark.slow
def test_regression_stage_trains_evaluates_exports_and_predicts(stage0_run, phantom_records, phantom_cohort, tmp_path):
    shutil.copytree(stage0_run, tmp_path / "run")
    stages = [UNICON_ORDER[0], {"name": "volume", "task": "regression", "head": "volume", "strategy": "finetune", "epochs": 3,
                                "learning_rate": 3e-3, "loss": {"error": "squared"}}]
    pipeline = write_pipeline(tmp_path, phantom_records, stages=stages, name="variants")
    record = train.train_stage(pipeline, "volume", tmp_path / "run", verbose=0)
    assert {"volume_r2", "volume_mae", "val_volume_r2"} <= set(record["history"][-1])
    assert record["history"][-1]["volume_loss"] < record["history"][0]["volume_loss"]

    result = evaluate.evaluate_stage(Run(tmp_path / "run").stage(1, "volume"), previous_row=[0.5])
    assert result["tasks"] == ["classification", "volume"] and result["task_kinds"][-1] == "regression"
    scores = result["metrics"][-1]
    assert result["row"][-1] == scores["r2"] and scores["chance"] == 0.0 and scores["patients"] > 2
    assert scores["r2"] == pytest.approx(float(r_squared(scores["target"], np.ravel(scores["output"]))))
    assert scores["mae"] == pytest.approx(np.mean(np.abs(np.subtract(scores["target"], np.ravel(scores["output"])))))
    assert evaluate.score("regression", scores["target"], scores["output"])["r2"] == scores["r2"]

    exported = serving.export_stage(tmp_path / "run", base=tmp_path / "saved_models", force=True)
    signature = tf.saved_model.load(str(exported)).signatures["volume"]
    assert set(signature.structured_outputs) == {"value"}
    assert "volume_value" in tf.saved_model.load(str(exported)).signatures["serving_default"].structured_outputs

    ct = phantom_cohort.parent / "images" / "P0000_ct.nii.gz"
    prediction = serving.predict_nifti(exported, {"ct": ct}, tmp_path / "predicted")
    assert set(prediction["heads"]["volume"]) == {"value"} and np.isfinite(prediction["heads"]["volume"]["value"])
    assert task_kind("regression").metric_names[task_kind("regression").main_metric] == "R^2"


def test_a_pipeline_checks_a_regression_stage_through_the_kind_registry(phantom_records, tmp_path):
    """`regression` is declared only in its module: a pipeline file checks its loss and
    head options against its `TaskKind` and head, naming the field."""
    stage = {"name": "volume", "task": "regression", "loss": {"error": "squared"}}
    spec = train.load_pipeline(write_pipeline(tmp_path, phantom_records, stages=[UNICON_ORDER[0], stage]))
    assert spec.stages[1].training.loss == {"error": "squared"}
    for bad, message in (({"loss": {"error": "absolute"}}, r"stage 'volume'.*loss option error = 'absolute'"),
                         ({"pooling": "sum"}, r"stage 'volume': head options .*pooling"),
                         ({"num_classes": 2}, r"stage 'volume': unknown key\(s\) \['num_classes'\]"),
                         ({"sampling": {"foreground_probability": 0.5}}, r"segmentation stages only")):
        pipeline = write_pipeline(tmp_path, phantom_records, stages=[UNICON_ORDER[0], {**stage, **bad}])
        with pytest.raises(train.PipelineError, match=message):
            train.load_pipeline(pipeline)
