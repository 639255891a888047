"""The error type of bad input data (it names the patient, the file and the field) and its warning."""

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unicon_tf.data.dicom import SeriesRef


class DataError(ValueError):
    """Bad input data, located by patient, file and manifest field.

    Args:
        message: what is wrong.
        patient: the patient_id, or None for a manifest-level problem.
        file: the offending file (a NIfTI image, the manifest, a TFRecord shard, a DICOM series).
        field: the manifest column or record feature concerned (`ct`, `time`, ...).

    Example:
    >>> str(DataError("NaN voxels", patient="P001", file="ct.nii.gz", field="ct"))
    'patient P001, file ct.nii.gz, field ct: NaN voxels'
    """

    def __init__(self, message: str, patient: str | None = None, file: "str | os.PathLike | SeriesRef | None" = None,
                 field: str | None = None) -> None:
        self.reason, self.patient, self.file, self.field = message, patient, file, field
        where = [f"{label} {value}" for label, value in (("patient", patient), ("file", file), ("field", field)) if value]
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def __reduce__(self):  # keep patient, file and field across worker processes
        return type(self), (self.reason, self.patient, self.file, self.field)


class DataWarning(UserWarning):
    """Input data that is usable but doubtful (e.g. a NIfTI whose sform and qform disagree); names the file."""


def no_usable_patient(file: str | os.PathLike, rejected: Sequence[tuple[str, str, DataError]]) -> DataError:
    """The error when every patient of a cohort was rejected, quoting the first reasons.

    Args:
        file: the manifest.
        rejected: `[(patient_id, split, DataError)]`.
    """
    reasons = "; ".join(f"{pid}: {error}" for pid, _, error in rejected[:3])
    more = f" (and {len(rejected) - 3} more)" if len(rejected) > 3 else ""
    return DataError(f"no usable patient: all {len(rejected)} rejected, e.g. {reasons}{more}" if rejected
                     else "the manifest has no patients", file=file, field="patients")
