"""Per-patient preprocessing: NIfTI -> RAS -> common grid -> intensity window -> crop/pad.

Every modality of a patient is resampled, through the images' affines, onto one grid: an
axis-aligned RAS grid with the target spacing that covers the reference image (the first
modality, usually CT). Images are interpolated linearly and label maps by nearest
neighbour. Intensities are clipped to a per-modality window and scaled to [-1, 1] (CT:
[-1000, 1000] HU as in UNICON; PET: SUV [0, 20]). Finally every volume is cropped or
padded to the stage's shape around the body (or the mask), and the affine of that crop is
kept so predictions can be written back in world coordinates.
"""

import dataclasses

import nibabel as nib
import numpy as np
from scipy import ndimage

from unicon_tf.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class IntensityWindow:
    """Raw intensities times `scale`, clipped to [low, high], mapped linearly to [-1, 1].

    Args:
        low: lower bound after scaling (also the value outside a scan's field of view).
        high: upper bound after scaling.
        scale: factor applied first (e.g. Bq/mL -> SUV for PET).

    Example:
    >>> IntensityWindow(-1000, 1000).apply(np.array([-2000.0, 0.0, 500.0])).tolist()
    [-1.0, 0.0, 0.5]
    """

    low: float
    high: float
    scale: float = 1.0

    def __post_init__(self):
        if not self.high > self.low:
            raise ValueError(f"An intensity window needs high > low, got [{self.low}, {self.high}].")

    def apply(self, raw):
        clipped = np.clip(raw * self.scale, self.low, self.high)
        return ((clipped - self.low) * (2.0 / (self.high - self.low)) - 1.0).astype(np.float32)


DEFAULT_WINDOWS = {"ct": IntensityWindow(-1000.0, 1000.0), "pet": IntensityWindow(0.0, 20.0)}
"""CT in Hounsfield units (UNICON's window) and PET in SUV."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns a patient's NIfTI files into training volumes; stored in `schema.json`.

    Args:
        shape: output grid `(D, H, W)` in voxels (RAS axes).
        spacing: output voxel size in mm `(x, y, z)`.
        windows: modality -> `IntensityWindow` (defaults for `ct` and `pet`).
        center: crop around the `"body"` (reference image above `body_threshold`) or the
            `"mask"` (falls back to the body when a patient has no mask voxels).
        mask_classes: label-map classes including background; mask values must lie in
            [0, mask_classes - 1].
        body_threshold: raw reference intensity that separates body from air (HU for CT).
        min_overlap: smallest fraction of the reference grid another modality must cover.

    Example:
    >>> Preprocessing(shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0)).window("ct").high
    1000.0
    """

    shape: tuple
    spacing: tuple
    windows: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_WINDOWS))
    center: str = "body"
    mask_classes: int = 2
    body_threshold: float = -500.0
    min_overlap: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        windows = {m: w if isinstance(w, IntensityWindow) else IntensityWindow(*w) for m, w in self.windows.items()}
        object.__setattr__(self, "windows", windows)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive ints, got {self.shape}.")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive mm values, got {self.spacing}.")
        if self.center not in ("body", "mask"):
            raise ValueError(f"center must be 'body' or 'mask', got '{self.center}'.")
        if self.mask_classes < 2:
            raise ValueError(f"mask_classes must be >= 2, got {self.mask_classes}.")

    def window(self, modality):
        """The intensity window of `modality`; an error names a modality without one."""
        if modality not in self.windows:
            raise ValueError(
                f"No intensity window for modality '{modality}': give one, e.g. "
                f"windows={{'{modality}': (low, high)}} (known: {sorted(self.windows)})."
            )
        return self.windows[modality]

    def to_json(self):
        """A JSON-ready dict (inverse: `Preprocessing.from_json`)."""
        config = dataclasses.asdict(self)
        config["shape"], config["spacing"] = list(self.shape), list(self.spacing)
        config["windows"] = {m: dataclasses.asdict(w) for m, w in self.windows.items()}
        return config

    @classmethod
    def from_json(cls, config):
        config = dict(config)
        config["windows"] = {m: IntensityWindow(**w) for m, w in config["windows"].items()}
        return cls(**config)


def load_volume(path, patient=None, field=None):
    """Load a 3D NIfTI, reoriented to RAS; errors name patient, file and field.

    Args:
        path: the NIfTI file.
        patient: patient id, for error messages.
        field: manifest column, for error messages.

    Returns:
        `(data, affine)`: float32 array `(X, Y, Z)` in RAS voxel order and its 4x4 affine.
    """

    def fail(message):
        return DataError(message, patient=patient, file=path, field=field)

    try:
        image = nib.load(str(path))
        image = nib.as_closest_canonical(image) if len(image.shape) == 3 else image
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as error:  # nibabel raises many types for unreadable or truncated files
        raise fail(f"unreadable or truncated NIfTI ({type(error).__name__}: {error})") from error
    if data.ndim != 3:
        raise fail(f"expected a 3D image, got {data.ndim}D with shape {tuple(data.shape)}")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise fail(f"{bad} of {data.size} voxels are NaN or Inf")
    affine = image.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise fail("the affine is singular or not finite")
    return data, affine


def reference_grid(data, affine, spacing):
    """The axis-aligned RAS grid with `spacing` (mm) that covers an image's field of view.

    Returns:
        `(grid_affine, grid_shape)`.
    """
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, data.shape[0] - 0.5)
                        for j in (-0.5, data.shape[1] - 0.5) for k in (-0.5, data.shape[2] - 0.5)])
    world = (affine @ corners.T).T[:, :3]
    low, high = world.min(axis=0), world.max(axis=0)
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = np.maximum(1, np.round((high - low) / spacing).astype(int))
    grid = np.diag(np.append(spacing, 1.0))
    grid[:3, 3] = low + spacing / 2
    return grid, tuple(int(s) for s in shape)


def resample(data, affine, grid_affine, grid_shape, order, fill):
    """Sample `data` (with `affine`) on the grid `grid_affine` of shape `grid_shape`.

    Args:
        order: 1 for images (trilinear), 0 for label maps (nearest).
        fill: value outside the image's field of view.
    """
    voxel_from_grid = np.linalg.inv(affine) @ grid_affine
    return ndimage.affine_transform(
        data, voxel_from_grid[:3, :3], offset=voxel_from_grid[:3, 3], output_shape=tuple(grid_shape),
        order=order, mode="constant", cval=fill, prefilter=False,
    )


def crop_or_pad(volume, start, shape, fill):
    """The box `[start, start + shape)` of `volume`, padded with `fill` where it falls outside."""
    out = np.full(shape, fill, dtype=volume.dtype)
    src = [slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, shape, volume.shape)]
    dst = [slice(r.start - s, r.stop - s) for r, s in zip(src, start)]
    if all(r.stop > r.start for r in src):
        out[tuple(dst)] = volume[tuple(src)]
    return out


def crop_start(foreground, size, shape):
    """Start voxel of a `shape` box centred on the foreground's bounding box, kept inside the grid."""
    if np.any(foreground):
        idx = np.nonzero(foreground)
        center = np.array([(i.min() + i.max()) / 2.0 for i in idx])
    else:
        center = (np.asarray(size) - 1) / 2.0
    start = np.round(center - (np.asarray(shape) - 1) / 2.0).astype(int)
    for axis, (n, d) in enumerate(zip(shape, size)):
        start[axis] = min(max(start[axis], 0), d - n) if d >= n else (d - n) // 2
    return tuple(int(s) for s in start)


def preprocess_patient(patient, preprocessing):
    """Turn one manifest `Patient` into arrays on the stage's grid.

    Returns:
        dict with `patient_id`, `images` (modality -> float32 `shape` in [-1, 1]), `mask`
        (uint8 `shape` or None), `affine` (4x4 world affine of the output grid),
        `label`, `time`, `event`.
    """
    prep = preprocessing
    modalities = list(patient.images)
    reference, ref_affine = load_volume(patient.images[modalities[0]], patient.patient_id, modalities[0])
    grid_affine, grid_shape = reference_grid(reference, ref_affine, prep.spacing)

    raw = {}
    for modality in modalities:
        window = prep.window(modality)
        data, affine = (reference, ref_affine) if modality == modalities[0] else load_volume(
            patient.images[modality], patient.patient_id, modality)
        if modality != modalities[0]:
            _check_overlap(data, affine, grid_affine, grid_shape, prep.min_overlap, patient, modality)
        raw[modality] = resample(data, affine, grid_affine, grid_shape, order=1, fill=window.low / window.scale)

    mask = None
    if patient.mask is not None:
        data, affine = load_volume(patient.mask, patient.patient_id, "mask")
        values = np.unique(data)
        bad = values[(values != np.round(values)) | (values < 0) | (values > prep.mask_classes - 1)]
        if bad.size:
            raise DataError(
                f"mask values {bad[:5].tolist()} are outside the classes 0..{prep.mask_classes - 1}",
                patient=patient.patient_id, file=patient.mask, field="mask",
            )
        _check_overlap(data, affine, grid_affine, grid_shape, prep.min_overlap, patient, "mask")
        mask = resample(data, affine, grid_affine, grid_shape, order=0, fill=0).astype(np.uint8)

    body = raw[modalities[0]] > prep.body_threshold
    use_mask = prep.center == "mask" and mask is not None and np.any(mask)
    start = crop_start(mask > 0 if use_mask else body, grid_shape, prep.shape)
    out_affine = grid_affine.copy()
    out_affine[:3, 3] = grid_affine[:3, :3] @ np.asarray(start, dtype=np.float64) + grid_affine[:3, 3]
    images = {}
    for modality, volume in raw.items():
        window = prep.window(modality)
        images[modality] = crop_or_pad(window.apply(volume), start, prep.shape, fill=-1.0)
    return {
        "patient_id": patient.patient_id,
        "images": images,
        "mask": None if mask is None else crop_or_pad(mask, start, prep.shape, fill=0),
        "affine": out_affine,
        "label": patient.label,
        "time": patient.time,
        "event": patient.event,
    }


def _check_overlap(data, affine, grid_affine, grid_shape, min_overlap, patient, field):
    inside = resample(np.ones(data.shape, np.float32), affine, grid_affine, grid_shape, order=0, fill=0.0)
    coverage = float(inside.mean())
    if coverage < min_overlap:
        file = patient.mask if field == "mask" else patient.images[field]
        raise DataError(
            f"covers {coverage:.0%} of the reference image's field of view (needs >= {min_overlap:.0%}): "
            "check its affine (not overlapping the CT?)",
            patient=patient.patient_id, file=file, field=field,
        )

