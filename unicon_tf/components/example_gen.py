"""ExampleGen: a NIfTI manifest -> validated, sharded TFRecords (an `Examples` artifact)."""

import pathlib
from collections.abc import Mapping
from typing import Any

from unicon_tf.components.base import Artifact, ComponentSpec
from unicon_tf.data import Preprocessing, data_fingerprint, ingest
from unicon_tf.data.preprocess import DEFAULT_WINDOWS

SPEC = ComponentSpec(
    name="ExampleGen",
    inputs={},
    outputs={"examples": "Examples"},
    parameters=("manifest", "shape", "spacing", "center", "mask_classes", "windows"),
)


def execute(inputs: Mapping[str, Artifact], parameters: Mapping[str, Any],
            context: Mapping[str, Any]) -> dict[str, Artifact]:
    """Ingest `parameters["manifest"]` into `<context.output_dir>` (must not exist yet)."""
    windows = {**DEFAULT_WINDOWS, **{m: tuple(w) for m, w in (parameters.get("windows") or {}).items()}}
    preprocessing = Preprocessing(shape=parameters["shape"], spacing=parameters["spacing"], windows=windows,
                                  center=parameters.get("center", "body"),
                                  mask_classes=parameters.get("mask_classes", 2))
    out = pathlib.Path(context["output_dir"])
    schema = ingest(parameters["manifest"], out, preprocessing, verbose=context.get("verbose", 1) > 0)
    return {"examples": Artifact("Examples", str(out), context["id"], data_fingerprint(out),
                                 {"splits": {s: v["count"] for s, v in schema["splits"].items()},
                                  "modalities": schema["modalities"], "targets": schema["targets"]})}
