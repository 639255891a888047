"""A built-in synthetic PET/CT cohort: chest phantoms with a lesion, labels, survival and masks.

Every patient is drawn independently from one documented generative model, so that the
whole UNICON workflow (classification -> prognosis -> segmentation -> PET) runs with nothing
to download, and so that its results can be checked against known truths.

Geometry (world RAS coordinates in mm, origin at the centre of a cubic field of view F):

- body: elliptic cylinder along z, semi-axes 0.42 F (x) and 0.30 F (y), 40 HU, SUV 1.0
- lungs: ellipsoids at x = +-0.19 F, semi-axes (0.14, 0.20, 0.38) F, -850 HU, SUV 0.5
- heart: ellipsoid at (-0.04, 0.07, -0.06) F, semi-axes (0.12, 0.10, 0.12) F, 40 HU, SUV 2.0
- spine: cylinder along z at y = -0.22 F, radius 0.05 F, 700 HU, SUV 1.6
- one lesion, a sphere of radius r, whose *character* is the classification label:
  label ~ Bernoulli(0.5); r ~ U(0.035, 0.07) F for label 0, U(0.05, 0.09) F for label 1.
  Location ~ Bernoulli(P_HIDDEN = 0.5) between:
  * parenchymal (inside a lung): 40 HU if label 1 (solid), -350 HU if label 0 (part-solid);
    clearly delineated on CT;
  * mediastinal (within the heart's soft tissue, centre within 0.3 (s - r) of the heart's
    centre along each semi-axis s, so that all of it lies in soft tissue): 40 HU whatever
    the label, so on CT it is indistinguishable from the heart around it: its extent (and
    its size, the label's cue) shows on PET only.
  Uptake: SUV ~ U(3.5, 5.5) for label 0, U(7, 13) for label 1: clear on PET everywhere.
- Small, faint lesions (`LesionOptions`, `unicon-tf phantom --lesion-radius LOW HIGH
  --lesion-contrast HU`): r ~ U(LOW, HIGH) mm whatever the label, and a solid
  parenchymal lesion ct_contrast_hu above the lung's -850 HU (a part-solid one 500/890 of
  it, the documented model's ratio); mediastinal lesions stay at 40 HU (hidden on CT).
  Left unset, the documented distributions above hold and a cohort is byte for byte the
  same as without the option.
- CT: Gaussian noise of 15 HU. PET: the SUV map blurred (Gaussian, FWHM 1.5 PET voxels),
  sampled on a grid of twice the CT spacing shifted by a quarter voxel, with 10%
  multiplicative noise. CT and PET are co-registered in world space through their affines.
  The CT is stored in LPS-like voxel order (x and y flipped) to exercise reorientation.

Survival (months): a proportional-hazards model on the lesion's volume V (mL) and uptake,

    hazard h = H0 * (V / V0) ** BETA_VOLUME * exp(BETA_SUV * (SUV - SUV0))
    event time T ~ Exponential(h);  censoring C ~ Uniform(C_MIN, C_MAX)
    time = min(T, C);  event = 1 if T <= C

so P(event | h) = 1 - (exp(-h C_MIN) - exp(-h C_MAX)) / (h (C_MAX - C_MIN)).

Mask: 1 on the lesion, 0 elsewhere, on the CT grid. Label, survival and mask all derive
from the same lesion, so an encoder trained on one task has learned features for the
others.
"""

import csv
import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

P_HIDDEN = 0.5
HEART_CENTER, HEART_SEMI_AXES = (-0.04, 0.07, -0.06), (0.12, 0.10, 0.12)  # in units of the field of view
H0, V0, BETA_VOLUME, SUV0, BETA_SUV = 1.0 / 24.0, 4.0, 0.8, 6.0, 0.15
C_MIN, C_MAX = 6.0, 60.0
LUNG_HU, SOFT_TISSUE_HU, PART_SOLID_HU = -850.0, 40.0, -350.0
MAX_CONTRAST_HU = 1850.0
"""Largest `LesionOptions.ct_contrast_hu`: a lesion at most +1000 HU (calcified), as lung CT shows."""
MAX_RADIUS = 0.09  # the largest lesion radius the anatomy holds, in units of the field of view
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
SUV_RANGE = {0: (3.5, 5.5), 1: (7.0, 13.0)}
"""A lesion's uptake (SUV) ~ U(SUV_RANGE[label])."""
PET_FWHM = 1.5  # the PET point-spread function's FWHM, in PET voxels
PET_NOISE = 0.1  # multiplicative Gaussian noise of the PET image


@dataclasses.dataclass(frozen=True)
class LesionOptions:
    """The lesions' size and CT contrast, when not the documented model's (see the module docstring).

    Args:
        radius_mm: `(low, high)`: every lesion's radius ~ U(low, high) mm, whatever its
            label; None: the documented per-label distributions (in units of the field of view).
        ct_contrast_hu: HU of a solid (label 1) parenchymal lesion above the lung (-850 HU);
            a part-solid (label 0) one gets 500/890 of it; mediastinal lesions stay soft
            tissue (40 HU, hidden on CT). None: the documented 40 / -350 HU (890 / 500 above the lung).

    Raises:
        ValueError: a radius range that is empty, not positive, or a contrast that is not
            a finite number in (0, MAX_CONTRAST_HU] (`check` adds the limits that depend on
            the grid).

    Example:
    >>> small = LesionOptions(radius_mm=(4.0, 9.0), ct_contrast_hu=60.0)
    >>> patient = make_patient("P0", np.random.default_rng(0), shape=(56, 56, 56), spacing=2.0, lesions=small)
    >>> bool(4.0 <= patient.latent["radius_mm"] <= 9.0)
    True
    """

    radius_mm: tuple | None = None
    ct_contrast_hu: float | None = None

    def __post_init__(self):
        if self.radius_mm is not None:
            low, high = (float(r) for r in self.radius_mm)
            if not (np.isfinite(low) and np.isfinite(high) and 0.0 < low <= high):
                raise ValueError(f"lesion radius range must be 0 < low <= high (mm), got {tuple(self.radius_mm)}.")
            object.__setattr__(self, "radius_mm", (low, high))
        if self.ct_contrast_hu is not None:
            if isinstance(self.ct_contrast_hu, bool) or not np.isfinite(float(self.ct_contrast_hu)):
                raise ValueError(f"lesion CT contrast must be a finite number of HU, got {self.ct_contrast_hu!r}.")
            if not 0 < float(self.ct_contrast_hu) <= MAX_CONTRAST_HU:
                raise ValueError(f"lesion CT contrast must be in (0, {MAX_CONTRAST_HU:g}] HU above the lung's "
                                 f"{LUNG_HU:g} HU (a lesion denser than lung, at most {LUNG_HU + MAX_CONTRAST_HU:+g} "
                                 f"HU), got {self.ct_contrast_hu!r}.")
            object.__setattr__(self, "ct_contrast_hu", float(self.ct_contrast_hu))

    def check(self, fov: float, spacing: float) -> None:
        """Raise ValueError when the radius range does not fit a grid: above `MAX_RADIUS` of
        the field of view `fov` (mm; a larger lesion leaves the heart's soft tissue), or
        below half a voxel (`spacing`, mm; the mask could be empty)."""
        if self.radius_mm is None:
            return
        low, high = self.radius_mm
        if high > MAX_RADIUS * fov:
            raise ValueError(f"lesion radius {high:g} mm is too large for a {fov:g} mm field of view: at most "
                             f"{MAX_RADIUS:g} x the field of view ({MAX_RADIUS * fov:g} mm) fits the anatomy.")
        if low < spacing / 2:
            raise ValueError(f"lesion radius {low:g} mm is below half a voxel ({spacing / 2:g} mm): its mask "
                             "could be empty; use a finer --spacing or a larger radius.")

    def to_json(self) -> dict[str, Any]:
        """The options that are set (an empty dict for the documented model)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if v is not None}


@dataclasses.dataclass
class PhantomPatient:
    """One synthetic patient: images with affines, targets, and the latent truth behind them."""

    patient_id: str
    ct: np.ndarray  # HU, int16
    ct_affine: np.ndarray
    pet: np.ndarray  # SUV, float32
    pet_affine: np.ndarray
    mask: np.ndarray  # uint8, on the CT grid
    label: int
    time: float
    event: int
    latent: dict  # location, radius_mm, volume_ml, suv, hazard, event_time


def event_probability(hazard: float | np.ndarray) -> float | np.ndarray:
    """P(T <= C) for T ~ Exp(hazard) and C ~ U(C_MIN, C_MAX): the model's event rate."""
    hazard = np.asarray(hazard, dtype=np.float64)
    return 1.0 - (np.exp(-hazard * C_MIN) - np.exp(-hazard * C_MAX)) / (hazard * (C_MAX - C_MIN))


def _world(shape, affine):
    """World coordinates (mm) of every voxel centre, shape `(3,) + shape`."""
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:4]).reshape((3,) + tuple(shape))


def _ellipsoid(world, center, semi_axes):
    d = sum(((world[i] - center[i]) / semi_axes[i]) ** 2 for i in range(3))
    return d <= 1.0


def _anatomy(world, fov, lesion):
    """Label volumes (boolean) of body, lungs, heart, spine and lesion at world points."""
    x, y = world[0], world[1]
    body = (x / (0.42 * fov)) ** 2 + (y / (0.30 * fov)) ** 2 <= 1.0
    lungs = _ellipsoid(world, (0.19 * fov, 0, 0), (0.14 * fov, 0.20 * fov, 0.38 * fov))
    lungs |= _ellipsoid(world, (-0.19 * fov, 0, 0), (0.14 * fov, 0.20 * fov, 0.38 * fov))
    heart = _ellipsoid(world, [c * fov for c in HEART_CENTER], [a * fov for a in HEART_SEMI_AXES])
    lungs &= ~heart
    spine = (x / (0.05 * fov)) ** 2 + ((y + 0.22 * fov) / (0.05 * fov)) ** 2 <= 1.0
    r = lesion["radius_mm"]
    lesion_mask = _ellipsoid(world, lesion["center"], (r, r, r)) & body
    return body, lungs, heart, spine, lesion_mask


def _draw_lesion(rng, fov, lesions):
    label = int(rng.random() < 0.5)
    if lesions.radius_mm is None:
        radius = rng.uniform(*((0.05, MAX_RADIUS) if label else (0.035, 0.07))) * fov
    else:
        radius = rng.uniform(*lesions.radius_mm)
    hidden = bool(rng.random() < P_HIDDEN)
    if hidden:  # inside the heart's soft tissue, none of it touching the lung
        margin = 0.3 * (np.array(HEART_SEMI_AXES) * fov - radius)
        center = tuple(np.array(HEART_CENTER) * fov + rng.uniform(-1.0, 1.0, 3) * margin)
    else:  # well inside one lung
        side = 1.0 if rng.random() < 0.5 else -1.0
        center = (side * 0.21 * fov, rng.uniform(-0.08, 0.08) * fov, rng.uniform(-0.2, 0.2) * fov)
    suv = rng.uniform(*SUV_RANGE[label])
    return {"label": label, "radius_mm": float(radius), "center": tuple(float(c) for c in center),
            "location": "mediastinal" if hidden else "parenchymal", "suv": float(suv)}


def _lesion_hu(lesion, lesions):
    """The lesion's CT value: soft tissue if mediastinal; in a lung, solid or part-solid by label."""
    if lesion["location"] == "mediastinal":
        return SOFT_TISSUE_HU
    return parenchymal_hu(lesion["label"], lesions)


def parenchymal_hu(label: int, lesions: LesionOptions) -> float:
    """The CT value (HU) of a lesion in a lung: solid (label 1) or part-solid (label 0).

    Args:
        label: the lesion's class.
        lesions: its `LesionOptions`: with `ct_contrast_hu` set, a solid lesion lies that
            far above the lung's `LUNG_HU` and a part-solid one 500/890 of it; unset, the
            documented 40 / -350 HU.

    Returns:
        HU.

    Example:
    >>> parenchymal_hu(0, LesionOptions(ct_contrast_hu=89.0))
    -800.0
    """
    if lesions.ct_contrast_hu is None:
        return SOFT_TISSUE_HU if label else PART_SOLID_HU
    ratio = 1.0 if label else (PART_SOLID_HU - LUNG_HU) / (SOFT_TISSUE_HU - LUNG_HU)
    return LUNG_HU + ratio * lesions.ct_contrast_hu


def ct_affine(shape: tuple, spacing: float) -> np.ndarray:
    """The CT grid's affine: LPS-like voxel order (x and y flipped), `spacing` mm, centred on
    the world origin (the field of view's centre)."""
    extent = np.asarray(shape) * spacing
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = [extent[0] / 2 - spacing / 2, extent[1] / 2 - spacing / 2, -extent[2] / 2 + spacing / 2]
    return affine


def pet_grid(shape: tuple, spacing: float) -> tuple[tuple, np.ndarray, tuple, np.ndarray]:
    """The PET grid of a CT grid, and the fine grid its uptake is drawn on.

    The PET voxel is twice the CT's (`spacing` mm), the grid shifted by a quarter PET voxel
    from the CT's centre; the fine grid has the CT's spacing and two voxels per PET voxel
    and axis, so `pet_image` block-averages it onto the PET grid.

    Returns:
        `(pet_shape, pet_affine, fine_shape, fine_affine)`.

    Example:
    >>> pet_shape, _, fine_shape, _ = pet_grid((24, 24, 20), 2.0)
    >>> pet_shape, fine_shape
    ((12, 12, 10), (24, 24, 20))
    """
    pet_spacing = 2.0 * spacing
    pet_shape = tuple(max(1, int(s) // 2) for s in shape)
    pet_affine = np.diag([pet_spacing, pet_spacing, pet_spacing, 1.0])
    pet_affine[:3, 3] = -np.asarray(pet_shape) * pet_spacing / 2 + pet_spacing / 2 + pet_spacing / 4
    fine_affine = np.diag([spacing, spacing, spacing, 1.0])
    fine_affine[:3, 3] = pet_affine[:3, 3] - pet_spacing / 4
    return pet_shape, pet_affine, tuple(2 * s for s in pet_shape), fine_affine


def pet_image(suv: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A PET image from an uptake map on `pet_grid`'s fine grid: blurred by the point-spread
    function (Gaussian, FWHM `PET_FWHM` PET voxels), block-averaged onto the PET grid
    (half the fine grid's shape), with `PET_NOISE` multiplicative Gaussian noise.

    Args:
        suv: SUV on the fine grid, shape `2 * pet_shape`.
        rng: a `numpy.random.Generator`.

    Returns:
        SUV on the PET grid, float64, not clipped.
    """
    pet_shape = tuple(s // 2 for s in suv.shape)
    sigma = PET_FWHM * 2.0 / 2.3548  # in fine voxels
    blurred = ndimage.gaussian_filter(suv, sigma).reshape(pet_shape[0], 2, pet_shape[1], 2, pet_shape[2], 2)
    return blurred.mean(axis=(1, 3, 5)) * (1.0 + rng.normal(0.0, PET_NOISE, pet_shape))


def hazard(volume_ml: float, suv: float) -> float:
    """The proportional-hazards model's hazard (per month) of a lesion of `volume_ml` mL and
    uptake `suv` (see the module docstring)."""
    return float(H0 * (max(volume_ml, 1e-3) / V0) ** BETA_VOLUME * np.exp(BETA_SUV * (suv - SUV0)))


def draw_outcome(rng: np.random.Generator, rate: float) -> tuple[float, int, float]:
    """Draw survival under `rate` (`hazard`): T ~ Exponential(rate), C ~ U(C_MIN, C_MAX).

    Returns:
        `(time, event, event_time)`: months min(T, C) (at least 0.01), 1 if T <= C, and T.

    Example:
    >>> time, event, t = draw_outcome(np.random.default_rng(0), hazard(4.0, 6.0))
    >>> event == int(t <= time + 1e-9)
    True
    """
    event_time = float(rng.exponential(1.0 / rate))
    censor_time = float(rng.uniform(C_MIN, C_MAX))
    return float(max(min(event_time, censor_time), 0.01)), int(event_time <= censor_time), event_time


def make_patient(patient_id: str, rng: np.random.Generator, shape: Sequence[int] = (64, 64, 64), spacing: float = 3.0,
                 lesions: LesionOptions | None = None) -> PhantomPatient:
    """Draw one `PhantomPatient` from the generative model (see the module docstring).

    Args:
        patient_id: identifier.
        rng: a `numpy.random.Generator`.
        shape: CT grid in voxels; the field of view is `shape[0] * spacing` mm.
        spacing: CT voxel size in mm (isotropic); PET voxels are twice as large.
        lesions: a `LesionOptions` (default: the documented model).

    Raises:
        ValueError: `lesions` does not fit the grid (`LesionOptions.check`).
    """
    shape = tuple(int(s) for s in shape)
    fov = shape[0] * spacing
    lesions = lesions or LesionOptions()
    lesions.check(fov, spacing)
    affine = ct_affine(shape, spacing)
    lesion = _draw_lesion(rng, fov, lesions)

    body, lungs, heart, spine, lesion_mask = _anatomy(_world(shape, affine), fov, lesion)
    ct = np.full(shape, -1000.0)
    ct[body] = SOFT_TISSUE_HU
    ct[lungs] = LUNG_HU
    ct[heart] = SOFT_TISSUE_HU
    ct[spine] = 700.0
    ct[lesion_mask] = _lesion_hu(lesion, lesions)
    ct += rng.normal(0.0, 15.0, shape)

    _, pet_affine, fine_shape, fine = pet_grid(shape, spacing)  # uptake drawn at CT resolution, then blurred
    body, lungs, heart, spine, lesion_fine = _anatomy(_world(fine_shape, fine), fov, lesion)
    suv = np.zeros(fine_shape)
    suv[body], suv[lungs], suv[heart], suv[spine], suv[lesion_fine] = 1.0, 0.5, 2.0, 1.6, lesion["suv"]
    pet = pet_image(suv, rng)

    volume_ml = float(lesion_mask.sum() * spacing**3 / 1000.0)
    rate = hazard(volume_ml, lesion["suv"])
    time, event, event_time = draw_outcome(rng, rate)
    return PhantomPatient(
        patient_id=patient_id,
        ct=np.round(ct).astype(np.int16), ct_affine=affine,
        pet=np.clip(pet, 0.0, None).astype(np.float32), pet_affine=pet_affine,
        mask=lesion_mask.astype(np.uint8),
        label=lesion["label"], time=time, event=event,
        latent={**lesion, "volume_ml": volume_ml, "hazard": rate, "event_time": event_time},
    )


def iter_cohort(n: int, shape: Sequence[int] = (64, 64, 64), seed: int = 0, spacing: float = 3.0,
                lesions: LesionOptions | None = None) -> Iterator[PhantomPatient]:
    """Yield `n` phantom patients one at a time (see `cohort`)."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]
    for i, rng in enumerate(rngs):
        yield make_patient(f"P{i:04d}", rng, shape, spacing, lesions)


def cohort(n: int, shape: Sequence[int] = (64, 64, 64), seed: int = 0, spacing: float = 3.0,
           lesions: LesionOptions | None = None) -> list[PhantomPatient]:
    """Draw `n` phantom patients; the same seed gives the same cohort.

    Args:
        n: number of patients.
        shape: CT grid in voxels.
        seed: random seed.
        spacing: CT voxel size in mm.
        lesions: a `LesionOptions` (default: the documented model).

    Returns:
        A list of `PhantomPatient`, ids `P0000`, `P0001`, ...

    Raises:
        ValueError: `lesions` does not fit the grid.

    Example:
    >>> patients = cohort(4, shape=(32, 32, 32), seed=0, spacing=6.0)
    >>> [p.patient_id for p in patients]
    ['P0000', 'P0001', 'P0002', 'P0003']
    """
    return list(iter_cohort(n, shape, seed, spacing, lesions))


def assign_splits(n: int, seed: int = 0, fractions: Mapping[str, float] | None = None) -> list[str]:
    """Deterministic train/val/test assignment in the proportions `fractions` (default
    `SPLIT_FRACTIONS`); the test split takes the rest."""
    fractions = fractions or SPLIT_FRACTIONS
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(n * fractions["train"]))
    n_val = int(round(n * fractions["val"]))
    splits = np.empty(n, dtype=object)
    splits[order[:n_train]] = "train"
    splits[order[n_train:n_train + n_val]] = "val"
    splits[order[n_train + n_val:]] = "test"
    return splits.tolist()


def write_cohort(out: pathlib.Path | str, n: int = 120, shape: Sequence[int] = (64, 64, 64), seed: int = 0,
                 spacing: float = 3.0, progress: Callable[[int], object] | None = None,
                 split_fractions: Mapping[str, float] | None = None,
                 lesions: LesionOptions | None = None) -> pathlib.Path:
    """Write a phantom cohort as NIfTI files plus `manifest.csv` and `phantom.json` (latents).

    Args:
        out: output folder (created).
        n, shape, seed, spacing: see `cohort`.
        progress: optional callable `progress(done)` after each patient.
        split_fractions: `{"train", "val"}` fractions of the patients (the rest is test);
            default `SPLIT_FRACTIONS`.
        lesions: a `LesionOptions` (default: the documented model); recorded in
            `phantom.json` when set.

    Returns:
        Path of the manifest.

    Raises:
        ValueError: `lesions` does not fit the grid (nothing is written).
    """
    lesions = lesions or LesionOptions()
    lesions.check(int(shape[0]) * spacing, spacing)
    options = {"lesions": lesions.to_json()} if lesions.to_json() else {}  # absent for the documented model
    return write_patients(out, iter_cohort(n, shape, seed, spacing, lesions), assign_splits(n, seed, split_fractions),
                          "phantom.json", {"n": n, "shape": list(shape), "seed": seed, "spacing": spacing, **options},
                          progress)


def write_patients(out: pathlib.Path | str, patients: Iterable[PhantomPatient], splits: list, record: str, description: dict,
                   progress: Callable[[int], Any] | None = None) -> pathlib.Path:
    """Write generated patients (`PhantomPatient`s) as NIfTI files plus `manifest.csv`, and
    `description` with every patient's latents as `record` (JSON), the generator's record.

    Args:
        out: output folder (created).
        patients: an iterable of `PhantomPatient`.
        splits: each patient's split (`assign_splits`).
        record: file name of the generator's record, e.g. `phantom.json`.
        description: the generator's settings, written before the latents.
        progress: optional callable `progress(done)` after each patient.

    Returns:
        Path of the manifest.
    """
    out = pathlib.Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, latents = [], {}
    for i, (patient, split) in enumerate(zip(patients, splits)):
        files = {}
        for field, data, affine in (("ct", patient.ct, patient.ct_affine), ("pet", patient.pet, patient.pet_affine),
                                    ("mask", patient.mask, patient.ct_affine)):
            files[field] = f"images/{patient.patient_id}_{field}.nii.gz"
            image = nib.Nifti1Image(data, affine)
            image.header.set_xyzt_units("mm", "sec")
            nib.save(image, str(out / files[field]))
        rows.append({"patient_id": patient.patient_id, "split": split, "ct": files["ct"], "pet": files["pet"],
                     "label": patient.label, "time": f"{patient.time:.4f}", "event": patient.event,
                     "mask": files["mask"]})
        latents[patient.patient_id] = patient.latent
        if progress:
            progress(i + 1)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / record).write_text(json.dumps({**description, "latent": latents}, indent=1) + "\n")
    return manifest
