"""A pipeline YAML -> a KFP v2 pipeline: the translation of the graph `LocalRunner` walks
(`unicon_tf.components.graph`).

For every stage, in order:

    ImportManifest.<source> -> ExampleGen.<source>   (once per `sources` entry a stage uses)
    ImportExamples.<stage>                            (once per ingested folder, for other stages)
    Trainer.<stage>    <- Examples, Model of the previous stage
    Evaluator.<stage>  <- Model, Evaluation of the previous stage
    Pusher.<stage>     <- Model, Blessing; only if the Evaluator's `blessed` (its output
                       parameter `Output`) is true

Each KFP task's display name is the run id that `lineage.json` uses. The task runs the
component's executor (`unicon_tf.kubeflow.tasks`) in the pipeline's image; artifacts are
typed (`unicon_tf.kubeflow.artifacts`); data from outside the pipeline comes in through
`dsl.importer`s whose URIs are pipeline parameters, as are the serving base and the
served model's name. A stage's `resources` (cpu, memory, gpu, accelerator) set its
Trainer's and Evaluator's limits.

Example:
>>> compile_pipeline("pipelines/chest_ct.yaml", "chest_ct.yaml",
...                  image="europe-docker.pkg.dev/p/r/unicon-tf:0.1.0")  # doctest: +SKIP
>>> print(format_task_graph(load_spec("chest_ct.yaml")))  # doctest: +SKIP
"""

import dataclasses
import inspect
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from kfp import compiler, dsl

from unicon_tf.components import COMPONENTS
from unicon_tf.components.graph import SERVING_PARAMETERS, Output, SingleTaskBaseline, pipeline_graph
from unicon_tf.kubeflow import artifacts
from unicon_tf.kubeflow.tasks import TASKS
from unicon_tf.names import engine_name
from unicon_tf.train.pipeline import PipelineError, PipelineSpec, load_pipeline
from unicon_tf.version import __version__

DEFAULT_IMAGE = f"unicon-tf:{__version__}"
"""The image `docker build -t unicon-tf:<version> .` makes from the repository's Dockerfile."""
DEFAULT_ACCELERATOR = "nvidia.com/gpu"
RESOURCED = ("Trainer", "Evaluator")
"""The components whose tasks get a stage's `resources`."""


def build_pipeline(pipeline: PipelineSpec | pathlib.Path | str, image: str = DEFAULT_IMAGE, base: str = "/models",
                   model_name: str | None = None, data_root: str | None = None) -> Callable[..., Any]:
    """The KFP pipeline (a `dsl.pipeline` graph component) of a unicon pipeline.

    Args:
        pipeline: a `PipelineSpec` or the path of a pipeline YAML.
        image: the container image every task runs in (the repository's Dockerfile).
        base: default of the `serving_base` parameter: where the Pusher writes SavedModel
            versions, as the tasks see it (a mounted volume, or `/gcs/<bucket>/...` on
            Vertex AI).
        model_name: default of the `model_name` parameter (default: the pipeline's name).
        data_root: what relative data paths resolve against: a folder, or a URI
            (`gs://bucket/data`, `s3://...`, `minio://...`) [default: the pipeline file's
            folder].

    Returns:
        The pipeline function; `kfp.compiler.Compiler().compile` writes it, and under
        `kfp.local.init(...)` calling it runs it.

    Raises:
        PipelineError: an invalid pipeline file, or resources KFP does not accept.
    """
    spec = pipeline if isinstance(pipeline, PipelineSpec) else _load(pipeline, data_root)
    graph = pipeline_graph(spec)
    tasks = {name: dsl.component(function, base_image=image, install_kfp_package=False)
             for name, function in TASKS.items()}
    parameters = {name: external.uri for name, external in graph.externals.items()}
    parameters.update({SERVING_PARAMETERS["base"]: str(base), SERVING_PARAMETERS["model_name"]: model_name or spec.name})
    config = json.dumps(spec.to_json(), default=str)

    def dag(*channels):
        arguments = dict(zip(parameters, channels))
        channels = {}  # a graph source (`Output` or `External`) -> the KFP channel that carries it
        for name, external in graph.externals.items():
            if external.kind == "manifest":
                manifest = dsl.importer(artifact_uri=arguments[name], artifact_class=dsl.Dataset, reimport=False)
                manifest.set_display_name(f"ImportManifest.{external.users[0]}")
                node = graph.nodes[f"ExampleGen.{external.users[0]}"]
                source = {k: v for k, v in node.parameters.items() if k != "manifest"}
                task = tasks["ExampleGen"](run_id=node.run_id, source=source,
                                           manifest=manifest.output).set_display_name(node.run_id)
                channels[Output(node.run_id, "examples")] = task.output
            else:
                task = dsl.importer(artifact_uri=arguments[name], artifact_class=artifacts.KFP_TYPES["Examples"],
                                    reimport=False, metadata={"type": "Examples"})
                channels[external] = task.set_display_name(f"ImportExamples.{external.users[0]}").output
        for node in (n for n in graph.nodes.values() if n.component != "ExampleGen"):
            inputs = {name: channels[source] for name, source in node.inputs.items()
                      if not isinstance(source, SingleTaskBaseline)}  # KFP trains no single-task baseline
            kfp_parameters = {**node.parameters, **{k: arguments[v] for k, v in node.runtime.items()}}
            if node.component == "Trainer":  # KFP constants hold no nulls: the spec travels as JSON text
                kfp_parameters["pipeline"] = config
            if node.condition is None:
                task = tasks[node.component](run_id=node.run_id, **kfp_parameters, **inputs)
            else:  # the Evaluator's `blessed` is its output parameter `Output`
                blessed = channels[Output(node.condition.run_id, "Output")]
                with dsl.If(blessed == True, name=f"blessed.{node.stage}"):  # noqa: E712 (a KFP condition)
                    task = tasks[node.component](run_id=node.run_id, **kfp_parameters, **inputs)
            task.set_display_name(node.run_id)
            if node.component in RESOURCED:
                _set_resources(task, spec.stage(node.stage)[1], spec)
            channels.update({Output(node.run_id, name): channel for name, channel in task.outputs.items()})

    dag.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value, annotation=str)
        for name, value in parameters.items()])
    dag.__name__ = spec.name
    return dsl.pipeline(name=_kfp_name(spec.name), description=f"unicon-tf pipeline {spec.name} ({spec.path.name}): "
                        + " -> ".join(s.name for s in spec.stages))(dag)


def compile_pipeline(pipeline: PipelineSpec | pathlib.Path | str, output: pathlib.Path | str,
                     **options: Any) -> pathlib.Path:
    """Compile `pipeline` (see `build_pipeline` for `options`) to `output` (.yaml or .json).

    The file is written beside its target and renamed: an existing one is never left
    half-written.

    Returns:
        The output path.

    Raises:
        PipelineError: as `build_pipeline`; ValueError: an output that is not .yaml/.yml/.json.
    """
    output = pathlib.Path(output)
    if output.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"{output}: the output must end in .yaml, .yml or .json.")
    function = build_pipeline(pipeline, **options)
    partial = output.with_name(f".{output.stem}.partial{output.suffix}")
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(function, package_path=str(partial))
    os.replace(partial, output)
    return output


def load_spec(path: pathlib.Path | str) -> dict[str, Any]:
    """A compiled pipeline file (YAML or JSON; YAML parses both) as a dict."""
    return yaml.safe_load(pathlib.Path(path).read_text())


def _load(path, data_root):
    """`load_pipeline` with relative data paths joined onto a folder or a URI root."""
    root = str(data_root) if data_root is not None else None
    if root is None or "://" not in root:
        return load_pipeline(path, data_root=pathlib.Path(root or pathlib.Path(path).parent).resolve())
    spec = load_pipeline(path, data_root=pathlib.Path("."))
    join = lambda p: str(p) if pathlib.Path(p).is_absolute() else f"{root.rstrip('/')}/{p}"  # noqa: E731
    sources = {n: {**s, "manifest": join(s["manifest"])} for n, s in spec.sources.items()}
    stages = [s if s.source else dataclasses.replace(s, data=join(s.data)) for s in spec.stages]
    return dataclasses.replace(spec, stages=stages, sources=sources)


def _set_resources(task, stage, spec):
    """Set a stage's `resources` on one of its tasks, with KFP's own checks of the values."""
    resources = stage.resources
    try:
        if "cpu" in resources:
            task.set_cpu_limit(str(resources["cpu"]))
        if "memory" in resources:
            task.set_memory_limit(str(resources["memory"]))
        if resources.get("gpu"):
            task.set_accelerator_type(resources.get("accelerator", DEFAULT_ACCELERATOR))
            task.set_accelerator_limit(int(resources["gpu"]))
    except ValueError as error:
        raise PipelineError(f"{spec.path}: stage '{stage.name}': resources: {error}") from error
    return task


def _kfp_name(name):
    """A pipeline name KFP accepts (lower case, digits and dashes)."""
    return engine_name(name, "kfp_pipeline")


def format_task_graph(spec: Mapping[str, Any]) -> str:
    """A compiled pipeline's task graph as text, read from its IR (what KFP will run).

    Each task by display name, stage by stage: its resources, the condition it runs
    under, the artifacts it takes (`name <- producer.output (type)`) and makes.

    Args:
        spec: the compiled pipeline as a dict (`load_spec`).

    Returns:
        The text, one line per task, input and output.
    """
    tasks = {}  # task key -> (task, component, {channel: resolved input} of its DAG, condition)

    def collect(dag, channels, condition):
        for key, task in dag["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            resolved = {name: _resolve(source, channels) for kind in ("artifacts", "parameters")
                        for name, source in task.get("inputs", {}).get(kind, {}).items()}
            if "dag" in component:  # a dsl.If: its tasks see the resolved channels under its condition
                collect(component["dag"], resolved, (task.get("triggerPolicy", {}).get("condition", ""), resolved))
            else:
                tasks[key] = (task, component, resolved, condition)

    collect(spec["root"]["dag"], {}, ("", {}))
    consumed = {value[0] for _, _, resolved, _ in tasks.values() for value in resolved.values()
                if isinstance(value, tuple)}
    parameters = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    lines = [f"pipeline {spec['pipelineInfo']['name']}: {len(tasks)} tasks", "parameters: " + ", ".join(
        f"{name} = {p.get('defaultValue', '')}" for name, p in parameters.items())]
    done = set()

    def emit(key):
        if key in done:
            return
        done.add(key)
        task, component, resolved, condition = tasks[key]
        for value in resolved.values():
            if isinstance(value, tuple):
                emit(value[0])
        executor = spec["deploymentSpec"]["executors"][component["executorLabel"]]
        head = task["taskInfo"]["name"]
        if "importer" in executor:
            uri = resolved.get("uri")
            head += f"  importer of {uri if isinstance(uri, str) else executor['importer']['artifactUri']}"
        limits = _format_resources(executor.get("container", {}).get("resources", {}))
        test, channels = condition
        for name, value in channels.items():
            test = test.replace(f"inputs.parameter_values['{name}']", _describe(value, tasks))
        lines.append(head + (f"  [{limits}]" if limits else "") + (f"  if {test}" if test else ""))
        unicon = COMPONENTS.get(head.split(".")[0])  # the component's spec names the unicon types
        types = ({**unicon.SPEC.inputs, **unicon.SPEC.outputs, "Output": "blessed"} if unicon else
                 {"artifact": executor.get("importer", {}).get("metadata", {}).get("type", "")})
        inputs = component.get("inputDefinitions", {}).get("artifacts", {})
        for name in inputs:
            if name in resolved:
                lines.append(f"    {name} <- {_describe(resolved[name], tasks)}: "
                             f"{_typed(types.get(name), inputs[name]['artifactType']['schemaTitle'])}")
        outputs = component.get("outputDefinitions", {})
        for name, definition in outputs.get("artifacts", {}).items():
            lines.append(f"    -> {name}: {_typed(types.get(name), definition['artifactType']['schemaTitle'])}")
        for name, definition in outputs.get("parameters", {}).items():
            lines.append(f"    -> {name}: {_typed(types.get(name), definition['parameterType'].lower())}")

    for key in sorted(set(tasks) - consumed, key=_natural) + sorted(tasks, key=_natural):
        emit(key)
    return "\n".join(lines)


def _resolve(source, channels):
    """An input's source: `(producer task key, output)`, a pipeline parameter's name, or a constant."""
    for kind in ("taskOutputArtifact", "taskOutputParameter"):
        if kind in source:
            output = source[kind].get("outputArtifactKey") or source[kind].get("outputParameterKey")
            return source[kind]["producerTask"], output
    for kind in ("componentInputArtifact", "componentInputParameter"):
        if kind in source:
            return channels.get(source[kind], source[kind])
    return source.get("runtimeValue", {}).get("constant")


def _describe(value, tasks):
    if isinstance(value, tuple):
        return f"{tasks[value[0]][0]['taskInfo']['name']}.{value[1]}" if value[0] in tasks else ".".join(value)
    return str(value)


def _typed(unicon_type, kfp_type):
    """`Model (system.Model)`: the unicon type, and what it travels as on KFP."""
    return f"{unicon_type.rstrip('?')} ({kfp_type})" if unicon_type else kfp_type


def _format_resources(resources):
    parts = [f"cpu {resources['resourceCpuLimit']}"] if "resourceCpuLimit" in resources else []
    parts += [f"memory {resources['resourceMemoryLimit']}"] if "resourceMemoryLimit" in resources else []
    accelerator = resources.get("accelerator", {})
    if accelerator:
        parts.append(f"{accelerator.get('resourceCount', accelerator.get('count'))} x "
                     f"{accelerator.get('resourceType', accelerator.get('type'))}")
    return ", ".join(parts)


def _natural(key):
    """`trainer-10` after `trainer-2`; `trainer` (the first) before both."""
    name, _, number = key.rpartition("-")
    return (name, int(number)) if number.isdigit() else (key, 1)
