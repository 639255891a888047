"""The pipeline graph: every component run of a pipeline, built once from its spec.

`LocalRunner` walks this graph and the KFP compiler translates it; neither wires a
component itself. For each stage, in order (a `sources` entry's ExampleGen once, before
the first stage that uses it):

    ExampleGen.<source>  (params: the `sources` entry)         -> examples
    Trainer.<stage>      <- examples, base_model (previous Trainer's model) -> model
    Evaluator.<stage>    <- model, baseline (previous Evaluator's evaluation),
                            single_task (the stage's single-task baseline, when its
                            blessing is `bless: {min_vs_baseline}`) -> evaluation, blessing
    Pusher.<stage>       <- model, blessing; runs if the blessing's `blessed` holds

What comes from outside the pipeline is an `External`: the manifest of a `sources` entry
(ExampleGen's `manifest` parameter) or an already ingested folder (a stage's `data`),
each a pipeline parameter on KFP. The serving base and the served model's name are the
Pusher's run-time parameters (`Node.runtime`), given by the runner or the KFP run.

Example:
>>> from unicon_tf.train.pipeline import load_pipeline  # doctest: +SKIP
>>> graph = pipeline_graph(load_pipeline("pipelines/chest_ct.yaml"))  # doctest: +SKIP
>>> [node.run_id for node in graph.stage_nodes("classification")]  # doctest: +SKIP
['Trainer.classification', 'Evaluator.classification', 'Pusher.classification']
"""

import dataclasses

from unicon_tf.names import InvalidNameError, engine_names
from unicon_tf.train.pipeline import PipelineError, PipelineSpec

SERVING_PARAMETERS = {"base": "serving_base", "model_name": "model_name"}
"""The Pusher's run-time parameters -> the pipeline parameters that carry them on KFP."""


@dataclasses.dataclass(frozen=True)
class Output:
    """An input fed by output `name` of the run `run_id`."""

    run_id: str
    name: str


@dataclasses.dataclass(frozen=True)
class External:
    """Data from outside the pipeline.

    Attributes:
        kind: `manifest` (a `sources` entry's NIfTI manifest) or `examples` (an ingested
            TFRecord folder, a stage's `data`).
        uri: where it is (a path or a `gs://`-style URI), the pipeline parameter's default.
        parameter: the pipeline parameter's name (a Python identifier).
        users: the source (manifest), or the stages that read the folder (examples).
    """

    kind: str
    uri: str
    parameter: str
    users: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SingleTaskBaseline:
    """The single-task baseline of `stage`, trained by the local runner for a stage whose
    blessing is `bless: {min_vs_baseline}` (`unicon_tf.train.baselines`)."""

    stage: str


Source = Output | External | SingleTaskBaseline


@dataclasses.dataclass(frozen=True)
class Node:
    """One component run.

    Attributes:
        run_id: `<component>.<stage or source>`, the id `lineage.json` and KFP use.
        component: a name of `unicon_tf.components.COMPONENTS`.
        stage: the stage (or, for ExampleGen, the source) it belongs to.
        inputs: `{input name: Output | External | SingleTaskBaseline}` (an optional input
            without a source is left out).
        parameters: the run's fixed parameters.
        runtime: `{parameter: pipeline parameter}` given when the pipeline runs.
        condition: run only if this Blessing output is `blessed` (None: always).
    """

    run_id: str
    component: str
    stage: str
    inputs: dict[str, Source]
    parameters: dict
    runtime: dict[str, str] = dataclasses.field(default_factory=dict)
    condition: Output | None = None


@dataclasses.dataclass(frozen=True)
class PipelineGraph:
    """A pipeline's component runs in execution order, and what they read from outside."""

    name: str
    nodes: dict[str, Node]
    externals: dict[str, External]

    def stage_nodes(self, stage: str) -> list[Node]:
        """The Trainer, Evaluator and Pusher runs of `stage`, in order."""
        return [self.nodes[f"{component}.{stage}"] for component in ("Trainer", "Evaluator", "Pusher")]

    def parameters(self) -> list[str]:
        """The pipeline parameters: one per external input, then the serving ones."""
        return [*self.externals, *SERVING_PARAMETERS.values()]


def pipeline_graph(spec: PipelineSpec) -> PipelineGraph:
    """The graph of component runs of a pipeline.

    Args:
        spec: the loaded pipeline (`load_pipeline`).

    Returns:
        The `PipelineGraph`.

    Raises:
        PipelineError: a pipeline parameter name that is not a valid identifier.
    """
    externals = _externals(spec)
    examples = {}
    for external in externals.values():
        for user in external.users:
            examples[user] = (Output(f"ExampleGen.{user}", "examples") if external.kind == "manifest"
                              else external)
    nodes, config = {}, spec.to_json()
    for index, stage in enumerate(spec.stages):
        if stage.source and f"ExampleGen.{stage.source}" not in nodes:
            nodes[f"ExampleGen.{stage.source}"] = Node(f"ExampleGen.{stage.source}", "ExampleGen", stage.source, {},
                                                       dict(spec.sources[stage.source]))
        previous = spec.stages[index - 1].name if index else None
        trainer, evaluator = f"Trainer.{stage.name}", f"Evaluator.{stage.name}"
        data = examples[stage.source or stage.name]
        nodes[trainer] = Node(trainer, "Trainer", stage.name, {
            "examples": data, **({"base_model": Output(f"Trainer.{previous}", "model")} if previous else {})},
            {"pipeline": config, "stage": stage.name})
        single_task = (stage.training.bless or {}).get("min_vs_baseline") is not None
        nodes[evaluator] = Node(evaluator, "Evaluator", stage.name, {
            "model": Output(trainer, "model"),
            **({"baseline": Output(f"Evaluator.{previous}", "evaluation")} if previous else {}),
            **({"single_task": SingleTaskBaseline(stage.name)} if single_task else {})}, {"split": "test"})
        nodes[f"Pusher.{stage.name}"] = Node(
            f"Pusher.{stage.name}", "Pusher", stage.name,
            {"model": Output(trainer, "model"), "blessing": Output(evaluator, "blessing")}, {},
            runtime=dict(SERVING_PARAMETERS), condition=Output(evaluator, "blessing"))
    return PipelineGraph(spec.name, nodes, externals)


def _externals(spec):
    """`{pipeline parameter: External}` of what the pipeline reads from outside: a manifest
    per `sources` entry used (user: the source), an ingested folder per distinct stage
    `data` (users: the stages sharing it; named after the first)."""
    found, folders = {}, {}
    for stage in spec.stages:
        if stage.source:
            found.setdefault(f"{stage.source}_manifest", ("manifest", spec.sources[stage.source]["manifest"],
                                                          [stage.source]))
        elif str(stage.data) in folders:
            found[folders[str(stage.data)]][2].append(stage.name)
        else:
            folders[str(stage.data)] = f"{stage.name}_examples"
            found[f"{stage.name}_examples"] = ("examples", str(stage.data), [stage.name])
    try:  # KFP parameters are Python identifiers: `seg-2_examples` becomes `seg_2_examples`
        parameters = engine_names(list(found) + list(SERVING_PARAMETERS.values()), "identifier", "parameter")
    except InvalidNameError as error:
        raise PipelineError(f"{spec.path}: {error}") from error
    return {parameters[name]: External(kind, uri, parameters[name], tuple(users))
            for name, (kind, uri, users) in found.items()}
