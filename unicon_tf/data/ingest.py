"""Ingest a NIfTI cohort: manifest -> validated, preprocessed, sharded GZIP TFRecords.

Output folder:

    <out>/train-00000.tfrecord.gz ...   one series of shards per split
    <out>/schema.json                   features, shapes, dtypes, modalities, targets,
                                        preprocessing (spacing, windows), shard checksums
    <out>/stats.json                    counts per split, class balance, event rate,
                                        per-modality mean/std (train split), mask fractions
    <out>/rejected.csv                  with skip_bad: patients left out, and why

Everything is written to a temporary sibling folder that is renamed to `<out>` at the
end: a failed ingestion leaves nothing behind, and an existing folder is never touched.
This is the code that the ExampleGen component calls.
"""

import csv
import datetime
import json
import multiprocessing
import os
import pathlib

import numpy as np
import tensorflow as tf

from unicon_tf.data.errors import DataError, no_usable_patient
from unicon_tf.data.manifest import read_manifest
from unicon_tf.data.preprocess import preprocess_patient
from unicon_tf.data.records import encode_example
from unicon_tf.files import atomic_folder, sha256

SCHEMA_VERSION = 1


def ingest(manifest, out, preprocessing, workers=None, skip_bad=False, shard_size=64, verbose=True):
    """Preprocess every patient of a manifest into TFRecord shards, schema and stats.

    Args:
        manifest: path of the manifest CSV (see `unicon_tf.data.manifest`).
        out: output folder; must not exist yet (or be empty).
        preprocessing: a `Preprocessing` (shape, spacing, windows, crop centre, ...).
        workers: processes preprocessing patients in parallel (default: CPU count).
        skip_bad: write every good patient and list the bad ones (a bad manifest row or a
            bad image) in `rejected.csv` instead of failing on the first; problems of the
            whole cohort (a required column missing, duplicate ids) stay fatal.
        shard_size: examples per TFRecord shard.
        verbose: show a progress bar.

    Returns:
        The schema dict (also written to `<out>/schema.json`).

    Raises:
        DataError: naming patient, file and field of the first bad input (without skip_bad),
            a cohort-level problem, a modality scaled both per patient by the manifest and
            by its window's `scale`, or when no patient is usable. Nothing is written then.

    Example:
    >>> schema = ingest("cohort/manifest.csv", "data/ct32",
    ...                 Preprocessing(shape=(32, 32, 32), spacing=(6, 6, 6)))  # doctest: +SKIP
    """
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError("output folder already exists and is not empty; choose a new one", file=out, field="out")
    cohort = read_manifest(manifest, skip_bad=skip_bad)
    for modality in cohort.modalities:
        preprocessing.window(modality)
        if modality in cohort.scaling:
            try:
                preprocessing.check_per_patient_scale(modality, f"manifest: {cohort.scaling[modality]}")
            except ValueError as error:
                raise DataError(str(error), file=cohort.path, field=modality) from error
    workers = max(1, int(workers or os.cpu_count() or 1))

    with atomic_folder(out) as staging:
        writer = _ShardWriter(staging, shard_size)
        stats = _Stats(cohort.modalities)
        rejected = list(cohort.rejected)  # (patient_id, split, DataError), manifest rows first
        progress = tf.keras.utils.Progbar(len(cohort), unit_name="patient") if verbose else None
        for done, (patient, result) in enumerate(_preprocess_all(cohort.patients, preprocessing, workers), 1):
            if isinstance(result, DataError):
                if not skip_bad:
                    raise result
                rejected.append((patient.patient_id, patient.split, result))
            else:
                writer.write(patient.split, encode_example(result, cohort.targets))
                stats.add(patient.split, result)
            if progress:
                progress.update(done, finalize=done == len(cohort))
        splits = writer.close()
        if not splits:
            raise no_usable_patient(cohort.path, rejected)
        if rejected:
            _write_rejected(staging / "rejected.csv", rejected)
        schema = _schema(cohort, preprocessing, splits, stats)
        (staging / "schema.json").write_text(json.dumps(schema, indent=2) + "\n")
        (staging / "stats.json").write_text(json.dumps(stats.summary(), indent=2) + "\n")
    return schema


def _process(job):
    patient, preprocessing = job
    try:
        return patient, preprocess_patient(patient, preprocessing)
    except DataError as error:
        return patient, error


def _preprocess_all(patients, preprocessing, workers):
    """Yield `(patient, result or DataError)` in manifest order."""
    jobs = [(patient, preprocessing) for patient in patients]
    if workers == 1 or len(jobs) == 1:
        yield from map(_process, jobs)
        return
    # Workers use NumPy, SciPy and nibabel only; fork avoids re-importing TensorFlow.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(_process, jobs, chunksize=1)


class _ShardWriter:
    """GZIP TFRecord shards of `shard_size` examples per split, with sizes and checksums."""

    def __init__(self, directory, shard_size):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
        self.directory, self.shard_size = directory, shard_size
        self.open = {}  # split -> (writer, file name, count)
        self.shards = {}  # split -> [{"file", "count", ...}]

    def write(self, split, example):
        writer, name, count = self.open.get(split, (None, None, 0))
        if writer is None or count == self.shard_size:
            if writer is not None:
                self._finish(split, writer, name, count)
            name = f"{split}-{len(self.shards.get(split, [])):05d}.tfrecord.gz"
            writer = tf.io.TFRecordWriter(str(self.directory / name), options="GZIP")
            count = 0
        writer.write(example)
        self.open[split] = (writer, name, count + 1)

    def _finish(self, split, writer, name, count):
        writer.close()
        path = self.directory / name
        entry = {"file": name, "count": count, "bytes": path.stat().st_size, "sha256": sha256(path)}
        self.shards.setdefault(split, []).append(entry)

    def close(self):
        for split, (writer, name, count) in self.open.items():
            self._finish(split, writer, name, count)
        self.open = {}
        return {split: {"count": sum(s["count"] for s in shards), "shards": shards}
                for split, shards in sorted(self.shards.items())}


class _Stats:
    """Streaming cohort statistics: per split counts and targets, per modality moments."""

    def __init__(self, modalities):
        self.modalities = modalities
        self.counts, self.labels, self.events, self.times, self.mask_fraction = {}, {}, {}, {}, {}
        self.moments = {m: np.zeros(3) for m in modalities}  # n, sum, sum of squares (train)

    def add(self, split, result):
        self.counts[split] = self.counts.get(split, 0) + 1
        if result["label"] is not None:
            self.labels.setdefault(split, []).append(result["label"])
        if result["time"] is not None:
            self.events.setdefault(split, []).append(result["event"])
            self.times.setdefault(split, []).append(result["time"])
        if result["mask"] is not None:
            self.mask_fraction.setdefault(split, []).append(float(np.mean(result["mask"] > 0)))
        if split == "train":
            for modality, volume in result["images"].items():
                v = volume.astype(np.float64)
                self.moments[modality] += (v.size, v.sum(), np.square(v).sum())

    def summary(self):
        per_split = {}
        for split, count in sorted(self.counts.items()):
            entry = {"patients": count}
            if split in self.labels:
                values, freq = np.unique(self.labels[split], return_counts=True)
                entry["class_balance"] = {str(int(v)): int(f) for v, f in zip(values, freq)}
            if split in self.events:
                entry["event_rate"] = float(np.mean(self.events[split]))
                entry["median_time"] = float(np.median(self.times[split]))
            if split in self.mask_fraction:
                entry["mean_foreground_fraction"] = float(np.mean(self.mask_fraction[split]))
            per_split[split] = entry
        intensity = {}
        for modality, (n, total, squares) in self.moments.items():
            if n:
                mean = total / n
                intensity[modality] = {"mean": float(mean), "std": float(np.sqrt(max(squares / n - mean**2, 0.0)))}
        return {"splits": per_split, "intensity_train": intensity}


def _schema(cohort, preprocessing, splits, stats):
    shape = list(preprocessing.shape)
    features = {"patient_id": {"dtype": "string", "shape": []}, "affine": {"dtype": "float32", "shape": [4, 4]}}
    for modality in cohort.modalities:
        features[f"image/{modality}"] = {"dtype": "float32", "shape": shape + [1], "range": [-1.0, 1.0]}
    if "mask" in cohort.targets:
        features["mask"] = {"dtype": "int32", "shape": shape, "classes": preprocessing.mask_classes}
    if "label" in cohort.targets:
        labels = [label for values in stats.labels.values() for label in values]
        features["label"] = {"dtype": "int32", "shape": [], "classes": int(max(labels)) + 1 if labels else 0}
    if "time" in cohort.targets:
        features["time"] = {"dtype": "float32", "shape": []}
        features["event"] = {"dtype": "int32", "shape": []}
    return {
        "version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "manifest": str(cohort.path.resolve()),
        "modalities": list(cohort.modalities),
        "targets": list(cohort.targets),
        "scaling": dict(cohort.scaling),
        "features": features,
        "preprocessing": preprocessing.to_json(),
        "compression": "GZIP",
        "splits": splits,
    }


def _write_rejected(path, rejected):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "split", "file", "field", "reason"])
        for patient_id, split, error in rejected:
            writer.writerow([patient_id, split, error.file or "", error.field or "", error.reason])

