"""Serving: signatures, parity, versions, models.config, warmup, metadata, sliding window,
NIfTI prediction on the input's grid, and the refusals."""

import hashlib
import json
import shutil
import subprocess

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import unicon_tf
from unicon_tf import evaluate, serving
from unicon_tf.cli import main
from unicon_tf.run import Evaluation, Run


@pytest.fixture(scope="module")
def evaluated_run(trained_run, tmp_path_factory):
    """A copy of the trained run, evaluated (so its stages carry blessings)."""
    _, run, _ = trained_run
    copy = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(run, copy)
    evaluate.evaluate_run(copy, write_predictions=False)
    return copy


@pytest.fixture(scope="module")
def exported(evaluated_run, tmp_path_factory):
    """The final stage exported once, for the tests that only read it."""
    return serving.export_stage(evaluated_run, base=tmp_path_factory.mktemp("sm"))


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_export_versions_signatures_config_and_warmup(evaluated_run, tmp_path):
    base = tmp_path / "saved_models"
    first = serving.export_stage(evaluated_run, base=base, labels=["stable"], example_request=True)
    assert first == base / "tiny" / "1"
    before = tree_digest(first)
    second = serving.export_stage(evaluated_run, base=base, labels=["canary"])
    assert second == base / "tiny" / "2"
    assert tree_digest(first) == before  # version 1 untouched, byte for byte
    assert sorted(p.name for p in (base / "tiny").iterdir()) == ["1", "2"]  # no staging folder left

    shown = subprocess.run(["saved_model_cli", "show", "--dir", str(second), "--all"],
                           capture_output=True, text=True, check=True).stdout
    for signature in ("serving_default", "classification", "prognosis", "segmentation", "segmentation_ctpet"):
        assert f"signature_def['{signature}']" in shown
    for output in ("classification_probabilities", "prognosis_risk", "segmentation_ctpet_label_map"):
        assert f"outputs['{output}']" in shown
    assert "inputs['pet']" in shown and "inputs['ct']" in shown

    loaded = tf.saved_model.load(str(second))
    assert sorted(loaded.signatures["prognosis"].structured_input_signature[1]) == ["ct"]
    model = keras.models.load_model(evaluated_run / "stages/03-pet/model.keras")
    rng = np.random.default_rng(3)
    batch = {m: rng.uniform(-1, 1, (2, 16, 16, 16, 1)).astype(np.float32) for m in ("ct", "pet")}
    expected = model(batch, training=False)
    served = loaded.signatures["segmentation_ctpet"](ct=tf.constant(batch["ct"]), pet=tf.constant(batch["pet"]))
    np.testing.assert_allclose(served["probabilities"].numpy(), tf.nn.softmax(expected["segmentation_ctpet"]).numpy(),
                               atol=1e-5)
    risk = loaded.signatures["prognosis"](ct=tf.constant(batch["ct"]))["risk"].numpy()
    np.testing.assert_allclose(risk, np.asarray(expected["prognosis"]), atol=1e-5)
    info = json.loads((second / "unicon.json").read_text())
    assert info["stage"] == "pet" and info["preprocessing"]["shape"] == [16, 16, 16]
    assert info["parity_max_abs_diff"] <= 1e-5 and info["blessing"]["blessed"]

    from google.protobuf import text_format
    from tensorflow_serving.apis import prediction_log_pb2
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse((base / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (entry,) = config.model_config_list.config
    assert entry.name == "tiny" and entry.base_path == "/models/tiny" and entry.model_platform == "tensorflow"
    assert dict(entry.version_labels) == {"stable": 1, "canary": 2}
    records = list(tf.data.TFRecordDataset(str(second / "assets.extra" / "tf_serving_warmup_requests")))
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]
    assert sorted(log.predict_log.request.model_spec.signature_name for log in logs) == sorted(info["signatures"])
    assert all(log.predict_log.request.model_spec.name == "tiny" for log in logs)
    request = json.loads((first / "request.json").read_text())
    assert request["signature_name"] == "serving_default"
    assert np.asarray(request["instances"][0]["ct"]).shape == (16, 16, 16, 1)


def test_export_refusals(evaluated_run, tmp_path):
    run = tmp_path / "run"  # a copy of its own: the shared fixture stays as it is
    shutil.copytree(evaluated_run, run)
    blessing_file = Evaluation(Run(run).trained_stages()[-1].evaluation).blessing_file
    blessing_file.write_text(json.dumps({"stage": "pet", "blessed": False, "reasons": ["classification: fell"]}))
    with pytest.raises(serving.ExportError, match="not blessed: classification: fell"):
        serving.export_stage(run, base=tmp_path / "sm")
    assert not (tmp_path / "sm").exists()  # refused before anything is written
    forced = serving.export_stage(run, base=tmp_path / "sm", force=True)
    assert json.loads((forced / "unicon.json").read_text())["forced"] is True
    blessing_file.unlink()
    with pytest.raises(serving.ExportError, match="has not been evaluated"):
        serving.export_stage(run, base=tmp_path / "sm")
    model = keras.models.load_model(evaluated_run / "stages/00-classification/model.keras")
    with pytest.raises(serving.ExportError, match="already exists"):
        serving.export_model(model, tmp_path / "sm", "tiny", version=1)
    result = CliRunner().invoke(main, ["export", "--run-dir", str(evaluated_run), "--stage", "nope",
                                       "--base", str(tmp_path / "sm")])
    assert result.exit_code == 1 and "stage 'nope' is not trained" in result.output


def test_request_checks_name_the_input(exported):
    signature = tf.saved_model.load(str(exported)).signatures["segmentation_ctpet"]
    good = np.zeros((1, 16, 16, 16, 1), np.float32)
    serving.check_request(signature, {"ct": good, "pet": good})
    with pytest.raises(ValueError, match="input 'pet': rank 4"):
        serving.check_request(signature, {"ct": good, "pet": good[..., 0]})
    with pytest.raises(ValueError, match=r"input 'ct': shape \(1, 8, 16, 16, 1\)"):
        serving.check_request(signature, {"ct": good[:, :8], "pet": good})
    with pytest.raises(ValueError, match="input 'ct': dtype float64, expected float32"):
        serving.check_request(signature, {"ct": good.astype(np.float64), "pet": good})
    with pytest.raises(ValueError, match=r"lacks input\(s\) \['pet'\]"):
        serving.check_request(signature, {"ct": good})


def test_sliding_window_matches_a_full_volume_pass_away_from_borders():
    """Not bit-identical by nature: GroupNorm statistics are taken over each input (patch
    or whole volume) and patches see zero padding at their borders. Away from the volume's
    borders the blended patches agree closely with one fully convolutional pass."""
    keras.utils.set_random_seed(0)
    model = unicon_tf.foundation((32, 32, 32), task="segmentation", width=8, depth=2)
    volume = np.random.default_rng(0).uniform(-1, 1, (72, 72, 72)).astype(np.float32)  # 2.25x the patch

    def patches(batch):
        return tf.nn.softmax(model(batch, training=False)["segmentation"]).numpy()

    blended = serving.sliding_window(patches, {"ct": volume}, (32, 32, 32), overlap=0.5)
    big = keras.Input((72, 72, 72, 1), name="ct")
    parts = unicon_tf.model.model_parts(model)
    full_model = keras.Model(big, parts["heads"]["segmentation"](parts["encoder"](parts["stems"]["ct"](big))))
    full = tf.nn.softmax(full_model(volume[None, ..., None])).numpy()[0]
    inner = (slice(16, 56),) * 3
    assert np.mean(np.abs(blended[inner] - full[inner])) < 0.03
    assert np.mean(np.argmax(blended[inner], -1) == np.argmax(full[inner], -1)) > 0.95
    small = serving.sliding_window(patches, {"ct": volume[:10, :12, :40]}, (32, 32, 32))
    assert small.shape == (10, 12, 40, 2)


def test_predict_writes_json_and_label_maps_on_the_input_grid(exported, phantom_cohort, tmp_path):
    version = exported
    folder = phantom_cohort.parent
    ct, pet = folder / "images/P0000_ct.nii.gz", folder / "images/P0000_pet.nii.gz"
    result = CliRunner().invoke(main, ["predict", "--saved-model", str(version), "--ct", str(ct), "--pet", str(pet),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    prediction = json.loads((tmp_path / "out" / "prediction.json").read_text())
    heads = prediction["heads"]
    assert len(heads["classification"]["probabilities"]) == 2 and np.isfinite(heads["prognosis"]["risk"])
    source = nib.load(str(ct))
    for head in ("segmentation", "segmentation_ctpet"):
        written = nib.load(heads[head]["label_map"])
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine)  # LPS-stored input: same affine back
    ct_only = serving.predict_nifti(version, {"ct": ct}, tmp_path / "ct_only")
    assert "skipped" in ct_only["heads"]["segmentation_ctpet"]
