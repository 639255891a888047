"""Issue 23: kinds of real-world fault, each closed by its right behaviour."""

import errno
import fcntl
import json
import os
import pathlib
import re
import stat
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import unicon_tf
from conftest import UNICON_ORDER, Interrupt, patient_row, write_manifest, write_pipeline
from unicon_tf import data, train
from unicon_tf.run import ResumeWithoutCheckpointWarning
from unicon_tf.train.continual import ContinualModel
from unicon_tf.train.distribute import replica_batches
from unicon_tf.train.precision import optimizer_for, set_precision

ROOT = pathlib.Path(__file__).resolve().parents[1]

# --- 1. every precision trains every task, on one device and under a strategy ------------

TASK_TARGETS = {
    "classification": lambda rng: np.array([0, 1, 1, 0], "int32"),
    "prognosis": lambda rng: np.array([[1.0, 1], [2.0, 0], [3.0, 1], [4.0, 1]], "float32"),
    "segmentation": lambda rng: (rng.uniform(size=(4, 8, 8, 8)) > 0.7).astype("int32"),
}


def _one_step(task, precision, strategy):
    """`(weights before, weights after, optimizer)` of one training step of a fresh 8^3 model."""
    rng = np.random.default_rng(0)
    x = {"ct": rng.normal(size=(4, 8, 8, 8, 1)).astype("float32")}
    y = {task: TASK_TARGETS[task](rng)}
    with strategy.scope() if strategy else tf.device("/cpu:0"):
        keras.utils.set_random_seed(0)
        network = unicon_tf.foundation((8, 8, 8), task=task, width=4, depth=2)
        set_precision(network, precision)
        trainer = ContinualModel(network, {task: task})
        trainer.compile(optimizer=optimizer_for(precision, keras.optimizers.SGD(0.1)))
        before = [np.asarray(v) for v in network.trainable_weights]
        make = lambda: tf.data.Dataset.from_tensors((x, y))  # noqa: E731
        data = replica_batches(strategy, make) if strategy else make()
        history = trainer.fit(data, epochs=1, verbose=0, shuffle=False, steps_per_epoch=1 if strategy else None)
    after = [np.asarray(v) for v in network.trainable_weights]
    return before, after, trainer.optimizer, history.history["loss"][-1]


@pytest.mark.parametrize("distributed", [False, True], ids=["one-device", "mirrored"])
@pytest.mark.parametrize("precision", ["float32", "mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("task", sorted(TASK_TARGETS))
def test_every_precision_trains_every_task(task, precision, distributed):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"]) if distributed else None
    before, after, optimizer, loss = _one_step(task, precision, strategy)
    assert np.isfinite(loss) and loss > 0
    assert all(np.all(np.isfinite(w)) for w in after)
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(after, before)]
    assert max(moved) > 0, "no gradient reached the weights"
    # the head's output layer: its gradient is never zero for a loss > 0
    assert moved[-1] > 0 or moved[-2] > 0
    if precision == "mixed_float16":
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        assert float(np.asarray(optimizer.dynamic_scale)) == 2.0 ** 15  # finite gradients: the scale is kept
        assert int(np.asarray(optimizer.inner_optimizer.iterations)) == 1  # and the step applied
    else:
        assert int(np.asarray(optimizer.iterations)) == 1


def test_loss_scale_skips_an_overflowing_step_and_halves():
    # mixed_float16's dynamic loss scale: a step whose scaled gradients overflow is skipped
    # (weights unchanged) and the scale halves; the next finite step applies.
    rng = np.random.default_rng(0)
    x = {"ct": rng.normal(size=(4, 8, 8, 8, 1)).astype("float32")}
    y = {"prognosis": TASK_TARGETS["prognosis"](rng)}
    keras.utils.set_random_seed(0)  # the same network whatever ran before in this process
    network = set_precision(unicon_tf.foundation((8, 8, 8), task="prognosis", width=4, depth=2), "mixed_float16")
    trainer = ContinualModel(network, {"prognosis": "prognosis"})
    trainer.compile(optimizer=optimizer_for("mixed_float16", keras.optimizers.SGD(0.1)), run_eagerly=True)
    trainer.optimizer.build(trainer.trainable_variables)
    trainer.optimizer.dynamic_scale.assign(3e38)  # scaled loss and gradients: inf
    before = [np.asarray(v) for v in network.trainable_weights]
    trainer.train_on_batch(x, y)
    assert float(np.asarray(trainer.optimizer.dynamic_scale)) == pytest.approx(1.5e38)
    assert int(np.asarray(trainer.optimizer.inner_optimizer.iterations)) == 0
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, network.trainable_weights))
    trainer.optimizer.dynamic_scale.assign(1.0)  # unscaled float16 gradients of this small network: finite
    trainer.train_on_batch(x, y)
    assert int(np.asarray(trainer.optimizer.inner_optimizer.iterations)) == 1
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, network.trainable_weights))


@pytest.mark.slow
def test_mixed_float16_stages_train_on_one_device(phantom_records, tmp_path):
    # The advertised option end to end: stage 0 (everything trains), then a finetune stage
    # with LwF (a float16 teacher).
    stages = [UNICON_ORDER[0], {"name": "prognosis", "task": "prognosis", "strategy": "finetune", "alpha": 0.5}]
    pipeline = write_pipeline(tmp_path, phantom_records, stages=stages, depth=2, epochs=1, precision="mixed_float16")
    for stage in stages:
        record = train.train_stage(pipeline, stage["name"], tmp_path / "run", verbose=0)
        assert record["spec"]["training"]["precision"] == "mixed_float16"
        assert all(np.isfinite(v) for k, v in record["history"][-1].items() if k.endswith("loss"))
    assert record["plugins"]
    model = keras.models.load_model(tmp_path / "run" / "stages" / "01-prognosis" / "model.keras")
    assert all(w.dtype == "float32" for w in model.weights)


# --- 2. the experiment's baselines: the kinds the CLI offers, on a two-stage grid ----------

EXPERIMENT_STAGES = [{"name": "classification", "task": "classification", "num_classes": 2},
                     {"name": "segmentation", "task": "segmentation", "adapters": 2, "strategy": "adapters"}]


@pytest.fixture(scope="module")
def records_8(phantom_cohort, tmp_path_factory):
    """The phantom cohort ingested at 8^3, 24 mm, cropped around the mask."""
    out = tmp_path_factory.mktemp("records8") / "ct8"
    prep = data.Preprocessing(shape=(8, 8, 8), spacing=(24.0, 24.0, 24.0), center="mask")
    data.ingest(phantom_cohort, out, prep, workers=1, verbose=False)
    return out


@pytest.fixture(scope="module")
def grid(records_8, tmp_path_factory):
    """A two-stage pipeline (classification, then segmentation with adapters) at 8^3, depth 2,
    1 epoch, and its experiment folder (shared by the baseline kinds: finished cells are kept)."""
    folder = tmp_path_factory.mktemp("grid")
    pipeline = write_pipeline(folder, records_8, stages=EXPERIMENT_STAGES, input_shape=(8, 8, 8), depth=2,
                              epochs=1, augment=False)
    return pipeline, folder / "out"


@pytest.mark.e2e
@pytest.mark.slow
def test_experiment_scores_the_naive_and_joint_baselines_per_patient(grid):
    """The kinds besides single_task (whose cells test_experiment scores per patient)."""
    from unicon_tf.cli import main

    pipeline, out = grid
    kinds = ("naive", "joint")
    # in this process: the warnings below are caught here (test_experiment runs a cell in a child)
    args = ["experiment", str(pipeline), "--folds", "2", "--seeds", "1", "--fractions", "1.0", "--out", str(out),
            "--in-process"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, args + [option for kind in kinds for option in ("--baselines", kind)])
    assert result.exit_code == 0, result.output
    # every cell runs with resume (an interrupted one continues): a fresh stage is no mistyped run directory
    assert not [w for w in caught if issubclass(w.category, ResumeWithoutCheckpointWarning)]
    folds = json.loads((out / "folds.json").read_text())["folds"]
    for kind in kinds:
        for fold in (0, 1):
            cell = json.loads((out / "cells" / f"fold{fold}" / "seed0" / "frac1" / kind / "cell.json").read_text())
            assert sorted(cell["predictions"]) == ["classification", "segmentation"], kind
            for prediction in cell["predictions"].values():
                assert sorted(prediction["patient_ids"]) == sorted(folds[fold]["test"])
            assert len(cell["predictions"]["segmentation"]["dice_per_patient"]) == len(folds[fold]["test"])
    assert set(kinds) <= {c["arm"] for c in json.loads((out / "experiment.json").read_text())["cells"]}


# --- 3. the head against the data's schema, before any training ------------------------------

def _cohort(folder, rows, mask_classes=2):
    """Ingest `rows` (conftest.patient_row dicts) at 8^3 into `folder / "data"`."""
    manifest = write_manifest(folder, rows)
    prep = data.Preprocessing(shape=(8, 8, 8), spacing=(2.0, 2.0, 2.0), mask_classes=mask_classes)
    data.ingest(manifest, folder / "data", prep, workers=1, verbose=False)
    return folder / "data"


def _blob(value=1, low=2):
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[low:low + 3, 2:5, 2:5] = value
    return mask


def _train_cli(pipeline, stage, run_dir, *extra):
    from unicon_tf.cli import main

    return CliRunner().invoke(main, ["train", "--pipeline", str(pipeline), "--stage", stage, "--run-dir", str(run_dir), *extra])


def test_a_head_that_does_not_fit_the_data_schema_is_refused_before_training(tmp_path):
    rows = [patient_row(tmp_path, f"P{i}", split=s, mask=_blob(1 + i % 3), label=i % 3, time=5.0 + i, event=i % 2)
            for i, s in enumerate(["train"] * 4 + ["val", "test"])]
    folder = _cohort(tmp_path, rows, mask_classes=4)
    stages = [{"name": "seg", "task": "segmentation", "num_classes": 2}]
    pipeline = write_pipeline(tmp_path, folder, stages=stages, input_shape=(8, 8, 8), depth=2, epochs=1)
    result = _train_cli(pipeline, "seg", tmp_path / "run")
    assert result.exit_code != 0 and "Traceback" not in result.output and "InvalidArgument" not in result.output
    message = " ".join(result.output.split())
    assert "Stage 'seg'" in message and str(folder) in message
    assert "field 'num_classes': the head has 2 classes, the data's masks have 4 (features.mask.classes)" in message
    assert not list((tmp_path / "run").rglob("model.keras")) and not list((tmp_path / "run").rglob("checkpoint"))
    # Second members of the kind: labels of 3 classes under a 2-class head; a grid and a
    # modality the data lacks, all in one error.
    stages = [{"name": "grade", "task": "classification", "num_classes": 2, "modality": "pet"}]
    pipeline = write_pipeline(tmp_path, folder, stages=stages, name="grade", input_shape=(16, 16, 16), depth=2)
    with pytest.raises(train.StageError) as caught:
        train.train_stage(pipeline, "grade", tmp_path / "run2", verbose=0)
    text = str(caught.value)
    assert "the head has 2 classes, the data's labels have 3 (features.label.classes)" in text
    assert "grid (input_shape): the model takes [16, 16, 16], the data holds [8, 8, 8]" in text
    assert "field 'modalities': the head reads ['pet'], but" in text and isinstance(caught.value, data.DataError)


# --- 4. a train split that cannot teach its task; a validation metric never measured --------

@pytest.mark.parametrize("task, reason", [
    ("prognosis", "has no event (4 patients, all censored)"),
    ("classification", "holds one class only (class 1, 4 patients)"),
    ("segmentation", "has only empty masks (4 patients, no foreground voxel)"),
    ("regression", "has one value only (0 mL in all 4 patients)"),  # a kind added as one module: its own check
])
def test_a_train_split_that_cannot_teach_its_task_is_refused_by_name(tmp_path, task, reason):
    # Train: every patient censored, of class 1, with an empty mask; val and test are fine.
    rows = [patient_row(tmp_path, f"T{i}", mask=np.zeros((8, 8, 8), np.uint8), label=1, time=3.0 + i, event=0)
            for i in range(4)]
    rows += [patient_row(tmp_path, f"V{i}", split=s, mask=_blob(), label=i % 2, time=2.0 + i, event=1)
             for i, s in enumerate(["val", "val", "test", "test"])]
    folder = _cohort(tmp_path, rows)
    pipeline = write_pipeline(tmp_path, folder, stages=[{"name": "only", "task": task}], input_shape=(8, 8, 8),
                              depth=2, epochs=1)
    result = _train_cli(pipeline, "only", tmp_path / "run")
    assert result.exit_code != 0 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert f"Stage 'only': the train split of {folder} {reason}" in message, message
    assert not list((tmp_path / "run").rglob("stage.json")) and not list((tmp_path / "run").rglob("checkpoint"))


def test_a_small_split_is_warned_about_and_an_unmeasured_validation_metric_is_not_blessed(tmp_path):
    from unicon_tf.evaluate import evaluate_stage
    from unicon_tf.train.checks import validation_never_measured

    # 3 training patients under a batch of 4; the val split has one class (AUC: NaN every
    # epoch), which best_val selects on.
    rows = [patient_row(tmp_path, f"T{i}", label=i % 2) for i in range(3)]
    rows += [patient_row(tmp_path, f"V{i}", split="val", label=0) for i in range(2)]
    rows += [patient_row(tmp_path, f"X{i}", split="test", label=i % 2) for i in range(4)]
    folder = _cohort(tmp_path, rows)
    stages = [{"name": "grade", "task": "classification", "batch_size": 4, "select": "best_val",
               "monitor": "metric"}]  # (monitor: auto would watch the loss on 2 validation patients)
    pipeline = write_pipeline(tmp_path, folder, stages=stages, input_shape=(8, 8, 8), depth=2, epochs=2)
    with pytest.warns(data.DataWarning) as caught:
        record = train.train_stage(pipeline, "grade", tmp_path / "run", verbose=0)
    notes = [str(w.message) for w in caught if issubclass(w.category, data.DataWarning)]
    assert any(re.search(r"train split of .* has 3 patient\(s\), fewer than a batch \(batch_size: 4\)", n)
               for n in notes), notes
    assert any("val split of" in n and "holds one class only ({0: 2}): its AUC cannot be measured" in n
               for n in notes), notes
    assert all(np.isnan(logs["val_classification_auc"]) for logs in record["history"])
    assert "never measurable" in validation_never_measured(record)
    blessing = evaluate_stage(tmp_path / "run" / "stages" / "00-grade")["blessing"]
    assert blessing["blessed"] is False
    assert any("monitored val_classification_auc, which was never measurable (NaN at every one of 2 epoch(s))" in r
               for r in blessing["reasons"]), blessing


# --- 5. resuming under a changed definition or data; a checkpoint that does not fit -----------

def _interrupted(folder, records, **defaults):
    """A one-stage pipeline interrupted after its first epoch (checkpoint written); its path."""
    stages = [{"name": "grade", "task": "classification"}]
    pipeline = write_pipeline(folder, records, stages=stages, input_shape=(8, 8, 8), depth=2, epochs=2,
                              augment=False, **defaults)
    with pytest.raises(KeyboardInterrupt):
        train.train_stage(pipeline, "grade", folder / "run", verbose=0, callbacks=[Interrupt(1)])
    assert (folder / "run" / "stages" / "00-grade" / "checkpoint" / "state.json").exists()
    return pipeline


def _edit(pipeline, **changes):
    import yaml

    spec = yaml.safe_load(pipeline.read_text())
    for key, value in changes.items():
        where, _, field = key.rpartition(".")
        target = {"stage": spec["stages"][0], "encoder": spec["encoder"]}[where]
        target[field] = value
    pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))


def test_run_resumes_an_interrupted_stage_as_its_refusal_says(records_8, tmp_path):
    from unicon_tf.cli import main

    pipeline = _interrupted(tmp_path, records_8)
    arguments = ["run", str(pipeline), "--run-dir", str(tmp_path / "run"), "--base", str(tmp_path / "served"),
                 "--no-push"]
    refused = CliRunner().invoke(main, arguments)
    assert refused.exit_code == 1 and "pass --resume (unicon-tf train or run)" in refused.output
    resumed = CliRunner().invoke(main, arguments + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    stage = tmp_path / "run" / "stages" / "00-grade"
    assert len(json.loads((stage / "stage.json").read_text())["history"]) == 2  # epoch 1 kept, epoch 2 trained
    assert (stage / "model.keras").exists() and not (stage / "checkpoint").exists()


def test_resume_refuses_a_changed_definition_or_data_unless_accepted(records_8, phantom_cohort, tmp_path):
    other = tmp_path / "ct8-20mm"
    data.ingest(phantom_cohort, other, data.Preprocessing(shape=(8, 8, 8), spacing=(20.0,) * 3, center="mask"),
                workers=1, verbose=False)
    pipeline = _interrupted(tmp_path, records_8)
    _edit(pipeline, **{"stage.learning_rate": 0.01, "stage.data": str(other)})
    checkpoint = tmp_path / "run" / "stages" / "00-grade" / "checkpoint"
    before = (checkpoint / "state.json").read_text()
    result = _train_cli(pipeline, "grade", tmp_path / "run", "--resume")
    message = " ".join(result.output.split())
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "training.learning_rate: 0.001 -> 0.01" in message and f"-> '{other}'" in message, message
    assert "--accept-changes" in message and (checkpoint / "state.json").read_text() == before
    result = _train_cli(pipeline, "grade", tmp_path / "run", "--resume", "--accept-changes")
    assert result.exit_code == 0, result.output
    assert "resumed after epoch 1 with changes (accepted)" in result.output
    # 9. Progress suited to where it goes: not a terminal, so one plain line per epoch.
    assert "Epoch 2/2" in result.output and not {"\x1b", "\b", "\r"} & set(result.output), repr(result.output)
    record = json.loads((tmp_path / "run" / "stages" / "00-grade" / "stage.json").read_text())
    (entry,) = record["resume_changes"]
    assert entry["after_epoch"] == 1 and entry["changes"]["training.learning_rate"] == [0.001, 0.01]
    assert entry["changes"]["data"] == [str(records_8), str(other)]
    lineage = json.loads((tmp_path / "run" / "lineage.json").read_text())
    trainer = lineage["executions"]["Trainer.grade"]
    assert trainer["parameters"]["accept_changes"] is True
    assert trainer["outputs"]["model"]["properties"]["resume_changes"] == record["resume_changes"]


def test_a_checkpoint_that_does_not_fit_the_model_is_a_clear_error(records_8, tmp_path):
    pipeline = _interrupted(tmp_path, records_8)
    _edit(pipeline, **{"encoder.width": 6})
    result = _train_cli(pipeline, "grade", tmp_path / "run", "--resume")
    assert result.exit_code != 0 and "encoder.width: 8 -> 6" in " ".join(result.output.split())
    result = _train_cli(pipeline, "grade", tmp_path / "run", "--resume", "--accept-changes")
    message = " ".join(result.output.split())
    assert result.exit_code != 0 and "Traceback" not in result.output and "objects could not be loaded" not in message
    assert "does not fit the stage's model (changed since it was written: encoder.width)" in message, message
    assert len(result.output) < 2000
    # Another member: --accept-changes without --resume is refused up front.
    result = _train_cli(pipeline, "grade", tmp_path / "other", "--accept-changes")
    assert result.exit_code != 0 and "--accept-changes applies to --resume only" in result.output


# --- 6. serving versions never go backwards; labels of missing versions ----------------------

def test_versions_never_go_backwards_and_labels_of_deleted_versions_are_dropped(tmp_path):
    import shutil

    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from unicon_tf import serving

    def config():
        text = (tmp_path / "models.config").read_text()
        (entry,) = text_format.Parse(text, model_server_config_pb2.ModelServerConfig()).model_config_list.config
        return entry

    model = unicon_tf.foundation((8, 8, 8), task="prognosis", width=4, depth=2)
    for label in ("stable", "canary"):
        version = serving.export_model(model, tmp_path, "tiny")
        serving.update_models_config(tmp_path, "tiny", labels={label: int(version.name)})
    assert dict(config().version_labels) == {"stable": 1, "canary": 2}
    shutil.rmtree(tmp_path / "tiny" / "2")  # deleted by hand
    assert serving.next_version(tmp_path / "tiny") == 3
    version = serving.export_model(model, tmp_path, "tiny")
    assert version.name == "3"
    with pytest.warns(serving.ServingWarning, match=r"dropped label 'canary' -> version 2: no such version folder"):
        serving.update_models_config(tmp_path, "tiny", labels={"latest": 3})
    assert dict(config().version_labels) == {"stable": 1, "latest": 3}
    # Other members: an explicit version at or below the highest ever claimed, a label on
    # a missing version, the highest remembered after every folder is gone.
    with pytest.raises(serving.ExportError, match=r"version 2 of .* is not above the highest version ever claimed"):
        serving.export_model(model, tmp_path, "tiny", version=2)
    with pytest.raises(serving.ExportError, match=r"labels \{'canary': 2\} point at versions of 'tiny' that"):
        serving.update_models_config(tmp_path, "tiny", labels={"canary": 2})
    for folder in ("1", "3"):
        shutil.rmtree(tmp_path / "tiny" / folder)
    assert serving.next_version(tmp_path / "tiny") == 4
    with pytest.warns(serving.ServingWarning, match=r"label 'latest' -> version 3, label 'stable' -> version 1"):
        serving.update_models_config(tmp_path, "tiny")
    assert dict(config().version_labels) == {}


# --- 8. names our rules allow and an engine refuses -------------------------------------------

def test_stage_and_source_names_compile_for_kfp_or_are_refused_with_the_reason(tmp_path):
    import yaml

    from unicon_tf.cli import main

    spec = yaml.safe_load((ROOT / "pipelines" / "chest_ct.yaml").read_text())
    spec["name"] = "3D.chest-ct"
    for stage, name in zip(spec["stages"], ["seg-2", "cls.v1", "2nd", "pet"]):
        stage["name"] = name
    spec["stages"][1]["data"] = "other/ct"  # a second examples parameter, named after cls.v1
    spec["sources"] = {"lesion-32": {"manifest": "m.csv", "shape": [32, 32, 32], "spacing": [3, 3, 3]}}
    spec["stages"][3]["data"] = "lesion-32"
    path = tmp_path / "names.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    output = tmp_path / "names.json"
    result = CliRunner().invoke(main, ["compile", str(path), "--target", "kfp", "--output", str(output)])
    assert result.exit_code == 0, result.output
    compiled = json.loads(output.read_text())
    assert compiled["pipelineInfo"]["name"] == "3d-chest-ct"
    assert sorted(compiled["root"]["inputDefinitions"]["parameters"]) == [
        "cls_v1_examples", "lesion_32_manifest", "model_name", "seg_2_examples", "serving_base"]
    assert "Trainer.2nd" in result.output and "Trainer.cls.v1" in result.output  # display names keep ours
    # Two names one engine merges are refused, naming both; a source name that is no folder name too.
    spec["stages"][2]["name"], spec["stages"][2]["data"] = "seg_2", "third/ct"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = CliRunner().invoke(main, ["compile", str(path), "--target", "kfp", "--output", str(output)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "parameter names 'seg-2_examples' and 'seg_2_examples' are both 'seg_2_examples'" in result.output
    spec["sources"] = {"../up": spec["sources"]["lesion-32"]}
    spec["stages"][3]["data"] = "../up"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(train.PipelineError, match=r"sources: field 'name': source name '../up' is not allowed"):
        train.load_pipeline(path)


# --- 9. progress output suited to where it goes ----------------------------------------------

def test_progress_is_plain_when_not_a_terminal():
    import io

    from unicon_tf._quiet import progress_verbosity

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_verbosity(1, io.StringIO()) == 2 and progress_verbosity(1, Terminal()) == 1
    assert progress_verbosity(0, io.StringIO()) == 0 and progress_verbosity(2, Terminal()) == 2


# --- 7. ingestion memory per patient; running out of memory is a patient's error --------------

def test_ingestion_peak_memory_per_patient_is_bounded(tmp_path):
    import sys
    import tracemalloc

    import nibabel as nib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ingest_memory

    # A 160 x 160 x 120 int16 CT (6 MB) with a NIfTI intercept and a uint8 mask of the same grid
    # (smaller volumes are dominated by fixed buffers: gzip, SciPy).
    manifest, ct_bytes, _ = ingest_memory.write_patient(tmp_path, (160, 160, 120))
    assert nib.load(str(tmp_path / "ct.nii.gz")).get_data_dtype() == np.int16
    peak, _, _ = ingest_memory.measure(manifest)
    assert peak <= 3 * ct_bytes, f"peak {peak / ct_bytes:.2f}x the CT's voxel bytes"
    # The values are still right: the lesion (stored 1144, intercept -1024: 120 HU) is inside the crop.
    from unicon_tf.data.examples import process_patient
    from unicon_tf.data.manifest import read_manifest

    cohort = read_manifest(manifest)
    result = process_patient(cohort.patients[0], data.Preprocessing((16, 16, 16), (6.0,) * 3, center="mask"),
                             cohort.targets)
    assert result[1]["foreground"] > 0
    assert not tracemalloc.is_tracing()


def test_running_out_of_memory_is_a_patient_error_that_skip_bad_handles(tmp_path, monkeypatch):
    import importlib

    from unicon_tf.cli import main

    examples_module = importlib.import_module("unicon_tf.data.examples")
    ingest_module = importlib.import_module("unicon_tf.data.ingest")  # the package's `ingest` is the function

    rows = [patient_row(tmp_path, f"P{i}", label=i % 2) for i in range(3)]
    manifest = write_manifest(tmp_path, rows)
    real = examples_module.preprocess_patient

    def hungry(patient, preprocessing):
        if patient.patient_id == "P1":
            raise MemoryError("Unable to allocate 2.93 GiB for an array")
        return real(patient, preprocessing)

    monkeypatch.setattr(examples_module, "preprocess_patient", hungry)
    args = ["ingest", str(manifest), "--shape", "8", "8", "8", "--spacing", "2", "2", "2", "--workers", "1"]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "strict")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "patient P1" in result.output and "ran out of memory" in result.output and "field ct" in result.output
    assert not (tmp_path / "strict").exists()
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "skipped"), "--skip-bad"])
    assert result.exit_code == 0, result.output
    rejected = (tmp_path / "skipped" / "rejected.csv").read_text()
    assert "P1,train" in rejected and "ran out of memory" in rejected
    assert json.loads((tmp_path / "skipped" / "schema.json").read_text())["splits"]["train"]["count"] == 2
    # The default worker count follows the memory available per patient.
    cohort = ingest_module.read_manifest(manifest)
    assert ingest_module.default_workers(cohort, available=1) == 1
    assert ingest_module.default_workers(cohort, available=2**40) == (ingest_module.os.cpu_count() or 1)


def test_resume_without_a_checkpoint_says_it_trains_from_the_start(phantom_records, tmp_path):
    # A mistyped --run-dir: nothing to resume from. It trains, but not silently.
    pipeline = write_pipeline(tmp_path, phantom_records, stages=[UNICON_ORDER[0]], depth=2, epochs=1)
    with pytest.warns(UserWarning, match=r"Stage 'classification': --resume, but .*checkpoint holds no checkpoint: "
                                         r"training from epoch 1"):
        record = train.train_stage(pipeline, "classification", tmp_path / "typo", verbose=0, resume=True)
    assert len(record["history"]) == 1


# --- 10. a run or experiment folder another process is using ----------------------------------

HOLD_FOLDER = """
import sys
from unicon_tf import files
if sys.argv[2] == "nfs":
    files.fcntl = NoFolderLocks()
with files.folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


class NoFolderLocks:
    """`fcntl` as on NFS, whose flock (byte-range locks) refuses a folder opened read-only."""

    LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

    def flock(self, descriptor, operation):
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return fcntl.flock(descriptor, operation)


def hold_folder(folder, file_system="local"):
    """`(holder process, its pid)`: another process holding `folder`'s lock until its stdin closes."""
    import inspect
    import subprocess
    import sys

    script = "import errno, fcntl, os, stat\n" + inspect.getsource(NoFolderLocks) + HOLD_FOLDER
    holder = subprocess.Popen([sys.executable, "-c", script, str(folder), file_system],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder, holder.pid


@pytest.fixture
def held_folder(tmp_path):
    """`(folder, holder's pid)`: a folder whose lock another process holds for the test."""
    holder, pid = hold_folder(tmp_path / "busy")
    yield tmp_path / "busy", pid
    holder.communicate("")  # closing stdin ends the holder, and its lock with it


FOLDER_COMMANDS = {  # what each command calls the work it is refused
    "run": "run", "train": "run", "baselines": "run", "evaluate": "evaluation", "experiment": "experiment",
    "demo": "demo"}


@pytest.mark.parametrize("command", sorted(FOLDER_COMMANDS))
def test_a_folder_in_use_by_another_process_is_refused_before_any_write(command, held_folder, phantom_records,
                                                                         tmp_path):
    from unicon_tf.cli import main
    from unicon_tf.files import LOCK_FILE

    folder, pid = held_folder
    pipeline = write_pipeline(tmp_path, phantom_records, stages=UNICON_ORDER[:2])
    arguments = {"run": ["run", str(pipeline), "--run-dir", str(folder), "--no-push"],
                 "train": ["train", "--pipeline", str(pipeline), "--stage", "classification", "--run-dir", str(folder)],
                 "baselines": ["baselines", "--pipeline", str(pipeline), "--run-dir", str(folder),
                               "--kind", "single_task"],
                 "evaluate": ["evaluate", "--run-dir", str(folder)],
                 "experiment": ["experiment", str(pipeline), "--folds", "2", "--out", str(folder), "--in-process"],
                 "demo": ["demo", "--fast", "--out", str(folder), "--base", str(tmp_path / "served")]}
    result = CliRunner().invoke(main, arguments[command])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit, result.output
    what = FOLDER_COMMANDS[command]
    assert f"{folder} is in use by another unicon-tf process (pid {pid})" in result.output
    assert f"then start this {what} again" in result.output
    assert [p.name for p in folder.iterdir()] == [LOCK_FILE]  # nothing ingested, trained or recorded


def test_a_folder_lock_ends_with_its_process(held_folder):
    import os
    import signal

    from unicon_tf.files import LOCK_FILE, FolderInUseError, folder_lock

    folder, pid = held_folder
    with pytest.raises(FolderInUseError, match=f"pid {pid}"):
        with folder_lock(folder):
            pass
    (folder / LOCK_FILE).unlink()  # the file only names the holder: the lock is the folder's
    with pytest.raises(FolderInUseError, match="pid unknown"):
        with folder_lock(folder):
            pass
    os.kill(pid, signal.SIGKILL)  # a killed run leaves no stale lock
    os.waitpid(pid, 0)
    with folder_lock(folder, "run") as lock:
        assert lock.read_text() == f"{os.getpid()}\n"


def test_a_folder_that_cannot_be_made_is_a_clear_error(phantom_records, tmp_path):
    from unicon_tf.cli import main

    pipeline = write_pipeline(tmp_path, phantom_records, stages=UNICON_ORDER[:1])
    (tmp_path / "a_file").write_text("")
    result = CliRunner().invoke(main, ["run", str(pipeline), "--run-dir", str(tmp_path / "a_file" / "run")])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert f"{tmp_path / 'a_file' / 'run'}: cannot create this folder for the run (Not a directory)" in result.output


def test_baselines_train_and_evaluate_in_a_fresh_run_directory(phantom_records, tmp_path):
    from unicon_tf.cli import main

    pipeline = write_pipeline(tmp_path, phantom_records, stages=UNICON_ORDER[:1], epochs=1, depth=2)
    result = CliRunner().invoke(main, ["baselines", "--pipeline", str(pipeline), "--run-dir", str(tmp_path / "run"),
                                       "--kind", "single_task"])
    assert result.exit_code == 0, result.output
    matrix = json.loads((tmp_path / "run" / "baselines" / "single_task" / "evaluation" / "matrix.json").read_text())
    assert matrix["tasks"] == ["classification"] and matrix["pipeline"] == "tiny"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["stages"] == {}  # no continual stage trained


def test_where_folders_cannot_be_locked_the_lock_file_is_the_lock(tmp_path, monkeypatch):
    from unicon_tf import files

    monkeypatch.setattr(files, "fcntl", NoFolderLocks())
    holder, pid = hold_folder(tmp_path / "nfs", "nfs")
    try:
        with pytest.raises(files.FolderInUseError, match=f"pid {pid}"):
            with files.folder_lock(tmp_path / "nfs"):
                pass
    finally:
        holder.communicate("")
    with files.folder_lock(tmp_path / "nfs") as lock:  # the holder's end released it
        assert lock.read_text() == f"{os.getpid()}\n"


def test_a_forked_child_does_not_keep_its_parents_folder_locked(tmp_path):
    from unicon_tf.files import folder_lock

    with folder_lock(tmp_path):
        reader, writer = os.pipe()
        started_reader, started_writer = os.pipe()
        child = os.fork()
        if child == 0:  # a fork pool's worker, still running after the block
            os.close(writer)
            os.write(started_writer, b"1")  # os.fork has returned here: the fork hooks have run
            os.read(reader, 1)
            os._exit(0)
        assert os.read(started_reader, 1) == b"1"
        for descriptor in (reader, started_reader, started_writer):
            os.close(descriptor)
    try:
        with folder_lock(tmp_path) as lock:  # a new acquisition: refused if the child held the old one
            assert lock.read_text() == f"{os.getpid()}\n"
    finally:
        os.close(writer)
        os.waitpid(child, 0)


def test_another_thread_is_refused_like_another_process(tmp_path):
    import threading

    from unicon_tf.files import FolderInUseError, folder_lock

    errors = []

    def other_thread():
        try:
            with folder_lock(tmp_path):
                pass
        except FolderInUseError as error:
            errors.append(str(error))

    with folder_lock(tmp_path):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert errors == [f"{tmp_path} is in use by another thread of this process (pid {os.getpid()}): wait for it "
                      "to finish, then start this run again."]
    thread = threading.Thread(target=other_thread)  # released: the other thread gets it now
    thread.start()
    thread.join()
    assert len(errors) == 1
