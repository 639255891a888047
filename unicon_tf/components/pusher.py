"""Pusher: exports a model to TF Serving only if the Evaluator blessed it (as in TFX)."""

from unicon_tf.components.base import Artifact, ComponentSpec, fingerprint
from unicon_tf.data.records import sha256
from unicon_tf.serving import export_stage

SPEC = ComponentSpec(
    name="Pusher",
    inputs={"model": "Model", "blessing": "Blessing"},
    outputs={"pushed_model": "PushedModel"},
    parameters=("stage", "base", "model_name"),
)


def execute(inputs, parameters, context):
    """Export the stage as the next version, or record that it was not pushed and why."""
    blessing = inputs["blessing"].properties
    if not blessing["blessed"]:
        return {"pushed_model": Artifact("PushedModel", "", context["id"], fingerprint("skipped", blessing),
                                         {"pushed": False, "reason": "; ".join(blessing["reasons"])})}
    version = export_stage(context["run_dir"], parameters["stage"], base=parameters["base"],
                           model_name=parameters.get("model_name"))
    return {"pushed_model": Artifact("PushedModel", str(version), context["id"], sha256(version / "saved_model.pb"),
                                     {"pushed": True, "version": int(version.name)})}
