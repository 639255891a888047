"""The TFRecord format of a preprocessed patient, and reading it back with tf.data.

One `tf.train.Example` per patient:

| feature         | type                        | content                              |
|-----------------|-----------------------------|--------------------------------------|
| `patient_id`    | bytes                       | the manifest's patient_id            |
| `image/<m>`     | bytes (float32, `shape`)    | modality m, scaled to [-1, 1]        |
| `mask`          | bytes (uint8, `shape`)      | label map (when the cohort has masks)|
| `label`         | int64                       | class (when the cohort has labels)   |
| `time`, `event` | float, int64                | survival (when the cohort has them)  |
| `affine`        | 16 floats                   | world affine of the volume's grid    |

Volumes are raw little-endian bytes rather than float lists: parsing is a cheap
`decode_raw`. Shards are GZIP-compressed; `schema.json` lists them with their SHA-256
(`read_schema` reads it back; `data_fingerprint` condenses the checksums).
"""

import hashlib
import json
import pathlib
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from unicon_tf.data.errors import DataError
from unicon_tf.files import sha256


def encode_example(record: Mapping[str, Any], targets: Collection[str]) -> bytes:
    """Serialise a `preprocess_patient` result to `tf.train.Example` bytes."""

    def as_bytes(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {
        "patient_id": as_bytes(record["patient_id"].encode()),
        "affine": tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(record["affine"]).tolist())),
    }
    for modality, volume in record["images"].items():
        features[f"image/{modality}"] = as_bytes(np.ascontiguousarray(volume, dtype="<f4").tobytes())
    if "mask" in targets:
        features["mask"] = as_bytes(np.ascontiguousarray(record["mask"], dtype=np.uint8).tobytes())
    if "label" in targets:
        features["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[record["label"]]))
    if "time" in targets:
        features["time"] = tf.train.Feature(float_list=tf.train.FloatList(value=[record["time"]]))
        features["event"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[record["event"]]))
    # deterministic: map entries in key order, so a shard's bytes do not depend on the process
    # (or Beam worker) that encoded it.
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def feature_spec(schema: Mapping[str, Any]) -> dict[str, tf.io.FixedLenFeature]:
    """The `tf.io.parse_single_example` spec of a cohort described by `schema`."""
    spec = {
        "patient_id": tf.io.FixedLenFeature([], tf.string),
        "affine": tf.io.FixedLenFeature([16], tf.float32),
    }
    for modality in schema["modalities"]:
        spec[f"image/{modality}"] = tf.io.FixedLenFeature([], tf.string)
    targets = schema["targets"]
    if "mask" in targets:
        spec["mask"] = tf.io.FixedLenFeature([], tf.string)
    if "label" in targets:
        spec["label"] = tf.io.FixedLenFeature([], tf.int64)
    if "time" in targets:
        spec["time"] = tf.io.FixedLenFeature([], tf.float32)
        spec["event"] = tf.io.FixedLenFeature([], tf.int64)
    return spec


def parse_example(serialized: tf.Tensor, schema: Mapping[str, Any]) -> dict[str, tf.Tensor]:
    """A serialized Example -> dict of tensors: images `(D, H, W, 1)` float32, mask `(D, H, W)` int32."""
    shape = schema["preprocessing"]["shape"]
    parsed = tf.io.parse_single_example(serialized, feature_spec(schema))
    out = {"patient_id": parsed["patient_id"], "affine": tf.reshape(parsed["affine"], (4, 4))}
    for modality in schema["modalities"]:
        volume = tf.io.decode_raw(parsed[f"image/{modality}"], tf.float32, little_endian=True)
        out[modality] = tf.reshape(volume, list(shape) + [1])
    if "mask" in parsed:
        out["mask"] = tf.cast(tf.reshape(tf.io.decode_raw(parsed["mask"], tf.uint8), shape), tf.int32)
    for name in ("label", "event"):
        if name in parsed:
            out[name] = tf.cast(parsed[name], tf.int32)
    if "time" in parsed:
        out["time"] = parsed["time"]
    return out


def read_schema(directory: pathlib.Path | str) -> dict[str, Any]:
    """The `schema.json` of an ingested cohort folder.

    Raises:
        DataError: the folder has no schema.json (it was not written by `ingest`).
    """
    path = pathlib.Path(directory) / "schema.json"
    if not path.is_file():
        raise DataError("not an ingested cohort: schema.json is missing", file=path, field="schema")
    return json.loads(path.read_text())


def data_fingerprint(directory: pathlib.Path | str) -> str:
    """SHA-256 over the shard checksums recorded in an ingested folder's schema: the same
    examples give the same fingerprint wherever the folder lives.

    Raises:
        DataError: the folder has no schema.json.
    """
    schema = read_schema(directory)
    shards = sorted(s["sha256"] for split in schema["splits"].values() for s in split["shards"])
    return hashlib.sha256("".join(shards).encode()).hexdigest()


def verify_shards(directory: pathlib.Path | str, schema: Mapping[str, Any], split: str) -> list[str]:
    """The split's shard paths, after checking each one's size and SHA-256 against the schema.

    Raises:
        DataError: naming the shard that is missing, truncated or corrupt.
    """
    directory = pathlib.Path(directory)
    if split not in schema["splits"]:
        raise DataError(f"no split '{split}' in this cohort (has {sorted(schema['splits'])})",
                        file=directory / "schema.json", field="splits")
    paths = []
    for shard in schema["splits"][split]["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise DataError("TFRecord shard is missing", file=path, field=split)
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise DataError(f"TFRecord shard is truncated or altered ({size} bytes, expected {shard['bytes']})",
                            file=path, field=split)
        if sha256(path) != shard["sha256"]:
            raise DataError("TFRecord shard is corrupt (SHA-256 differs from schema.json)", file=path, field=split)
        paths.append(str(path))
    return paths
