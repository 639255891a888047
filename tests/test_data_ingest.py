"""NIfTI -> TFRecord -> tensors: values, grids, alignment, and every kind of bad input."""

import csv
import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from conftest import PREP_8, RAS_2MM, patient_row, write_manifest, write_nifti

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


@pytest.mark.parametrize("problem", IMAGE_PROBLEMS)
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
