"""Data: manifests of NIfTI cohorts -> validated TFRecord shards -> tf.data pipelines.

Example:
>>> from unicon_tf import data
>>> manifest = data.phantom.write_cohort("cohort", n=12, shape=(32, 32, 32), spacing=6.0)  # doctest: +SKIP
>>> data.ingest(manifest, "tfrecords", data.Preprocessing(shape=(32, 32, 32), spacing=(6, 6, 6)))  # doctest: +SKIP
>>> train = data.dataset("tfrecords", "train", task="classification", batch_size=4)  # doctest: +SKIP
"""

from unicon_tf._quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before any module of this package imports TensorFlow or Keras

from unicon_tf.data import phantom, suv  # noqa: E402
from unicon_tf.data.dataset import TASK_TARGETS, dataset, task_target  # noqa: E402
from unicon_tf.data.errors import DataError, DataWarning  # noqa: E402
from unicon_tf.data.ingest import ingest, read_schema  # noqa: E402
from unicon_tf.data.manifest import Manifest, Patient, read_manifest  # noqa: E402
from unicon_tf.data.preprocess import (DEFAULT_WINDOWS, IntensityWindow, PatientGrid, Preprocessing,  # noqa: E402
                                      load_volume, preprocess_patient, resample_patient)

__all__ = [
    "DEFAULT_WINDOWS",
    "DataError",
    "DataWarning",
    "IntensityWindow",
    "Manifest",
    "Patient",
    "PatientGrid",
    "Preprocessing",
    "TASK_TARGETS",
    "dataset",
    "ingest",
    "load_volume",
    "phantom",
    "preprocess_patient",
    "read_manifest",
    "read_schema",
    "resample_patient",
    "suv",
    "task_target",
]
