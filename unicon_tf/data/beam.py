"""Ingestion as an Apache Beam pipeline: `ingest(..., runner="beam")`.

The same per-patient work as the local runner (`examples.process_patient`), distributed by
Beam (DirectRunner by default; Dataflow, Flink or Spark through pipeline options):

    patients --Map(process_patient)--> (index, example | error, summary)
        outcomes (small: split, ok, summary or error) --ToList--> shard assignment
        examples --key (split, shard)--> GroupByKey --> one GZIP TFRecord shard each
        outcomes + shard entries --> _beam_results.json in the staging folder

A patient's shard is its rank among the usable patients of its split, in manifest order,
divided by `shard_size`, and each shard is written in manifest order: exactly the shards
the local runner writes. `ingest` then folds the outcomes in manifest order into the same
statistics, schema and `rejected.csv`, and renames the staging folder, as for the local
runner. Without `skip_bad`, a bad patient writes no shard and `ingest` raises the first
error in manifest order.

Every worker needs unicon-tf installed, and must be able to read the manifest's image
paths and write the output's staging folder (a shared filesystem); see docs/scale.md.
A shard's examples are grouped in one worker's memory: about `shard_size` x example size.

Beam is an optional dependency, imported only here: `pip install 'unicon-tf[beam]'`.
"""

import json
import pathlib
import shlex
import types
from typing import TYPE_CHECKING, Any

from unicon_tf.data.errors import DataError
from unicon_tf.data.examples import process_patient
from unicon_tf.data.shards import open_shard, shard_entry, shard_name, split_entries

if TYPE_CHECKING:
    from unicon_tf.data.manifest import Manifest, Patient
    from unicon_tf.data.preprocess import Preprocessing

RESULTS = "_beam_results.json"


def run_beam(cohort: "Manifest", preprocessing: "Preprocessing", staging: pathlib.Path, shard_size: int,
             skip_bad: bool, beam_args: str | None = None,
             ) -> tuple[list[tuple["Patient", dict[str, Any] | DataError]], dict[str, dict[str, Any]]]:
    """Run the per-patient work and the shard writing of `ingest` as a Beam pipeline.

    Args:
        cohort: the validated `Manifest`.
        preprocessing: the `Preprocessing`.
        staging: the (existing, empty) folder the shards are written to.
        shard_size: examples per shard, >= 1.
        skip_bad: write the usable patients even when some are bad.
        beam_args: Beam pipeline options as one command-line string (parsed with shlex),
            e.g. `"--runner=DataflowRunner --project=p --region=r --temp_location=gs://b/t
            --setup_file=./setup.py"`; None or empty for the DirectRunner.

    Returns:
        `(outcomes, splits)`: `[(patient, summary or DataError)]` in manifest order, and
        the schema's `splits` (empty when nothing was written).

    Raises:
        DataError: Apache Beam is not installed (field `runner`).
        ValueError: shard_size < 1.
    """
    beam = import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    staging = str(staging)
    patients = list(enumerate(cohort.patients))
    options = PipelineOptions(shlex.split(beam_args or ""))
    with beam.Pipeline(options=options) as pipeline:
        processed = (pipeline
                     | "Patients" >> beam.Create(patients, reshuffle=True)
                     | "Process" >> beam.Map(_process, preprocessing, list(cohort.targets)))
        outcomes = (processed
                    | "Outcome" >> beam.Map(_outcome)
                    | "AllOutcomes" >> beam.combiners.ToList())
        assignment = outcomes | "AssignShards" >> beam.Map(_assign_shards, shard_size, skip_bad)
        entries = (processed
                   | "KeyByShard" >> beam.FlatMap(_key_by_shard, beam.pvalue.AsSingleton(assignment))
                   | "GroupShards" >> beam.GroupByKey()
                   | "WriteShard" >> beam.Map(_write_shard, staging)
                   | "AllShards" >> beam.combiners.ToList())
        _ = (pipeline
             | "Once" >> beam.Create([None])
             | "WriteResults" >> beam.Map(_write_results, staging, beam.pvalue.AsSingleton(outcomes),
                                          beam.pvalue.AsSingleton(entries)))
    return _read_results(staging, cohort)


def import_beam() -> types.ModuleType:
    """`apache_beam`, or a DataError (field `runner`) that says how to install it."""
    try:
        import apache_beam
    except ImportError as error:
        raise DataError("ingestion with --runner beam needs Apache Beam: pip install 'unicon-tf[beam]'",
                        field="runner") from error
    return apache_beam


def _process(indexed, preprocessing, targets):
    index, patient = indexed
    try:
        example, summary = process_patient(patient, preprocessing, targets)
        return index, patient.split, example, summary
    except DataError as error:
        failure = {"reason": error.reason, "patient": error.patient, "file": str(error.file) if error.file else None, "field": error.field}
        return index, patient.split, None, failure


def _outcome(processed):
    """The small part of a processed patient: everything but the example bytes."""
    index, split, example, details = processed
    return index, split, example is not None, details


def _assign_shards(outcomes, shard_size, skip_bad):
    """`{index: (split, shard)}` for every usable patient, ranked in manifest order; empty
    when a bad patient fails the run (no skip_bad)."""
    if not skip_bad and not all(ok for _, _, ok, _ in outcomes):
        return {}
    assignment, ranks = {}, {}
    for index, split, ok, _ in sorted(outcomes, key=lambda outcome: outcome[0]):
        if ok:
            rank = ranks.get(split, 0)
            ranks[split] = rank + 1
            assignment[index] = (split, rank // shard_size)
    return assignment


def _key_by_shard(processed, assignment):
    index, _, example, _ = processed
    if index in assignment:
        yield assignment[index], (index, example)


def _write_shard(grouped, staging):
    (split, number), examples = grouped
    name = shard_name(split, number)
    examples = sorted(examples, key=lambda indexed: indexed[0])
    with open_shard(staging, name) as writer:
        for _, example in examples:
            writer.write(example)
    return {"split": split, "number": number, **shard_entry(staging, name, len(examples))}


def _write_results(_, staging, outcomes, entries):
    results = {"outcomes": sorted(outcomes, key=lambda outcome: outcome[0]),
               "shards": sorted(entries, key=lambda entry: (entry["split"], entry["number"]))}
    (pathlib.Path(staging) / RESULTS).write_text(json.dumps(results))


def _read_results(staging, cohort):
    path = pathlib.Path(staging) / RESULTS
    results = json.loads(path.read_text())
    path.unlink()
    outcomes = []
    for index, _, ok, details in results["outcomes"]:
        patient = cohort.patients[index]
        if ok:
            outcomes.append((patient, details))
        else:
            outcomes.append((patient, DataError(details["reason"], patient=details["patient"],
                                                file=details["file"], field=details["field"])))
    shards = {}
    for entry in results["shards"]:
        shards.setdefault(entry["split"], []).append({k: entry[k] for k in ("file", "count", "bytes", "sha256")})
    return outcomes, split_entries(shards)
