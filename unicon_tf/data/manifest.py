"""The cohort manifest: one CSV row per patient, validated before any image is read.

Columns:

| column             | required | meaning                                                      |
|--------------------|----------|--------------------------------------------------------------|
| `patient_id`       | yes      | unique identifier, a file name (no `/`, `\\`, `..`)           |
| `split`            | yes      | `train`, `val` or `test`                                     |
| `ct`, `pet`…       | >= 1     | path of a 3D image per modality (relative paths are relative |
|                    |          | to the manifest's folder): a NIfTI file, a DICOM series      |
|                    |          | folder, an ITK file (`.nrrd`, `.mha`, `.mhd`)                 |
| `<modality>_series_uid` | no  | SeriesInstanceUID of the series to read where the modality's |
|                    |          | folder holds several                                         |
| `label`            | no       | integer class (classification)                               |
| `time`             | no       | follow-up time > 0 (prognosis, with `event`)                 |
| `event`            | no       | 1 if the event was observed at `time`, 0 if censored         |
| `mask`             | no       | path of a 3D label map (segmentation): NIfTI, `.seg.nrrd`,   |
|                    |          | DICOM SEG or RTSTRUCT (drawn on the reference image's grid)  |
| `<modality>_scale` | no       | per-patient factor on that modality's raw values (e.g.       |
|                    |          | `pet_scale`: Bq/mL -> SUV)                                   |
| `weight_kg`,       | no       | body-weight SUV of `pet` (`unicon_tf.data.suv`): body weight |
| `injected_dose_bq` |          | in kg, injected activity in Bq at injection time             |
| `injection_time`,  | no       | decay correction of the dose to the scan start: both ISO     |
| `acquisition_time` |          | 8601 date-times or both times of day (`09:30:00`, `093000`)  |
| `scan_delay_s`     | no       | or the delay from injection to acquisition start in s        |
| `half_life_s`      | no       | the tracer's half-life in s (default F-18, 6586.2 s)         |

A `pet` given as a DICOM series (and no `pet_scale`) is turned into body-weight SUV from
its own tags (`unicon_tf.data.dicom.suv_from_tags`); the SUV columns above, where filled,
override the tags they replace, and the schema's `scaling` records which.

An image column's name must be a valid modality name (`unicon_tf.names`). A column that
is neither an image (its cells name image files or DICOM folders), a target nor a
per-patient field above is refused by name. A column a stage does not need may be left empty, but a column is either
filled for every patient or for none, so each split's targets are complete.

The file is read as UTF-8 with or without a byte-order mark, with any line ending, and
with `,`, `;` or tab between cells (as spreadsheets save it; with `;`, numbers may use a
decimal comma, `12,5`); header cells are matched after trimming spaces; rows that are
wholly empty are skipped.

Errors: a problem of the whole cohort (a required column missing, duplicate ids, an
unknown column) is fatal; a problem of one row (an empty or bad cell, a missing file) is
that patient's, so ingestion with `skip_bad` can leave the patient out.
"""

import csv
import dataclasses
import io
import pathlib
from collections.abc import Sequence

from unicon_tf.data import dicom
from unicon_tf.data.errors import DataError, no_usable_patient
from unicon_tf.data.suv import F18_HALF_LIFE_S, SUVInputError, delay_seconds, suv_bw_factor
from unicon_tf.names import InvalidNameError, check_name

SPLITS = ("train", "val", "test")
TARGET_COLUMNS = ("label", "time", "event", "mask")
RESERVED = ("patient_id", "split") + TARGET_COLUMNS
SUV_MODALITY = "pet"
SUV_COLUMNS = ("weight_kg", "injected_dose_bq", "injection_time", "acquisition_time", "scan_delay_s", "half_life_s")
SCALE_SUFFIX = "_scale"
NUMERIC_COLUMNS = ("label", "time", "event", "weight_kg", "injected_dose_bq", "scan_delay_s", "half_life_s")
STRAY = None
"""Row key of the filled cells that have no column name (as `csv.DictReader`'s `restkey`):
an unquoted separator inside a cell (`12,5` in a `,` file) shifts the cells after it."""
IMAGE_SUFFIXES = ((".nii", ".nii.gz", ".hdr", ".img", ".img.gz", ".mgh", ".mgz") + dicom.ITK_SUFFIXES
                  + dicom.DICOM_SUFFIXES)
"""File names read as 3D images (nibabel's, ITK's, DICOM's); a column whose cells name none
of them, nor a folder (a DICOM series) or a DICOM file, is no image."""
SERIES_UID_SUFFIX = "_series_uid"
SUV_FROM_TAGS = dicom.SUV_SOURCE


@dataclasses.dataclass(frozen=True)
class Patient:
    """One manifest row, typed and with absolute paths.

    `scales` maps a modality to this patient's factor on its raw values (e.g. `pet`:
    SUVbw factor in mL/Bq); modalities without one are not scaled per patient.
    """

    patient_id: str
    split: str
    images: dict  # modality -> pathlib.Path
    label: int | None = None
    time: float | None = None
    event: int | None = None
    mask: pathlib.Path | None = None
    scales: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated manifest: its patients, modalities (first is the reference grid) and targets.

    `scaling` maps a modality scaled per patient to how (e.g. `{"pet": "SUVbw from
    weight_kg, injected_dose_bq"}`); `rejected` lists `(patient_id, split, DataError)` of
    rows left out (only with `skip_bad`).
    """

    path: pathlib.Path
    patients: list
    modalities: list
    targets: list
    scaling: dict = dataclasses.field(default_factory=dict)
    rejected: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.patients)


def read_manifest(path: pathlib.Path | str, modalities: Sequence[str] | None = None,
                  skip_bad: bool = False) -> Manifest:
    """Read and validate a manifest CSV; errors name the row's patient, the file and the field.

    Args:
        path: the CSV file.
        modalities: image columns to use, the reference grid first (default: every
            image column, `ct` first when present).
        skip_bad: collect the rows with a problem of their own in `Manifest.rejected`
            instead of raising the first one.

    Returns:
        A `Manifest`.

    Raises:
        DataError: naming the file, the column and (for a row) the patient and line:
            cohort-level problems always, row problems unless `skip_bad`, and a manifest
            with no usable row.

    Example:
    >>> manifest = read_manifest("cohort/manifest.csv")  # doctest: +SKIP
    >>> manifest.modalities, manifest.targets  # doctest: +SKIP
    (['ct', 'pet'], ['label', 'time', 'event', 'mask'])
    """
    path = pathlib.Path(path)
    columns, rows, lines = _read_table(path)
    for column in ("patient_id", "split"):
        if column not in columns:
            near = [c for c in columns if c.lower().replace(" ", "_") == column]
            hint = f" (found '{near[0]}': column names are case-sensitive)" if near else ""
            raise DataError(f"required column '{column}' is missing{hint}", file=path, field=column)
    filled = [c for c in columns if c and any(row.get(c) for row in rows)]
    image_columns = _image_columns(path, filled, rows)
    for column in [c for c in filled if c.endswith(SERIES_UID_SUFFIX)]:
        if column[: -len(SERIES_UID_SUFFIX)] not in image_columns + ["mask"]:
            raise DataError(f"column '{column}' chooses a series of '{column[: -len(SERIES_UID_SUFFIX)]}', which has "
                            "no image column", file=path, field=column)
    if modalities is None:
        modalities = sorted(image_columns, key=lambda c: (c != "ct", image_columns.index(c)))
    modalities = [m for m in modalities if any(row.get(m) for row in rows)]
    for modality in modalities:
        if modality not in columns:
            raise DataError(f"image column '{modality}' is missing", file=path, field=modality)
    if not modalities:
        raise DataError("no image column (e.g. 'ct') has any file", file=path)
    targets = [c for c in TARGET_COLUMNS if c in filled]
    if ("time" in targets) != ("event" in targets):
        raise DataError("'time' and 'event' must be given together", file=path, field="time/event")
    scaling = _scaling(path, filled, image_columns, modalities, rows)
    per_patient = [c for c in filled if c.endswith(SCALE_SUFFIX) or
                   (c in SUV_COLUMNS and not scaling.get(SUV_MODALITY, "").startswith(SUV_FROM_TAGS))]
    required = list(modalities) + targets + per_patient

    seen = {}
    for line, row in zip(lines, rows):
        pid = row.get("patient_id", "")
        if pid and pid in seen:
            raise DataError(f"duplicate patient_id (manifest lines {seen[pid]} and {line})", patient=pid,
                            file=path, field="patient_id")
        seen.setdefault(pid, line)
    patients, rejected = [], []
    for line, row in zip(lines, rows):
        try:
            patients.append(_patient(row, line, path, modalities, targets, required, scaling))
        except DataError as error:
            if not skip_bad:
                raise
            rejected.append((row.get("patient_id") or f"<line {line}>", row.get("split", ""), error))
    if not patients:
        raise no_usable_patient(path, rejected)
    return Manifest(path=path, patients=patients, modalities=modalities, targets=targets, scaling=scaling,
                    rejected=rejected)


def _read_table(path):
    """Header cells (trimmed), rows (`{column: trimmed cell}`, wholly empty rows dropped) and their line numbers.

    A row's filled cells under no header name (beyond the header, or under a blank header
    cell) are kept as `row[STRAY]`, `{1-based column number: cell}`, for `_patient` to refuse.
    """
    if not path.is_file():
        raise DataError("manifest file does not exist", file=path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}): "
                        "save the manifest as 'CSV UTF-8'", file=path) from error
    first = text.lstrip("\r\n").splitlines()[0] if text.strip() else ""
    delimiter = max(",;\t", key=first.count) if any(d in first for d in ",;\t") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    header = next((cells for cells in reader if any(cell.strip() for cell in cells)), [])
    columns = [cell.strip().lstrip("\ufeff").strip() for cell in header]
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:
        raise DataError(f"column(s) {repeated} appear more than once in the header", file=path, field=repeated[0])
    decimal_comma = delimiter == ";"  # the spreadsheets that separate cells by ';' write 12,5 for 12.5
    numeric = [c for c in columns if c in NUMERIC_COLUMNS or c.endswith(SCALE_SUFFIX)] if decimal_comma else []
    rows, lines = [], []
    for cells in reader:
        cells = [cell.strip() for cell in cells]
        if any(cells):
            row = {c: (cells[i] if i < len(cells) else "") for i, c in enumerate(columns) if c}
            stray = {i + 1: cell for i, cell in enumerate(cells) if cell and (i >= len(columns) or not columns[i])}
            rows.append({**row, **{c: row[c].replace(",", ".") for c in numeric}, **({STRAY: stray} if stray else {})})
            lines.append(reader.line_num)
    return columns, rows, lines


def _image_columns(path, filled, rows):
    """The filled columns that hold images; an unknown column or an invalid modality name is refused."""
    images = []
    for column in filled:
        if column in RESERVED or column in SUV_COLUMNS or column.endswith((SCALE_SUFFIX, SERIES_UID_SUFFIX)):
            continue
        cells = [row[column] for row in rows if row.get(column)]
        if not any(cell.lower().endswith(IMAGE_SUFFIXES) or dicom.kind_of(_resolve(path, cell)) == "series"
                   or _is_dicom_file(_resolve(path, cell)) for cell in cells):
            raise DataError(
                f"column '{column}' is neither an image (its cells, e.g. '{cells[0]}', name no image file nor "
                f"DICOM series folder), "
                f"a target {list(TARGET_COLUMNS)} nor a per-patient field {list(SUV_COLUMNS)} or "
                f"'<modality>{SCALE_SUFFIX}': rename or remove it", file=path, field=column)
        try:
            check_name(column, "modality")
        except InvalidNameError as error:
            raise DataError(f"image column: {error}", file=path, field=column) from error
        images.append(column)
    return images


def _resolve(path, cell):
    """A manifest cell's path: relative paths are relative to the manifest's folder."""
    file = pathlib.Path(cell)
    return file if file.is_absolute() else path.parent / file


def _is_dicom_file(file):
    return file.is_file() and dicom.kind_of(file) == "dicom"


def _scaling(path, filled, image_columns, modalities, rows):
    """`{modality: how it is scaled per patient}`; contradictory or orphan columns are refused."""
    scaling = {}
    for column in [c for c in filled if c.endswith(SCALE_SUFFIX)]:
        modality = column[: -len(SCALE_SUFFIX)]
        if modality not in image_columns:
            raise DataError(f"column '{column}' scales modality '{modality}', which has no image column",
                            file=path, field=column)
        if modality in modalities:
            scaling[modality] = f"column {column}"
    suv = [c for c in SUV_COLUMNS if c in filled]
    if "scan_delay_s" in suv and "injection_time" in suv:
        raise DataError("give the delay either as 'scan_delay_s' or as 'injection_time' and 'acquisition_time', "
                        "not both", file=path, field="scan_delay_s")
    pet_series = SUV_MODALITY in modalities and SUV_MODALITY not in scaling and any(
        row.get(SUV_MODALITY) and dicom.kind_of(_resolve(path, row[SUV_MODALITY])) == "series" for row in rows)
    if pet_series:  # SUV from each series' tags, the columns overriding them
        scaling[SUV_MODALITY] = SUV_FROM_TAGS + (f"; manifest columns {suv} override the tags" if suv else "")
        return scaling
    if not suv:
        return scaling
    for needed in ("weight_kg", "injected_dose_bq"):
        if needed not in suv:
            raise DataError(f"body-weight SUV needs both 'weight_kg' and 'injected_dose_bq'; '{needed}' is missing "
                            f"(given: {suv})", file=path, field=needed)
    if ("injection_time" in suv) != ("acquisition_time" in suv):
        raise DataError("decay correction needs both 'injection_time' and 'acquisition_time'", file=path,
                        field="injection_time/acquisition_time")
    if SUV_MODALITY not in modalities:
        raise DataError(f"body-weight SUV columns {suv} are given but there is no '{SUV_MODALITY}' image column",
                        file=path, field="weight_kg")
    if SUV_MODALITY in scaling:
        raise DataError(f"'{SUV_MODALITY}' is scaled twice: by column '{SUV_MODALITY}{SCALE_SUFFIX}' and by "
                        "body-weight SUV (weight_kg, injected_dose_bq): keep one", file=path,
                        field=f"{SUV_MODALITY}{SCALE_SUFFIX}")
    decay = ("decay-corrected from injection_time to acquisition_time" if "injection_time" in suv else
             "decay-corrected over scan_delay_s" if "scan_delay_s" in suv else "dose taken at the scan start")
    half_life = "half_life_s" if "half_life_s" in suv else f"F-18 half-life {F18_HALF_LIFE_S} s"
    scaling[SUV_MODALITY] = f"SUVbw = Bq/mL * weight_kg * 1000 / injected_dose_bq ({decay}, {half_life})"
    return scaling


def _patient(row, line, path, modalities, targets, required, scaling):
    pid = row.get("patient_id", "")

    def fail(message, field):
        raise DataError(f"{message} (manifest line {line})", patient=pid or f"<line {line}>", file=path, field=field)

    if not pid:
        fail("patient_id is empty", "patient_id")
    if row.get(STRAY):
        number, cell = next(iter(row[STRAY].items()))
        fail(f"column {number} holds '{cell}' but has no name in the header: is a separator unquoted inside a "
             f"cell (a decimal comma, a comma in a path)? quote that cell", f"column {number}")
    if _file_name_unsafe(pid):
        fail(f"patient_id {pid!r} cannot name a file (it names the patient's label maps): no '/', '\\', "
             "control characters, '.' or '..'", "patient_id")
    if row.get("split") not in SPLITS:
        fail(f"split must be one of {list(SPLITS)}, got '{row.get('split')}'", "split")
    for column in required:
        if not row.get(column):
            fail(f"'{column}' is empty while other patients have it", column)

    def existing(column):
        file = _resolve(path, row[column])
        uid = row.get(column + SERIES_UID_SUFFIX)
        if file.is_dir() and column != "mask":
            return dicom.SeriesRef(file, uid) if uid else file
        if not file.exists():
            raise DataError(f"file does not exist (manifest line {line})", patient=pid, file=file, field=column)
        if not file.is_file() or uid:
            fail(f"'{row[column]}' is {'a folder' if file.is_dir() else 'a file'}: "
                 + ("a mask is one file (NIfTI, ITK, DICOM SEG or RTSTRUCT)" if column == "mask" else
                    f"'{column}{SERIES_UID_SUFFIX}' chooses a series in a DICOM folder"), column)
        return file

    values = {"images": {m: existing(m) for m in modalities}}
    if "mask" in targets:
        values["mask"] = existing("mask")
    if "label" in targets:
        values["label"] = _number(row["label"], int, fail, "label")
        if values["label"] < 0:
            fail(f"label must be a class index >= 0, got {row['label']}", "label")
    if "time" in targets:
        values["time"] = _number(row["time"], float, fail, "time")
        if not values["time"] > 0:
            fail(f"time must be > 0, got {row['time']}", "time")
        values["event"] = _number(row["event"], int, fail, "event")
        if values["event"] not in (0, 1):
            fail(f"event must be 0 (censored) or 1 (observed), got {row['event']}", "event")
    values["scales"] = {m: _scale(row, m, how, fail, values["images"].get(m)) for m, how in scaling.items()}
    return Patient(patient_id=pid, split=row["split"], **values)


def _file_name_unsafe(patient_id):
    """Whether `patient_id` is no plain file name (a path separator, a control character, `.`, `..`)."""
    return (patient_id in (".", "..") or any(c in "/\\" for c in patient_id)
            or not patient_id.isprintable())


def _scale(row, modality, how, fail, image=None):
    """This row's factor on `modality`: its `<modality>_scale` cell or its SUVbw factor (from the
    columns, or from the tags of a DICOM `image` with the columns overriding them)."""
    column = f"{modality}{SCALE_SUFFIX}"
    if how == f"column {column}":
        factor = _number(row[column], float, fail, column)
        if not factor > 0:
            fail(f"{column} must be > 0, got {row[column]}", column)
        return factor
    numbers = {c: _number(row[c], float, fail, c) for c in ("weight_kg", "injected_dose_bq", "scan_delay_s",
                                                            "half_life_s") if row.get(c)}
    if how.startswith(SUV_FROM_TAGS) and dicom.kind_of(image) == "series":
        overrides = {**{c: row[c] for c in ("injection_time", "acquisition_time") if row.get(c)}, **numbers}
        try:
            return dicom.suv_from_tags(dicom.suv_tags(image, row.get("patient_id"), modality), overrides)[0]
        except SUVInputError as error:
            fail(f"body-weight SUV from the tags of {image}: {error}", error.field)
    for needed in ("weight_kg", "injected_dose_bq"):
        if needed not in numbers:
            fail(f"'{needed}' is empty: the cohort's other PET series give SUV from their DICOM tags, this "
                 f"'{modality}' is no DICOM series", needed)
    delay = numbers.get("scan_delay_s", 0.0)
    if row.get("injection_time"):
        try:
            delay = delay_seconds(row["injection_time"], row["acquisition_time"],
                                  numbers.get("half_life_s", F18_HALF_LIFE_S))
        except ValueError as error:
            fail(f"injection_time/acquisition_time: {error}", "injection_time")
        if delay < 0:
            fail(f"acquisition_time '{row['acquisition_time']}' is before injection_time '{row['injection_time']}'",
                 "acquisition_time")
    try:
        return suv_bw_factor(numbers["weight_kg"], numbers["injected_dose_bq"], delay,
                             numbers.get("half_life_s", F18_HALF_LIFE_S))
    except SUVInputError as error:
        delay_field = "acquisition_time" if row.get("injection_time") else "scan_delay_s"
        fail(str(error), delay_field if error.field == "scan_delay_s" else error.field)


def _number(text, kind, fail, field):
    try:
        value = float(text)
    except ValueError:
        fail(f"{field} must be a number, got '{text}'", field)
    if value != value or value in (float("inf"), float("-inf")):
        fail(f"{field} must be finite, got '{text}'", field)
    if kind is int and value != int(value):
        fail(f"{field} must be an integer, got '{text}'", field)
    return kind(value)
