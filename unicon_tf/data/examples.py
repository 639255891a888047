"""One patient -> one example: the per-patient work of every ingestion runner.

`unicon_tf.data.ingest` (a local process pool) and `unicon_tf.data.beam` (an Apache Beam
pipeline) both call `process_patient`; neither imports the other's runner for it.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from unicon_tf.data.errors import DataError
from unicon_tf.data.preprocess import preprocess_patient
from unicon_tf.data.records import encode_example

if TYPE_CHECKING:
    from unicon_tf.data.manifest import Patient
    from unicon_tf.data.preprocess import Preprocessing


def process_patient(patient: "Patient", preprocessing: "Preprocessing",
                    targets: Sequence[str]) -> tuple[bytes, dict[str, Any]]:
    """The per-patient work of every runner: preprocess, encode, summarise.

    Args:
        patient: a manifest `Patient`.
        preprocessing: the cohort's `Preprocessing`.
        targets: the manifest's target columns (which features the example carries).

    Returns:
        `(example, summary)`: the serialized `tf.train.Example` bytes and the patient's
        contribution to `stats.json` (see `patient_summary`).

    Raises:
        DataError: naming the patient, file and field of bad input, or of the image whose
            preprocessing ran out of memory.
    """
    try:
        result = preprocess_patient(patient, preprocessing)
        return encode_example(result, targets), patient_summary(result)
    except MemoryError as error:  # NumPy's _ArrayMemoryError too: one patient's images, not the cohort
        raise out_of_memory(patient, error) from None


def patient_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """What `stats.json` needs from one preprocessed patient: targets, foreground fraction,
    and per modality (voxels, sum, sum of squares) in float64."""
    moments = {}
    for modality, volume in result["images"].items():
        v = volume.astype(np.float64)
        moments[modality] = [int(v.size), float(v.sum()), float(np.square(v).sum())]
    foreground = None if result["mask"] is None else float(np.mean(result["mask"] > 0))
    return {"label": result["label"], "time": result["time"], "event": result["event"],
            "foreground": foreground, "moments": moments}


def out_of_memory(patient: "Patient", error: BaseException) -> DataError:
    """The `DataError` of a patient whose preprocessing ran out of memory (a patient-level
    error: `skip_bad` lists it in rejected.csv and goes on)."""
    files = {**patient.images, **({"mask": patient.mask} if patient.mask else {})}
    largest = max(files, key=lambda k: voxel_bytes(files[k]))
    return DataError(f"ran out of memory preprocessing this patient ({type(error).__name__}: {error}); its largest "
                     f"image holds {voxel_bytes(files[largest]) / 2**20:.0f} MiB of voxels: give ingestion more "
                     "memory or fewer --workers", patient=patient.patient_id, file=files[largest], field=largest)


def voxel_bytes(path: pathlib.Path | str) -> int:
    """Bytes of an image's voxels as stored (from its header; 0 when it cannot be read)."""
    try:
        image = nib.load(str(path))
        return int(np.prod(image.shape)) * image.get_data_dtype().itemsize
    except Exception:  # noqa: BLE001 (an unreadable file is reported by its own check)
        return 0
