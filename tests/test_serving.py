"""Serving: signatures, parity, versions, models.config, warmup, metadata, sliding window,
NIfTI prediction on the input's grid, and the refusals."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

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
def versions(evaluated_run, tmp_path_factory):
    """The final stage exported twice into one base: version 1 labelled `stable` with an
    example request, then version 2 labelled `canary`; with version 1's digest taken before
    version 2 was written."""
    base = tmp_path_factory.mktemp("versions") / "saved_models"
    first = serving.export_stage(evaluated_run, base=base, labels=["stable"], example_request=True)
    before = tree_digest(first)
    second = serving.export_stage(evaluated_run, base=base, labels=["canary"])
    return {"base": base, "first": first, "first_digest": before, "second": second}


@pytest.fixture(scope="module")
def exported(versions):
    """The final stage's export, for the tests that only read it."""
    return versions["second"]


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_export_versions_signatures_config_and_warmup(versions, evaluated_run):
    base, first, second = versions["base"], versions["first"], versions["second"]
    assert first == base / "tiny" / "1"
    assert second == base / "tiny" / "2"
    assert tree_digest(first) == versions["first_digest"]  # version 1 untouched by version 2, byte for byte
    assert sorted(p.name for p in (base / "tiny").iterdir()) == [serving.HIGHEST, "1", "2"]  # no staging folder left

    loaded = tf.saved_model.load(str(second))  # the signature defs TF Serving reads (saved_model_cli shows them)
    signatures = loaded.signatures
    assert {"serving_default", "classification", "prognosis", "segmentation", "segmentation_ctpet"} <= set(signatures)
    assert {"classification_probabilities", "prognosis_risk", "segmentation_ctpet_label_map"} <= set(
        signatures["serving_default"].structured_outputs)
    assert sorted(signatures["serving_default"].structured_input_signature[1]) == ["ct", "pet"]
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


@pytest.mark.slow
def test_export_refusals(evaluated_run, tmp_path):
    run = tmp_path / "run"  # a copy of its own: the shared fixture stays as it is
    shutil.copytree(evaluated_run, run)
    # stage 0 (one head: a quick export) stands for any stage
    blessing_file = Evaluation(Run(run).trained_stages("classification")[-1].evaluation).blessing_file
    blessing_file.write_text(json.dumps({"stage": "classification", "blessed": False,
                                         "reasons": ["classification: below its threshold"]}))
    with pytest.raises(serving.ExportError, match="not blessed: classification: below its threshold"):
        serving.export_stage(run, "classification", base=tmp_path / "sm")
    assert not (tmp_path / "sm").exists()  # refused before anything is written
    forced = serving.export_stage(run, "classification", base=tmp_path / "sm", force=True)
    assert json.loads((forced / "unicon.json").read_text())["forced"] is True
    blessing_file.unlink()
    with pytest.raises(serving.ExportError, match="has not been evaluated"):
        serving.export_stage(run, "classification", base=tmp_path / "sm")
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


def test_predict_reads_trailing_singleton_dimensions_as_3d(exported, phantom_cohort, tmp_path):
    ct = phantom_cohort.parent / "images/P0000_ct.nii.gz"
    source = nib.load(str(ct))
    stored = tmp_path / "ct_x_y_z_1.nii.gz"
    nib.save(nib.Nifti1Image(source.get_fdata()[..., None, None], source.affine), str(stored))
    plain = serving.predict_nifti(exported, {"ct": ct}, tmp_path / "plain")
    singleton = serving.predict_nifti(exported, {"ct": stored}, tmp_path / "singleton")
    plain_class, singleton_class = plain["heads"]["classification"], singleton["heads"]["classification"]
    assert singleton_class["class"] == plain_class["class"]
    np.testing.assert_allclose(singleton_class["probabilities"], plain_class["probabilities"], rtol=1e-6)
    assert singleton["heads"]["segmentation"]["voxels"] == plain["heads"]["segmentation"]["voxels"]
    written = nib.load(singleton["heads"]["segmentation"]["label_map"])
    assert written.shape == source.shape[:3]


def test_predict_refuses_what_ingest_refuses(exported, phantom_cohort, tmp_path):
    from unicon_tf import data

    folder = phantom_cohort.parent / "images"
    pet = nib.load(str(folder / "P0000_pet.nii.gz"))
    far = pet.affine.copy()
    far[:3, 3] += [800.0, 0.0, 0.0]  # a PET from elsewhere: no overlap with the CT
    moved = tmp_path / "far_pet.nii.gz"
    nib.save(nib.Nifti1Image(pet.get_fdata(), far), str(moved))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", "--saved-model", str(exported), "--ct", str(folder / "P0000_ct.nii.gz"),
                                       "--pet", str(moved), "--out", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # no traceback
    assert str(moved) in result.output and "field pet" in result.output and "covers 0%" in result.output
    assert not out.exists()
    # Ingestion refuses the very same file with the very same reason.
    prep = data.Preprocessing.from_json(json.loads((exported / "unicon.json").read_text())["preprocessing"])
    with pytest.raises(data.DataError) as caught:
        data.resample_patient({"ct": folder / "P0000_ct.nii.gz", "pet": moved}, prep, patient="P0000")
    assert caught.value.reason in result.output


def test_predict_wants_the_per_patient_factor_the_model_was_trained_with(exported, phantom_cohort, tmp_path):
    folder = phantom_cohort.parent / "images"
    images = {"ct": folder / "P0000_ct.nii.gz", "pet": folder / "P0000_pet.nii.gz"}
    trained_with_suv = tmp_path / "version"
    shutil.copytree(exported, trained_with_suv)
    info = json.loads((trained_with_suv / "unicon.json").read_text())
    assert info["scaling"] == {}  # the phantom's PET is in SUV already
    info["scaling"] = {"pet": "SUVbw = Bq/mL * weight_kg * 1000 / injected_dose_bq"}
    (trained_with_suv / "unicon.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="scaled per patient.*--scale pet"):
        serving.predict_nifti(trained_with_suv, images, tmp_path / "refused")
    # The PET given in Bq/mL with its factor predicts as the PET already in SUV.
    bq = tmp_path / "pet_bq.nii.gz"
    pet = nib.load(str(images["pet"]))
    nib.save(nib.Nifti1Image(pet.get_fdata() * 4000.0, pet.affine), str(bq))
    scaled = serving.predict_nifti(trained_with_suv, {**images, "pet": bq}, tmp_path / "scaled",
                                   scales={"pet": 1 / 4000.0})
    suv = serving.predict_nifti(exported, images, tmp_path / "suv")
    assert scaled["heads"]["segmentation_ctpet"]["voxels"] == suv["heads"]["segmentation_ctpet"]["voxels"]


EXPORT_WHEN_BOTH_READY = """
import pathlib, sys, time
from unicon_tf import serving
run, base, label, barrier = sys.argv[1:]
pathlib.Path(barrier, label).touch()
while len(list(pathlib.Path(barrier).iterdir())) < 2:  # start both exports at the same moment
    time.sleep(0.01)
print(serving.export_stage(run, "classification", base=base, labels=[label]))  # one head: claiming is the point
"""


@pytest.mark.slow
def test_concurrent_exports_get_distinct_versions_and_both_labels(evaluated_run, tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    base, barrier = tmp_path / "sm", tmp_path / "barrier"
    barrier.mkdir()
    dead = subprocess.run(["python", "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = base / "tiny" / f".partial-1-{int(dead.stdout)}"  # left by an export that was killed
    (stale / "variables").mkdir(parents=True)
    (base / "tiny" / ".claim-1").write_text(json.dumps({"host": __import__("socket").gethostname(),
                                                         "pid": int(dead.stdout)}))
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    exports = [subprocess.Popen([sys.executable, "-c", EXPORT_WHEN_BOTH_READY, str(evaluated_run), str(base),
                                 label, str(barrier)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for label in ("stable", "canary")]
    results = [p.communicate() + (p.returncode,) for p in exports]
    assert all(code == 0 for _, _, code in results), [err[-2000:] for _, err, _ in results]
    versions = {label: int(pathlib.Path(out.strip().splitlines()[-1]).name)
                for label, (out, _, _) in zip(("stable", "canary"), results)}
    assert sorted(versions.values()) == [1, 2]
    assert sorted(p.name for p in (base / "tiny").iterdir()) == [serving.HIGHEST, "1", "2"]  # no claim, no partial left
    config = text_format.Parse((base / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (entry,) = config.model_config_list.config
    assert dict(entry.version_labels) == versions
    assert entry.model_version_policy.WhichOneof("policy_choice") == "all"


def test_models_config_update_keeps_the_version_policy(tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    (tmp_path / "models.config").write_text(
        'model_config_list { config { name: "tiny" base_path: "/models/tiny" model_platform: "tensorflow" '
        'model_version_policy { specific { versions: 1 } } version_labels { key: "stable" value: 1 } } '
        'config { name: "other" base_path: "/models/other" model_platform: "tensorflow" '
        'model_version_policy { latest { num_versions: 2 } } } }')
    serving.update_models_config(tmp_path, "tiny", labels={"canary": 2})
    serving.update_models_config(tmp_path, "other", labels={"stable": 3})
    config = text_format.Parse((tmp_path / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    tiny, other = config.model_config_list.config
    assert list(tiny.model_version_policy.specific.versions) == [1, 2]  # pinned; the labelled version added
    assert dict(tiny.version_labels) == {"stable": 1, "canary": 2}
    assert other.model_version_policy.latest.num_versions == 2 and dict(other.version_labels) == {"stable": 3}


def test_export_refuses_names_a_signature_cannot_hold_and_non_finite_weights(tmp_path, monkeypatch):
    # A model built before the name rule (or by hand): the check at build time is bypassed.
    monkeypatch.setattr(sys.modules["unicon_tf.model.foundation"], "check_name", lambda name, kind: name)
    for modality, head in (("t1-ce", "classification"), ("ct", "T1.post"), ("t1 ce", "grade")):
        model = unicon_tf.foundation((16, 16, 16), modality=modality, head_name=head, width=8, depth=3)
        bad = modality if modality != "ct" else head
        with pytest.raises(serving.ExportError, match=f"name '{bad}' is not allowed"):
            serving.export_model(model, tmp_path / "sm", "names")
    model = unicon_tf.foundation((16, 16, 16), width=8, depth=3)
    kernel = model.get_layer("classification").dense.kernel
    kernel.assign(np.where(np.arange(kernel.shape[0])[:, None] == 0, np.nan, kernel.numpy()))
    with pytest.raises(serving.ExportError, match=r"1 non-finite weight\(s\) \(e\.g\. .*dense/kernel"):
        serving.export_model(model, tmp_path / "sm", "nan")
    assert not (tmp_path / "sm" / "nan").exists() or not any((tmp_path / "sm" / "nan").iterdir())
    assert not (tmp_path / "sm" / "names").exists()


def test_served_signatures_assert_the_volume_shape_like_tf_serving_sees_it(exported):
    """TF Serving runs the graph without checking shapes: feed it through a raw session callable."""
    from tensorflow.core.protobuf import config_pb2

    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta = tf.compat.v1.saved_model.load(session, ["serve"], str(exported))
        signature = meta.signature_def["segmentation_ctpet"]
        options = config_pb2.CallableOptions(feed=[signature.inputs[m].name for m in ("ct", "pet")],
                                             fetch=[signature.outputs["label_map"].name])
        run = session._make_callable_from_options(options)
        good = np.zeros((1, 16, 16, 16, 1), np.float32)
        assert run(good, good)[0].shape == (1, 16, 16, 16)
        for bad in (np.zeros((1, 32, 32, 32, 1), np.float32), good[..., 0], good[..., None]):
            with pytest.raises(tf.errors.InvalidArgumentError,
                               match=r"input pet: expected shape \(batch, 16, 16, 16, 1\), got"):
                run(good, bad)
