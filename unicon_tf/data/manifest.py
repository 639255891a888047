"""The cohort manifest: one CSV row per patient, validated before any image is read.

Columns:

| column       | required | meaning                                                    |
|--------------|----------|------------------------------------------------------------|
| `patient_id` | yes      | unique identifier                                          |
| `split`      | yes      | `train`, `val` or `test`                                   |
| `ct`, `pet`… | >= 1     | path of a 3D NIfTI image per modality (relative paths are  |
|              |          | relative to the manifest's folder)                         |
| `label`      | no       | integer class (classification)                             |
| `time`       | no       | follow-up time > 0 (prognosis, with `event`)               |
| `event`      | no       | 1 if the event was observed at `time`, 0 if censored       |
| `mask`       | no       | path of a 3D NIfTI label map (segmentation)                |

A column a stage does not need may be left empty, but a column is either filled for every
patient or for none, so each split's targets are complete.
"""

import csv
import dataclasses
import pathlib

from unicon_tf.data.errors import DataError

SPLITS = ("train", "val", "test")
TARGET_COLUMNS = ("label", "time", "event", "mask")
RESERVED = ("patient_id", "split") + TARGET_COLUMNS


@dataclasses.dataclass(frozen=True)
class Patient:
    """One manifest row, typed and with absolute paths."""

    patient_id: str
    split: str
    images: dict  # modality -> pathlib.Path
    label: int | None = None
    time: float | None = None
    event: int | None = None
    mask: pathlib.Path | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated manifest: its patients, modalities (first is the reference grid) and targets."""

    path: pathlib.Path
    patients: list
    modalities: list
    targets: list

    def __len__(self):
        return len(self.patients)


def read_manifest(path, modalities=None):
    """Read and validate a manifest CSV; errors name the row's patient, the file and the field.

    Args:
        path: the CSV file.
        modalities: image columns to use, the reference grid first (default: every
            non-reserved column, `ct` first when present).

    Returns:
        A `Manifest`.

    Example:
    >>> manifest = read_manifest("cohort/manifest.csv")  # doctest: +SKIP
    >>> manifest.modalities, manifest.targets  # doctest: +SKIP
    (['ct', 'pet'], ['label', 'time', 'event', 'mask'])
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError("manifest file does not exist", file=path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    for column in ("patient_id", "split"):
        if column not in columns:
            raise DataError(f"required column '{column}' is missing", file=path, field=column)
    image_columns = [c for c in columns if c not in RESERVED]
    if modalities is None:
        modalities = sorted(image_columns, key=lambda c: (c != "ct", image_columns.index(c)))
    modalities = [m for m in modalities if any(row.get(m) for row in rows)]
    for modality in modalities:
        if modality not in columns:
            raise DataError(f"image column '{modality}' is missing", file=path, field=modality)
    if not modalities:
        raise DataError("no image column (e.g. 'ct') has any file", file=path)
    targets = [c for c in TARGET_COLUMNS if c in columns and any(row.get(c) for row in rows)]
    if ("time" in targets) != ("event" in targets):
        raise DataError("'time' and 'event' must be given together", file=path, field="time/event")

    patients, seen = [], {}
    for line, row in enumerate(rows, start=2):
        patients.append(_patient(row, line, path, modalities, targets, seen))
    if not patients:
        raise DataError("the manifest has no patients", file=path)
    return Manifest(path=path, patients=patients, modalities=modalities, targets=targets)


def _patient(row, line, path, modalities, targets, seen):
    pid = row.get("patient_id", "")

    def fail(message, field):
        raise DataError(f"{message} (manifest line {line})", patient=pid or f"<line {line}>", file=path, field=field)

    if not pid:
        fail("patient_id is empty", "patient_id")
    if pid in seen:
        fail(f"duplicate patient_id (also on line {seen[pid]})", "patient_id")
    seen[pid] = line
    if row.get("split") not in SPLITS:
        fail(f"split must be one of {list(SPLITS)}, got '{row.get('split')}'", "split")
    for column in list(modalities) + [t for t in targets]:
        if not row.get(column):
            fail(f"'{column}' is empty while other patients have it", column)

    def existing(column):
        file = pathlib.Path(row[column])
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise DataError("file does not exist", patient=pid, file=file, field=column)
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
    return Patient(patient_id=pid, split=row["split"], **values)


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
