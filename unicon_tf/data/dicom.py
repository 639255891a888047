"""Clinical inputs: DICOM series, DICOM SEG and RTSTRUCT masks, ITK files; body-weight SUV from DICOM tags.

Every reader returns what `unicon_tf.data.preprocess.load_volume` returns for a NIfTI file,
a float32 array and a RAS affine (before its reorientation to RAS voxel order), so ingestion
and inference resample every kind of input through the same geometry checks.

- A DICOM series is a folder (searched recursively) of single-frame images, optionally
  chosen by SeriesInstanceUID (`SeriesRef`) when the folder holds several. Its headers are
  read with pydicom and checked (`series_headers`); its pixels are decoded with SimpleITK
  (GDCM: uncompressed, JPEG, JPEG-LS, JPEG 2000, RLE), falling back to pydicom's decoder
  plugins; its affine is built from ImagePositionPatient, ImageOrientationPatient and
  PixelSpacing (DICOM's LPS patient axes turned into RAS: x and y negated), with the slice
  axis from the first to the last position, so a gantry-tilted (sheared) stack is placed
  and resampled exactly.
- An ITK file (`.nrrd`, `.seg.nrrd`, `.mha`, `.mhd`) is read with SimpleITK (LPS too).
- A DICOM SEG is read with highdicom (`Segmentation.get_volume`, segments combined: a
  voxel holds its segment number, the highest where segments overlap; a FRACTIONAL SEG's
  voxel its most probable segment where that is >= 0.5; omitted empty frames are
  background); a RTSTRUCT's closed planar contours are rasterised on the grid of the first
  of the patient's images (the reference image first) whose slices they lie in, as on the
  series they were drawn on (a voxel is inside when its centre is inside the polygon,
  even-odd rule, so a contour inside another is a hole); ROI `n` of the
  StructureSetROISequence becomes class `n` (in sequence order), later ROIs drawn over earlier.

Body-weight SUV from a PET series' own tags (`suv_tags`, `suv_from_tags`) follows the
QIBA vendor-neutral pseudo-code (as cornerstone's calculate-suv): Units must be BQML;
DecayCorrection START decays the injected dose from RadiopharmaceuticalStartDateTime
(or RadiopharmaceuticalStartTime, a time of day) to the scan start, SeriesDate/SeriesTime
(or the earliest AcquisitionDate/AcquisitionTime when the series time is later, as after
post-processing); ADMIN takes the dose as it is. Manifest columns override the tags.

The readers need the `dicom` extra (`pip install 'unicon-tf[dicom]'`: SimpleITK,
pydicom, highdicom); without it they raise a `DataError` that says so.
"""

import collections.abc
import dataclasses
import os
import pathlib
import re
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pydicom

PathLike = str | os.PathLike

from unicon_tf.data.errors import DataError, DataWarning
from unicon_tf.data.suv import SUVInputError, delay_seconds, suv_bw_factor

ITK_SUFFIXES = (".nrrd", ".seg.nrrd", ".mha", ".mhd")
"""File names read with SimpleITK (NRRD, 3D Slicer segmentations, MetaImage)."""
DICOM_SUFFIXES = (".dcm", ".dicom")
"""File names read as one DICOM object (a SEG or RTSTRUCT mask, or a multi-frame image)."""
SLICE_TOLERANCE = 0.02
"""Largest deviation of a slice step from the series' median step, as a fraction of it
(at least 0.01 mm): beyond it a series has a missing slice or uneven spacing."""
GEOMETRY_TOLERANCE = 1e-4
"""Largest difference of ImageOrientationPatient cosines (or relative PixelSpacing) within a series."""
NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC")
DICOM_EXTRA = "pip install 'unicon-tf[dicom]'"


@dataclasses.dataclass(frozen=True)
class SeriesRef:
    """A DICOM series: a folder and, where the folder holds several, its SeriesInstanceUID.

    Example:
    >>> str(SeriesRef(pathlib.Path("A/ct"), "1.2.3"))
    'A/ct (SeriesInstanceUID 1.2.3)'
    """

    folder: pathlib.Path
    uid: str | None = None

    def __str__(self):
        return f"{self.folder} (SeriesInstanceUID {self.uid})" if self.uid else str(self.folder)


def kind_of(path: "PathLike | SeriesRef") -> str:
    """What a manifest cell or a predict argument names: `series`, `dicom`, `itk` or `nifti`.

    Args:
        path: a `SeriesRef`, a folder (a DICOM series), or a file.

    Returns:
        `series` (a folder), `dicom` (a `.dcm` file or one with the DICOM preamble),
        `itk` (`ITK_SUFFIXES`), else `nifti` (nibabel's formats).

    Example:
    >>> kind_of("mask.seg.nrrd"), kind_of("ct.nii.gz")
    ('itk', 'nifti')
    """
    if isinstance(path, SeriesRef):
        return "series"
    path = pathlib.Path(path)
    name = path.name.lower()
    if path.is_dir():
        return "series"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    return "dicom" if _has_dicom_preamble(path) else "nifti"


def _has_dicom_preamble(path):
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _require(module, patient, path, field):
    """Import an optional reader (`pydicom`, `SimpleITK`, `highdicom`) or refuse with the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise DataError(f"reading DICOM and ITK files needs {module}: {DICOM_EXTRA}", patient=patient,
                        file=path, field=field) from error


def read_dicom(path: PathLike, pixels: bool = True) -> "pydicom.Dataset":
    """One DICOM file with pydicom, also without the Part 10 preamble and file meta (older exports).

    A file pydicom refuses as not Part 10 is read again with `force=True`; its encoding,
    found by pydicom, becomes its TransferSyntaxUID (implicit or explicit VR little
    endian), so the pixel decoders can read it. A non-DICOM file raises as pydicom does.

    Args:
        path: the file.
        pixels: False stops before the pixel data (headers only).

    Returns:
        A pydicom `Dataset`.

    Raises:
        pydicom.errors.InvalidDicomError: neither form (and others pydicom raises for a corrupt file).

    Example:
    >>> read_dicom("A/ct/IM0001", pixels=False).Modality  # doctest: +SKIP
    'CT'
    """
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except pydicom.errors.InvalidDicomError:
        dataset = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
        if "SOPClassUID" not in dataset:  # force reads anything: a text file is no DICOM
            raise
        if "TransferSyntaxUID" not in dataset.file_meta:
            implicit, little = dataset.original_encoding
            dataset.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                                   pydicom.uid.ExplicitVRLittleEndian if little else
                                                   pydicom.uid.ExplicitVRBigEndian)
        return dataset


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """A 4x4 voxel-to-LPS affine (DICOM, ITK) as voxel-to-RAS (NIfTI, nibabel): x and y negated.

    Example:
    >>> lps_to_ras(np.eye(4))[:3, :3].diagonal().tolist()
    [-1.0, -1.0, 1.0]
    """
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


# ----------------------------------------------------------------------------------------- series


@dataclasses.dataclass(frozen=True)
class Series:
    """A checked DICOM series: its files in slice order, headers, RAS affine and shape `(columns, rows, slices)`."""

    files: list
    headers: list
    affine: np.ndarray
    shape: tuple
    notes: tuple = ()


def series_headers(ref: "PathLike | SeriesRef", patient: str | None = None, field: str | None = None) -> Series:
    """Read, choose and check a DICOM series' headers (no pixels).

    Geometry as DICOM PS3.3 C.7.6.2 (Image Plane Module) defines it: slices sorted by
    ImagePositionPatient along the normal of ImageOrientationPatient's row and column
    cosines; the affine's columns are row cosine x column spacing, column cosine x row
    spacing, and the mean step between positions (DICOM LPS, returned as RAS).

    Args:
        ref: a `SeriesRef` or a folder.
        patient: patient id, for error messages.
        field: manifest column, for error messages.

    Returns:
        A `Series` whose files are sorted along the slice normal.

    Raises:
        DataError: naming patient, folder and fault: no DICOM image, several series and no
            SeriesInstanceUID chosen (the message lists each UID with its description,
            modality and slice count), a chosen UID absent, a missing tag, inconsistent
            orientation, pixel spacing or matrix, a duplicate slice position, a missing
            slice or uneven slice spacing beyond `SLICE_TOLERANCE`. Localizer images
            (ImageType LOCALIZER) are dropped with a `DataWarning` and a note.

    Example:
    >>> series = series_headers(SeriesRef(pathlib.Path("A/study"), "1.2.3"), patient="A", field="ct")  # doctest: +SKIP
    >>> series.shape  # doctest: +SKIP
    (512, 512, 180)
    """
    ref = ref if isinstance(ref, SeriesRef) else SeriesRef(pathlib.Path(ref))
    _require("pydicom", patient, ref.folder, field)

    def fail(message):
        return DataError(message, patient=patient, file=ref, field=field)

    if not ref.folder.is_dir():
        raise fail("folder does not exist")
    groups, others = {}, 0
    for file, header in _image_headers(ref.folder):
        if header is None:
            others += 1
            continue
        groups.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((file, header))
    if not groups:
        raise fail(f"no DICOM image in the folder ({others} other file(s))")
    if ref.uid is None and len(groups) > 1:
        listing = "; ".join(_describe(uid, members) for uid, members in groups.items())
        raise fail(f"the folder holds {len(groups)} series: {listing}; choose one with a column "
                   f"'{field or '<modality>'}_series_uid' (or --series-uid at predict)")
    uid = ref.uid if ref.uid is not None else next(iter(groups))
    if uid not in groups:
        listing = "; ".join(_describe(u, members) for u, members in groups.items())
        raise fail(f"no series with SeriesInstanceUID {uid} in the folder (it holds: {listing})")
    members, copies, seen = [], [], set()
    for file, header in groups[uid]:  # an instance copied twice (an export and its copy) counts once
        instance = str(header.get("SOPInstanceUID", file))
        (copies if instance in seen else members).append(file if instance in seen else (file, header))
        seen.add(instance)
    notes = [f"skipped {len(copies)} copie(s) of images already read (same SOPInstanceUID): "
             f"{', '.join(f.name for f in copies[:3])}"] if copies else []
    localizers = [file for file, header in members if "LOCALIZER" in [str(v).upper() for v in
                                                                       header.get("ImageType", [])]]
    if localizers:
        notes.append(f"dropped {len(localizers)} localizer image(s) (ImageType LOCALIZER): "
                     f"{', '.join(f.name for f in localizers[:3])}")
        members = [(f, h) for f, h in members if f not in localizers]
    if notes:
        warnings.warn(f"patient {patient}, folder {ref}: {'; '.join(notes)}", DataWarning, stacklevel=2)
    if not members:
        raise fail("the series holds only localizer images")
    frames = [int(h.get("NumberOfFrames", 1) or 1) for _, h in members]
    if len(members) > 1 and max(frames) > 1:
        raise fail("the series mixes multi-frame files; name the multi-frame file itself in the manifest")
    for file, header in members:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in header and max(frames) == 1:
                raise fail(f"{file.name} lacks {tag}: its position in the patient is unknown")
    if max(frames) > 1:
        raise fail(f"{members[0][0].name} is one multi-frame image: name the file itself in the manifest")
    series = Series(*_sort_and_check(members, fail))
    tilt = tilt_degrees(series)
    if tilt > 0.01:
        warnings.warn(f"patient {patient}, folder {ref}: the slices are tilted by {tilt:.2f} degrees (gantry tilt); "
                      "placed and resampled through their positions", DataWarning, stacklevel=2)
        notes.append(f"gantry tilt {tilt:.2f} degrees")
    return dataclasses.replace(series, notes=tuple(notes))


def _image_headers(folder):
    """`(file, header)` of every file under `folder` (sorted, hidden files skipped); header None where
    the file is not a DICOM image (a DICOMDIR, a SEG, a text file)."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            header = read_dicom(file, pixels=False)
        except Exception:  # not DICOM: pydicom raises several types
            yield file, None
            continue
        image = "Rows" in header and str(header.get("Modality", "")) not in NON_IMAGE_MODALITIES
        yield file, header if image else None


def _describe(uid, members):
    header = members[0][1]
    return (f"{uid} ('{header.get('SeriesDescription', '')}', {header.get('Modality', '?')}, "
            f"{len(members)} image(s))")


def _sort_and_check(members, fail):
    """Files and headers in slice order, the RAS affine and the shape; geometry faults refused."""
    first_file, first = members[0]
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    spacing = np.array([float(v) for v in first.PixelSpacing])
    matrix = (int(first.Rows), int(first.Columns))
    for file, header in members[1:]:
        other = np.array([float(v) for v in header.ImageOrientationPatient])
        if not np.allclose(other, orientation, atol=GEOMETRY_TOLERANCE):
            raise fail(f"inconsistent orientation within the series: {first_file.name} has ImageOrientationPatient "
                       f"{orientation.round(4).tolist()}, {file.name} {other.round(4).tolist()}")
        other = np.array([float(v) for v in header.PixelSpacing])
        if not np.allclose(other, spacing, rtol=GEOMETRY_TOLERANCE):
            raise fail(f"inconsistent pixel spacing within the series: {first_file.name} has PixelSpacing "
                       f"{spacing.tolist()}, {file.name} {other.tolist()}")
        if (int(header.Rows), int(header.Columns)) != matrix:
            raise fail(f"inconsistent image size within the series: {first_file.name} is {matrix[0]}x{matrix[1]}, "
                       f"{file.name} {int(header.Rows)}x{int(header.Columns)} (rows x columns)")
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    positions = np.array([[float(v) for v in header.ImagePositionPatient] for _, header in members])
    order = np.argsort(positions @ normal, kind="stable")
    members, positions = [members[i] for i in order], positions[order]
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 3] = row * spacing[1], column * spacing[0], positions[0]
    if len(members) == 1:
        thickness = float(first.get("SliceThickness", 0) or 0) or float(spacing.min())
        affine[:3, 2] = normal * thickness
        return [f for f, _ in members], [h for _, h in members], lps_to_ras(affine), matrix[::-1] + (1,)
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    names = [f.name for f, _ in members]
    duplicate = np.flatnonzero(np.abs(along) < 1e-3)
    if duplicate.size:
        i = int(duplicate[0])
        raise fail(f"two images at the same slice position {positions[i].round(3).tolist()} ({names[i]} and "
                   f"{names[i + 1]}): several acquisitions, echoes or time points in one series?")
    median = float(np.median(along))
    tolerance = max(0.01, SLICE_TOLERANCE * median)
    uneven = np.flatnonzero(np.abs(along - median) > tolerance)
    if uneven.size:
        i = int(uneven[0])
        gap = float(along[i])
        kind = (f"{round(gap / median) - 1} missing slice(s)" if gap > 1.5 * median and
                abs(gap / median - round(gap / median)) * median <= tolerance else "uneven slice spacing")
        raise fail(f"{kind}: {gap:.3g} mm between {names[i]} and {names[i + 1]} where the series' slice step is "
                   f"{median:.3g} mm (tolerance {tolerance:.2g} mm, {len(uneven)} such gap(s))")
    mean_step = (positions[-1] - positions[0]) / (len(members) - 1)
    crooked = np.linalg.norm(steps - mean_step, axis=1).max()
    if crooked > tolerance:
        raise fail(f"the slice positions do not lie on one line (off by up to {crooked:.3g} mm): the series is "
                   "not one regular stack")
    affine[:3, 2] = mean_step  # along the normal, or sheared by a gantry tilt: exact either way
    return [f for f, _ in members], [h for _, h in members], lps_to_ras(affine), matrix[::-1] + (len(members),)


def tilt_degrees(series: Series) -> float:
    """The angle in degrees between a series' slice axis and its slice normal (gantry tilt; 0 for a plain stack)."""
    axes = series.affine[:3, :3]
    normal = np.cross(axes[:, 0], axes[:, 1])
    cosine = abs(normal @ axes[:, 2]) / (np.linalg.norm(normal) * np.linalg.norm(axes[:, 2]))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def load_series(ref: "PathLike | SeriesRef", patient: str | None = None,
                field: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series as `(data, affine)`: float32 `(columns, rows, slices)` and its RAS affine.

    Pixel values are the modality values (RescaleSlope and RescaleIntercept of each image
    applied, PS3.3 C.11.1: HU for CT, Bq/mL for PET in BQML).

    Args:
        ref: a `SeriesRef` or a folder.
        patient: patient id, for error messages.
        field: manifest column, for error messages.

    Returns:
        `(data, affine)` in the series' own voxel order (not yet reoriented).

    Raises:
        DataError: a fault found by `series_headers`, or pixel data that no installed
            decoder can read (the message names the transfer syntax and the package to install).
    """
    series = series_headers(ref, patient, field)
    data = _decode(series, ref, patient, field)
    return data, series.affine


def _decode(series, ref, patient, field):
    """The series' pixels, modality LUT applied, `(columns, rows, slices)` float32: SimpleITK, else pydicom."""
    sitk = _require("SimpleITK", patient, ref, field)
    syntaxes = sorted({str(getattr(h, "file_meta", {}).get("TransferSyntaxUID", "")) for h in series.headers})
    try:
        warn = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            image = sitk.ReadImage([str(f) for f in series.files], sitk.sitkFloat32)
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(warn)
        array = sitk.GetArrayFromImage(image)
        if array.shape != (series.shape[2], series.shape[1], series.shape[0]):
            raise RuntimeError(f"SimpleITK read shape {array.shape}")
        return np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32)
    except RuntimeError as sitk_error:
        return _decode_with_pydicom(series, ref, patient, field, syntaxes, sitk_error)


def _decode_with_pydicom(series, ref, patient, field, syntaxes, sitk_error):
    import pydicom
    from pydicom.pixels import apply_rescale, get_decoder

    def fail(message):
        return DataError(message, patient=patient, file=ref, field=field)

    for syntax in syntaxes:
        uid = pydicom.uid.UID(syntax)
        try:
            decoder = get_decoder(uid)
            available, missing = decoder.is_available, decoder.missing_dependencies
        except NotImplementedError:  # pydicom's answer for a syntax it has no decoder class for (e.g. HTJ2K in 3.0)
            available, missing = False, []
        if not available:
            install = (f"install one of: {'; '.join(missing)} (e.g. pip install pylibjpeg pylibjpeg-openjpeg "
                       "pylibjpeg-libjpeg, or python-gdcm)" if missing else
                       "no Python decoder is known for it: convert the series to an uncompressed transfer "
                       "syntax (e.g. gdcmconv --raw, dcmdjpeg)")
            raise fail(f"pixel data in transfer syntax '{uid.name}' ({uid}) cannot be decoded by SimpleITK "
                       f"(GDCM) or pydicom's installed decoders: {install}")
    slices = []
    for file in series.files:
        try:
            dataset = read_dicom(file)
            slices.append(np.asarray(apply_rescale(dataset.pixel_array, dataset), dtype=np.float32))
        except Exception as error:  # decoders raise many types for corrupt data
            raise fail(f"{file.name}: pixel data unreadable (SimpleITK: {sitk_error}; pydicom: "
                       f"{type(error).__name__}: {error})") from error
    return np.ascontiguousarray(np.stack(slices, axis=-1).transpose(1, 0, 2))


def native_grid(path: "PathLike | SeriesRef") -> tuple[tuple, np.ndarray]:
    """`(shape, RAS affine)` of an image file or series in its own voxel order (before any reorientation).

    The grid a prediction is written back on: a NIfTI's header, a DICOM series'
    `(columns, rows, slices)`, an ITK file's or a multi-frame DICOM's voxels.

    Example:
    >>> shape, affine = native_grid("A/ct")  # doctest: +SKIP
    """
    kind = kind_of(path)
    if kind == "series":
        series = series_headers(path)
        return tuple(series.shape), series.affine
    if kind == "nifti":
        import nibabel as nib

        image = nib.load(str(path))
        return tuple(image.shape[:3]), image.affine
    data, affine = load_itk(path) if kind == "itk" else load_dicom_file(path)
    return tuple(data.shape), affine


# ------------------------------------------------------------------------------------- identity

MODALITY_OF_FIELD = {"ct": ("CT",), "pet": ("PT",), "mask": ("SEG", "RTSTRUCT")}
"""The DICOM Modality values each manifest column (or predict option) accepts; other columns take any."""


def identity(path: "PathLike | SeriesRef") -> dict | None:
    """Who and where a DICOM input is: its PatientID, Modality and frame(s) of reference (no pixels read).

    Args:
        path: a `SeriesRef`, a series folder, or a DICOM file (SEG, RTSTRUCT, multi-frame image).

    Returns:
        `{"file", "patient_id", "modality", "frames"}` (`frames`: the FrameOfReferenceUIDs the
        object's coordinates are in: its own, or for a RTSTRUCT those of its
        ReferencedFrameOfReferenceSequence and ROIs), or None for NIfTI and ITK files, which
        carry neither.

    Example:
    >>> identity("A/ct")["modality"]  # doctest: +SKIP
    'CT'
    """
    kind = kind_of(path)
    if kind == "series":
        ref = path if isinstance(path, SeriesRef) else SeriesRef(pathlib.Path(path))
        headers = ((f, h) for f, h in _image_headers(ref.folder)
                   if h is not None and ref.uid in (None, str(h.get("SeriesInstanceUID", ""))))
    elif kind == "dicom":
        try:
            headers = [(pathlib.Path(path), read_dicom(path, pixels=False))]
        except Exception:  # unreadable: the reader that loads it says why
            return None
    else:
        return None
    for file, header in headers:
        frames = {str(header.get("FrameOfReferenceUID", "") or "")}
        frames |= {str(item.get("FrameOfReferenceUID", "")) for item in header.get("ReferencedFrameOfReferenceSequence", [])}
        frames |= {str(item.get("ReferencedFrameOfReferenceUID", ""))
                   for item in header.get("StructureSetROISequence", [])}
        return {"file": file, "patient_id": str(header.get("PatientID", "") or "") or None,
                "modality": str(header.get("Modality", "") or "") or None, "frames": frames - {""}}
    return None


def check_identity(inputs: dict, patient: str | None = None) -> None:
    """Refuse a patient's DICOM inputs that cannot belong together: a modality in the wrong column, images
    or a mask of another DICOM patient, a mask drawn in another frame of reference than the images'.

    NIfTI and ITK inputs carry no identity and pass; the checks compare DICOM with DICOM
    only (a SEG's or RTSTRUCT's coordinates mean something only in the frame of reference,
    PS3.3 C.7.4.1, of the images they were drawn on).

    Args:
        inputs: `{field: path}` (`ct`, `pet`, ..., `mask`), the reference image first.
        patient: patient id, for error messages.

    Raises:
        DataError: naming the patient, the file, the field and the tag (Modality, PatientID,
            FrameOfReferenceUID) that disagrees.

    Example:
    >>> check_identity({"ct": "A/ct", "mask": "A/seg.dcm"}, patient="A")  # doctest: +SKIP
    """
    known = {field: identity(path) for field, path in inputs.items() if path is not None}
    known = {field: found for field, found in known.items() if found is not None}
    for field, found in known.items():
        allowed = MODALITY_OF_FIELD.get(field)
        if allowed and found["modality"] and found["modality"] not in allowed:
            raise DataError(f"Modality is {found['modality']} ({found['file'].name}), but column '{field}' takes "
                            f"{' or '.join(allowed)}: a series or file in the wrong column?", patient=patient,
                            file=inputs[field], field=field)
    named = [(field, found) for field, found in known.items() if found["patient_id"]]
    for field, found in named[1:]:
        if found["patient_id"] != named[0][1]["patient_id"]:
            raise DataError(f"PatientID is '{found['patient_id']}' ({found['file'].name}) where the {named[0][0]} "
                            f"({inputs[named[0][0]]}) has '{named[0][1]['patient_id']}': another patient's "
                            "image or mask?", patient=patient, file=inputs[field], field=field)
    if "mask" in known and known["mask"]["frames"]:
        frames = set().union(*(found["frames"] for field, found in known.items() if field != "mask"))
        if frames and not frames & known["mask"]["frames"]:
            raise DataError(f"FrameOfReferenceUID {', '.join(sorted(known['mask']['frames']))} "
                            f"({known['mask']['file'].name}) is none of the images' ({', '.join(sorted(frames))}): "
                            "the mask was drawn on another acquisition's coordinates", patient=patient,
                            file=inputs["mask"], field="mask")


# ------------------------------------------------------------------------------ files: ITK, SEG, RTSTRUCT


def load_itk(path: PathLike, patient: str | None = None, field: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An ITK-readable file (`.nrrd`, `.seg.nrrd`, `.mha`, `.mhd`) as `(data, RAS affine)`, with SimpleITK.

    ITK's physical space is LPS: affine = direction x spacing, origin; turned into RAS.

    Example:
    >>> data, affine = load_itk("A/mask.seg.nrrd", patient="A", field="mask")  # doctest: +SKIP

    Raises:
        DataError: unreadable file, or not one 3D scalar volume.
    """
    sitk = _require("SimpleITK", patient, path, field)
    data_file = _detached_data_file(path)
    if data_file is not None and not data_file.is_file():
        raise DataError(f"its data file {data_file.name} (ElementDataFile) is missing: copy it beside the header, "
                        f"or give the single-file .mha", patient=patient, file=path, field=field)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"unreadable or truncated ITK file ({str(error).strip().splitlines()[-1]})",
                        patient=patient, file=path, field=field) from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"expected one 3D scalar volume, got {image.GetDimension()}D with "
                        f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel (size {image.GetSize()}): "
                        "a multi-layer segmentation? export it as one label map", patient=patient, file=path,
                        field=field)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    return np.ascontiguousarray(data), lps_to_ras(affine)


def _detached_data_file(path):
    """The voxel file a MetaImage header (`.mhd`) names in ElementDataFile, or None (LOCAL, LIST, a pattern)."""
    path = pathlib.Path(path)
    if not path.name.lower().endswith(".mhd") or not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            value = value.strip()
            if value.upper() == "LOCAL" or value.upper().startswith("LIST") or "%" in value or " " in value:
                return None
            return path.parent / value
    return None


def load_dicom_file(path: PathLike, patient: str | None = None, field: str | None = None,
                    reference: tuple | list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM object as `(data, RAS affine)`: a SEG, a RTSTRUCT (rasterised) or a multi-frame image.

    SEG (PS3.3 A.51) and enhanced or legacy-converted multi-frame images are read with
    highdicom's `get_volume` (segments combined; a voxel holds its segment number), the
    RTSTRUCT (PS3.3 A.19) with `rasterise_rtstruct`. A SEG whose frames highdicom cannot
    stack (a gantry-tilted, sheared source series) is placed by its frames'
    ImagePositionPatient as a series is (`_seg_by_frame_positions`).

    Example:
    >>> mask, affine = load_dicom_file("A/lesion_seg.dcm", patient="A", field="mask")  # doctest: +SKIP

    Args:
        path: the `.dcm` file.
        patient: patient id, for error messages.
        field: manifest column, for error messages.
        reference: `(shape, RAS affine)` of the grid a RTSTRUCT may be drawn on, or a list
            of them (the patient's images, the reference first); needed only for a RTSTRUCT.

    Raises:
        DataError: unreadable file, a SOP class that is neither, a SEG not on a regular
            3D grid, a RTSTRUCT whose contours lie in the slices of none of the grids.
    """
    _require("pydicom", patient, path, field)
    try:
        dataset = read_dicom(path)
    except Exception as error:
        raise DataError(f"unreadable DICOM file ({type(error).__name__}: {error})", patient=patient, file=path,
                        field=field) from error
    modality = str(dataset.get("Modality", ""))
    if modality == "RTSTRUCT":
        if reference is None:
            raise DataError("a RTSTRUCT is a mask: give it in the 'mask' column", patient=patient, file=path,
                            field=field)
        grids = [reference] if isinstance(reference, tuple) else list(reference)
        failures = []
        for shape, affine in grids:
            try:
                return rasterise_rtstruct(dataset, shape, affine, patient=patient, path=path, field=field)
            except DataError as error:
                failures.append(error)
        raise failures[0] if len(grids) == 1 else DataError(
            f"{failures[0].reason}; nor in the slices of the patient's other images", patient=patient,
            file=path, field=field)
    highdicom = _require("highdicom", patient, path, field)
    try:
        if modality == "SEG":
            try:
                volume = _seg_volume(highdicom.seg.Segmentation.from_dataset(dataset))
            except RuntimeError:  # highdicom's volumes are unsheared: frames on a gantry-tilted stack
                return _seg_by_frame_positions(dataset, pathlib.Path(path), lambda message: DataError(
                    message, patient=patient, file=path, field=field))
        elif int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            volume = highdicom.Image.from_dataset(dataset).get_volume()
        else:
            raise DataError(f"a single DICOM image (Modality {modality or '?'}), not a volume: name its series' "
                            "folder", patient=patient, file=path, field=field)
    except (ValueError, RuntimeError, AttributeError, KeyError) as error:
        raise DataError(f"a DICOM {modality or 'file'} that is not one regular 3D volume ({type(error).__name__}: "
                        f"{error})", patient=patient, file=path, field=field) from error
    # highdicom's volume axes are (slice, row, column), as in DICOM; reorder to (column, row, slice)
    data = np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0), dtype=np.float32)
    affine = volume.get_affine("RAS")[:, [2, 1, 0, 3]]
    return data, affine


def _seg_volume(seg):
    """A SEG as one label volume: segment numbers, the highest where segments overlap (as a RTSTRUCT's
    later ROI); a FRACTIONAL SEG's voxel takes its most probable segment where that is >= 0.5."""
    if str(seg.SegmentationType) != "FRACTIONAL":
        return seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    volume = seg.get_volume(combine_segments=False, dtype=np.float32)
    probabilities = np.asarray(volume.array).reshape(volume.spatial_shape + (-1,))
    numbers = np.asarray(seg.segment_numbers)
    labels = np.where(probabilities.max(axis=-1) >= 0.5, numbers[probabilities.argmax(axis=-1)], 0)
    return type(volume)(labels.astype(np.float32), volume.affine, coordinate_system="PATIENT")


def _seg_by_frame_positions(dataset, path, fail):
    """A SEG as `(label map, RAS affine)` placed by its frames' ImagePositionPatient, as a series is
    (`_sort_and_check`: the slice axis from the first to the last position, so a stack sheared by a
    gantry tilt is placed exactly); segments combined as `_seg_volume` does (the highest number wins;
    a FRACTIONAL frame's voxel where it is >= half of MaximumFractionalValue)."""
    from pydicom.dataset import Dataset

    shared = dataset.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = dataset.PerFrameFunctionalGroupsSequence

    def item(i, name):
        group = per_frame[i] if name in per_frame[i] else shared
        return group[name].value[0]

    pixels = np.asarray(dataset.pixel_array).reshape(len(per_frame), int(dataset.Rows), int(dataset.Columns))
    if str(dataset.SegmentationType) == "FRACTIONAL":
        pixels = pixels >= 0.5 * float(dataset.MaximumFractionalValue)
    slices, slot, members = {}, [], []
    for i in range(len(per_frame)):
        position = tuple(round(float(v), 4) for v in item(i, "PlanePositionSequence").ImagePositionPatient)
        if position not in slices:
            header = Dataset()
            header.ImagePositionPatient = list(position)
            header.ImageOrientationPatient = item(i, "PlaneOrientationSequence").ImageOrientationPatient
            header.PixelSpacing = item(i, "PixelMeasuresSequence").PixelSpacing
            header.SliceThickness = item(i, "PixelMeasuresSequence").get("SliceThickness", 0)
            header.Rows, header.Columns = dataset.Rows, dataset.Columns
            slices[position] = len(members)
            members.append((pathlib.PurePath(f"{path.name} frame {i + 1}"), header))
        slot.append(slices[position])
    ordered, _, affine, shape = _sort_and_check(members, fail)
    order = {str(name): k for k, name in enumerate(ordered)}
    rank = [order[str(members[s][0])] for s in slot]
    label_map = np.zeros(shape, dtype=np.float32)
    for i, k in enumerate(rank):
        number = int(item(i, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        where = pixels[i].T > 0
        label_map[..., k][where] = np.maximum(label_map[..., k][where], number)
    return label_map, affine


def rasterise_rtstruct(dataset: "pydicom.Dataset", shape: tuple, affine: np.ndarray, patient: str | None = None,
                       path: PathLike | None = None,
                       field: str | None = "mask") -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a RTSTRUCT's closed planar contours on a grid: ROI `n` (sequence order) -> class `n`.

    ROI Contour Module (PS3.3 C.8.8.6): ContourData are LPS points in mm; each CLOSED_PLANAR
    contour must lie in one slice of the grid; a voxel is inside when its centre is inside
    the polygon (matplotlib `Path.contains_points`), contours of one ROI in one slice
    combine by the even-odd rule (an inner contour is a hole), as plastimatch and rt-utils do.

    Args:
        dataset: the RTSTRUCT (a pydicom `Dataset`).
        shape: the grid's voxel shape `(X, Y, Z)`.
        affine: the grid's 4x4 RAS affine (the reference image's).
        patient, path, field: for error messages.

    Returns:
        `(label map float32 of shape, affine)`.

    Raises:
        DataError: no ROI, a contour whose points do not lie in one slice of the grid.

    Example:
    >>> label_map, _ = rasterise_rtstruct(rtstruct, ct.shape, ct_affine)  # doctest: +SKIP
    """
    from matplotlib.path import Path as Polygon

    def fail(message):
        return DataError(message, patient=patient, file=path, field=field)

    rois = [int(item.ROINumber) for item in dataset.get("StructureSetROISequence", [])]
    if not rois:
        raise fail("the RTSTRUCT has no ROI (StructureSetROISequence is empty)")
    label_map = np.zeros(shape, dtype=np.float32)
    inverse = np.linalg.inv(affine)
    contours = {int(item.ReferencedROINumber): item.get("ContourSequence", [])
                for item in dataset.get("ROIContourSequence", [])}
    for label, number in enumerate(rois, 1):
        painted = np.zeros(shape, dtype=bool)
        for contour in contours.get(number, []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue  # points and open polylines enclose no voxel
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3) * [-1.0, -1.0, 1.0]
            index = points @ inverse[:3, :3].T + inverse[:3, 3]
            axis = int(np.argmin(np.ptp(index, axis=0)))
            plane = float(np.mean(index[:, axis]))
            if np.ptp(index[:, axis]) > 0.1 or abs(plane - round(plane)) > 0.1:
                raise fail(f"a contour of ROI {number} does not lie in one slice of the reference image (voxel "
                           f"index {plane:.2f} along axis {axis}): drawn on another series' grid?")
            k = int(round(plane))
            if not 0 <= k < shape[axis]:
                continue
            in_plane = [a for a in range(3) if a != axis]
            grid = np.stack(np.meshgrid(np.arange(shape[in_plane[0]]), np.arange(shape[in_plane[1]]),
                                        indexing="ij"), axis=-1).reshape(-1, 2)
            inside = Polygon(index[:, in_plane]).contains_points(grid).reshape(shape[in_plane[0]], shape[in_plane[1]])
            where = [slice(None)] * 3
            where[axis] = k
            painted[tuple(where)] ^= inside  # even-odd: a contour inside another is a hole
        label_map[painted] = label
    return label_map, affine


def class_legend(path: PathLike) -> str | None:
    """Which class each segment of a DICOM SEG or ROI of a RTSTRUCT becomes, for messages about mask values.

    Args:
        path: a mask file.

    Returns:
        E.g. `"1 = ROI 3 'GTV' (no contour), 2 = ROI 7 'lesion'"`, or None for a file that is
        neither (NIfTI, ITK, unreadable).

    Example:
    >>> class_legend("A/rt.dcm")  # doctest: +SKIP
    "1 = ROI 3 'BODY', 2 = ROI 7 'GTV'"
    """
    if kind_of(path) != "dicom":
        return None
    try:
        header = read_dicom(path, pixels=False)
    except Exception:  # unreadable: its reader has said why
        return None
    if str(header.get("Modality", "")) == "SEG":
        return ", ".join(f"{int(item.SegmentNumber)} = segment '{item.get('SegmentLabel', '')}'"
                         for item in header.get("SegmentSequence", []))
    if str(header.get("Modality", "")) != "RTSTRUCT":
        return None
    contoured = {int(item.ReferencedROINumber) for item in header.get("ROIContourSequence", [])
                 if any(str(c.get("ContourGeometricType", "CLOSED_PLANAR")) == "CLOSED_PLANAR"
                        for c in item.get("ContourSequence", []))}
    return ", ".join(f"{label} = ROI {int(item.ROINumber)} '{item.get('ROIName', '')}'"
                     f"{'' if int(item.ROINumber) in contoured else ' (no closed contour: empty)'}"
                     for label, item in enumerate(header.get("StructureSetROISequence", []), 1))


# ---------------------------------------------------------------------------------------------- SUV

SUV_SOURCE = "SUVbw from the PET series' DICOM tags (QIBA vendor-neutral: Units BQML, DecayCorrection START or ADMIN)"
"""How a factor from `suv_from_tags` is recorded (the schema's `scaling`, predict's `scales`)."""
SUV_TAG_OF = {"weight_kg": "PatientWeight", "injected_dose_bq": "RadionuclideTotalDose",
              "injection_time": "RadiopharmaceuticalStartDateTime", "acquisition_time": "SeriesDate/SeriesTime",
              "half_life_s": "RadionuclideHalfLife", "scan_delay_s": "SeriesTime"}
"""The manifest column that overrides each DICOM tag of the SUV computation."""


def suv_tags(ref: "PathLike | SeriesRef", patient: str | None = None, field: str = "pet") -> dict:
    """The body-weight SUV inputs of a PET series' tags, as the manifest's SUV columns name them.

    Args:
        ref: a `SeriesRef` or a folder.
        patient, field: for error messages.

    Returns:
        `{"units", "decay_correction", "corrected_image" (an upper-case list), "weight_kg",
        "injected_dose_bq", "injection_time", "acquisition_time", "half_life_s"}`, each None
        when its tag is absent; times as DICOM DT (`YYYYMMDDHHMMSS`) or, for an injection given as a time only, a DICOM TM;
        TimezoneOffsetFromUTC, where given, is the zone of a date-time that has none.
        The scan time is SeriesDate/SeriesTime, or the earliest AcquisitionDate/Time
        where that is earlier (QIBA: a series time rewritten by post-processing).

    Raises:
        DataError: see `series_headers`.
        SUVInputError: a tag of `SUV_SERIES_TAGS` that differs between the series' images
            (naming the tag and two files).
    """
    series = series_headers(ref, patient, field)
    first = series.headers[0]

    def text(header, name):
        value = header.get(name)
        return None if value in (None, "") else str(value).strip()

    def series_level(header):  # the tags every image of one PET series shares (calculate-suv checks them too)
        info = (header.get("RadiopharmaceuticalInformationSequence") or [None])[0]
        return {**{name: text(header, name) for name in SUV_SERIES_TAGS[:6]},
                **{name: text(info, name) if info is not None else None for name in SUV_SERIES_TAGS[6:]}}

    expected = series_level(first)
    for file, header in zip(series.files[1:], series.headers[1:]):
        differing = [name for name, value in series_level(header).items() if not _same_value(value, expected[name])]
        if differing:
            name = differing[0]
            raise SUVInputError(f"tag {name} differs within the series: {series.files[0].name} has "
                                f"{expected[name]}, {file.name} {series_level(header)[name]} (images of several "
                                "series or patients in one folder?)", name)
    info = (first.get("RadiopharmaceuticalInformationSequence") or [None])[0]
    dose = text(info, "RadionuclideTotalDose") if info is not None else None
    half_life = text(info, "RadionuclideHalfLife") if info is not None else None
    start = text(info, "RadiopharmaceuticalStartDateTime") if info is not None else None
    time_of_day = start is None and info is not None and text(info, "RadiopharmaceuticalStartTime") is not None
    if time_of_day:
        start = _time(text(info, "RadiopharmaceuticalStartTime"))
    series_date, series_time = text(first, "SeriesDate"), text(first, "SeriesTime")
    scan = f"{series_date}{_time(series_time)}" if series_date and series_time else None
    acquisitions = sorted(f"{text(h, 'AcquisitionDate')}{_time(text(h, 'AcquisitionTime'))}" for h in series.headers
                          if text(h, "AcquisitionDate") and text(h, "AcquisitionTime"))
    if acquisitions and (scan is None or acquisitions[0] < scan):
        scan = acquisitions[0]
    if time_of_day and scan is not None:
        scan = scan[8:]  # the injection is a time of day: compare times of day (a scan after midnight is next day)
    zone = text(first, "TimezoneOffsetFromUTC")  # the local zone of the dates and times without one
    if zone and start and scan and not time_of_day:
        start, scan = (value if _ZONED.search(value) else value + zone for value in (start, scan))
    weight = text(first, "PatientWeight")
    corrected = first.get("CorrectedImage")  # a CS, one value or several (pydicom's MultiValue is a Sequence)
    corrected = None if corrected in (None, "") else [str(v).strip().upper() for v in (
        corrected if isinstance(corrected, collections.abc.Sequence) and not isinstance(corrected, str) else [corrected])]
    return {"units": text(first, "Units"), "decay_correction": text(first, "DecayCorrection"),
            "corrected_image": corrected,
            "weight_kg": float(weight) if weight else None, "injected_dose_bq": float(dose) if dose else None,
            "injection_time": start, "acquisition_time": scan, "half_life_s": float(half_life) if half_life else None}


SUV_SERIES_TAGS = ("Units", "CorrectedImage", "DecayCorrection", "PatientWeight", "SeriesDate", "SeriesTime",
                   "RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartDateTime",
                   "RadiopharmaceuticalStartTime")
"""The SUV tags that must agree in every image of a series (the last four, of its
RadiopharmaceuticalInformationSequence)."""
_ZONED = re.compile(r"[+-]\d{4}$")


def _same_value(first, second):
    """Two tag values as text, equal as text or as numbers (DS `70` and `70.0`)."""
    if first == second:
        return True
    try:
        return float(first) == float(second)
    except (TypeError, ValueError):
        return False


def _time(value):
    """A DICOM TM padded to HHMMSS (`0930` -> `093000`), fraction kept."""
    whole, dot, fraction = str(value).partition(".")
    return whole.ljust(6, "0") + dot + fraction


def suv_from_tags(tags: dict, overrides: dict | None = None) -> tuple[float, list]:
    """The SUVbw factor (mL/Bq) of a PET series from its tags (`suv_tags`), manifest columns overriding.

    QIBA vendor-neutral SUV pseudo-code (QIBA FDG-PET/CT profile; cornerstone's
    calculate-suv): BQML only; START: dose x 2^(-(scan - injection) / half-life); ADMIN:
    the dose as injected; SUVbw factor = weight [g] / decayed dose [Bq]
    (`unicon_tf.data.suv.suv_bw_factor`, with its plausibility ranges).

    Args:
        tags: the dict of `suv_tags`.
        overrides: `{column: value}` from the manifest (`weight_kg`, `injected_dose_bq`,
            `injection_time`, `acquisition_time`, `scan_delay_s`, `half_life_s`); each
            replaces its tag (`SUV_TAG_OF`).

    Returns:
        `(factor, overridden columns)`.

    Raises:
        SUVInputError: naming the tag (or column) that is missing, implausible (the ranges
            of `unicon_tf.data.suv.PLAUSIBLE`) or unsupported: Units other than BQML (CNTS,
            GML: give `pet_scale`), CorrectedImage without ATTN and DECY (as calculate-suv
            requires), DecayCorrection other than START or ADMIN.

    Example:
    >>> tags = {"units": "BQML", "corrected_image": ["ATTN", "DECY"], "decay_correction": "START",
    ...         "weight_kg": 70.0, "injected_dose_bq": 3.7e8,
    ...         "injection_time": "20240301093000", "acquisition_time": "20240301103000", "half_life_s": 6586.2}
    >>> round(suv_from_tags(tags)[0], 8)
    0.00027634
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v not in (None, "")}
    units = (tags.get("units") or "").upper()
    if units != "BQML":
        what = {"CNTS": "counts (a vendor's scale factor, e.g. Philips (7053,1000), is needed)",
                "GML": "already SUV in g/mL"}.get(units, "not an activity concentration")
        raise SUVInputError(f"tag Units is '{tags.get('units')}' ({what}): only BQML gives SUV from tags; give "
                            "the factor in a 'pet_scale' column (or predict --scale pet F)", "Units")
    corrected = tags.get("corrected_image")
    if not {"ATTN", "DECY"} <= set(corrected or []):
        raise SUVInputError(f"tag CorrectedImage is {corrected}: SUV from tags needs images corrected for attenuation "
                            "(ATTN) and decay (DECY); a non-attenuation-corrected (NAC) series is not quantitative: "
                            "choose the AC series (pet_series_uid) or give 'pet_scale'", "CorrectedImage")
    decay = (tags.get("decay_correction") or "").upper()
    if decay not in ("START", "ADMIN"):
        raise SUVInputError(f"tag DecayCorrection is '{tags.get('decay_correction')}': SUV from tags needs START "
                            "or ADMIN (images decay-corrected to the scan start or to the injection)",
                            "DecayCorrection")
    values = {name: overrides.get(name, tags.get(name)) for name in ("weight_kg", "injected_dose_bq", "half_life_s")}
    for name, value in values.items():
        if value is None:
            raise SUVInputError(f"tag {SUV_TAG_OF[name]} is missing: give column '{name}'", SUV_TAG_OF[name])
    delay = 0.0
    if decay == "START":
        if "scan_delay_s" in overrides:
            delay = float(overrides["scan_delay_s"])
        else:
            start = overrides.get("injection_time", tags.get("injection_time"))
            scan = overrides.get("acquisition_time", tags.get("acquisition_time"))
            for name, value in (("injection_time", start), ("acquisition_time", scan)):
                if value is None:
                    raise SUVInputError(f"tag {SUV_TAG_OF[name]} is missing (DecayCorrection START needs it): give "
                                        f"column '{name}'", SUV_TAG_OF[name])
            try:
                delay = delay_seconds(start, scan, float(values["half_life_s"]))
            except ValueError as error:
                raise SUVInputError(f"injection {start} / scan {scan}: {error}", "RadiopharmaceuticalStartDateTime")
    try:
        factor = suv_bw_factor(float(values["weight_kg"]), float(values["injected_dose_bq"]), delay,
                               float(values["half_life_s"]))
    except SUVInputError as error:
        source = error.field if error.field in overrides else SUV_TAG_OF.get(error.field, error.field)
        raise SUVInputError(f"{source}: {error}", source) from error
    return factor, sorted(overrides)


# -------------------------------------------------------------------------------------- SEG output


SEG_SOURCE_TYPE1 = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
"""Tags a DICOM SEG copies from, or references in, its source images and cannot do without."""
SEG_SOURCE_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""Patient and study tags a SEG copies that may be empty (Type 2): absent ones (an anonymised export) are copied empty."""


def seg_sources(ref: "PathLike | SeriesRef", patient: str | None = None, field: str | None = None) -> tuple:
    """A series' headers as a DICOM SEG referencing it needs them, checked before anything is written.

    Args:
        ref: the source series (a `SeriesRef` or a folder).
        patient, field: for error messages.

    Returns:
        `(Series, headers)`: the checked series and its images' headers (no pixels), with
        the absent `SEG_SOURCE_TYPE2` tags set empty.

    Raises:
        DataError: a fault of `series_headers`, or an image lacking a tag of
            `SEG_SOURCE_TYPE1` (naming the file and the tag).

    Example:
    >>> series, headers = seg_sources(SeriesRef(pathlib.Path("A/ct")), field="ct")  # doctest: +SKIP
    """
    series = series_headers(ref, patient, field)
    headers = [read_dicom(f, pixels=False) for f in series.files]  # attributes only
    for file, header in zip(series.files, headers):
        for tag in SEG_SOURCE_TYPE1:
            if not header.get(tag):
                raise DataError(f"{file.name} lacks {tag}, which a DICOM SEG referencing the series must copy: "
                                "the series is not a conformant image series (give it as NIfTI to predict)",
                                patient=patient, file=ref, field=field)
        for tag in SEG_SOURCE_TYPE2:
            if tag not in header:
                setattr(header, tag, "")
    return series, headers


def write_seg(label_map: np.ndarray, ref: "PathLike | SeriesRef", out: PathLike, classes: int,
              model_name: str = "unicon-tf", version: str = "0", description: str = "segmentation") -> pathlib.Path:
    """Write a label map on a DICOM series' grid as a DICOM SEG referencing that series (highdicom).

    A BINARY Segmentation (PS3.3 A.51) with one segment per class (AUTOMATIC, the model as
    algorithm), one frame per source slice (empty ones kept), in the source series' study,
    frame of reference and patient; a new SeriesInstanceUID.

    Raises:
        ValueError: `label_map` is not on the series' grid.
        DataError: see `seg_sources`.

    Args:
        label_map: uint8 `(columns, rows, slices)` on the series' own grid (see
            `series_headers`: `Series.shape` and `Series.affine`).
        ref: the source series (a `SeriesRef` or a folder).
        out: the `.dcm` file to write (through a partial file and a rename).
        classes: number of classes including background; class `c` >= 1 is segment `c`.
        model_name, version: the algorithm identification of the segments.
        description: the SEG's SeriesDescription.

    Returns:
        The path written.

    Example:
    >>> write_seg(label_map, SeriesRef(pathlib.Path("A/ct")), "out/segmentation.seg.dcm", classes=2)  # doctest: +SKIP
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series, sources = seg_sources(ref)
    if tuple(label_map.shape) != tuple(series.shape):
        raise ValueError(f"label map shape {label_map.shape} is not the series' {series.shape}")
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, family=codes.cid7162.ArtificialIntelligence,
                                                   version=str(version))
    segments = [hd.seg.SegmentDescription(segment_number=c, segment_label=f"class {c}",
                                          segmented_property_category=codes.SCT.Tissue,
                                          segmented_property_type=codes.SCT.Tissue,
                                          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                          algorithm_identification=algorithm) for c in range(1, classes)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(label_map.transpose(2, 1, 0)).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="unicon-tf", manufacturer_model_name=model_name,
        software_versions=str(version), device_serial_number="0", series_description=description,
        omit_empty_frames=False)
    out = pathlib.Path(out)
    partial = out.with_name(out.name + ".partial")
    seg.save_as(partial)
    os.replace(partial, out)
    return out
