"""Trainer: one continual-learning stage -> a `Model` artifact (the stage's folder).

Reads only its inputs and parameters: the Examples artifact's folder is the stage's data,
the base Model artifact's folder holds the previous stage's model (for every stage but
the first); writes the stage into `context["output_dir"]`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from unicon_tf.components.base import Artifact, ComponentSpec
from unicon_tf.files import sha256
from unicon_tf.run import StageFolder
from unicon_tf.train.pipeline import PipelineSpec
from unicon_tf.train.stage import fit_stage

SPEC = ComponentSpec(
    name="Trainer",
    inputs={"examples": "Examples", "base_model": "Model?"},
    outputs={"model": "Model"},
    parameters=("pipeline", "stage", "strategy", "epochs", "learning_rate", "init", "resume", "distribute",
                "precision", "profile_batch", "accept_changes"),
)


def execute(inputs: Mapping[str, Artifact], parameters: Mapping[str, Any],
            context: Mapping[str, Any]) -> dict[str, Artifact]:
    """Train `parameters["stage"]` of `parameters["pipeline"]` (`PipelineSpec.to_json`) on
    the Examples artifact, from the base Model artifact, into `context["output_dir"]`."""
    pipeline = PipelineSpec.from_json(parameters["pipeline"])
    index, spec = pipeline.stage(parameters["stage"])
    stages = list(pipeline.stages)
    stages[index] = dataclasses.replace(spec, data=inputs["examples"].uri)
    base = inputs.get("base_model")
    out = StageFolder(context["output_dir"])
    record = fit_stage(dataclasses.replace(pipeline, stages=stages), spec.name, out,
                       base=base.uri if base else None, strategy=parameters.get("strategy"),
                       epochs=parameters.get("epochs"), learning_rate=parameters.get("learning_rate"),
                       init=parameters.get("init"), resume=parameters.get("resume", False),
                       verbose=context.get("verbose", 1), distribute=parameters.get("distribute"),
                       precision=parameters.get("precision"), profile_batch=parameters.get("profile_batch"),
                       accept_changes=parameters.get("accept_changes", False))
    if not record["chief"]:  # a multi-worker strategy's other worker: the chief writes (and records) the stage
        return {"model": Artifact("Model", str(out.path), context["id"], "", {"stage": spec.name, "worker": True})}
    return {"model": Artifact("Model", str(out.path), context["id"], sha256(out.model),
                              {"stage": spec.name, "head": record["head"], "strategy": record["strategy"],
                               **({"resume_changes": record["resume_changes"]} if record["resume_changes"] else {})})}
