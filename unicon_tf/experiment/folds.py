"""Patient-level cross-validation folds and training fractions over ingested cohorts.

A fold is a re-split of the cohort's patients (every split of every ingested folder the
pipeline reads, pooled by `patient_id`): fold k's test split is the k-th part of a
stratified K-fold partition (stratified on `label` and `event`, where the cohort has
them), and its validation split is carved, stratified, from the other parts. The folds
depend only on the patients and `fold_seed`: every arm, seed and fraction of an
experiment sees the same folds.

The data a fold's stages read is written by copying the ingested `tf.train.Example`
records (bytes unchanged) into new shards per split (`write_split`): preprocessing is
the same for every fold, and the cohort is ingested once.

A fraction keeps a stratified subset of a split's patients (`training_subset`); the
subsets of one seed are nested (the 25% subset lies inside the 50% one), so a
data-fraction curve compares like with like.

Example:
>>> patients = [Patient(f"p{i}", label=i % 2, event=None) for i in range(12)]
>>> plan = make_folds(patients, folds=3)
>>> sorted(len(f["test"]) for f in plan)
[4, 4, 4]
>>> len(training_subset(plan[0]["train"], patients, 0.5, seed=0))
3
"""

import dataclasses
import json
import pathlib
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from sklearn.model_selection import StratifiedKFold

from unicon_tf.data import read_schema
from unicon_tf.data.errors import DataError
from unicon_tf.data.shards import ShardWriter
from unicon_tf.data.records import verify_shards
from unicon_tf.files import atomic_folder


@dataclasses.dataclass(frozen=True)
class Patient:
    """What a fold assignment needs to know of a patient: its id and strata."""

    patient_id: str
    label: int | None = None
    event: int | None = None

    @property
    def stratum(self) -> str:
        return f"{self.label}|{self.event}"


def read_patients(directory: pathlib.Path | str, splits: Iterable[str] | None = None) -> list[Patient]:
    """The patients of an ingested folder, with label and event where present.

    Reads only `patient_id`, `label` and `event` of each record.

    Args:
        directory: an ingested folder.
        splits: the splits to read (default: all).

    Returns:
        `[Patient]` in split, then record order.

    Raises:
        DataError: a missing schema or a corrupt shard (naming the file).
    """
    schema = read_schema(directory)
    spec = {"patient_id": tf.io.FixedLenFeature([], tf.string)}
    for target in ("label", "event"):
        if target in schema["targets"]:
            spec[target] = tf.io.FixedLenFeature([], tf.int64)
    patients = []
    for split in splits or schema["splits"]:
        records = tf.data.TFRecordDataset(verify_shards(directory, schema, split), compression_type="GZIP")
        for serialized in records:
            parsed = tf.io.parse_single_example(serialized, spec)
            patients.append(Patient(parsed["patient_id"].numpy().decode(),
                                    label=int(parsed["label"]) if "label" in parsed else None,
                                    event=int(parsed["event"]) if "event" in parsed else None))
    return patients


def pool_patients(cohorts: Iterable[Iterable[Patient]]) -> list[Patient]:
    """Every patient of several cohorts (lists of `Patient`), once each, sorted by id; a
    patient's strata come from the first cohort that has any."""
    pooled = {}
    for patients in cohorts:
        for patient in patients:
            known = pooled.get(patient.patient_id)
            if known is None or (known.label is None and known.event is None):
                pooled[patient.patient_id] = patient
    return [pooled[k] for k in sorted(pooled)]


def make_folds(patients: Iterable[Patient], folds: int, val_fraction: float = 0.25,
               fold_seed: int = 0) -> list[dict[str, list[str]]]:
    """Stratified, patient-disjoint K-fold splits with a validation split from the training folds.

    Args:
        patients: `[Patient]` (ids unique).
        folds: K >= 2.
        val_fraction: share of each fold's non-test patients kept for validation
            (0 for none).
        fold_seed: the seed of the partition (the same seed gives the same folds).

    Returns:
        K dicts `{"train", "val", "test"}` of sorted patient ids: the test splits
        partition the patients; train, val and test of a fold are disjoint.

    Raises:
        ValueError: fewer patients than folds, or K < 2.

    Strata are `(label, event)` (scikit-learn's `StratifiedKFold`; a stratum smaller than
    K is spread as evenly as it can be), coarsened to the label or the event alone when
    every `(label, event)` stratum is smaller than K.
    """
    patients = sorted(patients, key=lambda p: p.patient_id)  # the folds do not depend on the order
    ids = [p.patient_id for p in patients]
    if len(set(ids)) != len(ids):
        raise ValueError("make_folds: patient ids must be unique.")
    if folds < 2 or len(patients) < folds:
        raise ValueError(f"make_folds: need 2 <= folds <= patients, got {folds} folds for {len(patients)} patients.")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"make_folds: val_fraction must be in [0, 1), got {val_fraction}.")
    plan = []
    for k, (rest, test) in enumerate(_stratified_parts(patients, folds, fold_seed)):
        val = []
        parts = min(max(2, int(round(1 / val_fraction))) if val_fraction > 0 else 0, len(rest))
        if parts >= 2:
            inner = next(_stratified_parts([patients[i] for i in rest], parts, fold_seed * 1000 + k))[1]
            val = rest[inner]
        train = np.setdiff1d(rest, val)
        plan.append({split: sorted(ids[i] for i in members) for split, members in
                     (("train", train), ("val", val), ("test", test))})
    return plan


def _stratified_parts(patients, parts, seed):
    """`(other indices, part indices)` of a shuffled stratified partition into `parts`: strata
    `(label, event)`, or the label alone, the event alone, none, the first whose largest
    stratum can be spread over the parts."""
    for key in (lambda p: p.stratum, lambda p: p.label, lambda p: p.event, lambda p: None):
        strata = np.array([str(key(p)) for p in patients])
        if np.unique(strata, return_counts=True)[1].max() >= parts:
            break
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        splitter = StratifiedKFold(n_splits=parts, shuffle=True, random_state=seed)
        yield from splitter.split(np.zeros(len(strata)), strata)


def training_subset(ids: Collection[str], patients: Iterable[Patient], fraction: float, seed: int) -> list[str]:
    """A stratified `fraction` of the patients `ids` (at least one), nested across fractions.

    Patients are ordered once per `seed`: within each stratum at random, then interleaved
    by their quantile in the stratum, so every prefix keeps the strata's proportions; a
    fraction takes a prefix.

    Returns:
        Sorted ids.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    strata = {p.patient_id: p.stratum for p in patients}
    rng = np.random.default_rng(seed)
    groups = {}
    for pid in sorted(ids):
        groups.setdefault(strata[pid], []).append(pid)
    ordered = []
    for stratum in sorted(groups):
        members = rng.permutation(groups[stratum])
        ordered += [((i + rng.uniform()) / len(members), pid) for i, pid in enumerate(members)]
    ordered.sort()
    keep = max(1, int(round(fraction * len(ordered))))
    return sorted(pid for _, pid in ordered[:keep])


def write_split(source: pathlib.Path | str, out: pathlib.Path | str, assignment: Mapping[str, Sequence[str]],
                provenance: Mapping[str, Any] | None = None, shard_size: int = 64) -> pathlib.Path:
    """Copy an ingested folder's records into `out`, each patient in the split `assignment` gives.

    Patients `assignment` does not name are left out. The records' bytes are unchanged;
    `schema.json` is the source's with the new splits (counts, shards, checksums) and a
    `derived_from` entry. Written through `atomic_folder`; an existing `out` is kept
    as it is (it holds the same split).

    Args:
        source: an ingested folder.
        out: the new folder.
        assignment: `{split: [patient ids]}`.
        provenance: JSON-able facts kept under `derived_from` (fold, fraction, ...).
        shard_size: examples per shard.

    Returns:
        `out` as a `pathlib.Path`.

    Raises:
        DataError: a split with no patient of the source (naming the source's schema).
    """
    out = pathlib.Path(out)
    if (out / "schema.json").exists():
        return out
    schema = read_schema(source)
    split_of = {pid: split for split, ids in assignment.items() for pid in ids}
    with atomic_folder(out) as staging:
        writer = ShardWriter(staging, shard_size)
        spec = {"patient_id": tf.io.FixedLenFeature([], tf.string)}
        for split in schema["splits"]:
            records = tf.data.TFRecordDataset(verify_shards(source, schema, split), compression_type="GZIP")
            for serialized in records:
                pid = tf.io.parse_single_example(serialized, spec)["patient_id"].numpy().decode()
                if pid in split_of:
                    writer.write(split_of[pid], serialized.numpy())
        splits = writer.close()
        empty = [s for s, ids in assignment.items() if ids and s not in splits]
        if empty or not splits:
            raise DataError(f"no patient of the {empty or 'assigned'} split(s) is in this cohort",
                            file=pathlib.Path(source) / "schema.json", field="patient_id")
        derived = {"source": str(pathlib.Path(source).resolve()), **(provenance or {})}
        (staging / "schema.json").write_text(json.dumps({**schema, "splits": splits, "derived_from": derived},
                                                        indent=2) + "\n")
    return out
