"""NIfTI -> TFRecord -> tensors: values, grids, alignment, and every kind of bad input."""

import csv
import gzip
import json
import math

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from conftest import PREP_8, RAS_2MM, patient_row, write_manifest, write_nifti

import unicon_tf.names
from unicon_tf import data
from unicon_tf.cli import main
from unicon_tf.data.preprocess import resample


def test_round_trip_preserves_values_grid_and_targets(tmp_path):
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1200, 1200, (8, 8, 8)).astype(np.float32)
    pet = rng.uniform(0, 25, (8, 8, 8)).astype(np.float32)
    mask = (rng.random((8, 8, 8)) > 0.7).astype(np.uint8)
    rows = [patient_row(tmp_path, "A", ct=ct, pet=pet, mask=mask, label=1, time=12.5, event=1),
            patient_row(tmp_path, "B", split="test", pet=pet, mask=mask, label=0, time=3.0, event=0)]
    schema = data.ingest(write_manifest(tmp_path, rows), tmp_path / "out", PREP_8, workers=1, verbose=False)
    assert schema["preprocessing"]["spacing"] == [2.0, 2.0, 2.0]
    assert schema["features"]["image/ct"] == {"dtype": "float32", "shape": [8, 8, 8, 1], "range": [-1.0, 1.0]}
    assert json.loads((tmp_path / "out" / "schema.json").read_text()) == schema

    inputs, targets, meta = next(iter(data.dataset(tmp_path / "out", "train", with_meta=True, batch_size=1)))
    expected_ct = np.clip(ct, -1000, 1000) / 1000.0
    np.testing.assert_allclose(inputs["ct"][0, ..., 0].numpy(), expected_ct, atol=1e-5)
    np.testing.assert_allclose(inputs["pet"][0, ..., 0].numpy(), np.clip(pet, 0, 20) / 10.0 - 1.0, atol=1e-5)
    np.testing.assert_array_equal(targets["mask"][0].numpy(), mask)
    assert targets["label"].numpy().tolist() == [1] and targets["event"].numpy().tolist() == [1]
    assert targets["time"].numpy()[0] == pytest.approx(12.5)
    np.testing.assert_allclose(meta["affine"][0].numpy(), RAS_2MM)
    assert meta["patient_id"].numpy()[0] == b"A"

    # Parsed records agree with raw TFRecord reading by tf.data.
    raw = list(tf.data.TFRecordDataset(str(tmp_path / "out" / "test-00000.tfrecord.gz"), "GZIP"))
    assert len(raw) == 1 and b"B" in raw[0].numpy()


def test_resampling_a_linear_ramp_is_exact_inside(tmp_path):
    # f = 3x - 2y + z in world mm, on a 1 mm grid; resampled onto 2 mm voxel centres.
    index = np.indices((20, 20, 20)).astype(np.float64)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ramp = 3 * index[0] - 2 * index[1] + index[2]
    grid, shape = data.preprocess.reference_grid(ramp, affine, (2.0, 2.0, 2.0))
    assert shape == (10, 10, 10)
    out = resample(ramp, affine, grid, shape, order=1, fill=0.0)
    world = np.indices(shape).reshape(3, -1) * 2.0 + grid[:3, 3:4]
    expected = (3 * world[0] - 2 * world[1] + world[2]).reshape(shape)
    np.testing.assert_allclose(out[1:-1, 1:-1, 1:-1], expected[1:-1, 1:-1, 1:-1], atol=1e-9)
    # Nearest-neighbour for label maps keeps only existing labels.
    labels = (index[0] > 9).astype(np.float64) * 2
    assert set(np.unique(resample(labels, affine, grid, shape, order=0, fill=0))) <= {0.0, 2.0}


def test_pet_lands_on_the_ct_grid_through_shifted_affines(tmp_path):
    ct = np.full((16, 16, 16), 40.0, np.float32)
    ct_affine = np.diag([-2.0, -2.0, 2.0, 1.0])  # LPS voxel order, as many scanners store it
    ct_affine[:3, 3] = [15.0, 15.0, -15.0]
    hot_world = np.array([-3.0, 5.0, 7.0])
    pet_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    pet_affine[:3, 3] = [-17.0, -13.0, -11.0]  # a different origin and spacing
    pet = np.zeros((9, 9, 9), np.float32)
    hot_index = np.round(np.linalg.inv(pet_affine) @ np.append(hot_world, 1.0))[:3].astype(int)
    pet[tuple(hot_index)] = 10.0
    hot_world = (pet_affine @ np.append(hot_index, 1.0))[:3]
    rows = [{"patient_id": "A", "split": "train",
             "ct": write_nifti(tmp_path / "ct.nii.gz", ct, ct_affine),
             "pet": write_nifti(tmp_path / "pet.nii.gz", pet, pet_affine)}]
    prep = data.Preprocessing(shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0))
    result = data.preprocess_patient(data.read_manifest(write_manifest(tmp_path, rows)).patients[0], prep)
    # The output affine is RAS with the CT's field of view.
    np.testing.assert_allclose(np.diag(result["affine"])[:3], [2.0, 2.0, 2.0])
    np.testing.assert_allclose(result["affine"][:3, 3], [-15.0, -15.0, -15.0])
    volume = result["images"]["pet"] + 1.0
    centroid = np.array(np.nonzero(volume)).T.astype(float)
    weights = volume[volume > 0]
    center_voxel = (centroid * weights[:, None]).sum(0) / weights.sum()
    center_world = (result["affine"] @ np.append(center_voxel, 1.0))[:3]
    np.testing.assert_allclose(center_world, hot_world, atol=1.0)


def test_flipped_storage_gives_the_same_volume(tmp_path):
    rng = np.random.default_rng(4)
    ct = rng.uniform(-1000, 1000, (8, 8, 8)).astype(np.float32)
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    lps[:3, 3] = [14.0, 14.0, 0.0]  # the same world box as RAS_2MM
    rows = [{"patient_id": "RAS", "split": "train", "ct": write_nifti(tmp_path / "ras.nii.gz", ct)},
            {"patient_id": "LPS", "split": "train", "ct": write_nifti(tmp_path / "lps.nii.gz", ct[::-1, ::-1], lps)}]
    patients = data.read_manifest(write_manifest(tmp_path, rows)).patients
    ras, lps_out = (data.preprocess_patient(p, PREP_8) for p in patients)
    np.testing.assert_array_equal(ras["images"]["ct"], lps_out["images"]["ct"])
    np.testing.assert_allclose(ras["affine"], lps_out["affine"])


def test_parallel_ingestion_writes_identical_shards(phantom_cohort, tmp_path):
    prep = data.Preprocessing(shape=(16, 16, 16), spacing=(12.0, 12.0, 12.0))
    one = data.ingest(phantom_cohort, tmp_path / "one", prep, workers=1, verbose=False)
    two = data.ingest(phantom_cohort, tmp_path / "two", prep, workers=2, verbose=False)
    assert one["splits"] == two["splits"]  # same files, counts and SHA-256


def bad_cohort(tmp_path, problem):
    """A two-patient cohort where patient 'BAD' has `problem`; returns (manifest, file, field)."""
    good = patient_row(tmp_path, "GOOD", label=0, time=5.0, event=1)
    bad = patient_row(tmp_path, "BAD", label=1, time=5.0, event=0)
    ct_file = tmp_path / bad["ct"]
    field, file = "ct", ct_file
    if problem == "unreadable":
        ct_file.write_bytes(b"this is not a NIfTI file")
    elif problem == "truncated":
        raw = gzip.decompress(ct_file.read_bytes())
        ct_file.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    elif problem == "2d":
        write_nifti(ct_file, np.zeros((8, 8), np.float32))
    elif problem == "4d":
        write_nifti(ct_file, np.zeros((8, 8, 8, 2), np.float32))
    elif problem == "nan":
        volume = np.zeros((8, 8, 8), np.float32)
        volume[1, 2, 3] = np.nan
        write_nifti(ct_file, volume)
    elif problem == "pet_elsewhere":
        far = RAS_2MM.copy()
        far[:3, 3] = [500.0, 0.0, 0.0]
        good["pet"] = write_nifti(tmp_path / "good_pet.nii.gz", np.ones((8, 8, 8), np.float32))
        bad["pet"] = write_nifti(tmp_path / "bad_pet.nii.gz", np.ones((8, 8, 8), np.float32), far)
        field, file = "pet", tmp_path / "bad_pet.nii.gz"
    elif problem == "mask_values":
        good["mask"] = write_nifti(tmp_path / "good_mask.nii.gz", np.zeros((8, 8, 8), np.uint8))
        bad["mask"] = write_nifti(tmp_path / "bad_mask.nii.gz", np.full((8, 8, 8), 3, np.uint8))
        field, file = "mask", tmp_path / "bad_mask.nii.gz"
    elif problem == "time":
        bad["time"], field, file = "0", "time", tmp_path / "manifest.csv"
    elif problem == "event":
        bad["event"], field, file = "2", "event", tmp_path / "manifest.csv"
    elif problem == "duplicate":
        bad["patient_id"], field, file = "GOOD", "patient_id", tmp_path / "manifest.csv"
    elif problem == "missing":
        bad["ct"], file = "nowhere.nii.gz", tmp_path / "nowhere.nii.gz"
    return write_manifest(tmp_path, [good, bad]), file, field


IMAGE_PROBLEMS = ["unreadable", "truncated", "2d", "4d", "nan", "pet_elsewhere", "mask_values"]
MANIFEST_PROBLEMS = ["time", "event", "duplicate", "missing"]


@pytest.mark.parametrize("problem", IMAGE_PROBLEMS + MANIFEST_PROBLEMS)
def test_bad_input_is_named_and_nothing_is_written(tmp_path, problem):
    manifest, file, field = bad_cohort(tmp_path, problem)
    out = tmp_path / "out"
    with pytest.raises(data.DataError) as caught:
        data.ingest(manifest, out, PREP_8, workers=2, verbose=False)
    error = caught.value
    assert str(file) in str(error) and f"field {field}" in str(error)
    patient = "GOOD" if problem == "duplicate" else "BAD"
    assert f"patient {patient}" in str(error)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("problem", IMAGE_PROBLEMS + ["time", "event", "missing"])
def test_skip_bad_writes_the_good_and_lists_the_bad(tmp_path, problem):
    manifest, file, field = bad_cohort(tmp_path, problem)
    schema = data.ingest(manifest, tmp_path / "out", PREP_8, workers=1, skip_bad=True, verbose=False)
    assert schema["splits"]["train"]["count"] == 1
    with (tmp_path / "out" / "rejected.csv").open() as handle:
        rejected = list(csv.DictReader(handle))
    assert [(r["patient_id"], r["field"], r["file"]) for r in rejected] == [("BAD", field, str(file))]
    ids = [m["patient_id"] for _, _, m in data.dataset(tmp_path / "out", "train", with_meta=True)]
    assert ids[0].numpy().tolist() == [b"GOOD"]


def test_existing_output_is_never_overwritten(tmp_path):
    manifest = write_manifest(tmp_path, [patient_row(tmp_path, "A")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(data.DataError, match="already exists"):
        data.ingest(manifest, out, PREP_8, verbose=False)
    assert (out / "keep.txt").read_text() == "precious"


def test_corrupt_shard_is_reported_by_file_name(phantom_records, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(phantom_records, copy)
    shard = copy / "train-00000.tfrecord.gz"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="train-00000.tfrecord.gz.*corrupt"):
        data.dataset(copy, "train", task="classification")
    shard.write_bytes(bytes(raw[:100]))
    with pytest.raises(data.DataError, match="train-00000.tfrecord.gz.*truncated"):
        data.dataset(copy, "train")


def test_cli_ingest_reports_bad_input_with_exit_code(tmp_path):
    manifest, file, field = bad_cohort(tmp_path, "nan")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["ingest", str(manifest), "--out", str(out), "--shape", "8", "8", "8",
                                       "--spacing", "2", "2", "2", "--workers", "1"])
    assert result.exit_code == 1
    assert "patient BAD" in result.output and str(file) in result.output and "NaN" in result.output
    assert not out.exists()


# --- Real clinical inputs (issue 11): each test writes one member of a kind of input. ---


def manifest_text(tmp_path, rows):
    """The plain manifest of `rows` as text (the reference the variants are compared with)."""
    return write_manifest(tmp_path, rows).read_text()


SPREADSHEET_VARIANTS = {
    "bom": lambda text: "\ufeff" + text,
    "bom_crlf": lambda text: "\ufeff" + text.replace("\r\n", "\n").replace("\n", "\r\n"),
    "cr_only": lambda text: text.replace("\r\n", "\n").replace("\n", "\r"),
    "semicolons": lambda text: "\ufeff" + text.replace(",", ";"),
    "tabs": lambda text: text.replace(",", "\t"),
    "padded_quoted_header": lambda text: text.replace("patient_id,split", '" patient_id ", "split" ', 1),
    "blank_rows": lambda text: "\r\n" + text.replace("\r\n", "\n") + ",,,\n\n,,,\n",
}


@pytest.mark.parametrize("variant", sorted(SPREADSHEET_VARIANTS))
def test_spreadsheet_saved_manifests_read_as_the_plain_one(tmp_path, variant):
    rows = [patient_row(tmp_path, "A", label=1, time="12.5", event=1),
            patient_row(tmp_path, "B", split="test", label=0, time="3", event=0)]
    plain = data.read_manifest(write_manifest(tmp_path, rows))
    text = SPREADSHEET_VARIANTS[variant](plain.path.read_text())
    if variant == "semicolons":
        text = text.replace("12.5", "12,5")  # a decimal comma, as those spreadsheets write it
    path = tmp_path / "saved.csv"
    path.write_bytes(text.encode("utf-8"))
    read = data.read_manifest(path)
    assert [(p.patient_id, p.split, p.images, p.label, p.time) for p in read.patients] == [
        (p.patient_id, p.split, p.images, p.label, p.time) for p in plain.patients]
    assert read.modalities == ["ct"] and read.targets == ["label", "time", "event"]
    assert read.patients[0].time == 12.5
    bad = path.read_text(encoding="utf-8-sig").replace("test", "tset")
    path.write_text(bad, encoding="utf-8")
    with pytest.raises(data.DataError, match=r"got 'tset' \(manifest line 3\)" if variant != "blank_rows" else
                       r"got 'tset' \(manifest line 4\)"):
        data.read_manifest(path)  # line numbers count the file's own lines


def test_cli_ingests_a_manifest_with_bom_and_crlf(tmp_path):
    rows = [patient_row(tmp_path, "A", label=1), patient_row(tmp_path, "B", label=0)]
    path = write_manifest(tmp_path, rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    result = CliRunner().invoke(main, ["ingest", str(path), "--out", str(tmp_path / "out"), "--shape", "8", "8", "8",
                                       "--spacing", "2", "2", "2", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["splits"]["train"]["patients"] == 2


def test_manifest_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("patient_id,split,ct\nJosé,train,a.nii.gz\n".encode("cp1252"))
    with pytest.raises(data.DataError, match="not UTF-8.*CSV UTF-8") as caught:
        data.read_manifest(path)
    assert caught.value.file == path


def test_required_column_in_another_case_gets_a_hint(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("Patient_ID,split,ct\nA,train,a.nii.gz\n")
    with pytest.raises(data.DataError, match="'patient_id' is missing \\(found 'Patient_ID'"):
        data.read_manifest(path)


@pytest.mark.parametrize("name", ["t1-ce", "T1.post", "t1 ce", "CT", "3d"])
def test_modality_column_with_an_invalid_name_is_refused_by_name(tmp_path, name):
    row = patient_row(tmp_path, "A")
    row[name] = row["ct"]
    path = write_manifest(tmp_path, [row])
    with pytest.raises(data.DataError) as caught:
        data.read_manifest(path)
    error = caught.value
    assert error.file == path and error.field == name and "modality name" in str(error)
    assert f"'{unicon_tf.names.suggest_name(name)}'" in str(error)


@pytest.mark.parametrize("column, value", [("height_cm", "170"), ("weight", "70"), ("notes", "smoker")])
def test_a_column_that_is_no_image_target_or_known_field_is_refused_by_name(tmp_path, column, value):
    path = write_manifest(tmp_path, [{**patient_row(tmp_path, "A"), column: value}])
    with pytest.raises(data.DataError, match=f"column '{column}' is neither an image") as caught:
        data.read_manifest(path)
    assert caught.value.file == path and caught.value.field == column


def constant_pet_cohort(tmp_path, concentration, extra):
    """Patients A, B with a constant-activity PET (Bq/mL) and per-patient manifest cells `extra[pid]`."""
    rows = [{**patient_row(tmp_path, pid, pet=np.full((8, 8, 8), concentration, np.float32)), **cells}
            for pid, cells in extra.items()]
    return write_manifest(tmp_path, rows)


def ingested_pet(tmp_path, manifest, prep=PREP_8):
    data.ingest(manifest, tmp_path / "out", prep, workers=1, verbose=False)
    return {m["patient_id"].numpy()[0].decode(): float(np.mean(x["pet"].numpy()))
            for x, _, m in data.dataset(tmp_path / "out", "train", with_meta=True, batch_size=1)}


def test_body_weight_suv_from_manifest_columns_with_decay_correction(tmp_path):
    # SUVbw = C [Bq/mL] * weight [g] / (dose [Bq] * 2 ** (-delay / half-life)).
    extra = {"A": {"weight_kg": "70", "injected_dose_bq": "3.7e8", "injection_time": "09:30:00",
                   "acquisition_time": "10:30:00"},
             "B": {"weight_kg": "95.5", "injected_dose_bq": "2.5e8", "injection_time": "2024-03-01T23:40:00",
                   "acquisition_time": "2024-03-02T00:25:00"}}
    manifest = constant_pet_cohort(tmp_path, 5000.0, extra)
    suv = {"A": 5000.0 * 70000.0 / (3.7e8 * 2 ** (-3600 / 6586.2)),
           "B": 5000.0 * 95500.0 / (2.5e8 * 2 ** (-2700 / 6586.2))}
    assert 1.0 < suv["A"] < 2.0 and 2.0 < suv["B"] < 3.0  # hand-computed values, within the window
    pet = ingested_pet(tmp_path, manifest)
    assert pet == pytest.approx({p: v / 10.0 - 1.0 for p, v in suv.items()}, abs=1e-5)  # window [0, 20] SUV
    schema = data.read_schema(tmp_path / "out")
    assert schema["scaling"]["pet"].startswith("SUVbw")


def test_pet_scale_column_and_half_life_and_scan_delay(tmp_path):
    manifest = constant_pet_cohort(tmp_path, 100.0, {"A": {"pet_scale": "0.05"}, "B": {"pet_scale": "0.1"}})
    assert ingested_pet(tmp_path, manifest) == pytest.approx({"A": 0.5 - 1.0, "B": 1.0 - 1.0}, abs=1e-6)
    ga68 = {"A": {"weight_kg": "80", "injected_dose_bq": "1.5e8", "scan_delay_s": "3400", "half_life_s": "4062.6"},
            "B": {"weight_kg": "80", "injected_dose_bq": "1.5e8", "scan_delay_s": "0", "half_life_s": "4062.6"}}
    folder = tmp_path / "ga68"
    folder.mkdir()
    pet = ingested_pet(folder, constant_pet_cohort(folder, 3000.0, ga68))
    expected = {"A": 3000.0 * 80000.0 / (1.5e8 * 2 ** (-3400 / 4062.6)), "B": 3000.0 * 80000.0 / 1.5e8}
    assert pet == pytest.approx({p: v / 10.0 - 1.0 for p, v in expected.items()}, abs=1e-5)


@pytest.mark.parametrize("cells, field, message", [
    ({"weight_kg": "70"}, "injected_dose_bq", "needs both"),
    ({"weight_kg": "70", "injected_dose_bq": "3e8", "injection_time": "09:00"}, "injection_time/acquisition_time",
     "needs both"),
    ({"weight_kg": "70", "injected_dose_bq": "3e8", "pet_scale": "0.1"}, "pet_scale", "scaled twice"),
    ({"mr_scale": "2"}, "mr_scale", "no image column"),
])
def test_contradictory_or_incomplete_scaling_columns_are_refused(tmp_path, cells, field, message):
    manifest = constant_pet_cohort(tmp_path, 1.0, {"A": cells})
    with pytest.raises(data.DataError, match=message) as caught:
        data.read_manifest(manifest)
    assert caught.value.file == manifest and caught.value.field == field


def test_manifest_scaling_and_cohort_scale_together_are_refused(tmp_path):
    manifest = constant_pet_cohort(tmp_path, 1.0, {"A": {"pet_scale": "0.1"}})
    prep = data.Preprocessing(shape=(8, 8, 8), spacing=(2.0, 2.0, 2.0),
                              windows={"ct": (-1000, 1000), "pet": (0, 20, 0.001)})
    with pytest.raises(data.DataError, match="scaled per patient.*give one of the two") as caught:
        data.ingest(manifest, tmp_path / "out", prep, workers=1, verbose=False)
    assert caught.value.file == manifest and caught.value.field == "pet"
    assert not (tmp_path / "out").exists()


def test_bad_suv_row_is_rejected_with_its_field(tmp_path):
    extra = {"A": {"weight_kg": "70", "injected_dose_bq": "3e8", "injection_time": "09:00", "acquisition_time": "10:00"},
             "B": {"weight_kg": "-70", "injected_dose_bq": "3e8", "injection_time": "09:00", "acquisition_time": "10:00"},
             "C": {"weight_kg": "70", "injected_dose_bq": "3e8", "injection_time": "9 am", "acquisition_time": "10:00"}}
    manifest = constant_pet_cohort(tmp_path, 1000.0, extra)
    data.ingest(manifest, tmp_path / "out", PREP_8, workers=1, skip_bad=True, verbose=False)
    with (tmp_path / "out" / "rejected.csv").open() as handle:
        rejected = [(r["patient_id"], r["field"]) for r in csv.DictReader(handle)]
    assert rejected == [("B", "weight_kg"), ("C", "injection_time")]


@pytest.mark.parametrize("shape", [(8, 8, 8, 1), (8, 8, 8, 1, 1)])
def test_trailing_singleton_dimensions_are_read_as_3d(tmp_path, shape):
    rng = np.random.default_rng(1)
    ct = rng.uniform(-1000, 1000, (8, 8, 8)).astype(np.float32)
    write_nifti(tmp_path / "plain.nii.gz", ct)
    write_nifti(tmp_path / "stored.nii.gz", ct.reshape(shape))
    volume, affine = data.load_volume(tmp_path / "stored.nii.gz")
    np.testing.assert_array_equal(volume, ct)
    np.testing.assert_allclose(affine, RAS_2MM)
    rows = [{"patient_id": "A", "split": "train", "ct": "stored.nii.gz"}]
    out = data.preprocess_patient(data.read_manifest(write_manifest(tmp_path, rows)).patients[0], PREP_8)
    np.testing.assert_allclose(out["images"]["ct"], ct / 1000.0, atol=1e-6)


def test_a_real_series_is_still_refused_with_its_length(tmp_path):
    write_nifti(tmp_path / "series.nii.gz", np.zeros((8, 8, 8, 3), np.float32))
    with pytest.raises(data.DataError, match="series of 3 volumes"):
        data.load_volume(tmp_path / "series.nii.gz", field="ct")


def test_nan_in_the_affine_is_named(tmp_path):
    affine = RAS_2MM.copy()
    affine[0, 3] = np.nan
    write_nifti(tmp_path / "nan_affine.nii.gz", np.zeros((8, 8, 8), np.float32), affine)
    with pytest.raises(data.DataError, match=r"the affine \(sform\) holds NaN") as caught:
        data.load_volume(tmp_path / "nan_affine.nii.gz", patient="A", field="ct")
    assert caught.value.file == tmp_path / "nan_affine.nii.gz" and caught.value.field == "ct"


def test_sform_and_qform_that_disagree_are_warned_about(tmp_path):
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), RAS_2MM)
    shifted = RAS_2MM.copy()
    shifted[:3, 3] = [10.0, 0.0, 0.0]
    image.set_qform(shifted, code=1)
    nib.save(image, str(tmp_path / "both.nii.gz"))
    with pytest.warns(data.DataWarning, match=r"both.nii.gz.*sform and the qform.*10 mm"):
        _, affine = data.load_volume(tmp_path / "both.nii.gz")
    np.testing.assert_allclose(affine, RAS_2MM)  # the sform wins, as in nibabel
    image.set_qform(RAS_2MM, code=1)
    nib.save(image, str(tmp_path / "agree.nii.gz"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.load_volume(tmp_path / "agree.nii.gz")


def oblique_affine(degrees, spacing=2.0, center=(0.0, 0.0, 0.0), shape=(24, 24, 24)):
    """A rotation about z then x (as a tilted gantry and a rotated patient), voxel centre at `center`."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx * spacing
    affine[:3, 3] = np.asarray(center) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def world_points(affine, shape):
    index = np.indices(shape).reshape(3, -1).T
    return nib.affines.apply_affine(affine, index).reshape(tuple(shape) + (3,))


@pytest.mark.parametrize("degrees", [25.0, 30.0])
def test_oblique_ct_pet_and_mask_land_on_the_grid(tmp_path, degrees):
    # A sphere of radius 9 mm drawn on a 1 mm CT rotated 25-30 degrees; the reference Dice of
    # the axis-aligned case is 1.0, and voxelising the sphere twice (CT grid, then output grid)
    # costs about 0.04 when rotated.
    shape, center, radius = (24, 24, 24), np.array([1.0, -1.5, 0.5]), 9.0
    affine = oblique_affine(degrees, spacing=1.0, shape=shape)
    inside = np.linalg.norm(world_points(affine, shape) - center, axis=-1) <= radius
    ct = np.where(inside, 40.0, -100.0).astype(np.float32)
    rows = [{"patient_id": "A", "split": "train", "ct": write_nifti(tmp_path / "ct.nii.gz", ct, affine),
             "pet": write_nifti(tmp_path / "pet.nii.gz", inside * 8.0, affine),
             "mask": write_nifti(tmp_path / "mask.nii.gz", inside.astype(np.uint8), affine)}]
    prep = data.Preprocessing(shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0))
    out = data.preprocess_patient(data.read_manifest(write_manifest(tmp_path, rows)).patients[0], prep)
    truth = np.linalg.norm(world_points(out["affine"], prep.shape) - center, axis=-1) <= radius
    mask = out["mask"] > 0
    dice = 2 * np.sum(mask & truth) / (mask.sum() + truth.sum())
    assert dice >= 0.95, dice
    pet_hot = out["images"]["pet"] > -0.6  # SUV > 4, half the lesion's 8
    assert 2 * np.sum(pet_hot & truth) / (pet_hot.sum() + truth.sum()) >= 0.95


def test_field_of_view_coverage_is_measured_on_the_oriented_boxes():
    affine = oblique_affine(30.0, shape=(24, 24, 24))
    coverage = data.preprocess.fov_coverage
    assert coverage((24, 24, 24), affine, (24, 24, 24), affine) == 1.0
    half = affine.copy()
    half[:3, 3] += affine[:3, :3] @ np.array([12.0, 0.0, 0.0])  # shifted by half its width along its own axis
    assert coverage((24, 24, 24), affine, (24, 24, 24), half) == pytest.approx(0.5, abs=0.02)
    assert coverage((24, 24, 24), affine, (6, 6, 6), affine) == pytest.approx((6 / 24) ** 3, abs=0.01)


def test_mask_saved_at_minimum_extent_equals_the_full_mask(tmp_path):
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[5:9, 6:11, 7:10] = 1
    cropped_affine = RAS_2MM.copy()
    cropped_affine[:3, 3] = RAS_2MM[:3, :3] @ np.array([5.0, 6.0, 7.0])  # bounding box corner, same grid
    ct = np.full((16, 16, 16), 40.0, np.float32)
    rows = [{"patient_id": "FULL", "split": "train", "ct": write_nifti(tmp_path / "ct.nii.gz", ct),
             "mask": write_nifti(tmp_path / "full.nii.gz", mask)},
            {"patient_id": "CROPPED", "split": "train", "ct": "ct.nii.gz",
             "mask": write_nifti(tmp_path / "cropped.nii.gz", mask[5:9, 6:11, 7:10], cropped_affine)}]
    prep = data.Preprocessing(shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0))
    full, cropped = (data.preprocess_patient(p, prep) for p in data.read_manifest(write_manifest(tmp_path, rows)).patients)
    np.testing.assert_array_equal(cropped["mask"], full["mask"])
    assert full["mask"].sum() == 4 * 5 * 3


@pytest.mark.parametrize("where, message", [("shifted", "lies mostly outside"), ("foreground", "of its foreground")])
def test_mask_outside_the_ct_is_refused(tmp_path, where, message):
    ct = write_nifti(tmp_path / "ct.nii.gz", np.full((8, 8, 8), 40.0, np.float32))
    affine = RAS_2MM.copy()
    if where == "shifted":
        mask = np.ones((8, 8, 8), np.uint8)
        affine[:3, 3] = [10.0, 0.0, 0.0]  # 5 of its 8 voxel columns lie beyond the CT
    else:
        mask = np.zeros((24, 24, 24), np.uint8)  # a larger field of view holding the CT...
        mask[18:22, 18:22, 18:22] = 1  # ...with its lesion beyond the CT
        affine[:3, 3] = [-16.0, -16.0, -16.0]
    rows = [{"patient_id": "A", "split": "train", "ct": ct, "mask": write_nifti(tmp_path / "mask.nii.gz", mask, affine)}]
    with pytest.raises(data.DataError, match=message) as caught:
        data.preprocess_patient(data.read_manifest(write_manifest(tmp_path, rows)).patients[0], PREP_8)
    assert caught.value.field == "mask" and caught.value.file == tmp_path / "mask.nii.gz"


def test_skip_bad_keeps_cohort_level_errors_fatal(tmp_path):
    manifest, _, _ = bad_cohort(tmp_path, "duplicate")
    with pytest.raises(data.DataError, match="duplicate patient_id"):
        data.ingest(manifest, tmp_path / "out", PREP_8, workers=1, skip_bad=True, verbose=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["manifest", "images"])
def test_when_every_patient_is_rejected_the_error_quotes_the_reasons(tmp_path, where):
    rows = [patient_row(tmp_path, "A", time="5", event=1), patient_row(tmp_path, "B", time="5", event=0)]
    if where == "manifest":
        rows[0]["time"], rows[1]["time"] = "0", "-1"
    else:
        for row in rows:
            (tmp_path / row["ct"]).write_bytes(b"not a NIfTI")
    with pytest.raises(data.DataError, match="no usable patient: all 2 rejected, e.g. A: .*; B: ") as caught:
        data.ingest(write_manifest(tmp_path, rows), tmp_path / "out", PREP_8, workers=1, skip_bad=True,
                    verbose=False)
    assert ("time must be > 0" if where == "manifest" else "unreadable") in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("low, high, scale", [(-math.inf, math.inf, 1.0), (0.0, math.nan, 1.0), (-1000.0, 1000.0, 0.0),
                                              (-1000.0, 1000.0, -1.0), (-1000.0, 1000.0, math.nan)])
def test_an_intensity_window_needs_finite_bounds_and_a_positive_scale(low, high, scale):
    from unicon_tf.data.preprocess import IntensityWindow

    with pytest.raises(ValueError, match="An intensity window"):
        IntensityWindow(low, high, scale)
