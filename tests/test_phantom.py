"""The built-in phantom cohort: deterministic, and faithful to its documented model."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from unicon_tf.data import phantom


@pytest.fixture(scope="module")
def patients():
    return phantom.cohort(240, shape=(32, 32, 32), seed=11, spacing=6.0)


def test_same_seed_same_cohort_other_seed_differs():
    a, b = phantom.cohort(3, shape=(16, 16, 16), seed=5, spacing=12.0), phantom.cohort(
        3, shape=(16, 16, 16), seed=5, spacing=12.0)
    c = phantom.cohort(3, shape=(16, 16, 16), seed=6, spacing=12.0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.ct, y.ct)
        np.testing.assert_array_equal(x.pet, y.pet)
        assert (x.label, x.time, x.event) == (y.label, y.time, y.event)
    assert any(not np.array_equal(x.ct, z.ct) for x, z in zip(a, c))


def within(value, expected, sd, k=3.5):
    assert abs(value - expected) <= k * sd, f"{value} is not within {k} sd ({sd:.3f}) of {expected}"


def test_label_location_and_survival_follow_the_model(patients):
    n = len(patients)
    labels = np.array([p.label for p in patients])
    hidden = np.array([p.latent["location"] == "mediastinal" for p in patients])
    within(labels.mean(), 0.5, np.sqrt(0.25 / n))
    within(hidden.mean(), phantom.P_HIDDEN, np.sqrt(phantom.P_HIDDEN * (1 - phantom.P_HIDDEN) / n))
    # hazard * T ~ Exp(1) for the latent event times.
    scaled = np.array([p.latent["hazard"] * p.latent["event_time"] for p in patients])
    within(scaled.mean(), 1.0, 1.0 / np.sqrt(n))
    # The observed event rate matches P(T <= C) under uniform censoring.
    events = np.array([p.event for p in patients])
    expected = phantom.event_probability([p.latent["hazard"] for p in patients])
    within(events.mean(), expected.mean(), np.sqrt(np.sum(expected * (1 - expected))) / n)
    times = np.array([p.time for p in patients])
    assert np.all(times > 0) and np.all(times <= phantom.C_MAX)
    assert np.all(times[events == 0] >= phantom.C_MIN)
    # Larger, hotter lesions (label 1) have higher hazard: the tasks share the lesion.
    hazards = np.array([p.latent["hazard"] for p in patients])
    assert np.median(hazards[labels == 1]) > 2 * np.median(hazards[labels == 0])


def test_mask_is_the_documented_lesion(patients):
    for p in patients[:40]:
        radius_vox = p.latent["radius_mm"] / 6.0
        assert p.mask.sum() == pytest.approx(4 / 3 * np.pi * radius_vox**3, rel=0.6, abs=6)
        assert p.latent["volume_ml"] == pytest.approx(p.mask.sum() * 6.0**3 / 1000)
        assert set(np.unique(p.mask)) <= {0, 1} and p.mask.sum() > 0


def test_hidden_lesions_are_invisible_on_ct_and_clear_on_pet():
    for p in phantom.cohort(30, shape=(64, 64, 64), seed=12, spacing=3.0):
        lesion = p.mask.astype(bool)
        ct_in = p.ct[lesion].mean()
        # Peak PET near the lesion centre against the body's typical uptake.
        center = np.append(np.array(p.latent["center"]), 1.0)
        index = np.round(np.linalg.inv(p.pet_affine) @ center)[:3].astype(int)
        peak = p.pet[tuple(slice(max(i - 1, 0), i + 2) for i in index)].max()
        assert peak > 2.0 * np.median(p.pet[p.pet > 0.8])
        if p.latent["location"] == "mediastinal" or p.label == 1:
            assert abs(ct_in - 40.0) < 10.0  # soft tissue
        else:
            assert abs(ct_in + 350.0) < 10.0
        if p.latent["location"] == "mediastinal":
            # No edge on CT: the voxels around the lesion are soft tissue too (no lung), and
            # inside and around differ by noise only.
            shell = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
            assert p.ct[shell].min() > -200.0
            assert abs(p.ct[shell].mean() - ct_in) < 5.0


def test_written_cohort_is_real_nifti_with_a_manifest(tmp_path):
    manifest = phantom.write_cohort(tmp_path, n=5, shape=(16, 16, 16), seed=2, spacing=12.0)
    with manifest.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["patient_id"] for r in rows] == [f"P000{i}" for i in range(5)]
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    drawn = phantom.cohort(5, shape=(16, 16, 16), seed=2, spacing=12.0)
    for row, patient in zip(rows, drawn):
        ct = nib.load(str(tmp_path / row["ct"]))
        np.testing.assert_array_equal(np.asarray(ct.dataobj), patient.ct)
        np.testing.assert_allclose(ct.affine, patient.ct_affine)
        assert nib.load(str(tmp_path / row["pet"])).shape == (8, 8, 8)
        assert int(row["label"]) == patient.label and float(row["time"]) == pytest.approx(patient.time, abs=1e-4)


def test_split_fractions_are_exact_and_deterministic():
    splits = phantom.assign_splits(96, seed=5, fractions={"train": 1 / 2, "val": 1 / 6})
    assert [splits.count(s) for s in ("train", "val", "test")] == [48, 16, 32]
    assert splits == phantom.assign_splits(96, seed=5, fractions={"train": 1 / 2, "val": 1 / 6})
    default = phantom.assign_splits(20, seed=5)
    assert [default.count(s) for s in ("train", "val", "test")] == [12, 4, 4]


def test_small_faint_lesions_follow_the_requested_distribution(tmp_path):
    """`unicon-tf phantom --lesion-radius 3 7 --lesion-contrast 60`: measured on the written
    NIfTI files, the masks' equivalent radii are U(3, 7) mm and the lung lesions stand 60 HU
    (solid) or 60 x 500/890 HU (part-solid) above the lung, mediastinal ones hidden (40 HU)."""
    from click.testing import CliRunner
    from scipy import stats

    from unicon_tf.cli import main

    low, high, contrast, n = 3.0, 7.0, 60.0, 36
    result = CliRunner().invoke(main, ["phantom", "--out", str(tmp_path / "small"), "-n", str(n), "--shape", "40",
                                       "40", "40", "--spacing", "2", "--seed", "4", "--lesion-radius", str(low),
                                       str(high), "--lesion-contrast", str(contrast)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "small"
    with (folder / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    record = json.loads((folder / "phantom.json").read_text())
    assert record["lesions"] == {"radius_mm": [low, high], "ct_contrast_hu": contrast}
    radii, contrasts = [], {0: [], 1: []}
    for row in rows:
        mask_image, ct_image = nib.load(folder / row["mask"]), nib.load(folder / row["ct"])
        mask = np.asarray(mask_image.dataobj).astype(bool)
        voxel_ml = float(np.prod(mask_image.header.get_zooms()[:3]))
        radii.append((3.0 * mask.sum() * voxel_ml / (4.0 * np.pi)) ** (1.0 / 3.0))
        ct = np.asarray(ct_image.dataobj, np.float64)
        inside = ct[mask].mean()
        if record["latent"][row["patient_id"]]["location"] == "mediastinal":
            assert abs(inside - phantom.SOFT_TISSUE_HU) < 10.0
            continue
        shell = ndimage.binary_dilation(mask, iterations=2) & ~mask
        lung = ct[shell & (ct < -600.0)].mean()  # the lung around the lesion
        contrasts[int(row["label"])].append(inside - lung)
    radii = np.array(radii)
    assert radii.min() >= low - 0.3 and radii.max() <= high + 0.3, radii
    assert stats.kstest(radii, "uniform", args=(low, high - low)).pvalue > 0.01
    within(radii.mean(), (low + high) / 2, (high - low) / np.sqrt(12 * n))
    assert contrasts[0] and contrasts[1]
    assert np.mean(contrasts[1]) == pytest.approx(contrast, abs=8.0)
    assert np.mean(contrasts[0]) == pytest.approx(contrast * 500.0 / 890.0, abs=8.0)
    # Without the options the documented model holds: solid lung lesions 890 HU above the lung.
    default = [p for p in phantom.cohort(12, shape=(40, 40, 40), seed=4, spacing=2.0)
               if p.latent["location"] == "parenchymal" and p.label == 1]
    assert default and all(abs(p.ct[p.mask.astype(bool)].mean() - 40.0) < 10.0 for p in default)


def test_lesion_options_that_do_not_fit_are_refused_with_nothing_written(tmp_path):
    from click.testing import CliRunner

    from unicon_tf.cli import main

    for radius, message in ((("9", "4"), "0 < low <= high"), (("4", "20"), "too large"), (("0.4", "5"), "half a voxel")):
        out = tmp_path / f"bad{radius[0]}"
        result = CliRunner().invoke(main, ["phantom", "--out", str(out), "-n", "2", "--shape", "40", "40", "40",
                                           "--spacing", "2", "--lesion-radius", *radius])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output and not out.exists()
    for contrast in ("-2000", "0", "5000", "nan"):  # below air, invisible, denser than bone, not a number
        out = tmp_path / f"contrast{contrast}"
        result = CliRunner().invoke(main, ["phantom", "--out", str(out), "-n", "2", "--lesion-contrast", contrast])
        assert result.exit_code == 1 and "lesion CT contrast must be" in result.output, result.output
        assert "Traceback" not in result.output and not out.exists()
