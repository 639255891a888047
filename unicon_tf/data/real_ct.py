"""A PET/CT cohort on real chest anatomy: varied views of real CT volumes with synthetic lesions.

The phantom's drawn anatomy (`unicon_tf.data.phantom`) is too clean to choose a recipe on
alone; this generator keeps everything else of it (files, targets, survival model, PET grid)
and takes the anatomy from real chest CTs. The default source is the pyradiomics 3.0.1
source distribution on PyPI (BSD-3-Clause, Harvard Medical School), whose `data/` holds two
chest CTs from LIDC-IDRI: `lung1_image.nrrd` (512 x 512 x 48, 0.57 x 0.57 x 5 mm) and
`lung2_image.nrrd` (512 x 512 x 61, 0.63 x 0.63 x 5 mm), int16 HU, with their nodules'
labels `lung*_label.nrrd`. Get it with

    pip download pyradiomics==3.0.1 --no-deps --no-binary :all: -d DIR

and pass the `.tar.gz` itself, a folder of `*_image.nrrd` (+ `*_label.nrrd`) files, or one
image file as the source. Reading needs SimpleITK (`pip install 'unicon-tf[dicom]'`).

Per source, once (`load_anatomy`): the CT in RAS, smoothed against aliasing and resampled
to an isotropic working grid of the cohort's spacing; tissue classes by HU:

- body: HU > -500, holes filled slice by slice, the largest component (no table);
- lungs: HU < -400 inside the body, connected components of at least 10% of the largest
  (both lungs, the airways joined to them);
- bone: HU > 200 in the body outside the lungs;
- mediastinum: soft tissue (-150..250 HU) between the lungs, row by row within each axial
  slice (heart, great vessels), outside lungs and bone;
- soft tissue: the rest of the body. Outside it: air.

Per patient (`make_patient`), from a `numpy.random.Generator`:

- source ~ uniform over the sources; label ~ Bernoulli(0.5); radius r ~ U(LesionOptions.radius_mm)
  mm; uptake SUV ~ U(phantom.SUV_RANGE[label]);
- a view: rotation about z ~ U(-10, 10) deg, about x and y ~ U(-3, 3) deg, isotropic scale
  s ~ U(0.9, 1.1) (output mm per source mm), a left-right flip with p = 0.5;
- the lesion's centre: a lung voxel drawn uniformly among those at least r / s + one voxel
  from the lung's edge (so all of it lies in lung) and at least r / s + NODULE_MARGIN_MM
  from the source's real nodule (the LIDC nodule stays in the anatomy, unlabelled, but never
  near a synthetic lesion, so a mask-centred crop of up to 2 x NODULE_MARGIN_MM rarely holds
  it); placed at U(-0.25, 0.25) of the field of view from its centre along each axis;
- CT: the view sampled (trilinear) on the phantom's CT grid (`phantom.ct_affine`: the
  field of view centred on the world origin, LPS-like voxel order), -1000 HU outside the
  source; the lesion adds its contrast to the real lung, weighted by each voxel's partial
  volume (a linear ramp of one voxel across the sphere's surface): +ct_contrast_hu for a
  solid lesion (label 1), 500/890 of it for a part-solid one (`phantom.parenchymal_hu`;
  unset: the documented 890 / 500 HU). Then intensity jitter: gain ~ U(0.97, 1.03), offset
  ~ U(-20, 20) HU, Gaussian noise of sigma ~ U(5, 15) HU;
- PET: SUV by tissue class (TISSUE_SUV: lung 0.5, soft tissue 1.0, mediastinum 2.0, bone
  1.6, air 0), the lesion's uptake mixed in by partial volume, on the phantom's fine PET
  grid (`phantom.pet_grid`), then `phantom.pet_image`: the point-spread function (FWHM 1.5
  PET voxels), sampled on its own grid (twice the CT spacing, a quarter voxel shifted) with
  10% multiplicative noise;
- mask: the voxels within r of the centre, on the CT grid; survival: the phantom's
  proportional-hazards model (`phantom.hazard`, `phantom.draw_outcome`) on the mask's
  volume and the uptake. Label, survival and mask derive from the same lesion.

Written like the phantom (`phantom.write_patients`): NIfTI files, `manifest.csv` with
splits, and `real_ct.json` with the settings, the sources' SHA-256 and every latent.
"""

import contextlib
import dataclasses
import hashlib
import pathlib
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from unicon_tf.data import phantom
from unicon_tf.data.dicom import load_itk
from unicon_tf.data.errors import DataError

SOURCE_DOWNLOAD = "pip download pyradiomics==3.0.1 --no-deps --no-binary :all: -d DIR"
DEFAULT_LESIONS = phantom.LesionOptions(radius_mm=(4.0, 9.0), ct_contrast_hu=100.0)
"""Small, faint lesions: radius 4-9 mm, a solid one 100 HU above the lung around it."""
NODULE_MARGIN_MM = 30.0
AIR, LUNG, SOFT_TISSUE, MEDIASTINUM, BONE = range(5)
TISSUE_SUV = np.array([0.0, 0.5, 1.0, 2.0, 1.6])  # SUV by tissue class
ROTATION_DEG, TILT_DEG, SCALE = 10.0, 3.0, (0.9, 1.1)


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One source CT on its working grid (isotropic, RAS, voxel order x, y, z).

    Attributes:
        name: the image file's stem, e.g. `lung1_image`.
        sha256: the image file's SHA-256.
        hu: CT in HU, float32.
        affine: the working grid's RAS affine (mm).
        tissue: uint8 class per voxel (AIR, LUNG, SOFT_TISSUE, MEDIASTINUM, BONE).
        sites: flat indices of the voxels a lesion centre may take, by minimum lung depth
            and nodule distance: see `lesion_sites`.
        lung_depth: mm from each lung voxel to the nearest non-lung voxel (0 outside).
        nodule_distance: mm to the nearest voxel of the source's labelled nodule (inf without one).
    """

    name: str
    sha256: str
    hu: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray
    lung_depth: np.ndarray
    nodule_distance: np.ndarray

    def lesion_sites(self, radius_mm: float) -> np.ndarray:
        """Flat indices of the voxels where a lesion of `radius_mm` (source mm) lies in lung,
        one voxel clear of its edge, and NODULE_MARGIN_MM clear of the real nodule."""
        voxel = float(self.affine[0, 0])
        return np.flatnonzero((self.lung_depth >= radius_mm + voxel)
                              & (self.nodule_distance >= radius_mm + NODULE_MARGIN_MM))


def find_sources(source: pathlib.Path | str) -> list[tuple[pathlib.Path, pathlib.Path | None]]:
    """The `(image, label or None)` files of a source folder or image file.

    A folder gives its `*_image.nrrd` files, each with the `*_label.nrrd` beside it if any;
    a file is one image (its label found the same way). For the pyradiomics source
    distribution (a `.tar.gz`) use `open_source`.

    Raises:
        DataError: no such file or folder, or a folder without `*_image.nrrd`.
    """
    source = pathlib.Path(source)
    if source.is_dir():
        images = sorted(source.glob("*_image.nrrd"))
        if not images:
            raise DataError(f"no *_image.nrrd in the folder (get the real CTs with `{SOURCE_DOWNLOAD}` and pass "
                            "the .tar.gz)", file=source)
    elif source.is_file():
        images = [source]
    else:
        raise DataError(f"no such file or folder (get the real CTs with `{SOURCE_DOWNLOAD}`)", file=source)
    pairs = []
    for image in images:
        label = image.with_name(image.name.replace("_image", "_label"))
        pairs.append((image, label if label != image and label.is_file() else None))
    return pairs


@contextlib.contextmanager
def open_source(source: pathlib.Path | str) -> Iterator[list[tuple[pathlib.Path, pathlib.Path | None]]]:
    """Yield the `(image, label)` pairs of a source (`find_sources`); a `.tar.gz` (the
    pyradiomics sdist) has its `data/*_image.nrrd` and `*_label.nrrd` extracted to a
    temporary folder, removed on exit (its chest CTs `lung1`, `lung2`; not its brain and breast images).

    Raises:
        DataError: an unreadable archive, or one without `data/lung*_image.nrrd`.
    """
    source = pathlib.Path(source)
    if not source.name.endswith((".tar.gz", ".tgz")):
        yield find_sources(source)
        return
    with tempfile.TemporaryDirectory(prefix="real_ct_") as folder:
        try:
            with tarfile.open(source) as archive:
                members = [m for m in archive.getmembers() if m.isfile() and "/data/lung" in m.name
                           and m.name.endswith(("_image.nrrd", "_label.nrrd"))]  # not its brain and breast
                for member in members:
                    member.name = pathlib.PurePosixPath(member.name).name
                    archive.extract(member, folder, filter="data")
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(f"unreadable archive ({error})", file=source) from error
        if not members:
            raise DataError(f"no data/lung*_image.nrrd in the archive (expected the pyradiomics 3.0.1 sdist: "
                            f"`{SOURCE_DOWNLOAD}`)", file=source)
        yield find_sources(folder)


def _slicewise(function, volume):
    """Apply a 2D binary operation to every axial slice (last axis)."""
    return np.stack([function(volume[..., k]) for k in range(volume.shape[-1])], axis=-1)


def _largest_components(mask, fraction):
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= fraction * sizes.max()) + 1
    return np.isin(labels, keep)


def tissue_classes(hu: np.ndarray) -> np.ndarray:
    """Tissue class per voxel of a chest CT in HU, voxel order (x, y, z) with z axial (see
    the module docstring for the thresholds).

    Args:
        hu: CT, HU, shape `(X, Y, Z)`.

    Returns:
        uint8 classes AIR, LUNG, SOFT_TISSUE, MEDIASTINUM, BONE, same shape.

    Example:
    >>> hu = np.full((40, 40, 4), -1000.0)
    >>> hu[5:35, 5:35] = 40.0; hu[8:16, 10:30] = -850.0; hu[24:32, 10:30] = -850.0
    >>> classes = tissue_classes(hu)
    >>> [int(classes[10, 20, 0]), int(classes[20, 20, 0]), int(classes[6, 6, 0]), int(classes[0, 0, 0])]
    [1, 3, 2, 0]
    """
    body = _slicewise(ndimage.binary_fill_holes, hu > -500)
    body = _largest_components(body, 1.0)
    lungs = _largest_components((hu < -400) & body, 0.1)
    bone = (hu > 200) & body & ~lungs
    # between the lungs along x, row by row in each slice
    between = np.maximum.accumulate(lungs, axis=0) & np.maximum.accumulate(lungs[::-1], axis=0)[::-1]
    mediastinum = between & ~lungs & ~bone & (hu >= -150) & (hu <= 250)
    tissue = np.full(hu.shape, AIR, dtype=np.uint8)
    tissue[body] = SOFT_TISSUE
    tissue[mediastinum] = MEDIASTINUM
    tissue[bone] = BONE
    tissue[lungs] = LUNG
    return tissue


def load_anatomy(image: pathlib.Path | str, label: pathlib.Path | str | None = None, spacing: float = 2.0) -> Anatomy:
    """Read a source CT (and its nodule label) onto an isotropic working grid of `spacing` mm.

    The CT is smoothed (Gaussian, sigma 0.4 output voxels along axes coarser in the
    output) against aliasing and resampled trilinearly; the label likewise, kept where >= 0.25.

    Args:
        image: an ITK file (`.nrrd`, `.mha`) of a chest CT in HU.
        label: its nodule label file, or None.
        spacing: working grid spacing, mm.

    Returns:
        An `Anatomy`.

    Raises:
        DataError: unreadable file, SimpleITK missing (names the `dicom` extra), or a CT
            without lungs.
    """
    image = pathlib.Path(image)
    hu, source_affine = load_itk(image, field="ct")
    sha256 = hashlib.sha256(image.read_bytes()).hexdigest()
    corners = np.array([[i, j, k, 1.0] for i in (0, hu.shape[0] - 1) for j in (0, hu.shape[1] - 1)
                        for k in (0, hu.shape[2] - 1)])
    world = (source_affine @ corners.T)[:3]
    low, high = world.min(axis=1), world.max(axis=1)
    shape = tuple(int(n) for n in np.floor((high - low) / spacing) + 1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = low
    to_source = np.linalg.inv(source_affine) @ affine

    def resample(volume, cval):
        voxel = np.linalg.norm(source_affine[:3, :3], axis=0)
        sigma = [0.4 * spacing / v if spacing > v else 0.0 for v in voxel]
        return ndimage.affine_transform(ndimage.gaussian_filter(volume, sigma), to_source[:3, :3],
                                        to_source[:3, 3], output_shape=shape, order=1, cval=cval)

    hu = resample(hu, -1000.0).astype(np.float32)
    tissue = tissue_classes(hu)
    lungs = tissue == LUNG
    if not lungs.any():
        raise DataError("no lungs found (no voxel below -400 HU inside the body): is it a chest CT in HU?",
                        file=image, field="ct")
    nodule = np.zeros(shape, bool)
    if label is not None:
        nodule = resample((load_itk(label, field="label")[0] > 0).astype(np.float32), 0.0) >= 0.25
    nodule_distance = (ndimage.distance_transform_edt(~nodule, sampling=spacing) if nodule.any()
                       else np.full(shape, np.inf))
    return Anatomy(name=image.name.split(".")[0], sha256=sha256, hu=hu, affine=affine, tissue=tissue,
                   lung_depth=ndimage.distance_transform_edt(lungs, sampling=spacing).astype(np.float32),
                   nodule_distance=nodule_distance.astype(np.float32))


def _rotation(rng):
    """A view's rotation (z, then the small tilts about x and y), with a left-right flip."""
    az, ax, ay = np.deg2rad([rng.uniform(-ROTATION_DEG, ROTATION_DEG), rng.uniform(-TILT_DEG, TILT_DEG),
                             rng.uniform(-TILT_DEG, TILT_DEG)])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    flip = bool(rng.random() < 0.5)
    return rz @ rx @ ry @ np.diag([-1.0 if flip else 1.0, 1.0, 1.0]), np.rad2deg([az, ax, ay]), flip


def _sample(volume, anatomy, grid_affine, shape, view, order, cval):
    """`volume` (on the anatomy's grid) at the voxels of a grid, through the view (output
    world -> source world: `view` 4 x 4)."""
    to_working = np.linalg.inv(anatomy.affine) @ view @ grid_affine
    return ndimage.affine_transform(volume, to_working[:3, :3], to_working[:3, 3], output_shape=shape,
                                    order=order, cval=cval)


def _occupancy(shape, affine, center, radius, spacing):
    """Partial volume of a sphere per voxel (a one-voxel linear ramp across its surface),
    and its mask (voxel centres within `radius`)."""
    distance = np.linalg.norm(phantom._world(shape, affine) - np.reshape(center, (3, 1, 1, 1)), axis=0)
    return np.clip((radius - distance) / spacing + 0.5, 0.0, 1.0), distance <= radius


def check_lesions(lesions: phantom.LesionOptions, shape: Sequence[int], spacing: float) -> None:
    """Raise ValueError unless `lesions` has a radius range that fits the grid: at least half a
    voxel, at most a quarter of the field of view's smallest side."""
    if lesions.radius_mm is None:
        raise ValueError("a real-CT cohort needs the lesions' radius range in mm (e.g. --lesion-radius 4 9).")
    low, high = lesions.radius_mm
    fov = min(shape) * spacing
    if low < spacing / 2:
        raise ValueError(f"lesion radius {low:g} mm is below half a voxel ({spacing / 2:g} mm): its mask could be "
                         "empty; use a finer --spacing or a larger radius.")
    if high > fov / 4:
        raise ValueError(f"lesion radius {high:g} mm is too large for a {fov:g} mm field of view (at most a quarter "
                         f"of it, {fov / 4:g} mm).")


def make_patient(patient_id: str, rng: np.random.Generator, anatomies: list[Anatomy], shape: Sequence[int] = (64, 64, 64),
                 spacing: float = 2.0, lesions: phantom.LesionOptions = DEFAULT_LESIONS) -> phantom.PhantomPatient:
    """Draw one patient: a view of a real anatomy with a synthetic lesion (module docstring).

    Args:
        patient_id: identifier.
        rng: a `numpy.random.Generator`.
        anatomies: `Anatomy`s loaded at `spacing`.
        shape: CT grid in voxels.
        spacing: CT voxel size in mm (isotropic); PET voxels are twice as large.
        lesions: radius range (required) and CT contrast.

    Returns:
        A `phantom.PhantomPatient`; its latents add the source, the view and the lesion's
        centre in the source.

    Raises:
        ValueError: lesions that do not fit the grid, or no lung site deep enough for the radius.
    """
    shape = tuple(int(s) for s in shape)
    check_lesions(lesions, shape, spacing)
    anatomy = anatomies[int(rng.integers(len(anatomies)))]
    label = int(rng.random() < 0.5)
    radius = float(rng.uniform(*lesions.radius_mm))
    suv = float(rng.uniform(*phantom.SUV_RANGE[label]))
    rotation, angles, flip = _rotation(rng)
    scale = float(rng.uniform(*SCALE))
    sites = anatomy.lesion_sites(radius / scale)
    if sites.size == 0:
        raise ValueError(f"{anatomy.name}: no lung voxel lies {radius / scale:.1f} mm inside the lung and "
                         f"{NODULE_MARGIN_MM:g} mm from its nodule: use a smaller lesion radius.")
    index = np.unravel_index(sites[int(rng.integers(sites.size))], anatomy.hu.shape)
    source_center = (anatomy.affine @ [*index, 1.0])[:3] + rng.uniform(-0.5, 0.5, 3) * anatomy.affine[0, 0]
    center = rng.uniform(-0.25, 0.25, 3) * np.asarray(shape) * spacing
    view = np.eye(4)  # output world (mm) -> source world (mm)
    view[:3, :3] = rotation / scale
    view[:3, 3] = source_center - view[:3, :3] @ center

    affine = phantom.ct_affine(shape, spacing)
    ct = _sample(anatomy.hu, anatomy, affine, shape, view, 1, -1000.0)
    weight, mask = _occupancy(shape, affine, center, radius, spacing)
    ct += weight * (phantom.parenchymal_hu(label, lesions) - phantom.LUNG_HU)
    gain, offset, noise = rng.uniform(0.97, 1.03), rng.uniform(-20.0, 20.0), rng.uniform(5.0, 15.0)
    ct = gain * ct + offset + rng.normal(0.0, noise, shape)

    _, pet_affine, fine_shape, fine_affine = phantom.pet_grid(shape, spacing)
    tissue = _sample(anatomy.tissue, anatomy, fine_affine, fine_shape, view, 0, AIR)
    weight_fine, _ = _occupancy(fine_shape, fine_affine, center, radius, spacing)
    uptake = TISSUE_SUV[tissue] * (1.0 - weight_fine) + suv * weight_fine
    pet = phantom.pet_image(uptake, rng)

    volume_ml = float(mask.sum() * spacing**3 / 1000.0)
    rate = phantom.hazard(volume_ml, suv)
    time, event, event_time = phantom.draw_outcome(rng, rate)
    return phantom.PhantomPatient(
        patient_id=patient_id,
        ct=np.round(np.clip(ct, -1024, 3071)).astype(np.int16), ct_affine=affine,
        pet=np.clip(pet, 0.0, None).astype(np.float32), pet_affine=pet_affine,
        mask=mask.astype(np.uint8), label=label, time=time, event=event,
        latent={"label": label, "location": "parenchymal", "radius_mm": radius,
                "center": [float(c) for c in center], "suv": suv, "volume_ml": volume_ml, "hazard": rate,
                "event_time": event_time, "source": anatomy.name,
                "source_center": [float(c) for c in source_center], "rotation_deg": [float(a) for a in angles],
                "scale": scale, "flip": flip,
                "ct_jitter": {"gain": float(gain), "offset_hu": float(offset), "noise_hu": float(noise)}},
    )


def iter_cohort(anatomies: list[Anatomy], n: int, shape: Sequence[int] = (64, 64, 64), seed: int = 0, spacing: float = 2.0,
                lesions: phantom.LesionOptions = DEFAULT_LESIONS) -> Iterator[phantom.PhantomPatient]:
    """Yield `n` patients one at a time; the same anatomies and seed give the same cohort.

    Example:
    >>> with open_source("pyradiomics-3.0.1.tar.gz") as pairs:  # doctest: +SKIP
    ...     anatomies = [load_anatomy(image, label, spacing=2.0) for image, label in pairs]
    >>> patients = list(iter_cohort(anatomies, 4, shape=(48, 48, 48)))  # doctest: +SKIP
    """
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]
    for i, rng in enumerate(rngs):
        yield make_patient(f"P{i:04d}", rng, anatomies, shape, spacing, lesions)


def write_cohort(out: pathlib.Path | str, source: pathlib.Path | str, n: int = 120, shape: Sequence[int] = (64, 64, 64),
                 seed: int = 0, spacing: float = 2.0, progress: Callable[[int], Any] | None = None, split_fractions: dict | None = None,
                 lesions: phantom.LesionOptions = DEFAULT_LESIONS) -> pathlib.Path:
    """Write a real-CT cohort like `phantom.write_cohort`: NIfTI files (CT, PET, mask),
    `manifest.csv` with splits, and `real_ct.json` (settings, sources, latents).

    Args:
        out: output folder (created).
        source: the pyradiomics 3.0.1 sdist (`.tar.gz`), a folder of `*_image.nrrd`, or one image.
        n: number of patients.
        shape: CT grid in voxels.
        seed: random seed (patients and splits).
        spacing: CT voxel size in mm.
        progress: optional callable `progress(done)` after each patient.
        split_fractions: `{"train", "val"}` fractions (the rest is test); default `phantom.SPLIT_FRACTIONS`.
        lesions: radius range and CT contrast (default `DEFAULT_LESIONS`).

    Returns:
        Path of the manifest.

    Raises:
        ValueError: lesions that do not fit the grid (nothing is written).
        DataError: a missing or unreadable source, or SimpleITK missing.

    Example:
    >>> write_cohort("cohort", "pyradiomics-3.0.1.tar.gz", n=40, shape=(48, 48, 48))  # doctest: +SKIP
    PosixPath('cohort/manifest.csv')
    """
    check_lesions(lesions, tuple(shape), spacing)
    with open_source(source) as pairs:
        anatomies = [load_anatomy(image, label, spacing) for image, label in pairs]
    description = {"generator": "real_ct", "n": n, "shape": list(shape), "seed": seed, "spacing": spacing,
                   "lesions": lesions.to_json(), "nodule_margin_mm": NODULE_MARGIN_MM,
                   "sources": {a.name: a.sha256 for a in anatomies}}
    return phantom.write_patients(out, iter_cohort(anatomies, n, shape, seed, spacing, lesions),
                                  phantom.assign_splits(n, seed, split_fractions), "real_ct.json", description,
                                  progress)
