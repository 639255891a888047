"""Clinical inputs: DICOM series (CT, PET with SUV from its tags), DICOM SEG and RTSTRUCT masks, ITK
files, the series checks, and DICOM SEG out of predict. Every DICOM file is made here, small."""

import dataclasses
import json
import math

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import write_manifest

pydicom = pytest.importorskip("pydicom")  # the dicom extra (in the test extra)
sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("highdicom")

from dicom_writer import pet_tags, write_rtstruct, write_seg, write_series, write_stack  # noqa: E402

import unicon_tf  # noqa: E402
from unicon_tf import data, serving  # noqa: E402
from unicon_tf.cli import main  # noqa: E402
from unicon_tf.data import dicom  # noqa: E402
from unicon_tf.data.errors import DataError, DataWarning  # noqa: E402
from unicon_tf.data.suv import SUVInputError  # noqa: E402

SHAPE = (16, 14, 10)
AFFINE = np.diag([2.0, 2.5, 3.0, 1.0])
AFFINE[:3, 3] = [-15.0, -20.0, 30.0]
PREP = data.Preprocessing(shape=(8, 8, 8), spacing=(4.0, 4.0, 4.0), center="mask")
SUV = {"weight_kg": "70", "injected_dose_bq": "370000000", "injection_time": "20240301093000",
       "acquisition_time": "20240301103000"}


def patient_volumes(seed):
    """CT (HU), PET (Bq/mL, slice 3 at a finer RescaleSlope) and a mask of one patient, RAS `SHAPE`."""
    rng = np.random.default_rng(seed)
    ct = rng.integers(-1000, 1000, size=SHAPE).astype(np.float32)
    ct[4:12, 3:11, 2:8] += 300
    slopes = [64.0] * SHAPE[2]
    slopes[3] = 32.0
    pet = (rng.integers(0, 400, size=SHAPE) * np.asarray(slopes)).astype(np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    for k in range(2 + seed % 2, 7):
        mask[4:9 + k % 2, 5:10, k] = 1
    mask[6, 7, 4] = 0  # a hole: the RTSTRUCT draws it as an inner contour
    return ct, pet, slopes, mask


def mask_boxes(mask):
    """The per-slice boxes and one-voxel holes of `patient_volumes`' masks, for a RTSTRUCT."""
    boxes, holes = [], []
    for k in range(mask.shape[2]):
        where = np.argwhere(mask[..., k] > 0)
        if len(where):
            (i0, j0), (i1, j1) = where.min(axis=0), where.max(axis=0)
            boxes.append((k, i0, i1, j0, j1))
            holes += [(k, i, i, j, j) for i, j in np.argwhere(mask[i0:i1 + 1, j0:j1 + 1, k] == 0) + [i0, j0]]
    return boxes, holes


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three patients as NIfTI (SUV from manifest columns) and as DICOM (series; masks as SEG,
    RTSTRUCT and .seg.nrrd; patient C's CT and PET in one study folder chosen by UID)."""
    root = tmp_path_factory.mktemp("cohort")
    nifti_rows, dicom_rows = [], []
    for seed, (pid, split, mask_kind) in enumerate([("A", "train", "seg"), ("B", "train", "rtstruct"),
                                                    ("C", "val", "nrrd")]):
        ct, pet, slopes, mask = patient_volumes(seed)
        folder = root / pid
        folder.mkdir()
        for name, array in (("ct", ct), ("pet", pet), ("mask", mask)):
            nib.save(nib.Nifti1Image(array, AFFINE), str(folder / f"{name}.nii.gz"))
        nifti_rows.append({"patient_id": pid, "split": split, "ct": folder / "ct.nii.gz", "pet": folder / "pet.nii.gz",
                           "mask": folder / "mask.nii.gz", "label": seed % 2, **SUV})
        study = folder / ("study" if pid == "C" else "ct")
        write_series(study, ct, AFFINE, patient=pid, uid=f"1.2.826.0.1.3680043.10.1.{seed}.1", description="CT")
        pet_folder = study if pid == "C" else folder / "pet"
        write_series(pet_folder, pet, AFFINE, modality="PT", patient=pid, uid=f"1.2.826.0.1.3680043.10.1.{seed}.2",
                     slopes=slopes, tags=pet_tags(), description="PET AC")
        ct_series = dicom.SeriesRef(study, f"1.2.826.0.1.3680043.10.1.{seed}.1") if pid == "C" else study
        if mask_kind == "seg":
            write_seg(folder / "mask.dcm", mask, ct_series)
        elif mask_kind == "rtstruct":
            boxes, holes = mask_boxes(mask)
            write_rtstruct(folder / "mask.dcm", boxes, AFFINE, study, holes=holes)
        else:
            write_itk(folder / "mask.seg.nrrd", mask)
        row = {"patient_id": pid, "split": split, "ct": study, "pet": pet_folder,
               "mask": folder / f"mask.{'seg.nrrd' if pid == 'C' else 'dcm'}", "label": seed % 2}
        if pid == "C":
            row.update(ct_series_uid=ct_series.uid, pet_series_uid=f"1.2.826.0.1.3680043.10.1.{seed}.2")
        dicom_rows.append(row)
    (root / "nifti").mkdir()
    (root / "dicom").mkdir()
    return root, write_manifest(root / "nifti", nifti_rows), write_manifest(root / "dicom", dicom_rows)


def write_itk(path, array):
    """`array` (RAS, `AFFINE`) as an ITK file (LPS: origin and direction of x and y negated)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(np.diag(AFFINE)[:3]))
    image.SetOrigin((-AFFINE[0, 3], -AFFINE[1, 3], AFFINE[2, 3]))
    image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    sitk.WriteImage(image, str(path))
    return path


def records(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tfrecord.gz"))}


def test_same_cohort_as_nifti_and_as_dicom_ingests_to_identical_records(cohort, tmp_path):
    root, nifti_manifest, dicom_manifest = cohort
    nifti = data.ingest(nifti_manifest, tmp_path / "nifti", PREP, workers=1, verbose=False)
    from_dicom = data.ingest(dicom_manifest, tmp_path / "dicom", PREP, workers=2, verbose=False)  # forked workers
    assert records(tmp_path / "nifti") and records(tmp_path / "nifti") == records(tmp_path / "dicom")
    assert nifti["splits"] == from_dicom["splits"]  # counts, sizes and SHA-256 of every shard
    assert from_dicom["scaling"]["pet"] == dicom.SUV_SOURCE
    dataset = tf.data.TFRecordDataset(sorted(str(p) for p in (tmp_path / "dicom").glob("train-*")),
                                      compression_type="GZIP")
    assert sum(1 for _ in dataset) == 2


def test_series_grid_matches_the_nifti_grid_and_readers_agree(cohort, tmp_path):
    root, _, _ = cohort
    ct, pet, _, mask = patient_volumes(1)
    volume, affine = data.load_volume(root / "B" / "ct")
    assert np.array_equal(volume, ct) and np.array_equal(affine, AFFINE)
    volume, affine = data.load_volume(root / "B" / "pet")  # per-slice RescaleSlope applied
    assert np.array_equal(volume, pet) and np.array_equal(affine, AFFINE)
    for suffix in (".nrrd", ".mha", ".mhd"):
        volume, affine = data.load_volume(write_itk(tmp_path / f"ct{suffix}", ct))
        assert np.array_equal(volume, ct) and np.allclose(affine, AFFINE)
    volume, _ = data.load_volume(root / "B" / "mask.dcm", field="mask", reference=(SHAPE, AFFINE))
    assert np.array_equal(volume, mask)  # the RTSTRUCT's inner contour is a hole
    seg = write_seg(tmp_path / "seg.dcm", mask, root / "B" / "ct")
    volume, affine = data.load_volume(seg, field="mask")
    assert np.array_equal(volume, mask) and np.allclose(affine, AFFINE)
    assert dicom.kind_of(root / "B" / "ct") == "series" and dicom.kind_of(seg) == "dicom"


def test_manifest_accepts_dicom_folders_and_records_the_suv_override(cohort, tmp_path):
    root, _, dicom_manifest = cohort
    manifest = data.read_manifest(dicom_manifest)
    assert manifest.modalities == ["ct", "pet"] and isinstance(manifest.patients[2].images["ct"], dicom.SeriesRef)
    expected = 70_000 / (3.7e8 * 2 ** (-3600 / 6586.2))
    assert [p.scales["pet"] for p in manifest.patients] == pytest.approx([expected] * 3, rel=1e-12)
    rows = [{"patient_id": "B", "split": "train", "ct": str(root / "B/ct"), "pet": str(root / "B/pet"),
             "weight_kg": "80"}]
    folder = tmp_path / "override"
    folder.mkdir()
    overridden = data.read_manifest(write_manifest(folder, rows))
    assert overridden.patients[0].scales["pet"] == pytest.approx(expected * 80 / 70, rel=1e-12)
    assert "['weight_kg'] override the tags" in overridden.scaling["pet"]


def suv_series(folder, extra=None, **tags):
    """A 4x4x3 PET series of 128 Bq/mL with the SUV tags of `pet_tags(**tags)` and `extra` tags."""
    pet = np.full((4, 4, 3), 128.0, np.float32)
    return write_series(folder, pet, AFFINE, modality="PT", slopes=[1.0] * 3, tags={**pet_tags(**tags), **(extra or {})})


@pytest.mark.parametrize("tags, delay", [
    ({}, 3600.0),  # START: the dose decays from injection to the series time
    ({"decay": "ADMIN"}, 0.0),  # ADMIN: images are decay-corrected to the injection: no decay
    ({"start": "20240301233000", "series_date": "20240302", "series_time": "003000"}, 3600.0),  # over midnight
    ({"start": None, "start_time_only": "233000", "series_date": "20240302", "series_time": "003000"}, 3600.0),
    ({"start": "20240301093000.5", "series_time": "103000"}, 3599.5),
])
def test_suv_from_pet_tags_follows_the_formula(tmp_path, tags, delay):
    folder = suv_series(tmp_path / "pet", **tags)
    factor, overridden = dicom.suv_from_tags(dicom.suv_tags(folder))
    dose_at_scan = 3.7e8 * math.exp(-math.log(2) * delay / 6586.2)
    assert factor == pytest.approx(70 * 1000 / dose_at_scan, rel=1e-12) and overridden == []
    voxel_suv = 128.0 * factor
    assert voxel_suv == pytest.approx(128.0 * 70_000 / dose_at_scan, rel=1e-12)


def test_suv_time_zones_from_the_tag(tmp_path):
    folder = suv_series(tmp_path / "pet", {"TimezoneOffsetFromUTC": "+0100"},  # the series in local time
                        start="20240301083000+0000")  # the injection in UTC
    factor, _ = dicom.suv_from_tags(dicom.suv_tags(folder))
    assert factor == pytest.approx(70_000 / (3.7e8 * 2 ** (-3600 / 6586.2)), rel=1e-12)


def test_suv_uses_the_earliest_acquisition_when_the_series_time_is_later(tmp_path):
    folder = suv_series(tmp_path / "pet", {"AcquisitionTime": "103000"}, series_time="120000")  # post-processed
    tags = dicom.suv_tags(folder)
    assert tags["acquisition_time"] == "20240301103000"


@pytest.mark.parametrize("tags, field, words", [
    ({"units": "CNTS"}, "Units", "pet_scale"),
    ({"units": "GML"}, "Units", "pet_scale"),
    ({"decay": "NONE"}, "DecayCorrection", "START or ADMIN"),
    ({"weight": None}, "PatientWeight", "weight_kg"),
    ({"dose": "370"}, "RadionuclideTotalDose", "in MBq or mCi"),
    ({"weight": "70000"}, "PatientWeight", "in g or lb"),
    ({"start": None}, "RadiopharmaceuticalStartDateTime", "injection_time"),
])
def test_suv_refuses_missing_implausible_or_unsupported_tags_by_name(tmp_path, tags, field, words):
    folder = suv_series(tmp_path / "pet", **tags)
    with pytest.raises(SUVInputError, match=words) as raised:
        dicom.suv_from_tags(dicom.suv_tags(folder))
    assert raised.value.field == field and field in str(raised.value)


def test_suv_override_replaces_the_tag_and_cnts_takes_a_factor(tmp_path):
    folder = suv_series(tmp_path / "pet", weight=None)
    factor, overridden = dicom.suv_from_tags(dicom.suv_tags(folder), {"weight_kg": 70.0})
    assert overridden == ["weight_kg"] and factor == pytest.approx(70_000 / (3.7e8 * 2 ** (-3600 / 6586.2)))
    cnts = suv_series(tmp_path / "cnts", units="CNTS")
    rows = [{"patient_id": "P", "split": "train", "ct": str(folder), "pet": str(cnts), "pet_scale": "0.0003"}]
    (tmp_path / "m").mkdir()
    manifest = data.read_manifest(write_manifest(tmp_path / "m", rows))
    assert manifest.patients[0].scales["pet"] == 0.0003 and manifest.scaling["pet"] == "column pet_scale"


# ---------------------------------------------------------------------------------- series faults


def faulty_cohort(tmp_path, edit=None, uid=None, **series):
    """One patient 'Q' whose CT series is written by `write_series(**series)` then `edit(folder)`."""
    ct, _, _, _ = patient_volumes(0)
    folder = write_series(tmp_path / "Q" / "ct", ct, AFFINE, patient="Q", **series)
    if edit:
        edit(folder)
    row = {"patient_id": "Q", "split": "train", "ct": "Q/ct"}
    if uid:
        row["ct_series_uid"] = uid
    return write_manifest(tmp_path, [row]), folder


def assert_refused(manifest, tmp_path, *words):
    """`unicon-tf ingest` exits non-zero naming patient, folder and fault, and writes nothing."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["ingest", str(manifest), "--out", str(out), "--shape", "8", "8", "8",
                                       "--spacing", "4", "4", "4", "--workers", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    message = " ".join(result.output.split())
    for word in ("patient Q", str(tmp_path / "Q" / "ct")) + words:
        assert word in message, (word, message[-400:])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return message


def second_series(folder):
    ct, _, _, _ = patient_volumes(1)
    write_series(folder, ct[:, :, :4], AFFINE, patient="Q", uid="1.2.3.99", description="CT thin")


def test_several_series_without_a_uid_are_listed(tmp_path):
    manifest, _ = faulty_cohort(tmp_path, edit=second_series, uid=None, description="CT soft")
    message = assert_refused(manifest, tmp_path, "holds 2 series", "1.2.3.99 ('CT thin', CT, 4 image(s))",
                             "('CT soft', CT, 10 image(s))", "ct_series_uid")
    assert "SeriesInstanceUID" in message or "_series_uid" in message
    manifest, _ = faulty_cohort(tmp_path / "chosen", edit=second_series, uid="1.2.3.99")
    assert data.read_manifest(manifest).patients[0].images["ct"].uid == "1.2.3.99"
    volume, _ = data.load_volume(data.read_manifest(manifest).patients[0].images["ct"])
    assert volume.shape == (16, 14, 4)


def drop(name_index):
    return lambda folder: sorted(folder.glob("*.dcm"))[name_index].unlink()


def edit_slice(index, change):
    """An edit of a series folder: `change(dataset)` on its `index`-th file, saved in place."""
    def edit(folder):
        file = sorted(folder.glob("*.dcm"))[index]
        ds = pydicom.dcmread(file)
        change(ds)
        ds.save_as(file)
    return edit


def shift_slice(index, dz):
    def move(ds):
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], f"{float(ds.ImagePositionPatient[2]) + dz:g}"]
    return edit_slice(index, move)


def set_tag(index, name, value):
    return edit_slice(index, lambda ds: setattr(ds, name, value))


@pytest.mark.parametrize("edit, words", [
    (drop(4), ("1 missing slice(s)", "6 mm between", "slice step is 3 mm")),
    (shift_slice(4, 0.8), ("uneven slice spacing", "3.8 mm between")),
    (set_tag(5, "ImageOrientationPatient", ["1", "0", "0", "0", "0.9", "0.4359"]),
     ("inconsistent orientation within the series",)),
    (set_tag(2, "PixelSpacing", ["2.5", "2.2"]), ("inconsistent pixel spacing within the series",)),
    (shift_slice(6, -3.0), ("two images at the same slice position",)),
    (edit_slice(3, lambda ds: delattr(ds, "ImagePositionPatient")), ("lacks ImagePositionPatient",)),
])
def test_series_faults_are_refused_naming_patient_folder_and_fault(tmp_path, edit, words):
    manifest, _ = faulty_cohort(tmp_path, edit=edit)
    assert_refused(manifest, tmp_path, *words)


def test_undecodable_transfer_syntax_names_the_package_to_install(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.pixels import get_decoder

    if get_decoder(pydicom.uid.HTJ2K).is_available:
        pytest.skip("an HTJ2K decoder is installed here")

    def compress(folder):
        for file in sorted(folder.glob("*.dcm")):
            ds = pydicom.dcmread(file)
            ds.file_meta.TransferSyntaxUID = pydicom.uid.HTJ2K
            ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
            ds["PixelData"].VR = "OB"
            ds.save_as(file, enforce_file_format=True)

    manifest, _ = faulty_cohort(tmp_path, edit=compress)
    assert_refused(manifest, tmp_path, "High-Throughput JPEG 2000", str(pydicom.uid.HTJ2K), "pylibjpeg-openjpeg")


def test_localizers_are_dropped_with_a_note(tmp_path):
    def add_localizer(folder):
        scout = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]  # a sagittal scout
        scout.SOPInstanceUID = pydicom.uid.generate_uid()
        scout.save_as(folder / "scout.dcm")

    manifest, folder = faulty_cohort(tmp_path, edit=add_localizer)
    with pytest.warns(DataWarning, match="dropped 1 localizer image"):
        volume, affine = data.load_volume(folder, patient="Q", field="ct")
    assert volume.shape == SHAPE and np.array_equal(affine, AFFINE)
    with pytest.warns(DataWarning, match="localizer"):
        schema = data.ingest(manifest, tmp_path / "out", PREP, workers=1, verbose=False)
    assert schema["splits"]["train"]["count"] == 1


def test_gantry_tilt_is_placed_by_the_slice_positions_and_resampled(tmp_path):
    """Each slice k of a 15-degree tilted stack sits at its own ImagePositionPatient: one bright
    voxel per slice, on a line in world space, lands on that line after resampling."""
    tilt = math.tan(math.radians(15.0)) * 3.0  # y shift per 3 mm slice
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[7:10, 5:8, :] = 1000.0  # a bar around voxel column (8, 6) in every slice

    def tilted(k, ds):
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], f"{float(ds.ImagePositionPatient[1]) + k * tilt:.6f}",
                                   ds.ImagePositionPatient[2]]
        ds.GantryDetectorTilt = "15"

    folder = write_series(tmp_path / "tilted", ct, AFFINE, per_slice=tilted)
    with pytest.warns(DataWarning, match="tilted by 15.00 degrees"):
        series = dicom.series_headers(folder)
        volume, affine = data.load_volume(folder)
    assert dicom.tilt_degrees(series) == pytest.approx(15.0, abs=1e-3) and "gantry tilt" in series.notes[0]
    for k in range(SHAPE[2]):
        world = affine @ [8, 6, k, 1]
        expected = AFFINE @ [8, 6, k, 1] - [0, k * tilt, 0, 0]  # LPS +y is RAS -y
        assert np.allclose(world, expected, atol=1e-4)
    with pytest.warns(DataWarning, match="gantry tilt"):
        grid = data.resample_patient({"ct": folder}, data.Preprocessing((8, 8, 8), (1.0, 1.0, 1.0)))
    for k in range(1, SHAPE[2] - 1):  # inner slices: at the first and last, rounding may fall just outside
        world = AFFINE @ [8, 6, k, 1] - [0, k * tilt, 0, 0]
        index = np.round(np.linalg.solve(grid.affine, world)[:3]).astype(int)
        assert grid.images["ct"][tuple(index)] > 0.9  # the bright line is where the tilt put it


# ---------------------------------------------------------------------------------- predict -> SEG


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory):
    """A small exported CT segmentation model trained on SUV PET (its tags give the factor at predict)."""
    keras.utils.set_random_seed(0)
    keras_model = unicon_tf.foundation((8, 8, 8), modality="ct", task="segmentation", num_classes=2, width=8, depth=2)
    return serving.export_model(keras_model, tmp_path_factory.mktemp("sm"), "seg", metadata={
        "stage": "s", "preprocessing": PREP.to_json(), "modalities": ["ct"], "scaling": {"pet": dicom.SUV_SOURCE}})


def test_predict_on_a_series_writes_a_seg_with_the_nifti_voxels(cohort, seg_model, tmp_path):
    import highdicom as hd

    root, _, _ = cohort
    version = seg_model
    result = CliRunner().invoke(main, ["predict", "--saved-model", str(version), "--ct", str(root / "B" / "ct"),
                                       "--pet", str(root / "B" / "pet"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    prediction = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert prediction["scales"]["pet"]["factor"] == pytest.approx(70_000 / (3.7e8 * 2 ** (-3600 / 6586.2)))
    head = prediction["heads"]["segmentation"]
    nifti = nib.load(head["label_map"])
    seg = hd.seg.segread(head["seg"])
    source = pydicom.dcmread(sorted((root / "B" / "ct").glob("*.dcm"))[0], stop_before_pixels=True)
    assert {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence} == {source.SeriesInstanceUID}
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID and seg.StudyInstanceUID == source.StudyInstanceUID
    volume = seg.get_volume(combine_segments=True)
    read_back = nib.as_closest_canonical(volume.to_nibabel())
    original = nib.as_closest_canonical(nifti)
    assert np.allclose(read_back.affine, original.affine) and np.allclose(original.affine, AFFINE)
    assert np.array_equal(np.asarray(read_back.dataobj), np.asarray(original.dataobj))
    assert read_back.shape == SHAPE and sum(head["voxels"].values()) == np.prod(SHAPE)
    assert set(head["voxels"]) == {"0", "1"}  # both classes, so equal voxels say something


def test_predict_refuses_a_faulty_series_like_ingest(tmp_path):
    manifest, folder = faulty_cohort(tmp_path, edit=drop(3))
    with pytest.raises(DataError, match="missing slice"):
        data.resample_patient({"ct": folder}, PREP)
    result = CliRunner().invoke(main, ["predict", "--saved-model", str(tmp_path), "--ct", str(folder),
                                       "--series-uid", "pet", "1.2", "--out", str(tmp_path / "p")])
    assert result.exit_code != 0 and "--series-uid pet" in result.output


def test_compressed_and_multi_frame_ct_read_as_the_plain_series(tmp_path):
    import highdicom as hd

    ct, _, _, _ = patient_volumes(0)
    folder = write_series(tmp_path / "rle", ct, AFFINE)
    sources = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(legacy_datasets=sources, series_instance_uid=hd.UID(),
                                                        series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    for file, dataset in zip(sorted(folder.glob("*.dcm")), sources):
        dataset.compress(pydicom.uid.RLELossless)
        dataset.save_as(file)
    for path in (folder, tmp_path / "enhanced.dcm"):
        volume, affine = data.load_volume(path)
        assert np.array_equal(volume, ct) and np.allclose(affine, AFFINE), path


def test_rtstruct_drawn_on_the_pet_is_filled_on_the_pet_grid(tmp_path):
    """Contours in the PET's slices (4 mm apart, not the CT's 3 mm) land where the same mask as
    NIfTI on the PET grid does."""
    ct, _, _, _ = patient_volumes(0)
    pet_affine = np.diag([4.0, 5.0, 6.0, 1.0])
    pet_affine[:3, 3] = [-14.0, -18.75, 31.5]
    pet = np.full((8, 7, 5), 1000.0, np.float32)
    mask = np.zeros((8, 7, 5), np.uint8)
    mask[2:5, 3:6, 1:4] = 1
    ct_folder = write_series(tmp_path / "ct", ct, AFFINE)
    pet_folder = write_series(tmp_path / "pet", pet, pet_affine, modality="PT", slopes=[1.0] * 5)
    rtstruct = write_rtstruct(tmp_path / "rt.dcm", mask_boxes(mask)[0], pet_affine, pet_folder)
    nib.save(nib.Nifti1Image(mask, pet_affine), str(tmp_path / "mask.nii.gz"))
    images = {"ct": ct_folder, "pet": pet_folder}
    from_rtstruct = data.resample_patient(images, PREP, mask=rtstruct)
    from_nifti = data.resample_patient(images, PREP, mask=tmp_path / "mask.nii.gz")
    assert from_rtstruct.mask.any() and np.array_equal(from_rtstruct.mask, from_nifti.mask)
    with pytest.raises(DataError, match="does not lie in one slice of the reference image"):
        data.resample_patient({"ct": ct_folder}, PREP, mask=rtstruct)


def rotation(axis, degrees):
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


@pytest.mark.parametrize("name, axes", [
    ("sagittal", np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])),  # rows along y, slices along x
    ("coronal", np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])),
    ("oblique", rotation(2, 20.0) @ rotation(0, -12.0)),
])
def test_any_orientation_reads_as_the_same_volume_in_nifti(tmp_path, name, axes):
    """A stack in any orientation, written as a DICOM series and as NIfTI (LPS -> RAS), reads back
    as the same RAS volume and affine, and an RTSTRUCT drawn in its slices fills the same voxels."""
    rng = np.random.default_rng(5)
    stack = rng.integers(-1000, 1000, size=(12, 10, 6)).astype(np.float32)
    lps = np.eye(4)
    lps[:3, :3] = axes @ np.diag([2.0, 2.5, 4.0])
    lps[:3, 3] = [10.0, -30.0, 40.0]
    folder = write_stack(tmp_path / name, stack, lps)
    nib.save(nib.Nifti1Image(stack, dicom.lps_to_ras(lps)), str(tmp_path / f"{name}.nii.gz"))
    volume, affine = data.load_volume(folder)
    expected, expected_affine = data.load_volume(tmp_path / f"{name}.nii.gz")
    assert np.array_equal(volume, expected) and np.allclose(affine, expected_affine, atol=1e-5)
    grids = [data.resample_patient({"ct": path}, PREP) for path in (folder, tmp_path / f"{name}.nii.gz")]
    assert np.allclose(grids[0].images["ct"], grids[1].images["ct"], atol=1e-5)
    mask = np.zeros(stack.shape, np.uint8)
    mask[3:8, 2:6, 1:5] = 1
    mask[3:5, 2:4, 2] = 0
    nib.save(nib.Nifti1Image(mask, dicom.lps_to_ras(lps)), str(tmp_path / "mask.nii.gz"))
    rtstruct = write_rtstruct(tmp_path / "rt.dcm", mask_boxes(mask)[0], dicom.lps_to_ras(lps), folder,
                              holes=mask_boxes(mask)[1])
    filled, _ = data.load_volume(rtstruct, field="mask", reference=(volume.shape, affine))
    assert filled.any() and np.array_equal(filled, data.load_volume(tmp_path / "mask.nii.gz")[0])


def test_a_copied_instance_is_read_once_with_a_note(tmp_path):
    ct, _, _, _ = patient_volumes(0)
    folder = write_series(tmp_path / "ct", ct, AFFINE)
    first = sorted(folder.glob("*.dcm"))[0]
    (folder / "copy").mkdir()
    (folder / "copy" / "IM0001").write_bytes(first.read_bytes())  # no suffix, in a sub-folder
    with pytest.warns(DataWarning, match="skipped 1 copie"):
        volume, _ = data.load_volume(folder, patient="Q", field="ct")
    assert np.array_equal(volume, ct)


def test_manifest_refuses_misplaced_series_uids_and_folder_masks(tmp_path):
    ct, _, _, mask = patient_volumes(0)
    folder = write_series(tmp_path / "ct", ct, AFFINE, uid="1.2.3.4")
    nib.save(nib.Nifti1Image(ct, AFFINE), str(tmp_path / "ct.nii.gz"))
    cases = [
        ({"ct": "ct", "ct_series_uid": "9.9"}, "SeriesInstanceUID 9.9", "1.2.3.4 ('series', CT, 10 image(s))"),
        ({"ct": "ct.nii.gz", "ct_series_uid": "1.2.3.4"}, "'ct_series_uid' chooses a series in a DICOM folder", "ct"),
        ({"ct": "ct", "mask": "ct"}, "a mask is one file", "mask"),
        ({"ct": "ct", "pet_series_uid": "1.2"}, "column 'pet_series_uid' chooses a series of 'pet'", "no image"),
    ]
    for cells, *words in cases:
        manifest = write_manifest(tmp_path, [{"patient_id": "Q", "split": "train", **cells}])
        with pytest.raises(DataError) as raised:
            for patient in data.read_manifest(manifest).patients:
                data.resample_patient(patient.images, PREP, mask=patient.mask, patient="Q")
        assert all(word in str(raised.value) for word in words), (words, str(raised.value))
    assert data.read_manifest(write_manifest(tmp_path, [{"patient_id": "Q", "split": "train", "ct": "ct",
                                                        "ct_series_uid": "1.2.3.4"}])).patients[0].images["ct"] \
        == dicom.SeriesRef(folder, "1.2.3.4")


def test_sparse_fractional_and_overlapping_segs_read_as_label_maps(tmp_path):
    """A SEG without its empty frames, a FRACTIONAL SEG (>= 0.5 is inside) and overlapping
    segments (the highest number wins, as a RTSTRUCT's later ROI) read as label maps."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ct, _, _, _ = patient_volumes(0)
    folder = write_series(tmp_path / "ct", ct, AFFINE)
    sources = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    algorithm = hd.AlgorithmIdentificationSequence(name="t", family=codes.cid7162.ArtificialIntelligence, version="1")
    segments = [hd.seg.SegmentDescription(segment_number=n, segment_label=f"s{n}", algorithm_type="AUTOMATIC",
                                          segmented_property_category=codes.SCT.Tissue,
                                          segmented_property_type=codes.SCT.Tissue, algorithm_identification=algorithm)
                for n in (1, 2)]
    first, second = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
    first[3:6, 3:6, [2, 6]] = 0.8  # slices 3-5 empty: omitted from the file
    first[3, 3, 2] = 0.3  # below one half: outside
    second[4:8, 4:8, 6] = 1.0  # overlaps segment 1 on slice 6
    expected = np.where(second >= 0.5, 2, np.where(first >= 0.5, 1, 0))

    def to_frames(volume):
        return np.ascontiguousarray(volume[::-1, ::-1, :].transpose(2, 1, 0))

    for kind, pixels in (("FRACTIONAL", np.stack([to_frames(first), to_frames(second)], -1)),
                         ("BINARY", np.stack([to_frames(first >= 0.5), to_frames(second >= 0.5)], -1).astype(np.uint8))):
        seg = hd.seg.Segmentation(source_images=sources, pixel_array=pixels, segmentation_type=kind,
                                  segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=9,
                                  sop_instance_uid=hd.UID(), instance_number=1, manufacturer="t",
                                  manufacturer_model_name="t", software_versions="1", device_serial_number="1")
        seg.save_as(tmp_path / f"{kind}.dcm")
        grid = data.resample_patient({"ct": folder}, data.Preprocessing(SHAPE, (2.0, 2.5, 3.0), mask_classes=3),
                                     mask=tmp_path / f"{kind}.dcm", patient="Q")  # the CT's own grid
        assert grid.shape == SHAPE and np.array_equal(grid.mask, expected), kind


def test_skip_bad_lists_a_faulty_series_and_keeps_the_good_patients(tmp_path):
    manifest, folder = faulty_cohort(tmp_path, edit=drop(4))
    ct, _, _, _ = patient_volumes(1)
    write_series(tmp_path / "R" / "ct", ct, AFFINE, patient="R")
    manifest = write_manifest(tmp_path, [{"patient_id": "Q", "split": "train", "ct": "Q/ct"},
                                         {"patient_id": "R", "split": "train", "ct": "R/ct"}])
    schema = data.ingest(manifest, tmp_path / "out", PREP, workers=1, verbose=False, skip_bad=True)
    assert schema["splits"]["train"]["count"] == 1
    rejected = (tmp_path / "out" / "rejected.csv").read_text()
    assert "Q,train," in rejected and str(folder) in rejected and "missing slice" in rejected


def test_dicom_inputs_of_another_patient_frame_or_modality_are_refused(tmp_path, monkeypatch):
    """A mask or PET of another DICOM patient, a SEG drawn in another frame of reference and a PET series
    in the 'ct' column overlap the CT's grid, so only their tags can tell: refused by tag, nothing written."""
    import dicom_writer

    ct, pet, slopes, mask = patient_volumes(0)
    folder = write_series(tmp_path / "Q" / "ct", ct, AFFINE, patient="Q")
    pet_folder = write_series(tmp_path / "Q" / "pet", pet, AFFINE, modality="PT", patient="Q", slopes=slopes)
    other = write_series(tmp_path / "Z" / "pet", pet, AFFINE, modality="PT", patient="Z", slopes=slopes)
    monkeypatch.setattr(dicom_writer, "FRAME_UID", pydicom.uid.generate_uid())
    later = write_series(tmp_path / "Q" / "ct_later", ct, AFFINE, patient="Q")  # another acquisition's frame
    seg = write_seg(tmp_path / "Q" / "seg.dcm", mask, later)
    assert data.resample_patient({"ct": later}, PREP, mask=seg, patient="Q").mask.any()  # its own frame: read
    cases = [({"ct": folder, "pet": other}, None, "pet", "PatientID is 'Z'"),
             ({"ct": folder}, seg, "mask", "FrameOfReferenceUID"),
             ({"ct": pet_folder}, None, "ct", "Modality is PT")]
    for images, mask_file, field, words in cases:
        with pytest.raises(DataError, match=words) as raised:
            data.resample_patient(images, PREP, mask=mask_file, patient="Q")
        assert raised.value.patient == "Q" and raised.value.field == field
    manifest = write_manifest(tmp_path, [{"patient_id": "Q", "split": "train", "ct": "Q/ct", "mask": "Q/seg.dcm"}])
    result = CliRunner().invoke(main, ["ingest", str(manifest), "--out", str(tmp_path / "out"), "--shape", "8", "8",
                                       "8", "--spacing", "4", "4", "4", "--workers", "1"])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output and "patient Q" in message
    assert "FrameOfReferenceUID" in message and "seg.dcm" in message and not (tmp_path / "out").exists()


def test_a_rtstruct_roi_without_contours_keeps_its_class_and_the_refusal_names_each_roi(tmp_path):
    """ROI n is class n (the same class in every patient's file), so an empty first ROI leaves the lesion
    class 2: a binary model refuses it naming each ROI, its class and which is empty."""
    from pydicom.dataset import Dataset

    ct, _, _, mask = patient_volumes(0)
    folder = write_series(tmp_path / "ct", ct, AFFINE, patient="Q")
    rtstruct = write_rtstruct(tmp_path / "rt.dcm", mask_boxes(mask)[0], AFFINE, folder)
    dataset = pydicom.dcmread(rtstruct)
    empty = Dataset()
    empty.ROINumber, empty.ROIName = 3, "BODY"
    dataset.StructureSetROISequence.insert(0, empty)
    dataset.ROIContourSequence.insert(0, Dataset())
    dataset.ROIContourSequence[0].ReferencedROINumber = 3
    dataset.save_as(rtstruct)
    filled, _ = data.load_volume(rtstruct, field="mask", reference=(SHAPE, AFFINE))
    assert set(np.unique(filled)) == {0.0, 2.0}
    with pytest.raises(DataError, match=r"outside the classes 0..1 \(its classes: 1 = ROI 3 'BODY' \(no closed "
                                        r"contour: empty\), 2 = ROI 7 'lesion'") as raised:
        data.resample_patient({"ct": folder}, PREP, mask=rtstruct, patient="Q")
    assert raised.value.field == "mask" and raised.value.patient == "Q"
    three = dataclasses.replace(PREP, mask_classes=3)
    assert set(np.unique(data.resample_patient({"ct": folder}, three, mask=rtstruct).mask)) == {0, 2}


def test_a_metaimage_whose_data_file_is_missing_names_it(tmp_path):
    ct, _, _, _ = patient_volumes(0)
    header = write_itk(tmp_path / "ct.mhd", ct)
    (tmp_path / "ct.raw").unlink()
    with pytest.raises(DataError, match=r"its data file ct.raw \(ElementDataFile\) is missing") as raised:
        data.load_volume(header, patient="Q", field="ct")
    assert raised.value.patient == "Q" and str(raised.value.file) == str(header)


def test_a_seg_on_a_gantry_tilted_series_is_placed_by_its_frame_positions(tmp_path):
    """highdicom builds unsheared volumes only; a SEG drawn on (or predicted for) a tilted CT reads as the
    same label map, on the series' sheared grid, as that map saved as NIfTI with the series' affine."""
    ct, _, _, _ = patient_volumes(0)
    lps = np.diag([2.0, 2.5, 3.0, 1.0])
    lps[1, 2] = 0.5  # each slice 0.5 mm further along y: a 9.5 degree gantry tilt
    folder = write_stack(tmp_path / "ct", ct, lps)
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:9, 4:10, 2:8], labels[5:7, 5:7, 4:6] = 1, 2
    with pytest.warns(DataWarning, match="gantry tilt"):
        affine = dicom.series_headers(folder).affine
        seg = dicom.write_seg(labels, folder, tmp_path / "seg.dcm", classes=3)
    volume, seg_affine = dicom.load_dicom_file(seg)
    assert np.array_equal(volume, labels) and np.allclose(seg_affine, affine)
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "mask.nii.gz"))
    three = dataclasses.replace(PREP, mask_classes=3)
    with pytest.warns(DataWarning, match="gantry tilt"):
        grids = [data.resample_patient({"ct": folder}, three, mask=m) for m in (seg, tmp_path / "mask.nii.gz")]
    assert grids[0].mask.any() and np.array_equal(grids[0].mask, grids[1].mask)


def test_times_of_day_are_refused_for_a_tracer_scanned_days_after_injection(tmp_path):
    """Zr-89 (78.4 h): an injection given as RadiopharmaceuticalStartTime only may be days before the scan,
    so a time of day would give a delay short by whole days; with its date the SUV follows the formula."""
    zr89 = "282276"
    folder = suv_series(tmp_path / "time", half_life=zr89, start=None, start_time_only="100000")
    with pytest.raises(SUVInputError, match="times of day, which cannot tell on which day") as raised:
        dicom.suv_from_tags(dicom.suv_tags(folder))
    assert raised.value.field == "RadiopharmaceuticalStartDateTime"
    folder = suv_series(tmp_path / "dated", half_life=zr89, start="20240226100000")  # 4 days and 30 min before
    delay = 4 * 86400 + 1800
    factor, _ = dicom.suv_from_tags(dicom.suv_tags(folder))
    assert factor == pytest.approx(70_000 / (3.7e8 * 2 ** (-delay / float(zr89))), rel=1e-12)
    f18 = suv_series(tmp_path / "f18", start=None, start_time_only="100000")  # 5 F-18 half-lives < a day: unambiguous
    assert dicom.suv_from_tags(dicom.suv_tags(f18))[0] == pytest.approx(70_000 / (3.7e8 * 2 ** (-1800 / 6586.2)))


@pytest.mark.parametrize("corrected", [["DECY"], ["ATTN"], None])
def test_suv_refuses_a_pet_not_corrected_for_attenuation_or_decay(tmp_path, corrected):
    """A non-attenuation-corrected (NAC) series, written beside the AC one in BQML, is not quantitative."""
    folder = suv_series(tmp_path / "pet", {"CorrectedImage": corrected} if corrected else None)
    if corrected is None:
        for file in folder.iterdir():
            dataset = pydicom.dcmread(file)
            del dataset.CorrectedImage
            dataset.save_as(file)
    with pytest.raises(SUVInputError, match=r"needs images corrected for attenuation \(ATTN\) and decay") as raised:
        dicom.suv_from_tags(dicom.suv_tags(folder))
    assert raised.value.field == "CorrectedImage" and "pet_series_uid" in str(raised.value)


def test_suv_refuses_a_series_whose_images_disagree_on_a_series_level_tag(tmp_path):
    """The factor comes from one image's tags: a weight or dose differing in another image is refused by name."""
    def later_weight(k, dataset):
        if k == 2:
            dataset.PatientWeight = "82"

    pet = np.full((4, 4, 3), 128.0, np.float32)
    folder = write_series(tmp_path / "pet", pet, AFFINE, modality="PT", slopes=[1.0] * 3, tags=pet_tags(),
                          per_slice=later_weight)
    with pytest.raises(SUVInputError, match=r"tag PatientWeight differs within the series: \S+_000.dcm has 70, "
                                            r"\S+_002.dcm 82") as raised:
        dicom.suv_tags(folder)
    assert raised.value.field == "PatientWeight"


def test_predict_checks_the_series_a_seg_must_reference_before_writing_anything(seg_model, tmp_path):
    """An anonymised series without PatientID still gets its SEG (Type 2: copied empty); one without
    FrameOfReferenceUID or StudyInstanceUID (Type 1) is refused naming file and tag, and nothing is written."""
    import highdicom as hd

    ct, _, _, _ = patient_volumes(0)

    def without(tag):
        return lambda k, dataset: delattr(dataset, tag)

    anonymised = write_series(tmp_path / "anonymised", ct, AFFINE, per_slice=without("PatientID"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", "--saved-model", str(seg_model), "--ct", str(anonymised),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert hd.seg.segread(out / "segmentation.seg.dcm").PatientID == ""
    for tag in ("FrameOfReferenceUID", "StudyInstanceUID"):
        folder = write_series(tmp_path / tag, ct, AFFINE, per_slice=without(tag))
        result = CliRunner().invoke(main, ["predict", "--saved-model", str(seg_model), "--ct", str(folder),
                                           "--out", str(tmp_path / f"out_{tag}")])
        message = " ".join(result.output.split())
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"lacks {tag}" in message and str(folder) in message and "field ct" in message
        assert not (tmp_path / f"out_{tag}").exists()


def test_a_series_of_files_without_the_part10_preamble_reads_as_the_volume(tmp_path):
    """Older PACS exports write bare datasets (no 128-byte preamble, no file meta, implicit VR) named
    without a suffix: read with pydicom's force and their own encoding, not 'no DICOM image'."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ct, _, _, _ = patient_volumes(0)
    folder = write_series(tmp_path / "ct", ct, AFFINE)
    for file in sorted(folder.glob("*.dcm")):
        dataset = pydicom.dcmread(file)
        del dataset.file_meta
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, True
        write_dataset(buffer, dataset)
        file.with_suffix("").write_bytes(buffer.getvalue())
        file.unlink()
    (folder / "notes.txt").write_text("exported 2024-03-01\n")  # forced reading must not take it for DICOM
    volume, affine = data.load_volume(folder)
    assert np.array_equal(volume, ct) and np.allclose(affine, AFFINE)
    assert dicom.identity(folder)["modality"] == "CT"
