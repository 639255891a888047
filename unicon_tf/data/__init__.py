"""Data: manifests of NIfTI cohorts -> validated TFRecord shards -> tf.data pipelines.

Example:
>>> import pathlib, tempfile
>>> from unicon_tf import data
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> manifest = data.phantom.write_cohort(folder / "cohort", n=6, shape=(16, 16, 16), spacing=12.0)
>>> prep = data.Preprocessing(shape=(8, 8, 8), spacing=(24.0, 24.0, 24.0))
>>> schema = data.ingest(manifest, folder / "tfrecords", prep, workers=1, verbose=False)
>>> sorted(schema["splits"]), schema["modalities"]
(['test', 'train', 'val'], ['ct', 'pet'])
>>> train = data.dataset(folder / "tfrecords", "train", task="classification", batch_size=2)
>>> inputs, labels = next(iter(train))
>>> tuple(inputs["ct"].shape), labels.dtype.name
((2, 8, 8, 8, 1), 'int32')
"""

from unicon_tf._quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before any module of this package imports TensorFlow or Keras

from unicon_tf.data import phantom, real_ct, suv  # noqa: E402
from unicon_tf.data.dataset import dataset  # noqa: E402
from unicon_tf.data.errors import DataError, DataWarning  # noqa: E402
from unicon_tf.data.ingest import ingest  # noqa: E402
from unicon_tf.data.manifest import Manifest, Patient, read_manifest  # noqa: E402
from unicon_tf.data.preprocess import (DEFAULT_WINDOWS, IntensityWindow, PatientGrid, Preprocessing,  # noqa: E402
                                      load_volume, preprocess_patient, resample_patient)
from unicon_tf.data.records import data_fingerprint, read_schema  # noqa: E402

__all__ = [
    "DEFAULT_WINDOWS",
    "DataError",
    "DataWarning",
    "IntensityWindow",
    "Manifest",
    "Patient",
    "PatientGrid",
    "Preprocessing",
    "data_fingerprint",
    "dataset",
    "ingest",
    "load_volume",
    "phantom",
    "preprocess_patient",
    "read_manifest",
    "read_schema",
    "real_ct",
    "resample_patient",
    "suv",
]
