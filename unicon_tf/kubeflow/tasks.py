"""What each KFP task runs: the same executors as `LocalRunner`, behind a thin adapter.

Each function below is a KFP lightweight Python component (`unicon_tf.kubeflow.compiler`
wraps it with `dsl.component` and the pipeline's image). Its signature is what KFP reads
(the component spec's inputs and outputs as KFP artifacts, its parameters; a test checks
the two agree), and its body hands its arguments to `run_component`, which sorts them by
the component spec into inputs, outputs and parameters, turns the inputs into unicon
`Artifact` records, calls `unicon_tf.components.<component>.execute(inputs, parameters, context)`
with the first output artifact's path as the output folder, and writes the returned
records back as the output artifacts' metadata. There is no second implementation of
any component.

KFP copies each function's source into the task, so a function imports what it uses in
its body. Its annotations are KFP's artifact types (`unicon_tf.kubeflow.artifacts`
says which unicon type each carries).
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from unicon_tf.kubeflow import artifacts

if TYPE_CHECKING:
    from unicon_tf.components.base import Artifact as UniconArtifact


def run_component(component: str, arguments: Mapping[str, Any], verbose: int = 2) -> dict[str, "UniconArtifact"]:
    """Execute `component`'s executor on a task's arguments.

    Args:
        component: a name of `unicon_tf.components.COMPONENTS` (ExampleGen, Trainer, ...).
        arguments: the task function's arguments: `run_id` (`<component>.<stage or
            source>` as in `lineage.json`), the KFP artifacts named as the component spec's
            inputs (None: an optional input not given) and outputs, and the executor's
            parameters (everything else). The first output's path is the executor's
            output folder.
        verbose: Keras verbosity in the task's log (2: one line per epoch).

    Returns:
        `{output name: unicon Artifact}`, as the executor returned them.

    Raises:
        ValueError: an input is not a unicon artifact, or an executor's check fails; what
            the executor raises (StageError, DataError, ExportError...).
    """
    from unicon_tf.components import COMPONENTS

    module = COMPONENTS[component]
    spec = module.SPEC
    records = {name: artifacts.to_record(arguments[name]) for name in spec.inputs if arguments.get(name) is not None}
    parameters = {k: v for k, v in arguments.items() if k != "run_id" and k not in {**spec.inputs, **spec.outputs}}
    spec.check(records, parameters)
    outputs = {name: arguments[name] for name in spec.outputs}
    context = {"id": arguments["run_id"], "output_dir": outputs[next(iter(outputs))].path, "verbose": verbose}
    results = module.execute(records, parameters, context)
    for name, artifact in outputs.items():
        artifacts.write_record(results[name], artifact)
    return results


def example_gen(run_id: str, source: dict, manifest: Input[Dataset], examples: Output[Dataset]):
    """ExampleGen: the NIfTI manifest artifact and its `sources` entry -> Examples."""
    from unicon_tf.kubeflow.tasks import run_component

    run_component("ExampleGen", {"run_id": run_id, **source, "manifest": manifest.path, "examples": examples})


def trainer(run_id: str, pipeline: str, stage: str, examples: Input[Dataset],
            model: Output[Model], base_model: Input[Model] = None):
    """Trainer: Examples and the previous stage's Model (none for stage 0) -> Model.
    `pipeline` is `PipelineSpec.to_json()` as JSON text (KFP constants hold no nulls)."""
    arguments = dict(locals())
    import json

    from unicon_tf.kubeflow.tasks import run_component

    run_component("Trainer", {**arguments, "pipeline": json.loads(pipeline)})


def evaluator(run_id: str, split: str, model: Input[Model], evaluation: Output[Metrics],
              blessing: Output[Artifact], baseline: Input[Metrics] = None) -> bool:
    """Evaluator: Model (and the previous stage's Evaluation) -> Evaluation, Blessing; returns
    `blessed`, the output parameter (`Output`) that the Pusher's condition reads. (A single
    return rather than a named output: kfp.local 2.17 evaluates conditions only on those.)"""
    arguments = dict(locals())
    from unicon_tf.kubeflow.tasks import run_component

    return bool(run_component("Evaluator", arguments)["blessing"].properties["blessed"])


def pusher(run_id: str, base: str, model_name: str, model: Input[Model],
           blessing: Input[Artifact], pushed_model: Output[Artifact]):
    """Pusher: a blessed Model -> a SavedModel version under `base` (a PushedModel)."""
    arguments = dict(locals())
    from unicon_tf.kubeflow.tasks import run_component

    run_component("Pusher", {**arguments, "model_name": model_name or None})


TASKS = {"ExampleGen": example_gen, "Trainer": trainer, "Evaluator": evaluator, "Pusher": pusher}
"""component name -> the function its KFP task runs."""
