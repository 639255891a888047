"""The unicon artifact types on KFP, and the adapter between the two kinds of record.

KFP v2 accepts only its own (`system.*`) and Google's (`google.*`) artifact schemas, so
each unicon type travels as the KFP type that fits it, its unicon type in the metadata:

| unicon type   | KFP type (`schema_title`) | holds                                          |
|---------------|---------------------------|------------------------------------------------|
| (manifest)    | `Dataset` (system.Dataset)| a NIfTI cohort's manifest.csv (ExampleGen reads it) |
| `Examples`    | `Dataset` (system.Dataset)| ingested TFRecords, schema.json, stats.json    |
| `Model`       | `Model` (system.Model)    | a stage folder: model.keras, stage.json        |
| `Evaluation`  | `Metrics` (system.Metrics)| metrics.json, blessing.json, predictions; metadata `row`, `tasks` |
| `Blessing`    | `Artifact` (system.Artifact) | metadata `blessed`, `reasons`               |
| `PushedModel` | `Artifact` (system.Artifact) | metadata `pushed`, `version`, `location` (the SavedModel version under the serving base) |

A unicon `Artifact` (type, uri, producer, fingerprint, properties) maps onto a KFP artifact
as: uri -> the artifact's local `.path` (KFP mounts `gs://`, `s3://`, `minio://` URIs
there); type, producer, fingerprint and properties -> its `.metadata`, which KFP's and
Vertex AI's metadata stores show and hand to the tasks downstream.
"""

from kfp import dsl

from unicon_tf.components.base import Artifact
from unicon_tf.files import plain_json, write_json_atomic

KFP_TYPES = {"Examples": dsl.Dataset, "Model": dsl.Model, "Evaluation": dsl.Metrics, "Blessing": dsl.Artifact,
             "PushedModel": dsl.Artifact}
"""unicon artifact type -> the KFP artifact class it travels as."""
RECORD_KEYS = ("type", "producer", "fingerprint")
"""Metadata keys that carry the unicon record's own fields (the rest are its properties)."""


def to_record(artifact: dsl.Artifact) -> Artifact:
    """The unicon `Artifact` of a KFP input artifact, its local path as the uri.

    An artifact that no unicon task produced (a `dsl.importer`'s) is `external`, with no
    fingerprint.

    Raises:
        ValueError: the metadata names no unicon type, or one KFP type does not carry.
    """
    metadata = dict(artifact.metadata)
    kind = metadata.get("type")
    if kind not in KFP_TYPES or artifact.schema_title != KFP_TYPES[kind].schema_title:
        raise ValueError(f"{artifact.uri}: a {artifact.schema_title} artifact whose metadata type is {kind!r} is "
                         f"not a unicon artifact (types: {sorted(KFP_TYPES)}).")
    return Artifact(kind, artifact.path, metadata.get("producer", "external"), metadata.get("fingerprint", ""),
                    {k: v for k, v in metadata.items() if k not in RECORD_KEYS})


def write_record(record: Artifact, artifact: dsl.Artifact) -> None:
    """Describe KFP output `artifact` by the unicon `record` an executor returned.

    Where the executor wrote its output elsewhere than the artifact's path (the Evaluator's
    blessing.json inside its evaluation folder, the Pusher's version under the serving
    base), the metadata says where (`location`) and the artifact's path holds the record
    as JSON.

    Raises:
        ValueError: a property would overwrite one of `RECORD_KEYS`.
    """
    clash = set(record.properties) & set(RECORD_KEYS)
    if clash:
        raise ValueError(f"{record.producer}: properties {sorted(clash)} clash with the record's own fields.")
    artifact.metadata.update(plain_json({**record.properties, "type": record.type, "producer": record.producer,
                                         "fingerprint": record.fingerprint}))
    if record.uri != artifact.path:
        artifact.metadata["location"] = record.uri
        write_json_atomic(artifact.path, record.to_json())
