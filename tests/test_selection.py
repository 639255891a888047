"""Model selection on validation: `epochs` as a maximum, early stopping (`patience`), the
best-on-validation weights kept (`select: best_val`), through checkpoints and --resume."""

import json

import keras
import numpy as np
import pytest
from conftest import PREP_8, Interrupt, patient_row, write_manifest, write_pipeline

from unicon_tf import data, train
from unicon_tf.model import model_parts
from unicon_tf.train.selection import Selection

STAGE = [{"name": "classification", "task": "classification", "num_classes": 2}]


class Sabotage(keras.callbacks.Callback):
    """From epoch `start` (0-based) on, sets the head to call every patient class 0 with
    logits 50 apart before the epoch trains, so that validation is far worse than at the
    epochs before: the best epoch is known."""

    def __init__(self, start=1):
        super().__init__()
        self.start = start

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= self.start:
            head = model_parts(self.model.network)["heads"]["classification"]
            for weight in head.weights:
                if weight.path.endswith("dense/kernel"):
                    weight.assign(np.zeros(weight.shape, "float32"))
                if weight.path.endswith("dense/bias"):
                    weight.assign(np.array([25.0, -25.0], "float32"))


class Snapshots(keras.callbacks.Callback):
    """The network's weights at the end of every epoch (1-based)."""

    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch + 1] = [np.array(w) for w in self.model.network.weights]


def test_selection_state_machine():
    loss = Selection("p", "prognosis", "best_val", patience=None, monitor="loss", max_epochs=4)
    assert loss.key == "val_p_loss" and loss.mode == "min"
    assert [loss.update(e, {"val_p_loss": v}) for e, v in enumerate([2.0, float("nan"), 1.0, 1.0], 1)] == [
        True, False, True, False]  # NaN and ties are no improvement
    assert not loss.stop() and loss.kept_epoch(4) == 3
    record = loss.record(4)
    assert (record["stopped"], record["epoch"], record["best"]) == ("max_epochs", 3, 1.0)
    assert record["reason"] == "max epochs (4) reached; kept epoch 3 of 4, the best val_p_loss (1.0000)"
    resumed = Selection("p", "prognosis", "best_val", None, "loss", 4, state=json.loads(json.dumps(loss.state())))
    assert resumed.state() == loss.state()
    last = Selection("s", "segmentation", "last", patience=1, monitor="metric", max_epochs=9)
    assert last.key == "val_s_dice"  # the per-patient mean Dice
    last.update(1, {"val_s_dice": 0.5}), last.update(2, {"val_s_dice": 0.4})
    assert last.stop() and last.record(2)["epoch"] == 2 and last.record(2)["stopped"] == "early_stop"


@pytest.mark.slow
def test_best_val_keeps_the_best_epoch_and_stops_early(phantom_records, tmp_path):
    pipeline = write_pipeline(tmp_path, phantom_records, stages=STAGE, epochs=6, select="best_val", patience=2,
                              monitor="loss")
    snapshots = Snapshots()
    record = train.train_stage(pipeline, "classification", tmp_path / "run", verbose=0,
                               callbacks=[Sabotage(1), snapshots])
    selection = record["selection"]
    losses = [h["val_classification_loss"] for h in record["history"]]
    assert len(losses) == 3 and losses[0] < min(losses[1:])  # the sabotage made epochs 2 and 3 worse
    assert selection["epoch"] == selection["best_epoch"] == 1 and selection["epochs_run"] == 3
    assert selection["stopped"] == "early_stop" and selection["monitor"] == "val_classification_loss"
    assert selection["reason"].startswith("early stop: val_classification_loss did not improve for 2 epoch(s)")
    saved = keras.models.load_model(tmp_path / "run/stages/00-classification/model.keras")
    for kept, weight in zip(snapshots.weights[1], saved.weights):
        np.testing.assert_array_equal(np.asarray(weight), kept)
    assert any(not np.array_equal(a, b) for a, b in zip(snapshots.weights[3], snapshots.weights[1]))
    assert json.loads((tmp_path / "run/stages/00-classification/stage.json").read_text())["selection"] == selection


@pytest.mark.slow
def test_select_last_keeps_the_last_epoch_and_patience_still_stops(phantom_records, tmp_path):
    pipeline = write_pipeline(tmp_path, phantom_records, stages=STAGE, epochs=5, select="last", patience=1,
                              monitor="loss")
    snapshots = Snapshots()
    record = train.train_stage(pipeline, "classification", tmp_path / "run", verbose=0,
                               callbacks=[Sabotage(1), snapshots])
    assert record["selection"]["select"] == "last" and record["selection"]["epoch"] == 2
    assert record["selection"]["stopped"] == "early_stop" and len(record["history"]) == 2
    saved = keras.models.load_model(tmp_path / "run/stages/00-classification/model.keras")
    for kept, weight in zip(snapshots.weights[2], saved.weights):
        np.testing.assert_array_equal(np.asarray(weight), kept)


@pytest.mark.slow
def test_resume_keeps_the_best_epoch_and_patience_counter(phantom_records, tmp_path):
    results = {}
    for label in ("straight", "resumed"):
        folder = tmp_path / label
        folder.mkdir()
        pipeline = write_pipeline(folder, phantom_records, stages=STAGE, epochs=5, select="best_val", patience=2,
                                  monitor="loss")
        if label == "resumed":  # dies in epoch 3, after epoch 2's checkpoint (best: epoch 1, 1 epoch waited)
            with pytest.raises(KeyboardInterrupt):
                train.train_stage(pipeline, "classification", folder / "run", verbose=0,
                                  callbacks=[Sabotage(1), Interrupt(2)])
            state = json.loads((folder / "run/stages/00-classification/checkpoint/state.json").read_text())
            assert state["selection"]["best_epoch"] == 1 and state["selection"]["wait"] == 1
            record = train.train_stage(pipeline, "classification", folder / "run", verbose=0, resume=True,
                                       callbacks=[Sabotage(1)])
        else:
            record = train.train_stage(pipeline, "classification", folder / "run", verbose=0, callbacks=[Sabotage(1)])
        model = keras.models.load_model(folder / "run/stages/00-classification/model.keras")
        results[label] = record["selection"], [np.asarray(w) for w in model.weights]
    assert results["resumed"][0] == results["straight"][0]
    assert results["straight"][0]["epoch"] == 1 and results["straight"][0]["epochs_run"] == 3
    for straight, resumed in zip(results["straight"][1], results["resumed"][1]):
        np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("select", "best", r"stage 'classification': select must be one of \['best_val', 'last'\], got 'best'"),
    ("patience", 0, r"stage 'classification': patience must be a whole number of epochs >= 1, got 0"),
    ("monitor", "auc", r"stage 'classification': monitor must be one of \['auto', 'metric', 'loss'\], got 'auc'"),
    ("min_epochs", 0, r"stage 'classification': min_epochs must be a whole number of epochs >= 1, got 0"),
    ("smoothing", 1.5, r"stage 'classification': smoothing must be a whole number of epochs >= 1, got 1.5"),
])
def test_bad_selection_keys_are_refused_naming_file_and_field(tmp_path, key, value, message):
    pipeline = write_pipeline(tmp_path, tmp_path / "data", stages=[{**STAGE[0], key: value}])
    with pytest.raises(train.PipelineError, match=str(pipeline).replace(".", r"\.") + ": " + message):
        train.load_pipeline(pipeline)


def test_best_val_without_a_val_split_is_refused(tmp_path):
    rows = [patient_row(tmp_path, pid, split, label=i % 2) for i, (pid, split) in
            enumerate([("A", "train"), ("B", "train"), ("C", "test")])]
    data.ingest(write_manifest(tmp_path, rows), tmp_path / "no_val", PREP_8, verbose=False)
    pipeline = write_pipeline(tmp_path, tmp_path / "no_val", stages=STAGE, input_shape=(8, 8, 8), depth=2,
                              select="best_val")
    with pytest.raises(train.StageError, match=r"select: best_val, patience: None need a 'val' split, and .*no_val"):
        train.train_stage(pipeline, "classification", tmp_path / "run", verbose=0)
    assert not (tmp_path / "run/stages/00-classification/model.keras").exists()


def test_a_spec_at_default_selection_keeps_its_json_and_round_trips(tmp_path):
    pipeline = train.load_pipeline(write_pipeline(tmp_path, tmp_path / "data", stages=STAGE))
    spec = pipeline.stages[0]
    assert not {"select", "patience", "monitor"} & set(spec.to_json()["training"])  # old fingerprints hold
    assert type(pipeline).from_json(json.loads(json.dumps(pipeline.to_json()))) == pipeline
    chosen = train.load_pipeline(write_pipeline(tmp_path, tmp_path / "data", stages=STAGE, select="best_val",
                                                patience=3))
    assert {"select": "best_val", "patience": 3}.items() <= chosen.stages[0].to_json()["training"].items()


def test_a_baseline_reuses_a_continual_stage_only_if_it_kept_what_best_val_keeps(tmp_path):
    from unicon_tf.train.baselines import _selected_as

    spec = train.load_pipeline(write_pipeline(tmp_path, tmp_path / "data", stages=STAGE, epochs=3,
                                              monitor="metric")).stages[0]
    splits = {"train": {"count": 40}, "val": {"count": 16}}  # unset select: best_val, as there is a val split

    def record(aucs, kept):
        history = [{"loss": 1.0, "val_classification_auc": a} for a in aucs]
        return {"head": "classification", "task": "classification", "spec": {"training": {"epochs": 3}},
                "history": history, "selection": {"epochs_run": len(aucs), "epoch": kept}}

    assert _selected_as(spec, record([0.6, 0.7, 0.8], kept=3), splits)  # select: last kept the best epoch
    assert not _selected_as(spec, record([0.6, 0.9, 0.8], kept=3), splits)  # best_val would keep epoch 2
    assert _selected_as(spec, record([0.6, 0.9, 0.8], kept=2), splits)
    old = record([0.6, 0.7, 0.8], kept=3)
    del old["selection"]  # a stage trained before selection kept its last epoch
    assert _selected_as(spec, old, splits)
