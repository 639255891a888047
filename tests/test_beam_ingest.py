"""Ingestion on Apache Beam (DirectRunner) equals the multiprocessing ingestion, example by example."""

import csv
import json
import sys

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from unicon_tf import data
from unicon_tf.cli import main
from unicon_tf.data.records import parse_example


@pytest.fixture
def beam():
    """Skips the test where Apache Beam (the `beam` extra) is not installed; CI installs it."""
    return pytest.importorskip("apache_beam")

PREP = data.Preprocessing(shape=(16, 16, 16), spacing=(12.0, 12.0, 12.0), center="mask")


def cohort_with_bad_patients(phantom_cohort, folder):
    """The phantom manifest (absolute paths) with patients P0001 and P0006 given a corrupt CT,
    so that skipping them shifts every later patient's shard."""
    broken = folder / "broken_ct.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    with phantom_cohort.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for column in ("ct", "pet", "mask"):
            row[column] = str(phantom_cohort.parent / row[column])
        if row["patient_id"] in ("P0001", "P0006"):
            row["ct"] = str(broken)
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, broken


def examples(folder, schema, split):
    """Every example of a split, decoded by tf.data, in shard order."""
    files = [str(folder / shard["file"]) for shard in schema["splits"][split]["shards"]]
    records = tf.data.TFRecordDataset(files, compression_type="GZIP").map(lambda s: parse_example(s, schema))
    return [{key: value.numpy() for key, value in record.items()} for record in records]


def without_run_details(schema):
    return {key: value for key, value in schema.items() if key != "created"}


def test_beam_ingestion_equals_multiprocessing_example_by_example(beam, phantom_cohort, tmp_path):
    manifest, broken = cohort_with_bad_patients(phantom_cohort, tmp_path)
    local = data.ingest(manifest, tmp_path / "local", PREP, workers=2, skip_bad=True, shard_size=2, verbose=False)
    beam = data.ingest(manifest, tmp_path / "beam", PREP, skip_bad=True, shard_size=2, verbose=False,
                       runner="beam")

    assert without_run_details(beam) == without_run_details(local)  # shards: names, counts, bytes, SHA-256
    assert [beam["splits"][s]["count"] for s in ("train", "val", "test")] == [6, 1, 3]
    assert len(beam["splits"]["train"]["shards"]) == 3
    for name in ("stats.json", "rejected.csv"):
        assert (tmp_path / "beam" / name).read_text() == (tmp_path / "local" / name).read_text()
    assert json.loads((tmp_path / "beam" / "stats.json").read_text())["intensity_train"]["ct"]["std"] > 0
    with (tmp_path / "beam" / "rejected.csv").open() as handle:
        assert [(r["patient_id"], r["file"]) for r in csv.DictReader(handle)] == [
            ("P0001", str(broken)), ("P0006", str(broken))]
    for split in beam["splits"]:
        ours, theirs = examples(tmp_path / "beam", beam, split), examples(tmp_path / "local", local, split)
        assert [e["patient_id"] for e in ours] == [e["patient_id"] for e in theirs]
        for a, b in zip(ours, theirs):
            assert sorted(a) == sorted(b)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{a['patient_id']} {key}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_beam_bad_input_is_named_and_nothing_is_written(beam, phantom_cohort, tmp_path):
    manifest, broken = cohort_with_bad_patients(phantom_cohort, tmp_path)
    with pytest.raises(data.DataError) as caught:
        data.ingest(manifest, tmp_path / "out", PREP, verbose=False, runner="beam")
    error = caught.value
    assert (error.patient, error.file, error.field) == ("P0001", str(broken), "ct")  # the first in manifest order
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_cli_beam_runner_with_pipeline_options(beam, phantom_cohort, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "ingest", str(phantom_cohort), "--out", str(out), "--shape", "16", "16", "16",
        "--spacing", "12", "12", "12", "--runner", "beam", "--beam-args", "--runner=DirectRunner"])
    assert result.exit_code == 0, result.output
    assert data.read_schema(out)["splits"]["train"]["count"] == 7

    result = CliRunner().invoke(main, [
        "ingest", str(phantom_cohort), "--out", str(tmp_path / "other"), "--runner", "beam",
        "--beam-args", "--runner=NoSuchRunner"])
    assert result.exit_code != 0 and "NoSuchRunner" in result.output
    assert not (tmp_path / "other").exists()


def test_without_beam_the_error_says_how_to_install_it(phantom_cohort, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if not installed
    result = CliRunner().invoke(main, ["ingest", str(phantom_cohort), "--out", str(tmp_path / "out"),
                                       "--runner", "beam"])
    assert result.exit_code != 0 and "pip install 'unicon-tf[beam]'" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
