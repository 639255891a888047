"""The real-CT cohort generator (unicon_tf.data.real_ct) on a small chest CT written here as NRRD."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from unicon_tf.data import phantom, real_ct
from unicon_tf.data.errors import DataError

sitk = pytest.importorskip("SimpleITK")

SHAPE, SPACING = (20, 20, 20), 3.0
LESIONS = phantom.LesionOptions(radius_mm=(3.0, 4.5), ct_contrast_hu=150.0)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A chest CT like the LIDC ones (LPS, anisotropic, int16 HU) at 2 x 2 x 4 mm: body, two
    lungs with a little texture, a heart between them, a spine, and a labelled nodule in the
    left lung."""
    folder = tmp_path_factory.mktemp("source")
    z, y, x = np.meshgrid(np.arange(30) * 4.0 - 60, np.arange(90) * 2.0 - 90, np.arange(90) * 2.0 - 90,
                          indexing="ij")  # SimpleITK arrays are (z, y, x)
    rng = np.random.default_rng(0)
    hu = np.full(x.shape, -1000.0)
    hu[(x / 80) ** 2 + (y / 60) ** 2 <= 1] = 40.0
    lungs = np.zeros(x.shape, bool)
    for side in (-1, 1):
        lungs |= ((x - side * 38) / 30) ** 2 + (y / 42) ** 2 + (z / 70) ** 2 <= 1
    hu[lungs] = -850.0 + rng.normal(0, 20, x.shape)[lungs]
    hu[((x + 2) / 14) ** 2 + ((y + 10) / 18) ** 2 + (z / 40) ** 2 <= 1] = 40.0
    hu[(x / 10) ** 2 + ((y - 48) / 10) ** 2 <= 1] = 700.0
    nodule = (x - 40) ** 2 + (y + 10) ** 2 + z**2 <= 6**2
    hu[nodule] = 20.0
    for name, volume in (("lung9_image", hu.astype(np.int16)), ("lung9_label", nodule.astype(np.uint8))):
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing((2.0, 2.0, 4.0))
        image.SetOrigin((-90.0, -90.0, -60.0))
        sitk.WriteImage(image, str(folder / f"{name}.nrrd"), True)
    return folder


@pytest.fixture(scope="module")
def anatomy(source):
    (image, label), = real_ct.find_sources(source)
    return real_ct.load_anatomy(image, label, SPACING)


def test_tissue_classes_and_nodule_of_the_source(anatomy):
    volumes = np.bincount(anatomy.tissue.ravel(), minlength=5) * SPACING**3 / 1000.0  # mL
    # two lung ellipsoids of 30 x 42 x 70 mm semi-axes: 2 x 4/3 pi abc = 739 mL
    assert volumes[real_ct.LUNG] == pytest.approx(739, rel=0.15)
    assert volumes[real_ct.MEDIASTINUM] > 10 and volumes[real_ct.BONE] > 5
    assert np.isfinite(anatomy.nodule_distance).any() and anatomy.nodule_distance.min() == 0.0
    # the label's nodule: centred 40 mm left (RAS x = -40 from LPS +40)
    ras = anatomy.affine @ [*np.argwhere(anatomy.nodule_distance == 0).mean(axis=0), 1.0]
    assert ras[:3] == pytest.approx([-40.0, 10.0, 0.0], abs=3.5)


def test_cohort_files_shapes_lesion_in_lung_and_targets(source, anatomy, tmp_path):
    manifest = real_ct.write_cohort(tmp_path / "cohort", source, n=6, shape=SHAPE, seed=1, spacing=SPACING,
                                    lesions=LESIONS)
    rows = list(csv.DictReader(manifest.open()))
    assert [r["patient_id"] for r in rows] == [f"P{i:04d}" for i in range(6)]
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    record = json.loads((tmp_path / "cohort" / "real_ct.json").read_text())
    assert record["sources"] == {"lung9_image": anatomy.sha256} and record["lesions"] == LESIONS.to_json()
    pet_shape, pet_affine, _, _ = phantom.pet_grid(SHAPE, SPACING)
    for row in rows:
        ct, pet, mask = (nib.load(tmp_path / "cohort" / row[f]) for f in ("ct", "pet", "mask"))
        latent = record["latent"][row["patient_id"]]
        assert ct.shape == mask.shape == SHAPE and pet.shape == pet_shape
        assert np.allclose(ct.affine, phantom.ct_affine(SHAPE, SPACING)) and np.allclose(pet.affine, pet_affine)
        assert ct.get_data_dtype() == np.int16
        lesion = np.asarray(mask.dataobj).astype(bool)
        # the mask is the sphere of the latent radius and centre; its volume drives survival
        assert lesion.sum() * SPACING**3 / 1000 == pytest.approx(latent["volume_ml"])
        assert latent["volume_ml"] == pytest.approx(4 / 3 * np.pi * latent["radius_mm"] ** 3 / 1000, rel=0.5)
        centre = ct.affine @ [*np.argwhere(lesion).mean(axis=0), 1.0]
        assert centre[:3] == pytest.approx(latent["center"], abs=SPACING)
        # inside lung: mapped back through the view, every lesion voxel is lung in the source
        rotation = np.asarray(latent["rotation_deg"])
        assert np.all(np.abs(rotation) <= [10, 3, 3]) and 0.9 <= latent["scale"] <= 1.1
        assert lesion_in_lung(anatomy, latent)
        # brighter than the lung around it, by about its contrast
        hu = np.asarray(ct.dataobj, dtype=float)
        ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & (hu < -600)  # the lung around it
        expected = phantom.parenchymal_hu(int(row["label"]), LESIONS) - phantom.LUNG_HU
        assert hu[lesion].mean() - hu[ring].mean() > 0.3 * expected
        # PET: uptake above the lung's 0.5 at the lesion, by label
        suv = np.asarray(pet.dataobj)
        peak = suv.flat[np.argmax(suv)]
        assert peak > 1.5 and int(row["label"]) == latent["label"]
        low, high = phantom.SUV_RANGE[latent["label"]]
        assert low <= latent["suv"] <= high
        assert latent["hazard"] == pytest.approx(phantom.hazard(latent["volume_ml"], latent["suv"]))
        assert int(row["event"]) == int(latent["event_time"] <= float(row["time"]) + 1e-3)


def lesion_in_lung(anatomy, latent):
    """Sample the source's lung class on a sphere of the lesion's radius around its source centre."""
    radius = latent["radius_mm"] / latent["scale"]
    directions = np.random.default_rng(0).normal(size=(200, 3))
    points = latent["source_center"] + radius * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    index = np.round((np.linalg.inv(anatomy.affine) @ np.c_[points, np.ones(len(points))].T)[:3]).astype(int)
    return bool(np.all(anatomy.tissue[tuple(index)] == real_ct.LUNG))


def test_same_seed_same_cohort_and_lesions_clear_of_the_nodule(anatomy):
    first = list(real_ct.iter_cohort([anatomy], 4, SHAPE, seed=5, spacing=SPACING, lesions=LESIONS))
    again = list(real_ct.iter_cohort([anatomy], 4, SHAPE, seed=5, spacing=SPACING, lesions=LESIONS))
    other = list(real_ct.iter_cohort([anatomy], 4, SHAPE, seed=6, spacing=SPACING, lesions=LESIONS))
    for a, b in zip(first, again):
        assert np.array_equal(a.ct, b.ct) and np.array_equal(a.pet, b.pet) and np.array_equal(a.mask, b.mask)
        assert (a.label, a.time, a.event) == (b.label, b.time, b.event)
    assert not all(np.array_equal(a.ct, b.ct) for a, b in zip(first, other))
    for patient in first:
        source_index = np.linalg.inv(anatomy.affine) @ [*patient.latent["source_center"], 1.0]
        distance = ndimage.map_coordinates(anatomy.nodule_distance, source_index[:3, None], order=1)[0]
        assert distance >= real_ct.NODULE_MARGIN_MM


def test_bad_sources_and_lesions_are_refused(source, tmp_path):
    with pytest.raises(DataError, match="no \\*_image.nrrd"):
        real_ct.find_sources(tmp_path)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a tar")
    with pytest.raises(DataError, match="unreadable archive"), real_ct.open_source(broken):
        pass
    with pytest.raises(ValueError, match="radius range"):
        real_ct.write_cohort(tmp_path / "out", source, n=2, shape=SHAPE, spacing=SPACING,
                             lesions=phantom.LesionOptions())
    with pytest.raises(ValueError, match="too large"):
        real_ct.write_cohort(tmp_path / "out", source, n=2, shape=SHAPE, spacing=SPACING,
                             lesions=phantom.LesionOptions(radius_mm=(3, 20)))
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_real_ct_cohort_and_refuses_a_missing_source(source, tmp_path):
    from click.testing import CliRunner

    from unicon_tf.cli import main

    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["phantom", "--out", str(out), "-n", "2", "--shape", *map(str, SHAPE),
                                       "--spacing", str(SPACING), "--anatomy", "real-ct", "--source", str(source),
                                       "--lesion-radius", "3", "4"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "real_ct.json").read_text())
    assert record["lesions"] == {"radius_mm": [3.0, 4.0], "ct_contrast_hu": real_ct.DEFAULT_LESIONS.ct_contrast_hu}
    assert len(list(csv.DictReader((out / "manifest.csv").open()))) == 2
    result = CliRunner().invoke(main, ["phantom", "--out", str(tmp_path / "none"), "--anatomy", "real-ct"])
    assert result.exit_code != 0 and "--source" in result.output and not (tmp_path / "none").exists()
