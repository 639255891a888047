"""Per-patient preprocessing: NIfTI -> RAS -> common grid -> intensity window -> crop/pad.

Every modality of a patient is resampled, through the images' affines, onto one grid: an
axis-aligned RAS grid with the target spacing that covers the reference image (the first
modality, usually CT), after the geometry checks of `resample_patient`, which ingestion and
inference share. Images are interpolated linearly and label maps by nearest
neighbour. Intensities are clipped to a per-modality window and scaled to [-1, 1] (CT:
[-1000, 1000] HU as in UNICON; PET: SUV [0, 20]). Finally every volume is cropped or
padded to the stage's shape around the body (or the mask), and the affine of that crop is
kept so predictions can be written back in world coordinates.
"""

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from unicon_tf.data import dicom
from unicon_tf.data.errors import DataError, DataWarning

if TYPE_CHECKING:
    from unicon_tf.data.manifest import Patient


@dataclasses.dataclass(frozen=True)
class IntensityWindow:
    """Raw intensities times `scale`, clipped to [low, high], mapped linearly to `out_range`
    ([-1, 1] by default; [0, 1] for the I3ResNet presets, Merlin's range).

    Args:
        low: lower bound after scaling (also the value outside a scan's field of view).
        high: upper bound after scaling.
        scale: factor applied first (e.g. Bq/mL -> SUV for PET).
        out_range: the values `low` and `high` map to.

    Example:
    >>> IntensityWindow(-1000, 1000).apply(np.array([-2000.0, 0.0, 500.0])).tolist()
    [-1.0, 0.0, 0.5]
    >>> IntensityWindow(-1000, 1000, out_range=(0, 1)).apply(np.array([-1000.0, 0.0])).tolist()
    [0.0, 0.5]
    """

    low: float
    high: float
    scale: float = 1.0
    out_range: tuple = (-1.0, 1.0)

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"An intensity window needs finite bounds, high > low, got [{self.low}, {self.high}].")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"An intensity window's scale must be a finite factor > 0, got {self.scale}.")
        out_range = tuple(float(v) for v in self.out_range)
        if len(out_range) != 2 or not out_range[1] > out_range[0]:
            raise ValueError(f"An intensity window's out_range needs two values, low < high, got {self.out_range}.")
        object.__setattr__(self, "out_range", out_range)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        clipped = np.clip(raw * self.scale, self.low, self.high)
        low, high = self.out_range
        return ((clipped - self.low) * ((high - low) / (self.high - self.low)) + low).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; `out_range` only when not the default (older schemas stay as they were)."""
        config = dataclasses.asdict(self)
        if self.out_range == (-1.0, 1.0):
            config.pop("out_range")
        else:
            config["out_range"] = list(self.out_range)
        return config


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
        min_overlap: smallest fraction of the reference image's (oriented) field of view
            another modality must cover, and of the smaller field of view a mask must share
            with it (see `resample_patient`).

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

    def window(self, modality: str) -> IntensityWindow:
        """The intensity window of `modality`; an error names a modality without one."""
        if modality not in self.windows:
            raise ValueError(
                f"No intensity window for modality '{modality}': give one, e.g. "
                f"windows={{'{modality}': (low, high)}} (known: {sorted(self.windows)})."
            )
        return self.windows[modality]

    def check_per_patient_scale(self, modality: str, source: str) -> None:
        """Refuse a per-patient factor (from `source`) on a modality whose window already scales.

        One factor per modality: the cohort's window `scale` (`--scale`) or a per-patient
        one (a manifest column, `predict --scale`), never both multiplied.

        Raises:
            ValueError: the window of `modality` has a `scale` other than 1.
        """
        scale = self.window(modality).scale
        if scale != 1.0:
            raise ValueError(f"'{modality}' is scaled per patient ({source}) and by the window's scale {scale} "
                             f"(--scale {modality} at ingestion): give one of the two")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (inverse: `Preprocessing.from_json`)."""
        config = dataclasses.asdict(self)
        config["shape"], config["spacing"] = list(self.shape), list(self.spacing)
        config["windows"] = {m: w.to_json() for m, w in self.windows.items()}
        return config

    @classmethod
    def from_json(cls, config: Mapping[str, Any]) -> "Preprocessing":
        config = dict(config)
        config["windows"] = {m: IntensityWindow(**w) for m, w in config["windows"].items()}
        return cls(**config)


def load_volume(path: "dicom.PathLike | dicom.SeriesRef", patient: str | None = None, field: str | None = None,
                reference: tuple | list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D image (NIfTI, DICOM, ITK), reoriented to RAS; errors name patient, file and field.

    NIfTI (and nibabel's other formats) are read with nibabel; a folder (or a
    `unicon_tf.data.dicom.SeriesRef`) as a DICOM series, a `.dcm` file as a DICOM SEG,
    RTSTRUCT or multi-frame image, and `.nrrd`/`.seg.nrrd`/`.mha`/`.mhd` with SimpleITK
    (`unicon_tf.data.dicom`: their LPS geometry is turned into RAS); every kind then goes
    through the same checks and reorientation below.

    A 3D image stored with trailing size-1 dimensions (`(X, Y, Z, 1)`, `(X, Y, Z, 1, 1)`,
    as some converters write) is read as 3D; a series of several volumes is refused. When
    the header's sform and qform both apply but place the image differently (by more than
    a tenth of a voxel), a `DataWarning` names the file; the sform is used, as nibabel does.
    A header with neither an sform nor a qform code (position guessed from pixdim) also
    warns.

    Args:
        path: the NIfTI file, DICOM series folder or `SeriesRef`, DICOM or ITK file.
        patient: patient id, for error messages.
        field: manifest column, for error messages.
        reference: `(shape, affine)` of the grid a RTSTRUCT is drawn on, or a list of the
            patient's image grids (the first its contours lie in is used).

    Returns:
        `(data, affine)`: float32 array `(X, Y, Z)` in RAS voxel order and its 4x4 affine.

    Raises:
        DataError: unreadable or truncated file, not one 3D volume, an empty dimension, NaN/Inf voxels, or an
            affine that is not finite or singular (the message says which header field).
    """

    image, fail = _checked_image(path, patient, field, reference)
    try:
        image = nib.as_closest_canonical(image)
    except Exception as error:
        raise fail(f"unreadable or truncated NIfTI ({type(error).__name__}: {error})") from error
    return _float_voxels(image, fail), image.affine


def _float_voxels(image, fail):
    """The image's voxels as float32 `(X, Y, Z)`, scaling applied, none NaN or Inf."""
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(image.shape[:3])
    except Exception as error:
        raise fail(f"unreadable or truncated NIfTI ({type(error).__name__}: {error})") from error
    bad = _count_non_finite(data)
    if bad:
        raise fail(f"{bad} of {data.size} voxels are NaN or Inf")
    return data


def _checked_image(path, patient=None, field=None, reference=None):
    """`(image, fail)`: the image at `path` (NIfTI, or DICOM/ITK read into one), its header checked (readable, a finite and
    non-singular affine, one 3D volume, no empty dimension) and squeezed to 3D, its voxels
    not read; `fail(message)` makes the DataError naming patient, file and field.

    Raises:
        DataError: see `load_volume`.
    """

    def fail(message):
        return DataError(message, patient=patient, file=path, field=field)

    kind = dicom.kind_of(path)
    if kind != "nifti":
        readers = {"series": dicom.load_series, "itk": dicom.load_itk,
                   "dicom": functools.partial(dicom.load_dicom_file, reference=reference)}
        image = nib.Nifti1Image(*readers[kind](path, patient, field))
        image.set_qform(None)  # one affine (the sform), which may be sheared (a gantry tilt)
    try:
        image = image if kind != "nifti" else nib.load(str(path))
        shape = tuple(image.shape)
    except Exception as error:  # nibabel raises many types for unreadable or truncated files
        raise fail(f"unreadable or truncated NIfTI ({type(error).__name__}: {error})") from error
    affine, source = image.affine, _affine_source(image)
    if affine is None:
        raise fail("the image has no affine: its position in world space is unknown")
    if not np.all(np.isfinite(affine)):
        raise fail(f"the affine ({source}) holds NaN or Inf: {np.asarray(affine).round(3).tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise fail(f"the affine ({source}) is singular (a zero voxel size or collapsed axes): "
                   f"{np.asarray(affine).round(3).tolist()}")
    _warn_if_sform_and_qform_disagree(image, path)
    if source.startswith("pixdim"):
        warnings.warn(f"{path}: the header has no sform or qform code, so the image's position and orientation "
                      "in world space are a guess from its voxel sizes (pixdim); masks and other modalities "
                      "are aligned to it only if they were written the same way", DataWarning, stacklevel=2)
    if len(shape) > 3 and all(size == 1 for size in shape[3:]):
        shape = shape[:3]
    if len(shape) != 3:
        series = len(shape) > 3 and all(size == 1 for size in shape[4:])
        raise fail(f"expected a 3D image, got a series of {shape[3]} volumes (shape {shape})" if series else
                   f"expected a 3D image, got {len(shape)}D with shape {shape}")
    if 0 in shape:
        raise fail(f"the image is empty: a dimension of size 0 (shape {shape})")
    return nib.funcs.squeeze_image(image), fail


def load_stored_volume(path: "dicom.PathLike | dicom.SeriesRef", patient: str | None = None, field: str | None = None,
                       reference: tuple | list | None = None) -> tuple[np.ndarray, np.ndarray, float, float]:
    """A 3D NIfTI's voxels as stored, for resampling without a full-resolution float copy.

    `load_volume` returns float32 in RAS voxel order: for a 512x512x600 int16 CT that is
    twice the stored bytes, plus a reoriented copy. Resampling needs neither (it goes
    through the affine): this returns the stored array (integers unscaled: the NIfTI
    `scl_slope`/`scl_inter` are returned to apply after resampling, on the small grid;
    floats as float32 with the scaling applied) in RAS voxel order (a view of the stored array).

    Args:
        path, patient, field, reference: as `load_volume` (a DICOM or ITK image is read whole,
            as float32: only NIfTI integers are kept as stored).

    Returns:
        `(data, affine, slope, intercept)`: the value of a voxel is `data * slope + intercept`.

    Raises:
        DataError: as `load_volume` (NaN or Inf voxels of a float image included).
    """
    image, fail = _checked_image(path, patient, field, reference)
    # RAS voxel order as `load_volume` gives it, by views (flips and transposes, no copy): the
    # same voxels on the same affine resample to the same bytes whatever the file's order.
    orientation = nib.orientations.io_orientation(image.affine)
    affine = image.affine @ nib.orientations.inv_ornt_aff(orientation, image.shape[:3])
    proxy = image.dataobj
    if np.issubdtype(image.get_data_dtype(), np.integer) and hasattr(proxy, "get_unscaled"):
        try:
            data = np.asarray(proxy.get_unscaled()).reshape(image.shape[:3])
        except Exception as error:
            raise fail(f"unreadable or truncated NIfTI ({type(error).__name__}: {error})") from error
        slope, intercept = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    else:
        data, slope, intercept = _float_voxels(image, fail), 1.0, 0.0
    return nib.orientations.apply_orientation(data, orientation), affine, slope, intercept


def _count_non_finite(data, slab=8):
    """NaN and Inf voxels of a 3D array, counted slab by slab (no full-size mask)."""
    return sum(int(data[i:i + slab].size - np.count_nonzero(np.isfinite(data[i:i + slab])))
               for i in range(0, data.shape[0], slab))


def _affine_source(image):
    """Which header field the image's affine comes from (as nibabel chooses it)."""
    header = image.header
    if not hasattr(header, "get_sform"):
        return "header"
    if int(header["sform_code"]) > 0:
        return "sform"
    return "qform" if int(header["qform_code"]) > 0 else "pixdim (no sform or qform code)"


def _warn_if_sform_and_qform_disagree(image, path):
    header = image.header
    if not hasattr(header, "get_sform") or int(header["sform_code"]) == 0 or int(header["qform_code"]) == 0:
        return
    sform, qform = header.get_sform(), header.get_qform()
    corners = fov_corners(image.shape[:3])
    finite = np.all(np.isfinite(qform))
    gap = float(np.linalg.norm(((sform - qform) @ corners.T)[:3], axis=0).max()) if finite else float("inf")
    voxel = float(np.min(np.linalg.norm(sform[:3, :3], axis=0)))
    if not gap <= 0.1 * voxel:
        warnings.warn(f"{path}: the sform and the qform place the image differently (by up to {gap:.3g} mm at "
                      "its corners); using the sform, as nibabel does: check which one the scanner meant",
                      DataWarning, stacklevel=3)


def fov_corners(shape: Sequence[int]) -> np.ndarray:
    """The 8 corners of a field of view `(X, Y, Z)`, homogeneous voxel indices `(8, 4)` (voxel edges at +-0.5)."""
    return np.array([[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                     for k in (-0.5, shape[2] - 0.5)])


def reference_grid(data: np.ndarray, affine: np.ndarray,
                   spacing: Sequence[float] | np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """The axis-aligned RAS grid with `spacing` (mm) that covers an image's field of view.

    Returns:
        `(grid_affine, grid_shape)`.
    """
    world = (affine @ fov_corners(data.shape).T).T[:, :3]
    low, high = world.min(axis=0), world.max(axis=0)
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = np.maximum(1, np.round((high - low) / spacing).astype(int))
    grid = np.diag(np.append(spacing, 1.0))
    grid[:3, 3] = low + spacing / 2
    return grid, tuple(int(s) for s in shape)


def resample(data: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, grid_shape: Sequence[int], order: int,
             fill: float, output: np.dtype | type | None = None) -> np.ndarray:
    """Sample `data` (with `affine`) on the grid `grid_affine` of shape `grid_shape`.

    Args:
        order: 1 for images (trilinear), 0 for label maps (nearest).
        fill: value outside the image's field of view.
        output: the result's dtype (default: `data`'s); SciPy reads `data` in its own
            dtype, so an int16 image is resampled without a float copy of it.
    """
    voxel_from_grid = np.linalg.inv(affine) @ grid_affine
    return ndimage.affine_transform(
        data, voxel_from_grid[:3, :3], offset=voxel_from_grid[:3, 3], output_shape=tuple(grid_shape),
        order=order, mode="constant", cval=fill, prefilter=False, output=output,
    )


def crop_or_pad(volume: np.ndarray, start: Sequence[int], shape: Sequence[int], fill: float) -> np.ndarray:
    """The box `[start, start + shape)` of `volume`, padded with `fill` where it falls outside."""
    out = np.full(shape, fill, dtype=volume.dtype)
    src = [slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, shape, volume.shape)]
    dst = [slice(r.start - s, r.stop - s) for r, s in zip(src, start)]
    if all(r.stop > r.start for r in src):
        out[tuple(dst)] = volume[tuple(src)]
    return out


def crop_start(foreground: np.ndarray, size: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
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


@dataclasses.dataclass(frozen=True)
class PatientGrid:
    """A patient's images (and mask) checked and resampled onto the reference grid.

    Attributes:
        affine: 4x4 world affine (mm, RAS) of the grid.
        shape: grid shape `(X, Y, Z)`.
        images: modality -> float32 volume on the grid, windowed to [-1, 1].
        body: bool volume, reference image above `body_threshold`.
        mask: uint8 label map on the grid (0 outside the mask's extent), or None.
    """

    affine: np.ndarray
    shape: tuple
    images: dict
    body: np.ndarray
    mask: np.ndarray | None = None


def resample_patient(images: Mapping[str, dicom.PathLike | dicom.SeriesRef], preprocessing: Preprocessing,
                     mask: dicom.PathLike | dicom.SeriesRef | None = None, patient: str | None = None,
                     scales: Mapping[str, float] | None = None) -> PatientGrid:
    """Load, check and resample one patient's images onto the reference grid.

    The one code path of ingestion (`preprocess_patient`) and inference (`predict_nifti`),
    so both accept and refuse the same files. Geometry rules, in world space through each
    file's affine:

    - the grid is the axis-aligned RAS box, at `preprocessing.spacing`, around the
      reference image (the first modality), however that image is oriented;
    - every other image must cover at least `min_overlap` of the reference image's own
      (oriented) field of view; where it does not, its voxels take the window's low value;
    - a mask may cover any part of the reference image (outside its extent is background);
      it is refused when it lies mostly outside the reference image (less than
      `min_overlap` of the smaller of the two fields of view is shared), or when less than
      `min_overlap` of its foreground voxels lie inside the reference image.

    Args:
        images: `{modality: image path}` (any kind `load_volume` reads), the reference modality first.
        preprocessing: a `Preprocessing` (spacing, windows, mask classes, thresholds).
        mask: label map path (NIfTI, ITK file, DICOM SEG or RTSTRUCT), or None.
        patient: patient id, for error messages.
        scales: `{modality: factor}` of this patient (e.g. SUVbw factor for `pet`), applied
            to the raw values before the window (on top of the window's own `scale`).

    Returns:
        A `PatientGrid`.

    Raises:
        DataError: naming patient, file and field of an unreadable image, a bad mask value,
            a geometry rule broken, or DICOM inputs that do not belong together
            (`unicon_tf.data.dicom.check_identity`: Modality, PatientID, FrameOfReferenceUID).

    Example:
    >>> grid = resample_patient({"ct": "ct.nii.gz", "pet": "pet.nii.gz"}, Preprocessing((64, 64, 64), (2, 2, 2)),
    ...                         mask="lesion.nii.gz", scales={"pet": 2.7e-4})  # doctest: +SKIP
    >>> grid.images["pet"].shape == grid.mask.shape == grid.shape  # doctest: +SKIP
    True
    """
    prep, scales = preprocessing, scales or {}
    modalities = list(images)
    # One full-resolution image in memory at a time, as stored (int16 CT: 2 bytes a voxel),
    # resampled at once onto the (small) grid; its NIfTI scaling is applied there.
    volumes, ref_shape, ref_affine, grid_affine, grid_shape = {}, None, None, None, None
    grids = []
    for modality in modalities:
        window = prep.window(modality)
        window = dataclasses.replace(window, scale=window.scale * scales.get(modality, 1.0))
        data, affine, slope, intercept = load_stored_volume(images[modality], patient, modality)
        if modality == modalities[0]:
            ref_shape, ref_affine = data.shape, affine
            grid_affine, grid_shape = reference_grid(data, affine, prep.spacing)
        else:
            coverage = fov_coverage(ref_shape, ref_affine, data.shape, affine)
            if coverage < prep.min_overlap:
                raise DataError(
                    f"covers {coverage:.0%} of the reference image's field of view (needs >= "
                    f"{prep.min_overlap:.0%}): check its affine (not overlapping the {modalities[0]}?)",
                    patient=patient, file=images[modality], field=modality)
        grids.append((data.shape, affine))  # where a RTSTRUCT mask may have been drawn
        fill = (window.low / window.scale - intercept) / slope  # in stored units
        raw = resample(data, affine, grid_affine, grid_shape, order=1, fill=fill, output=np.float32)
        del data
        raw = raw * np.float32(slope) + np.float32(intercept) if (slope, intercept) != (1.0, 0.0) else raw
        if modality == modalities[0]:
            body = raw > prep.body_threshold
        volumes[modality] = window.apply(raw)
    label_map = None
    dicom.check_identity({**{m: images[m] for m in modalities}, "mask": mask}, patient)
    if mask is not None:
        data, affine, slope, intercept = load_stored_volume(mask, patient, "mask", reference=grids)
        _check_mask(data, affine, ref_shape, ref_affine, prep, patient, mask, modalities[0], slope, intercept)
        label_map = resample(data, affine, grid_affine, grid_shape, order=0, fill=0)
        label_map = np.rint(label_map * slope + intercept) if (slope, intercept) != (1.0, 0.0) else label_map
        label_map = label_map.astype(np.uint8)
    return PatientGrid(affine=grid_affine, shape=grid_shape, images=volumes, body=body, mask=label_map)


def fov_coverage(shape: Sequence[int], affine: np.ndarray, other_shape: Sequence[int], other_affine: np.ndarray,
                 points: np.ndarray | None = None) -> float:
    """Fraction of an image's field of view that lies inside another image's, in world space.

    Each field of view is the oriented box of its voxels (`[-0.5, n - 0.5]` in voxel
    indices), so rotated (oblique) and cropped images are measured as they are. The
    fraction is estimated on an even lattice of at most 32 points per axis.

    Args:
        shape, affine: the first image's voxel shape and 4x4 affine.
        other_shape, other_affine: the other image's.
        points: voxel indices `(n, 3)` of the first image to test instead of the lattice
            (e.g. its foreground voxels).

    Returns:
        A fraction in [0, 1].

    Example:
    >>> ct = np.diag([2.0, 2.0, 2.0, 1.0])
    >>> shifted = ct.copy(); shifted[0, 3] = 16.0  # half of 16 voxels along x
    >>> fov_coverage((16, 16, 16), ct, (16, 16, 16), shifted)
    0.5
    """
    if points is None:
        axes = [(np.arange(m) + 0.5) * n / m - 0.5 for n, m in ((int(n), min(int(n), 32)) for n in shape)]
        points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    if not len(points):
        return 1.0
    index = nib.affines.apply_affine(np.linalg.inv(other_affine) @ affine, points)
    inside = np.all((index >= -0.5) & (index <= np.asarray(other_shape, dtype=np.float64) - 0.5), axis=1)
    return float(inside.mean())


def _check_mask(data, affine, ref_shape, ref_affine, prep, patient, file, reference, slope=1.0, intercept=0.0):
    """Refuse a mask whose values are not classes or that lies mostly outside the reference
    image. `data * slope + intercept` are its values (`load_stored_volume`); it is read a
    slab at a time, so no full-size temporary is made (a mask as large as its CT must not
    double the patient's memory)."""
    def fail(message):
        return DataError(message, patient=patient, file=file, field="mask")

    values = set()
    for i in range(0, data.shape[0], 8):
        values.update(np.unique(data[i:i + 8]).tolist())
    values = np.array(sorted(values), dtype=np.float64) * slope + intercept
    bad = values[(values != np.round(values)) | (values < 0) | (values > prep.mask_classes - 1)]
    if bad.size:
        legend = dicom.class_legend(file)
        raise fail(f"mask values {bad[:5].tolist()} are outside the classes 0..{prep.mask_classes - 1}"
                   + (f" (its classes: {legend}; keep in the file only the ROIs or segments the model learns)"
                      if legend else ""))
    shared = max(fov_coverage(data.shape, affine, ref_shape, ref_affine),
                 fov_coverage(ref_shape, ref_affine, data.shape, affine))
    if shared < prep.min_overlap:
        raise fail(f"lies mostly outside the {reference} image: they share {shared:.0%} of the smaller field of "
                   f"view (needs >= {prep.min_overlap:.0%}): check its affine")
    inside = fov_coverage(data.shape, affine, ref_shape, ref_affine,
                          points=_foreground_points(data, 0 if intercept == 0 and slope > 0 else -intercept / slope))
    if inside < prep.min_overlap:
        raise fail(f"{1 - inside:.0%} of its foreground lies outside the {reference} image (needs >= "
                   f"{prep.min_overlap:.0%} inside): check its affine")


def _foreground_points(data, background=0, limit=100_000, slab=8):
    """Voxel indices `(n, 3)` of at most about `limit` foreground voxels (stored value above
    `background`), evenly spread, found a slab at a time (never an index array of the whole
    foreground, 24 bytes a voxel)."""
    counts = [int(np.count_nonzero(data[i:i + slab] > background)) for i in range(0, data.shape[0], slab)]
    step, seen, points = max(1, sum(counts) // limit), 0, []
    for count, i in zip(counts, range(0, data.shape[0], slab)):
        if count:
            found = np.argwhere(data[i:i + slab] > background)
            first = (-seen) % step  # the global stride continues across slabs
            points.append(found[first::step] + [i, 0, 0])
            seen += count
    return np.concatenate(points) if points else np.zeros((0, 3), int)


def preprocess_patient(patient: "Patient", preprocessing: Preprocessing) -> dict[str, Any]:
    """Turn one manifest `Patient` into arrays on the stage's grid.

    Returns:
        dict with `patient_id`, `images` (modality -> float32 `shape` in [-1, 1]), `mask`
        (uint8 `shape` or None), `affine` (4x4 world affine of the output grid),
        `label`, `time`, `event`.

    Raises:
        DataError: see `resample_patient`.
    """
    prep = preprocessing
    grid = resample_patient(patient.images, prep, mask=patient.mask, patient=patient.patient_id,
                            scales=patient.scales)
    use_mask = prep.center == "mask" and grid.mask is not None and np.any(grid.mask)
    start = crop_start(grid.mask > 0 if use_mask else grid.body, grid.shape, prep.shape)
    out_affine = grid.affine.copy()
    out_affine[:3, 3] = grid.affine[:3, :3] @ np.asarray(start, dtype=np.float64) + grid.affine[:3, 3]
    return {
        "patient_id": patient.patient_id,
        "images": {m: crop_or_pad(volume, start, prep.shape, fill=-1.0) for m, volume in grid.images.items()},
        "mask": None if grid.mask is None else crop_or_pad(grid.mask, start, prep.shape, fill=0),
        "affine": out_affine,
        "label": patient.label,
        "time": patient.time,
        "event": patient.event,
    }
