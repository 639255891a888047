"""Trainer: one continual-learning stage -> a `Model` artifact (the stage's folder)."""

import dataclasses

from unicon_tf.components.base import Artifact, ComponentSpec
from unicon_tf.data.records import sha256
from unicon_tf.train.stage import RunDirectory, train_stage

SPEC = ComponentSpec(
    name="Trainer",
    inputs={"examples": "Examples", "base_model": "Model?"},
    outputs={"model": "Model"},
    parameters=("stage", "strategy", "epochs", "learning_rate", "init", "resume"),
)


def execute(inputs, parameters, context):
    """Train `parameters["stage"]` of `context["pipeline"]` on the Examples artifact."""
    pipeline = context["pipeline"]
    index, spec = pipeline.stage(parameters["stage"])
    stages = list(pipeline.stages)
    stages[index] = dataclasses.replace(spec, data=inputs["examples"].uri)
    record = train_stage(dataclasses.replace(pipeline, stages=stages), spec.name, context["run_dir"],
                         strategy=parameters.get("strategy"), epochs=parameters.get("epochs"),
                         learning_rate=parameters.get("learning_rate"), init=parameters.get("init"),
                         resume=parameters.get("resume", False), verbose=context.get("verbose", 1))
    run = RunDirectory(context["run_dir"], pipeline)
    return {"model": Artifact("Model", str(run.stage_dir(index)), context["id"], sha256(run.model_path(index)),
                              {"stage": spec.name, "head": record["head"], "strategy": record["strategy"]})}
