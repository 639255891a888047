"""Small synthetic DICOM for the tests: CT and PET series, SEG (highdicom) and RTSTRUCT (pydicom) from arrays.

Volumes are given as NIfTI sees them, `(X, Y, Z)` in RAS voxel order with an axis-aligned RAS
affine; the series are written as a scanner writes an axial stack (rows along patient
posterior, columns along patient left: ImageOrientationPatient 1\\0\\0\\0\\1\\0, LPS), so
every reader must flip x and y back to match the NIfTI.
"""

import pathlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "PT": "1.2.840.10008.5.1.4.1.1.128",
             "RTSTRUCT": "1.2.840.10008.5.1.4.1.1.481.3"}
STUDY_UID, FRAME_UID = generate_uid(), generate_uid()


def _number(value):
    """A DS string without float noise (`2.0` -> `2`)."""
    return f"{float(value):.10g}"


def _base(modality, patient, uid=None, sop_uid=None):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS[modality], ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = modality, patient, f"Test^{patient}"
    ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, uid or generate_uid()
    ds.FrameOfReferenceUID = FRAME_UID
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240301", "090000", "1", "A1"
    ds.ReferringPhysicianName, ds.Manufacturer, ds.SeriesNumber = "", "test", 1
    return ds


def write_series(folder, volume, affine, **options):
    """Write `volume` (RAS `(X, Y, Z)`, axis-aligned `affine`) as a scanner's axial stack; returns the folder.

    Columns run along patient left (RAS -x), rows along posterior (RAS -y): the volume is
    flipped in x and y and its LPS affine starts at RAS voxel `(X - 1, Y - 1, 0)`.
    `options` go to `write_stack`.
    """
    spacing = np.abs(np.diag(affine)[:3])
    lps = np.diag(np.append(spacing, 1.0))
    lps[:3, 3] = (affine @ [volume.shape[0] - 1, volume.shape[1] - 1, 0, 1])[:3] * [-1.0, -1.0, 1.0]
    return write_stack(folder, volume[::-1, ::-1, :], lps, **options)


def write_stack(folder, stack, lps, modality="CT", patient="P", uid=None, slopes=None, description="series",
                tags=None, per_slice=None, intercept=None):
    """Write `stack` `(columns, rows, slices)` with voxel-to-LPS affine `lps` as one file per slice.

    ImageOrientationPatient is `lps`'s first two columns normalised, PixelSpacing their
    lengths, ImagePositionPatient of slice k `lps @ (0, 0, k)`. CT is stored as `HU + 1024`
    with RescaleIntercept -1024; PET as int16 with per-slice RescaleSlope `slopes[k]`
    (values must be multiples of them). `tags` are set on every slice, `per_slice(k,
    dataset)` may edit slice k.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    cosines = (lps[:3, :2] / spacing[:2]).T.ravel()
    intercept = (-1024.0 if modality == "CT" else 0.0) if intercept is None else intercept
    for k in range(stack.shape[2]):
        ds = _base(modality, patient, uid)
        ds.SeriesDescription, ds.InstanceNumber = description, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [_number(v) for v in cosines]
        ds.ImagePositionPatient = [_number(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [_number(spacing[1]), _number(spacing[0])]  # between rows, between columns
        ds.SliceThickness = _number(spacing[2])
        slope = 1.0 if slopes is None else float(slopes[k])
        stored = np.round((stack[:, :, k].T - intercept) / slope).astype(np.int16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = _number(slope), _number(intercept)
        ds.PixelData = stored.tobytes()
        for name, value in (tags or {}).items():
            setattr(ds, name, value)
        if per_slice:
            per_slice(k, ds)
        ds.save_as(folder / f"{modality}_{uid[-6:]}_{k:03d}.dcm", enforce_file_format=True)
    return folder


def pet_tags(weight="70", dose="370000000", start="20240301093000", series_date="20240301", series_time="103000",
             decay="START", units="BQML", half_life="6586.2", start_time_only=None):
    """The SUV tags of a PET series (RadiopharmaceuticalInformationSequence and the rest)."""
    info = Dataset()
    info.RadionuclideTotalDose, info.RadionuclideHalfLife = dose, half_life
    if start_time_only:
        info.RadiopharmaceuticalStartTime = start_time_only
    elif start:
        info.RadiopharmaceuticalStartDateTime = start
    tags = {"RadiopharmaceuticalInformationSequence": Sequence([info]), "Units": units, "DecayCorrection": decay,
            "CorrectedImage": ["ATTN", "DECY"], "SeriesDate": series_date, "SeriesTime": series_time,
            "AcquisitionDate": series_date, "AcquisitionTime": series_time}
    if weight is not None:
        tags["PatientWeight"] = weight
    return tags


def write_seg(path, mask, series_folder, classes=2):
    """A DICOM SEG of `mask` (RAS `(X, Y, Z)`, on the series' grid) referencing the series, via highdicom."""
    from unicon_tf.data import dicom

    return dicom.write_seg(np.ascontiguousarray(mask[::-1, ::-1, :]).astype(np.uint8), series_folder, path, classes)


def write_rtstruct(path, boxes, affine, series_folder, holes=()):
    """A RTSTRUCT with one ROI whose contours are `boxes` `[(k, i0, i1, j0, j1)]` (RAS voxel indices,
    inclusive) traced along the voxels' outer edges; `holes` are boxes cut out of them (even-odd)."""
    references = sorted(pathlib.Path(series_folder).glob("*.dcm"))
    first = pydicom.dcmread(references[0], stop_before_pixels=True)
    ds = _base("RTSTRUCT", str(first.PatientID))
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "test", "20240301", "120000"
    roi = Dataset()
    roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = 7, "lesion", FRAME_UID
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = Sequence([roi])
    contours = []
    for k, i0, i1, j0, j1 in list(boxes) + list(holes):
        corners = np.array([[i0 - 0.5, j0 - 0.5, k], [i1 + 0.5, j0 - 0.5, k], [i1 + 0.5, j1 + 0.5, k],
                            [i0 - 0.5, j1 + 0.5, k]])
        world = corners @ affine[:3, :3].T + affine[:3, 3]
        contour = Dataset()
        contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", 4
        contour.ContourData = [_number(v) for v in (world * [-1.0, -1.0, 1.0]).ravel()]
        contours.append(contour)
    item = Dataset()
    item.ReferencedROINumber, item.ROIDisplayColor, item.ContourSequence = 7, [255, 0, 0], Sequence(contours)
    ds.ROIContourSequence = Sequence([item])
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = FRAME_UID, Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    ds.save_as(path, enforce_file_format=True)
    return pathlib.Path(path)
