"""Ingest a NIfTI cohort: manifest -> validated, preprocessed, sharded GZIP TFRecords.

Output folder:

    <out>/train-00000.tfrecord.gz ...   one series of shards per split
    <out>/schema.json                   features, shapes, dtypes, modalities, targets,
                                        preprocessing (spacing, windows), shard checksums
    <out>/stats.json                    counts per split, class balance, event rate,
                                        per-modality mean/std (train split), mask fractions
    <out>/rejected.csv                  with skip_bad: patients left out, and why

Two runners do the per-patient work (`unicon_tf.data.examples.process_patient`: preprocess,
encode, summarise) and write shards with `unicon_tf.data.shards`:
a local `multiprocessing` pool (default), or an Apache Beam pipeline (`runner="beam"`,
see `unicon_tf.data.beam`) on the DirectRunner, Dataflow, Flink or Spark. Both assign
examples to the same shards in manifest order and fold statistics in manifest order, so
their outputs are equal example by example.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from unicon_tf._quiet import progress_verbosity
from unicon_tf.data.beam import run_beam
from unicon_tf.data.errors import DataError, no_usable_patient
from unicon_tf.data.examples import process_patient, voxel_bytes
from unicon_tf.data.manifest import read_manifest
from unicon_tf.data.preprocess import DEFAULT_WINDOWS
from unicon_tf.data.shards import ShardWriter
from unicon_tf.files import atomic_folder

if TYPE_CHECKING:
    from unicon_tf.data.manifest import Manifest
    from unicon_tf.data.preprocess import Preprocessing

SCHEMA_VERSION = 1
RUNNERS = ("multiprocessing", "beam")


def ingest(manifest: pathlib.Path | str, out: pathlib.Path | str, preprocessing: "Preprocessing",
           workers: int | None = None, skip_bad: bool = False, shard_size: int = 64, verbose: bool = True,
           runner: str = "multiprocessing", beam_args: str | None = None) -> dict[str, Any]:
    """Preprocess every patient of a manifest into TFRecord shards, schema and stats.

    Args:
        manifest: path of the manifest CSV (see `unicon_tf.data.manifest`).
        out: output folder; must not exist yet (or be empty).
        preprocessing: a `Preprocessing` (shape, spacing, windows, crop centre, ...).
        workers: processes preprocessing patients in parallel (default: as many as the
            available memory holds, at most the CPU count; see `default_workers`).
        skip_bad: write every good patient and list the bad ones (a bad manifest row or a
            bad image) in `rejected.csv` instead of failing on the first; problems of the
            whole cohort (a required column missing, duplicate ids) stay fatal.
        shard_size: examples per TFRecord shard.
        verbose: show a progress bar.
        runner: `"multiprocessing"` (a local process pool) or `"beam"` (an Apache Beam
            pipeline; needs the `beam` extra, `pip install 'unicon-tf[beam]'`).
        beam_args: with `runner="beam"`, Beam pipeline options as one command-line string,
            e.g. `"--runner=FlinkRunner --flink_master=host:8081"` (default: DirectRunner).

    Returns:
        The schema dict (also written to `<out>/schema.json`).

    Raises:
        DataError: naming patient, file and field of the first bad input (without skip_bad),
            a cohort-level problem, a modality scaled both per patient by the manifest and
            by its window's `scale`, or when no patient is usable. Nothing is written then.
        DataError: `runner="beam"` without Apache Beam installed (field `runner`).

    Example:
    >>> schema = ingest("cohort/manifest.csv", "data/ct32",
    ...                 Preprocessing(shape=(32, 32, 32), spacing=(6, 6, 6)))  # doctest: +SKIP
    """
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError("output folder already exists and is not empty; choose a new one", file=out, field="out")
    cohort = read_manifest(manifest, skip_bad=skip_bad)
    unused = sorted(set(preprocessing.windows) - set(cohort.modalities) - set(DEFAULT_WINDOWS))
    if unused:  # a misspelt modality ('CT') would leave the real one on its default window
        raise DataError(f"a window is given for modality {unused[0]!r}, which the manifest has no image column for "
                        f"(its modalities: {cohort.modalities}); modality names are the manifest's column names",
                        file=cohort.path, field="windows")
    for modality in cohort.modalities:
        preprocessing.window(modality)
        if modality in cohort.scaling:
            try:
                preprocessing.check_per_patient_scale(modality, f"manifest: {cohort.scaling[modality]}")
            except ValueError as error:
                raise DataError(str(error), file=cohort.path, field=modality) from error
    if runner not in RUNNERS:
        raise ValueError(f"Unknown ingestion runner '{runner}': expected one of {list(RUNNERS)}.")
    workers = max(1, int(workers or default_workers(cohort)))

    with atomic_folder(out) as staging:
        if runner == "beam":
            outcomes, splits = run_beam(cohort, preprocessing, staging, shard_size, skip_bad, beam_args)
        else:
            writer = ShardWriter(staging, shard_size)
            outcomes = _process_and_write(cohort, preprocessing, workers, writer)
        stats = _Stats(cohort.modalities)
        rejected = list(cohort.rejected)  # (patient_id, split, DataError), manifest rows first
        progress = tf.keras.utils.Progbar(len(cohort), unit_name="patient",
                                          verbose=progress_verbosity(1)) if verbose else None
        for done, (patient, outcome) in enumerate(outcomes, 1):
            if isinstance(outcome, DataError):
                if not skip_bad:
                    raise outcome
                rejected.append((patient.patient_id, patient.split, outcome))
            else:
                stats.add(patient.split, outcome)
            if progress:
                progress.update(done, finalize=done == len(cohort))
        if runner != "beam":
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
    patient, preprocessing, targets = job
    try:
        return patient, process_patient(patient, preprocessing, targets)
    except DataError as error:
        return patient, error


PEAK_PER_RAW_BYTE = 3
"""Peak memory of preprocessing one patient, in bytes per stored voxel byte of its images
(the goal `benchmarks/ingest_memory.py` measures)."""


def default_workers(cohort: "Manifest", available: int | None = None) -> int:
    """Worker processes that fit in memory: the available memory (the cgroup limit or
    MemAvailable) over the peak of the cohort's largest patient (`PEAK_PER_RAW_BYTE` x its
    stored voxel bytes, read from the first patients' headers, plus 200 MiB per process),
    at most the CPU count, at least 1.

    Args:
        cohort: a read `Manifest`.
        available: bytes of memory to plan with (default: measured).

    Returns:
        The worker count.
    """
    cpus = os.cpu_count() or 1
    available = available_memory() if available is None else available
    sample = cohort.patients[:8]
    largest = max((sum(voxel_bytes(p) for p in [*patient.images.values(), patient.mask] if p)
                   for patient in sample), default=0)
    per_worker = PEAK_PER_RAW_BYTE * largest + 200 * 2**20
    if not available:
        return cpus
    return max(1, min(cpus, int(available // per_worker)))


def available_memory() -> int | None:
    """Bytes of memory this process may still use: the smaller of the cgroup's limit less its
    usage (containers) and the host's MemAvailable; None when neither can be read."""
    found = []
    try:
        limit = pathlib.Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(pathlib.Path("/sys/fs/cgroup/memory.current").read_text())
        if limit.isdigit():
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


def _process_and_write(cohort, preprocessing, workers, writer):
    """Yield `(patient, summary or DataError)` in manifest order, writing each example."""
    jobs = [(patient, preprocessing, cohort.targets) for patient in cohort.patients]
    for patient, outcome in _map_in_processes(_process, jobs, workers):
        if isinstance(outcome, DataError):
            yield patient, outcome
        else:
            example, summary = outcome
            writer.write(patient.split, example)
            yield patient, summary


def _map_in_processes(function, jobs, workers):
    """`map(function, jobs)` on a process pool, results in job order."""
    if workers == 1 or len(jobs) == 1:
        yield from map(function, jobs)
        return
    # Workers use NumPy, SciPy, nibabel and protobuf only; fork avoids re-importing TensorFlow.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(function, jobs, chunksize=1)


class _Stats:
    """Streaming cohort statistics: per split counts and targets, per modality moments."""

    def __init__(self, modalities):
        self.modalities = modalities
        self.counts, self.labels, self.events, self.times, self.mask_fraction = {}, {}, {}, {}, {}
        self.moments = {m: np.zeros(3) for m in modalities}  # n, sum, sum of squares (train)

    def add(self, split, summary):
        """Fold in one patient's `patient_summary` (in manifest order, for equal sums)."""
        self.counts[split] = self.counts.get(split, 0) + 1
        if summary["label"] is not None:
            self.labels.setdefault(split, []).append(summary["label"])
        if summary["time"] is not None:
            self.events.setdefault(split, []).append(summary["event"])
            self.times.setdefault(split, []).append(summary["time"])
        if summary["foreground"] is not None:
            self.mask_fraction.setdefault(split, []).append(summary["foreground"])
        if split == "train":
            for modality, moments in summary["moments"].items():
                self.moments[modality] += moments

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

