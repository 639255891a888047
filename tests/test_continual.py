"""Continual training through `train_stage`: protection, forgetting, distillation, resume,
feature caching, and the refusals."""

import json
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import PREP_8, UNICON_ORDER, Interrupt, patient_row, second_stage, write_manifest, write_pipeline

import unicon_tf
import unicon_tf.model
from unicon_tf import data, train
from unicon_tf.cli import main
from unicon_tf.model import model_parts
from unicon_tf.names import InvalidNameError
from unicon_tf.run import StageFolder


def outputs(model_path, batch):
    model = keras.models.load_model(model_path)
    return {k: np.asarray(v) for k, v in model({m: batch[m] for m in model.input}, training=False).items()}


@pytest.fixture(scope="module")
def batch(phantom_records):
    x, _ = next(iter(data.dataset(phantom_records, "test", batch_size=4)))
    return {m: v.numpy() for m, v in x.items()}


def test_all_four_stages_train_and_record_themselves(trained_run):
    pipeline, run, records = trained_run
    assert [r["head"] for r in records] == ["classification", "prognosis", "segmentation", "segmentation_ctpet"]
    assert records[3]["modalities"] == ["ct", "pet"]
    assert records[1]["teacher"]["stage"] == "classification" and records[0]["teacher"] is None
    for index, record in enumerate(records):
        folder = run / "stages" / f"{index:02d}-{record['stage']}"
        assert json.loads((folder / "stage.json").read_text())["data"]["fingerprint"] == record["data"]["fingerprint"]
        assert len(record["history"]) == 2 and all(np.isfinite(h["loss"]) for h in record["history"])
        assert not (folder / "checkpoint").exists()
    status = json.loads((run / "run.json").read_text())["stages"]
    assert [s["status"] for s in status.values()] == ["trained"] * 4
    final = keras.models.load_model(run / "stages" / "03-pet" / "model.keras")
    assert sorted(final.output) == ["classification", "prognosis", "segmentation", "segmentation_ctpet"]


def test_frozen_and_adapters_keep_old_heads_bit_identical(trained_run, batch):
    _, run, records = trained_run
    paths = [run / "stages" / f"{i:02d}-{r['stage']}" / "model.keras" for i, r in enumerate(records)]
    for before, after, record in zip(paths, paths[1:], records[1:]):
        old, new = outputs(before, batch), outputs(after, batch)
        for head in old:
            assert np.max(np.abs(new[head] - old[head])) == 0.0, f"{head} moved in stage {record['stage']}"
    # ...while the stage's own path did learn: its LoRA adapters start at zero (B = 0) and
    # only gradient steps move them; the new head's outputs differ between patients.
    for index, record in enumerate(records[1:3], start=1):
        encoder = model_parts(keras.models.load_model(paths[index]))["encoder"]
        up = [conv.adapter_weights(record["head"])[1] for conv in encoder.adaptable_layers]  # B, zero at the start
        assert up and any(np.any(np.asarray(b) != 0) for b in up), record["head"]
        assert np.std(outputs(paths[index], batch)[record["head"]]) > 0


def drift(run, batch, stage_dir, head="classification"):
    before = outputs(run / "stages/00-classification/model.keras", batch)[head]
    after = outputs(run / "stages" / stage_dir / "model.keras", batch)[head]
    return float(np.mean(np.abs(after - before)))


def test_frozen_prognosis_trains_on_cached_features(phantom_records, stage0_run, tmp_path, batch):
    record = second_stage(stage0_run, phantom_records, tmp_path, strategy="frozen")
    assert record["cached_features"] is True
    before = outputs(tmp_path / "run/stages/00-classification/model.keras", batch)
    after = outputs(tmp_path / "run/stages/01-prognosis/model.keras", batch)
    assert np.max(np.abs(after["classification"] - before["classification"])) == 0.0
    assert np.std(after["prognosis"]) > 0


def test_side_encoder_trains_on_cached_features_without_augmentation(phantom_records, stage0_run, tmp_path, batch):
    """A frozen segmentation head with a side encoder: without augmentation its volumes are
    cached beside the encoder's features (the backbone runs once per patient); with
    augmentation it trains on the volumes. Either way the old head stays bit-identical."""
    seg = {"name": "segmentation", "task": "segmentation", "strategy": "frozen", "side_encoder": 4}
    for augment in (False, True):
        folder = tmp_path / f"augment_{augment}"
        shutil.copytree(stage0_run, folder / "run")
        pipeline = write_pipeline(folder, phantom_records, stages=[UNICON_ORDER[0], {**seg, "augment": augment}],
                                  name="variants", epochs=1)
        record = train.train_stage(pipeline, "segmentation", folder / "run", verbose=0)
        assert record["cached_features"] is (not augment)
        before = outputs(folder / "run/stages/00-classification/model.keras", batch)
        after = outputs(folder / "run/stages/01-segmentation/model.keras", batch)
        assert np.max(np.abs(after["classification"] - before["classification"])) == 0.0
        # the side encoder learnt: its zero-initialised projections moved
        head = model_parts(keras.models.load_model(folder / "run/stages/01-segmentation/model.keras"))["heads"][
            "segmentation"]
        assert any(np.any(np.asarray(w) != 0) for p in head.side_projections for w in p.weights), augment


@pytest.fixture(scope="module")
def finetuned(phantom_records, stage0_run, tmp_path_factory, batch):
    """The prognosis stage trained once per protection on copies of `stage0_run`:
    `{label: (record, classification drift)}`. `alpha0` (finetune, no plugin) is also the
    unguarded reference of the penalties. Learning rate 1e-3: at 3e-3 the finetuned encoder's
    path is chaotic (float round-off in a normalisation layer moved the distilled drift from
    0.42 to 2.18), so the comparison would measure the trajectory, not the protection."""
    variants = {"naive": dict(strategy="naive"), "alpha0": dict(strategy="finetune", alpha=0.0),
                "alpha5": dict(strategy="finetune", alpha=5.0),
                "l2sp": dict(strategy="finetune", alpha=0.0, penalty="l2sp", beta=50.0),
                "ewc": dict(strategy="finetune", alpha=0.0, penalty="ewc", beta=5e4)}
    results = {}
    for label, stage in variants.items():
        folder = tmp_path_factory.mktemp(label)
        record = second_stage(stage0_run, phantom_records, folder, learning_rate=1e-3, **stage)
        results[label] = record, drift(folder / "run", batch, "01-prognosis")
    return results


@pytest.mark.slow
def test_naive_forgets_and_distillation_forgets_less(finetuned):
    drifts = {label: finetuned[label][1] for label in ("naive", "alpha0", "alpha5")}
    record = finetuned["alpha5"][0]
    assert [p["plugin"] for p in record["plugins"]] == ["Distillation"]
    # the per-head term is measured in training as in validation (it was logged as 0.0)
    assert all(h["classification_distillation"] > 0 and h["val_classification_distillation"] > 0
               for h in record["history"])
    assert drifts["naive"] > 1e-3  # the protection tests are not vacuous
    assert drifts["alpha0"] == pytest.approx(drifts["naive"])  # same seed, no plugin: the same run
    assert drifts["alpha5"] < 0.7 * drifts["alpha0"], drifts


@pytest.mark.slow
def test_distillation_after_the_pet_stage_reads_pet_in_a_ct_stage(phantom_records, trained_run, tmp_path):
    """A CT stage fine-tuned with LwF after the PET stage distils the CT+PET head too: its
    batches carry PET (they once carried only the new head's CT: "Missing data for input 'pet'")."""
    _, run, _ = trained_run
    shutil.copytree(run, tmp_path / "run")
    later = {"name": "relapse", "task": "prognosis", "head": "relapse", "strategy": "finetune", "alpha": 1.0,
             "epochs": 1}
    pipeline = write_pipeline(tmp_path, phantom_records, stages=UNICON_ORDER + [later])
    record = train.train_stage(pipeline, "relapse", tmp_path / "run", verbose=0)
    assert "segmentation_ctpet" in record["plugins"][0]["heads"]
    assert record["history"][0]["segmentation_ctpet_distillation"] > 0


@pytest.mark.slow
def test_l2sp_and_ewc_hold_the_encoder(stage0_run, finetuned):
    encoder_weights = len(model_parts(keras.models.load_model(stage0_run / "stages/00-classification/model.keras"))[
        "encoder"].base_weights())
    for penalty, beta in (("l2sp", 50.0), ("ewc", 5e4)):
        # finetune trains the whole encoder: the penalty holds every one of its base weights
        expected = {"plugin": "EWC" if penalty == "ewc" else "WeightPenalty", "kind": penalty, "beta": beta,
                    "variables": encoder_weights, **({"gamma": 1.0} if penalty == "ewc" else {})}
        assert finetuned[penalty][0]["plugins"] == [expected]
    fisher = train.load_fisher(StageFolder(stage0_run / "stages/00-classification"))
    assert fisher and all(np.all(f >= 0) for f in fisher.values()) and any(np.any(f > 0) for f in fisher.values())
    results = {penalty: finetuned[penalty][1] for penalty in ("l2sp", "ewc")}
    unguarded = finetuned["alpha0"][1]  # finetune, alpha 0, no penalty
    assert results["l2sp"] < 0.7 * unguarded and results["ewc"] < 0.7 * unguarded, (results, unguarded)


@pytest.mark.slow
def test_resumed_stage_matches_an_uninterrupted_one(phantom_records, tmp_path):
    # Dropout 0.5: its seed generators' state must be restored too, not only weights and optimizer.
    stages = [{"name": "classification", "task": "classification", "num_classes": 2, "dropout": 0.5}]
    weights, histories = {}, {}
    for label in ("straight", "resumed"):
        folder = tmp_path / label
        folder.mkdir()
        pipeline = write_pipeline(folder, phantom_records, stages=stages, epochs=3)
        if label == "resumed":
            with pytest.raises(KeyboardInterrupt):  # dies in epoch 2, after epoch 1's checkpoint
                train.train_stage(pipeline, "classification", folder / "run", verbose=0, callbacks=[Interrupt(1)])
            assert json.loads((folder / "run/stages/00-classification/checkpoint/state.json").read_text())["epoch"] == 1
            with pytest.raises(train.StageError, match="--resume"):
                train.train_stage(pipeline, "classification", folder / "run", verbose=0)
            record = train.train_stage(pipeline, "classification", folder / "run", verbose=0, resume=True)
        else:
            record = train.train_stage(pipeline, "classification", folder / "run", verbose=0)
        assert len(record["history"]) == 3
        model = keras.models.load_model(folder / "run/stages/00-classification/model.keras")
        weights[label] = [w.numpy() for w in model.weights]
        histories[label] = record["history"]
    # Same seed, same per-epoch data order, restored optimizer and dropout state: identical
    # losses and weights (1e-6 allows only for the order of float reductions).
    for straight, resumed in zip(histories["straight"], histories["resumed"]):
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert resumed[key] == pytest.approx(straight[key], rel=0, abs=1e-6, nan_ok=True), key
    for straight, resumed in zip(weights["straight"], weights["resumed"]):
        np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-6)


def test_refusals_name_the_problem(phantom_records, trained_run, stage0_run, tmp_path):
    pipeline_path, run, _ = trained_run
    with pytest.raises(train.StageError, match="already trained"):
        train.train_stage(pipeline_path, "prognosis", run, verbose=0)
    with pytest.raises(train.StageError, match="Stage 'prognosis' must be trained first"):
        train.train_stage(pipeline_path, "segmentation", tmp_path / "empty", verbose=0)
    other = write_pipeline(tmp_path, phantom_records, name="other")
    with pytest.raises(train.StageError, match="run of pipeline 'tiny', not 'other'"):
        train.train_stage(other, "prognosis", run, verbose=0)
    shutil.copytree(stage0_run, tmp_path / "r3")  # stage 0 of pipeline 'variants', as trained
    edited = write_pipeline(tmp_path, phantom_records, name="variants",
                            stages=[dict(UNICON_ORDER[0], num_classes=3)] + UNICON_ORDER[1:2])
    with pytest.raises(train.StageError, match="different definition of stage 'classification'"):
        train.train_stage(edited, "prognosis", tmp_path / "r3", verbose=0)
    with pytest.raises(train.PipelineError, match="Unknown strategy 'magic'"):
        train.train_stage(pipeline_path, "prognosis", tmp_path / "r", strategy="magic", verbose=0)
    with pytest.raises(train.PipelineError, match=r"learning_rate = 0.0 is out of range"):
        train.train_stage(pipeline_path, "classification", tmp_path / "r", learning_rate=0.0, verbose=0)
    with pytest.raises(train.PipelineError, match=r"stage 'pet': unknown key\(s\) \['colour'\]"):
        train.load_pipeline(write_pipeline(tmp_path, phantom_records, name="bad",
                                           stages=UNICON_ORDER[:3] + [dict(UNICON_ORDER[3], colour="red")]))


def test_data_without_the_stage_targets_or_modality_is_refused(tmp_path):
    manifest = write_manifest(tmp_path, [patient_row(tmp_path, "A", label=1), patient_row(tmp_path, "B", label=0)])
    data.ingest(manifest, tmp_path / "ct_only", PREP_8, verbose=False)
    stages = [{"name": "survival", "task": "prognosis"}]
    pipeline = write_pipeline(tmp_path, tmp_path / "ct_only", stages=stages, name="surv", input_shape=(8, 8, 8), depth=2)
    with pytest.raises(data.DataError, match=r"field time/event: the cohort has no \['time', 'event'\]"):
        train.train_stage(pipeline, "survival", tmp_path / "r1", verbose=0)
    stages = [{"name": "classification", "task": "classification"},
              {"name": "pet", "task": "classification", "modality": "pet", "head": "grade_ctpet"}]
    pipeline = write_pipeline(tmp_path, tmp_path / "ct_only", stages=stages, name="pet", input_shape=(8, 8, 8), depth=2)
    train.train_stage(pipeline, "classification", tmp_path / "r2", verbose=0)
    with pytest.raises(train.StageError, match=r"reads \['pet'\], but .*ct_only has only \['ct'\]"):
        train.train_stage(pipeline, "pet", tmp_path / "r2", verbose=0)


@pytest.mark.slow
def test_nan_loss_stops_names_the_step_and_keeps_the_checkpoint(phantom_records, tmp_path):
    stages = [{"name": "classification", "task": "classification"}]
    pipeline = write_pipeline(tmp_path, phantom_records, stages=stages, epochs=3)
    with pytest.raises(train.TrainingError, match=r"loss became nan at epoch \d+, step \d+") as caught:
        train.train_stage(pipeline, "classification", tmp_path / "run", learning_rate=1e38, verbose=0)
    assert "last good checkpoint" in str(caught.value)
    assert not (tmp_path / "run/stages/00-classification/model.keras").exists()
    checkpoint = tmp_path / "run/stages/00-classification/checkpoint/network.weights.npz"
    if checkpoint.exists():  # whatever epoch it holds, it is finite
        assert_finite_npz(checkpoint)
    # A lower learning rate recovers from the last good checkpoint (or from the start).
    record = train.train_stage(pipeline, "classification", tmp_path / "run", learning_rate=1e-3, resume=True, verbose=0)
    assert len(record["history"]) == 3 and np.isfinite(record["history"][-1]["loss"])
    model = keras.models.load_model(tmp_path / "run/stages/00-classification/model.keras")
    assert unicon_tf.model.non_finite_weights(model) == []


def assert_finite_npz(path):
    with np.load(path) as weights:
        arrays = [weights[name] for name in weights.files if name not in ("indices", "paths")]
    assert arrays and all(np.all(np.isfinite(a)) for a in arrays)


class BlowUpWeights(Interrupt):
    """At the end of an epoch, one adapter or head weight becomes NaN: an update that blew up
    on the epoch's last step, whose loss (computed before that update) was still finite."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at_epoch:
            weight = self.model.trainable_weights[-1]
            weight.assign(np.full(weight.shape, np.nan, np.float32))


@pytest.mark.slow
def test_non_finite_weights_are_never_checkpointed_or_saved(phantom_records, stage0_run, tmp_path):
    """Adapters whose weights became NaN with a finite loss: the epoch is refused, the last
    checkpoint stays the good one, and --resume with a lower learning rate recovers."""
    stages = [UNICON_ORDER[0], {"name": "segmentation", "task": "segmentation", "adapters": 2, "strategy": "adapters"}]
    pipeline = write_pipeline(tmp_path, phantom_records, stages=stages, name="variants", epochs=2)
    run = tmp_path / "run"
    shutil.copytree(stage0_run, run)
    with pytest.raises(train.TrainingError, match=r"weight\(s\) became non-finite in epoch 2 .*last good checkpoint: "
                                                  r"epoch 1") as caught:
        train.train_stage(pipeline, "segmentation", run, verbose=0, callbacks=[BlowUpWeights(1)])
    assert "--resume" in str(caught.value)
    folder = run / "stages/01-segmentation"
    assert not (folder / "model.keras").exists()
    assert json.loads((folder / "checkpoint/state.json").read_text())["epoch"] == 1
    assert_finite_npz(folder / "checkpoint/network.weights.npz")
    record = train.train_stage(pipeline, "segmentation", run, verbose=0, resume=True, learning_rate=1e-4)
    assert len(record["history"]) == 2
    assert unicon_tf.model.non_finite_weights(keras.models.load_model(folder / "model.keras")) == []


def test_names_a_signature_cannot_hold_are_refused_where_they_enter(phantom_records, tmp_path):
    for bad in ("t1-ce", "T1.post", "t1 ce"):
        for field, stage in (("modality", {"modality": bad, "head": "seg_mr"}), ("head", {"head": bad}),
                             ("modalities", {"modalities": ["ct", bad]})):
            stages = [UNICON_ORDER[0], {"name": "second", "task": "segmentation", **stage}]
            path = write_pipeline(tmp_path, phantom_records, stages=stages, name="names")
            with pytest.raises(train.PipelineError, match=rf"names.yaml: stage 'second': field '{field}': "
                                                          rf"(modality|head) name '{re.escape(bad)}' is not allowed"):
                train.load_pipeline(path)
            result = CliRunner().invoke(main, ["train", "--pipeline", str(path), "--stage", "classification",
                                               "--run-dir", str(tmp_path / "run")])
            assert result.exit_code == 1 and f"field '{field}'" in result.output and result.exception is not None
            assert "Traceback" not in result.output
        with pytest.raises(InvalidNameError, match="modality name"):
            unicon_tf.foundation((16, 16, 16), modality=bad, width=8, depth=3)
        with pytest.raises(InvalidNameError, match="head name"):
            unicon_tf.foundation((16, 16, 16), head_name=bad, width=8, depth=3)
        model = unicon_tf.foundation((16, 16, 16), width=8, depth=3)
        with pytest.raises(InvalidNameError, match="modality name"):
            unicon_tf.expand(model, task="segmentation", modality=bad)
        with pytest.raises(InvalidNameError, match="head name"):
            unicon_tf.expand(model, task="prognosis", name=bad)
    path = write_pipeline(tmp_path, phantom_records, stages=[UNICON_ORDER[0]], name="top")
    path.write_text(path.read_text().replace("modality: ct", "modality: CT"))
    with pytest.raises(train.PipelineError, match=r"top.yaml: field 'modality': modality name 'CT' is not allowed"):
        train.load_pipeline(path)


def test_cli_train_runs_a_stage_and_reports_errors(phantom_records, tmp_path):
    pipeline = write_pipeline(tmp_path, phantom_records, stages=UNICON_ORDER[:1], epochs=1)
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--pipeline", str(pipeline), "--stage", "classification",
                                  "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "stage 'classification'" in result.output and (tmp_path / "run/stages/00-classification/model.keras").exists()
    result = runner.invoke(main, ["train", "--pipeline", str(pipeline), "--stage", "nope",
                                  "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and "no stage 'nope'" in result.output


def test_a_train_step_is_traced_once(volumes, monkeypatch):
    """The optimizer is built before Keras traces the train step (`OptimizerBuiltFirst`):
    built inside the first trace, as Keras does on one device, its variables made
    TensorFlow trace the step twice."""
    from unicon_tf.train.continual import ContinualModel

    traces = []
    step = ContinualModel.train_step
    monkeypatch.setattr(ContinualModel, "train_step", lambda self, data: traces.append(1) or step(self, data))
    model = unicon_tf.foundation((16, 16, 16), task="segmentation", width=8, depth=2)
    trainer = ContinualModel(model, {"segmentation": "segmentation"})
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-3))
    mask = (np.abs(volumes["ct"][..., 0]) > 1.0).astype("int32")
    batches = tf.data.Dataset.from_tensors(({"ct": volumes["ct"]}, {"segmentation": mask})).repeat(2)
    trainer.fit(batches, epochs=2, verbose=0)
    assert len(traces) == 1 and trainer.optimizer.iterations.numpy() == 4
