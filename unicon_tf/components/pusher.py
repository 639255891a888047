"""Pusher: exports the `Model` artifact to TF Serving only if its `Blessing` says so (as in TFX).

The blessing is checked here, once; the export (`unicon_tf.serving.push_stage`) does not
check it again.
"""

from collections.abc import Mapping
from typing import Any

from unicon_tf.components.base import Artifact, ComponentSpec, fingerprint
from unicon_tf.files import sha256
from unicon_tf.serving import push_stage

SPEC = ComponentSpec(
    name="Pusher",
    inputs={"model": "Model", "blessing": "Blessing"},
    outputs={"pushed_model": "PushedModel"},
    parameters=("base", "model_name"),
)


def execute(inputs: Mapping[str, Artifact], parameters: Mapping[str, Any],
            context: Mapping[str, Any]) -> dict[str, Artifact]:
    """Export the model as the next version, or record that it was not pushed and why."""
    blessing = inputs["blessing"].properties
    if not blessing["blessed"]:
        return {"pushed_model": Artifact("PushedModel", "", context["id"], fingerprint("skipped", blessing),
                                         {"pushed": False, "reason": "; ".join(blessing["reasons"])})}
    version = push_stage(inputs["model"].uri, parameters["base"], parameters.get("model_name"),
                         blessing={"stage": inputs["model"].properties.get("stage"), **blessing})
    return {"pushed_model": Artifact("PushedModel", str(version), context["id"], sha256(version / "saved_model.pb"),
                                     {"pushed": True, "version": int(version.name)})}
